"""HTTP load generators for bench/overhead.py: our own (`run`), and wrk (`run_wrk`).

`run` is for machines without wrk. Several processes (one GIL each) run an
asyncio loop apiece, and each of their connections is a keep-alive HTTP/1.1
client with one request in flight at a time (no pipelining), so the offered
load is closed-loop like wrk's. On 2 cores it drives far more than the balancer
can serve, so the balancer, not the generator, is what limits the rate.

Definitions, the same for both generators:
    requests    responses (any status) completed inside the measured window
    rps         requests / duration_s, the window's length
    errors      connection failures, broken responses and timeouts in the window
    p50/90/99   latency from writing the request to reading the body in full

Clocks: the processes agree on the window's start through a wall-clock time
set by the parent once all of them are connected; each process then converts
it to its own `time.perf_counter`, and counts a request when it completes
inside [start, start + duration_s]. Requests completing during the warm-up
are not counted, nor is one still in flight when the window closes.
"""
from __future__ import annotations

import asyncio
import math
import multiprocessing
import os
import queue as queue_module
import re
import resource
import shutil
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from typing import Mapping
from urllib.parse import urlsplit

# Latency histogram: log-spaced buckets 1% wide (100 per factor e), 1 us to 100 s.
# Percentiles from it are within 0.5% of the exact ones, and a process returns
# ~1,850 counts instead of one float per request.
_PER_E = 100
_MIN_US = 1.0
_BUCKETS = int(math.log(100e6 / _MIN_US) * _PER_E) + 1


@dataclass
class LoadResult:
    """What one load run measured (see the module docstring for the definitions)."""

    requests: int
    errors: int
    non_2xx: int          # wrk counts only 4xx and 5xx here ("Non-2xx or 3xx responses")
    duration_s: float
    p50_ms: float         # nan when there were no requests
    p90_ms: float
    p99_ms: float
    generator: str        # "loadgen" or "wrk"
    cpu_s: float | None = None   # CPU of the generator's processes (loadgen: the window only)
    connections: int = 0
    statuses: dict[str, int] = field(default_factory=dict)   # "2xx": n, ... (loadgen only)
    started_at: float | None = None   # time.time() when the window opened (loadgen only)

    @property
    def rps(self) -> float:
        """Completed requests per second of the measured window."""
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0


# ---------------------------------------------------------------- our generator

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


class _Closed(Exception):
    """The server closed a kept-alive connection before answering (an idle close)."""


class _Stats:
    def __init__(self) -> None:
        self.requests = self.errors = 0
        self.classes = [0] * 6          # by status // 100
        self.hist = [0] * _BUCKETS
        self.cpu_s = 0.0


async def read_response(reader: asyncio.StreamReader,
                        head_only: bool = False) -> tuple[int, bool, bytes]:
    """Read one whole response; return its status, whether the connection stays open,
    and its body."""
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise _Closed from None
            raise
        status = int(head[9:12])
        if status >= 200 or status == 101:
            break        # 1xx other than 101 are interim: the real answer follows
    lower, http10 = head.lower(), head.startswith(b"HTTP/1.0")
    at = lower.find(b"\r\nconnection:")
    if at >= 0:
        value = lower[at:lower.index(b"\r\n", at + 2)]
        keep = b"close" not in value and (b"keep-alive" in value or not http10)
    else:
        keep = not http10
    if head_only or status in (204, 304):
        return status, keep, b""
    at = lower.find(b"\r\ncontent-length:")
    body = b""
    if at >= 0:
        length = int(lower[at + 17:lower.index(b"\r\n", at + 17)])
        if length:
            body = await reader.readexactly(length)
    elif b"chunked" in lower and b"\r\ntransfer-encoding:" in lower:
        chunks = []
        while size := int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16):
            chunks.append((await reader.readexactly(size + 2))[:-2])   # the chunk, no CRLF
        while await reader.readuntil(b"\r\n") != b"\r\n":
            pass                                    # trailers
        body = b"".join(chunks)
    else:
        body = await reader.read()                  # delimited by the close
        keep = False
    return status, keep, body


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
        request, head_only, last = self.plan.request, self.plan.head_only, _BUCKETS - 1
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
            except (OSError, EOFError, ValueError, asyncio.LimitOverrunError, _Closed) as exc:
                # An idle kept-alive connection closed by the server is no error: reconnect.
                failed = self.timed_out or fresh or not isinstance(exc, _Closed)
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
                bucket = int(log((done - sent) * 1e6 / _MIN_US) * _PER_E) if done > sent else 0
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


def _percentile_ms(hist: list[int], total: int, q: float) -> float:
    """Nearest-rank percentile from the merged histogram (bucket's geometric middle)."""
    if total == 0:
        return math.nan
    rank, seen = max(1, math.ceil(q * total)), 0
    for bucket, count in enumerate(hist):
        seen += count
        if seen >= rank:
            return _MIN_US * math.exp((bucket + 0.5) / _PER_E) / 1000
    return math.nan


def request_bytes(method: str, host: str, port: int, target: str, body: bytes,
                  headers: Mapping[str, str] | None = None) -> bytes:
    """One HTTP/1.1 request, ready to write: a Content-Length when there is a body."""
    head = f"{method} {target} HTTP/1.1\r\nHost: {host}:{port}\r\n"
    if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
        head += f"Content-Length: {len(body)}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    return head.encode("latin-1") + b"\r\n" + body


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
    hist, classes = [0] * _BUCKETS, [0] * 6
    requests = errors = 0
    cpu_s = 0.0
    for count, errs, child_classes, child_hist, cpu in done:
        requests, errors, cpu_s = requests + count, errors + errs, cpu_s + cpu
        classes = [a + b for a, b in zip(classes, child_classes)]
        hist = [a + b for a, b in zip(hist, child_hist)]
    return LoadResult(
        requests=requests, errors=errors, non_2xx=requests - classes[2],
        duration_s=float(duration_s),
        p50_ms=_percentile_ms(hist, requests, 0.50), p90_ms=_percentile_ms(hist, requests, 0.90),
        p99_ms=_percentile_ms(hist, requests, 0.99), generator="loadgen", cpu_s=cpu_s,
        connections=connections, statuses={f"{i}xx": n for i, n in enumerate(classes) if n},
        started_at=start_at.value)


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


# ---------------------------------------------------------------- wrk

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
