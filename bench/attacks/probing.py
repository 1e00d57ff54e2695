"""The victim: a paced client (open loop, e.g. 50 requests/s), each request a PUT of a
small JSON body that must come back unchanged, on a new connection unless
`keepalive`; it records the status and latency of each."""
from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

from bench.attacks.connection import Target
from bench.attacks.holding import until
from bench.loadgen.http1 import read_response, request_bytes
from bench.stats import percentile


@dataclass
class ProbeResult:
    """One probe request, as the probe saw it."""

    index: int
    sent_at: float            # seconds after the probe started
    status: int | None        # None: no HTTP answer
    ok: bool                  # 200, and its own body came back unchanged
    latency_s: float          # from opening the connection (or writing) to the body read
    error: str | None = None


async def _open(target: Target, source: str | None) -> tuple[asyncio.StreamReader,
                                                              asyncio.StreamWriter]:
    local = (source, 0) if source else None
    return await asyncio.open_connection(*target, local_addr=local)


async def probe(target: Target, rate: float, duration: float, source: str | None = None, *,
                keepalive: bool = False, timeout: float = 5.0,
                stop: asyncio.Event | None = None,
                results: list[ProbeResult] | None = None) -> list[ProbeResult]:
    """Send `rate` requests a second for `duration` s (or until `stop`); each ends as a
    ProbeResult in `results`, in the order they finish."""
    loop = asyncio.get_running_loop()
    results = results if results is not None else []
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    host, port = target
    headers = {"Content-Type": "application/json"}
    if not keepalive:
        headers["Connection"] = "close"

    async def one(index: int, sent_at: float) -> None:
        body = json.dumps({"probe": index}).encode()
        started = time.perf_counter()
        status, ok, error, conn = None, False, None, None
        try:
            async with asyncio.timeout(timeout):
                conn = idle.pop() if idle else await _open(target, source)
                conn[1].write(request_bytes("PUT", host, port, f"/probe/{index}", body,
                                            headers))
                status, keep, answer = await read_response(conn[0])
            ok = status == 200 and answer == body
            if keepalive and keep:
                idle.append(conn)
                conn = None
        except Exception as exc:  # any failure is a lost request: say which
            error = repr(exc) if str(exc) else type(exc).__name__
        finally:
            if conn is not None:
                conn[1].transport.abort()
        results.append(ProbeResult(index, round(sent_at, 3), status, ok,
                                   time.perf_counter() - started, error))

    ends = until(duration, stop)
    began, tasks = loop.time(), []
    for index in itertools.count():
        due = began + index / rate
        if due >= began + duration:
            break
        try:  # open loop: each request leaves on time, whatever the earlier ones do
            await asyncio.wait_for(ends.wait(), max(0.0, due - loop.time()))
            break
        except asyncio.TimeoutError:
            pass
        tasks.append(asyncio.ensure_future(one(index, loop.time() - began)))
    await asyncio.gather(*tasks)
    for _, writer in idle:
        writer.transport.abort()
    return results


def summary(results: Sequence[ProbeResult]) -> dict[str, Any]:
    """Sent, ok, lost, statuses and latency percentiles (ms) of a probe run."""
    latencies = sorted(r.latency_s * 1000 for r in results)
    ok = sum(r.ok for r in results)
    pick = (lambda q: round(percentile(latencies, q), 2)) if latencies else (lambda q: None)
    errors = Counter(r.error.split("(")[0] for r in results if r.error)
    return {"sent": len(results), "ok": ok, "lost": len(results) - ok,
            "success_rate": ok / len(results) if results else None,
            "p50_ms": pick(50), "p99_ms": pick(99), "max_ms": pick(100),
            "statuses": dict(Counter(str(r.status) for r in results)),
            "errors": dict(errors)}
