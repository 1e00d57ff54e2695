"""Measuring one row: its serving processes' CPU read from /proc, and a Sample per round."""
from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field
from typing import Callable

from bench import loadgen
from apps.launch.stack import Proc

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def group_cpu_s(pgid: int) -> tuple[float, float]:
    """CPU seconds (user, system) used so far by the live processes of a process group."""
    user = system = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                # Fields after the command name, which may hold spaces: state is [0].
                fields = stat.read().rpartition(")")[2].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[2]) == pgid:  # pgrp
            user, system = user + int(fields[11]), system + int(fields[12])  # utime, stime
    return user / CLOCK_TICKS, system / CLOCK_TICKS


def cpu_of(pgids: list[int]) -> tuple[float, float]:
    """CPU seconds (user, system) of several process groups together."""
    pairs = [group_cpu_s(pgid) for pgid in pgids]
    return sum(u for u, _ in pairs), sum(s for _, s in pairs)


@dataclass
class Sample:
    """One row's figures in one round."""

    rps: float
    p50_ms: float
    p99_ms: float
    p50_c1_ms: float
    cpu_ms_per_req: float
    sys_share: float  # of that CPU, the part spent in the kernel
    redis_ms_per_req: float | None
    requests: int
    errors: int
    non_2xx: int


@dataclass
class Row:
    """One server under test: where to send load, whose CPU to count, what it measured."""

    name: str
    url: str
    procs: list[Proc]
    uses_redis: bool = False
    samples: list[Sample] = field(default_factory=list)

    def median(self, attr: str) -> float | None:
        values = [getattr(s, attr) for s in self.samples if getattr(s, attr) is not None]
        return statistics.median(values) if values else None


def drive(client: str) -> Callable[[str, int, float], loadgen.LoadResult]:
    """The load function for a client: (url, connections, seconds) -> LoadResult."""
    if client == "wrk":
        return lambda url, c, d: loadgen.run_wrk(url, c, d)
    return lambda url, c, d: loadgen.run(url, c, d, warmup_s=0)


def measure(row: Row, load: Callable, connections: int, duration: float, c1_duration: float,
            redis_pgid: int) -> Sample:
    load(row.url, connections, 1.0)  # warm up: connections, pools, caches
    pgids = [p.popen.pid for p in row.procs]
    user_before, sys_before = cpu_of(pgids)
    redis_before = sum(group_cpu_s(redis_pgid))
    result = load(row.url, connections, duration)
    user_after, sys_after = cpu_of(pgids)
    user, system = user_after - user_before, sys_after - sys_before
    redis_cpu = sum(group_cpu_s(redis_pgid)) - redis_before
    single = load(row.url, 1, c1_duration)
    requests = max(result.requests, 1)
    return Sample(rps=result.rps, p50_ms=result.p50_ms, p99_ms=result.p99_ms,
                  p50_c1_ms=single.p50_ms, cpu_ms_per_req=(user + system) * 1000 / requests,
                  sys_share=system / (user + system) if user + system else 0.0,
                  redis_ms_per_req=redis_cpu * 1000 / requests if row.uses_redis else None,
                  requests=result.requests, errors=result.errors + single.errors,
                  non_2xx=result.non_2xx + single.non_2xx)
