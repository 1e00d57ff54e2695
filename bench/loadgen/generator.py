"""Our own load generator (`run`): processes of asyncio keep-alive connections, each with
one request in flight at a time; see bench/loadgen/__init__.py for what it counts."""
from __future__ import annotations

import asyncio
import math
import multiprocessing
import os
import queue as queue_module
import time
import traceback
from dataclasses import dataclass
from urllib.parse import urlsplit

from bench.loadgen.http1 import Closed, read_response, request_bytes
from bench.loadgen.result import BUCKETS, MIN_US, PER_E, LoadResult, merged


@dataclass
class _Plan:
    """One process's share of the work (pickled to it)."""

    host: str
    port: int
    request: bytes
    head_only: bool
    connections: int
    duration_s: float
    timeout_s: float


class _Stats:
    def __init__(self) -> None:
        self.requests = self.errors = 0
        self.classes = [0] * 6          # by status // 100
        self.hist = [0] * BUCKETS
        self.cpu_s = 0.0


class _Connection:
    def __init__(self, plan: _Plan) -> None:
        self.plan = plan
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.sent_at = 0.0          # perf_counter of the request in flight, 0 when idle
        self.timed_out = False

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.plan.host, self.plan.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()
            self.reader = self.writer = None

    async def drive(self, start: float, end: float, stats: _Stats) -> None:
        """Send requests one after another until `end`, counting those completed in the window."""
        perf, log, hist, classes = time.perf_counter, math.log, stats.hist, stats.classes
        request, head_only, last = self.plan.request, self.plan.head_only, BUCKETS - 1
        fresh = False
        while (now := perf()) < end:
            if self.writer is None:
                try:
                    await self.connect()
                    fresh = True
                except OSError:
                    if now >= start:
                        stats.errors += 1
                    await asyncio.sleep(0.01)    # don't spin on a refusing server
                    continue
            self.sent_at = sent = perf()
            try:
                self.writer.write(request)
                status, keep, _ = await read_response(self.reader, head_only)
            except (OSError, EOFError, ValueError, asyncio.LimitOverrunError, Closed) as exc:
                # An idle kept-alive connection closed by the server is no error: reconnect.
                failed = self.timed_out or fresh or not isinstance(exc, Closed)
                if failed and start <= perf() <= end:
                    stats.errors += 1
                self.sent_at, self.timed_out = 0.0, False
                self.close()
                continue
            done = perf()
            self.sent_at, fresh = 0.0, False
            if start <= done <= end:
                stats.requests += 1
                classes[min(status // 100, 5)] += 1
                bucket = int(log((done - sent) * 1e6 / MIN_US) * PER_E) if done > sent else 0
                hist[0 if bucket < 0 else last if bucket > last else bucket] += 1
            if not keep:
                self.close()


async def _watchdog(connections: list[_Connection], timeout_s: float) -> None:
    """Abort connections whose request is older than timeout_s.

    One sweep every 100 ms costs less than a timer armed and cancelled per request."""
    while True:
        await asyncio.sleep(min(0.1, timeout_s / 4))
        now = time.perf_counter()
        for conn in connections:
            if conn.sent_at and now - conn.sent_at > timeout_s and conn.writer is not None:
                conn.timed_out = True
                conn.writer.transport.abort()    # the pending read then fails; drive() counts it


async def _process_main(plan: _Plan, results, go, start_at) -> _Stats:
    connections = [_Connection(plan) for _ in range(plan.connections)]
    for conn in connections:     # connect before the start, so setup is not measured
        try:
            await conn.connect()
        except OSError:
            pass                 # drive() retries, and counts the failures in the window
    results.put(("ready", os.getpid()))
    go.wait()                    # blocks the loop on purpose: nothing runs until all are ready
    start = time.perf_counter() + (start_at.value - time.time())
    end = start + plan.duration_s
    stats = _Stats()
    tasks = [asyncio.create_task(conn.drive(start, end, stats)) for conn in connections]
    tasks.append(asyncio.create_task(_watchdog(connections, plan.timeout_s)))
    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    cpu = time.process_time()
    await asyncio.sleep(max(0.0, end - time.perf_counter()))
    stats.cpu_s = time.process_time() - cpu
    for task in tasks:           # what is still in flight now would complete after the window
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for conn in connections:
        conn.close()
    return stats


def _process(plan: _Plan, results, go, start_at) -> None:
    try:
        stats = asyncio.run(_process_main(plan, results, go, start_at))
        results.put(("done", (stats.requests, stats.errors, stats.classes, stats.hist,
                              stats.cpu_s)))
    except BaseException:
        results.put(("failed", traceback.format_exc()))


def run(url: str, connections: int, duration_s: float, processes: int | None = None,
        method: str = "GET", body: bytes = b"", warmup_s: float = 0.5,
        timeout_s: float = 2.0) -> LoadResult:
    """Load `url` with `connections` keep-alive connections for `duration_s` measured seconds.

    The connections are shared out among `processes` processes (default: one per
    CPU, never more than the connections). A request unanswered after `timeout_s`
    counts as an error and its connection is replaced."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"loadgen speaks plain http:// only, not {url!r}")
    if connections < 1 or duration_s <= 0:
        raise ValueError("need connections >= 1 and duration_s > 0")
    port = parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    request = request_bytes(method.upper(), parts.hostname, port, target, body)
    processes = max(1, min(processes or os.cpu_count() or 1, connections))
    # "spawn": a fork of a parent that runs threads (pytest, the benchmark) can deadlock.
    ctx = multiprocessing.get_context("spawn")
    results, go, start_at = ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0, lock=False)
    children = []
    for i in range(processes):
        share = connections // processes + (i < connections % processes)
        plan = _Plan(parts.hostname, port, request, method.upper() == "HEAD", share,
                     duration_s, timeout_s)
        children.append(ctx.Process(target=_process, args=(plan, results, go, start_at),
                                    name=f"loadgen-{i}", daemon=True))
    done: list = []
    try:
        for child in children:
            child.start()
        _collect(results, "ready", children, deadline=time.monotonic() + 60)
        start_at.value = time.time() + warmup_s
        go.set()
        done = _collect(results, "done", children,
                        deadline=time.monotonic() + warmup_s + duration_s + timeout_s + 30)
    finally:
        for child in children:      # after a failure, the others are not worth waiting for
            child.join(5 if len(done) == processes else 0)
            if child.is_alive():
                child.kill()
                child.join()
    return merged(done, duration_s, connections, start_at.value)


def _collect(results, kind: str, children: list, deadline: float) -> list:
    """Wait for a message of `kind` from every child; raise if one fails, dies or hangs."""
    got = []
    while len(got) < len(children):
        try:
            message, payload = results.get(timeout=0.2)
        except queue_module.Empty:
            # A child that died before it could report (e.g. spawn could not import
            # the caller's __main__) would otherwise keep us waiting until the deadline.
            dead = [child.name for child in children if child.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"loadgen: {', '.join(dead) or 'a process'} never "
                                   f"reported {kind!r} (see its traceback above)") from None
            continue
        if message == "failed":
            raise RuntimeError(f"loadgen process failed:\n{payload}")
        if message == kind:
            got.append(payload)
    return got
