"""HTTP load generators for bench/overhead/: our own (`run`), and wrk (`run_wrk`).

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

The parts: generator.py (our own), wrk.py, result.py (LoadResult and the
latency histogram), http1.py (a request's bytes, a response read whole: also
what the attackers of bench/attacks/ speak).
"""
from __future__ import annotations

from bench.loadgen.generator import run
from bench.loadgen.http1 import read_response, request_bytes
from bench.loadgen.result import LoadResult
from bench.loadgen.wrk import have_wrk, parse_wrk, run_wrk

__all__ = ["LoadResult", "have_wrk", "parse_wrk", "read_response", "request_bytes", "run",
           "run_wrk"]
