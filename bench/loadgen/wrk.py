"""wrk as the load generator: run `wrk --latency` and read its report into a LoadResult."""
from __future__ import annotations

import math
import re
import resource
import shutil
import subprocess

from bench.loadgen.result import LoadResult


def have_wrk() -> bool:
    """Is wrk on PATH?"""
    return shutil.which("wrk") is not None


_TIME_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}   # to milliseconds


def parse_wrk(text: str, connections: int = 0) -> LoadResult:
    """Read `wrk --latency` output into a LoadResult (generator="wrk")."""
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h),", text)
    distribution = text.partition("Latency Distribution")[2]
    if total is None or not distribution:
        raise ValueError(f"not the output of wrk --latency:\n{text}")
    percentiles = {int(p): float(value) * _TIME_UNITS[unit] for p, value, unit in
                   re.findall(r"^\s*(\d+)%\s+([\d.]+)(us|ms|s|m|h)\s*$", distribution, re.M)}
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                        text)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return LoadResult(
        requests=int(total[1]), errors=sum(map(int, sockets.groups())) if sockets else 0,
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
        duration_s=float(total[2]) * _TIME_UNITS[total[3]] / 1000,
        p50_ms=percentiles.get(50, math.nan), p90_ms=percentiles.get(90, math.nan),
        p99_ms=percentiles.get(99, math.nan), generator="wrk", connections=connections)


def run_wrk(url: str, connections: int, duration_s: float,
            threads: int | None = None) -> LoadResult:
    """Run `wrk --latency` against `url` and parse its report.

    wrk takes whole seconds, so duration_s is rounded (at least 1); the result's
    duration_s is what wrk reports it ran. cpu_s is wrk's CPU time."""
    threads = threads or min(connections, 2)
    seconds = max(1, round(duration_s))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(["wrk", "--latency", "-t", str(threads), "-c", str(connections),
                           "-d", f"{seconds}s", url],
                          capture_output=True, text=True, timeout=seconds + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    result = parse_wrk(done.stdout, connections)
    result.cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result
