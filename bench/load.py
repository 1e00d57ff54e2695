"""Threaded load test: N echo requests from W workers through the balancer.

The design note's benchmark (500 requests from 100 workers), made trustworthy:
every request carries its own `X-Request-ID` (id_offset + i, so a seeded echo
run draws the same faults each time) and a JSON body holding that id, and an
answer counts as a success only when it is 2xx *and* echoes that exact body.
Every request ends as exactly one of: success, or one error kind ("4xx",
"5xx", "timeout", "connection", "bad_body", "other"), so successes + errors
always equals the requests sent.

Definitions used in the report:
    completed   requests that got an HTTP answer, any status ("answered")
    throughput  completed / wall seconds
    latency     nearest-rank percentiles over all completed requests, measured
                in the worker from just before sending to the body read in full
                (time spent queued in the executor is not included)
    shares      each backend's (`X-Upstream`) share of the *successful* requests

The client is Python: its threads share one GIL, so at high concurrency part of
the latency is the client's own waiting. Compare runs made on the same machine.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from contextlib import nullcontext

import requests
from requests import Session
from requests.adapters import HTTPAdapter
from tqdm import tqdm

from bench.load_result import LoadResult, Outcome
from bench.watch import watching


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the load test's options to `parser`."""
    parser.add_argument("--url", default="http://127.0.0.1:8000",
                        help="target URL, requests go to it as given (default: %(default)s)")
    parser.add_argument("--requests", type=_positive_int, default=500,
                        help="requests to send (default: %(default)s)")
    parser.add_argument("--workers", type=_positive_int, default=100,
                        help="concurrent worker threads, one session each (default: %(default)s)")
    parser.add_argument("--timeout", type=_positive_float, default=30.0,
                        help="seconds allowed to connect and between bytes of the answer "
                             "(default: %(default)s)")
    parser.add_argument("--payload", type=_non_negative_int, default=64,
                        help="size of each JSON body in bytes; never less than the smallest "
                             "body holding the id (default: %(default)s)")
    parser.add_argument("--id-offset", type=_non_negative_int, default=0,
                        help="X-Request-ID of the first request (default: %(default)s)")
    parser.add_argument("--method", default="POST", type=str.upper,
                        help="HTTP method (default: %(default)s)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document instead of the text report")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar on stderr")
    parser.add_argument("--admin", default=None, metavar="URL",
                        help="the balancer's admin listener (e.g. http://127.0.0.1:8001): poll "
                             "its /status while the load runs and report any block and any "
                             "backend whose share fell below 1")


def make_body(request_id: int, payload: int) -> bytes:
    """A compact JSON object holding the id, padded to `payload` bytes when that fits."""
    bare = json.dumps({"id": request_id, "pad": ""}, separators=(",", ":"))
    padding = "x" * max(0, payload - len(bare))
    return json.dumps({"id": request_id, "pad": padding}, separators=(",", ":")).encode()


def classify(status: int, body_matches: bool) -> str:
    """The kind of an answered request."""
    if 200 <= status < 300:
        return "success" if body_matches else "bad_body"
    if 400 <= status < 500:
        return "4xx"
    if 500 <= status < 600:
        return "5xx"
    return "other"  # 1xx/3xx: redirects are not followed, so they are not the echo's answer


def classify_exception(exc: BaseException) -> str:
    # ConnectTimeout is both a Timeout and a ConnectionError: a timeout is the truer name.
    if isinstance(exc, requests.Timeout):
        return "timeout"
    if isinstance(exc, requests.ConnectionError):
        return "connection"
    return "other"


def _new_session(pool_maxsize: int = 1) -> Session:
    session = Session()
    # The target is the URL given: no proxies or .netrc from the environment.
    session.trust_env = False
    # No retries: a retried request would hide a failure and skew its latency.
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_maxsize, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _send(session: Session, method: str, url: str, request_id: int,
          payload: int, timeout: float) -> Outcome:
    body = make_body(request_id, payload)
    headers = {"Content-Type": "application/json", "X-Request-ID": str(request_id)}
    started = time.perf_counter()
    try:
        # stream=False: the clock stops once the whole body has arrived.
        response = session.request(method, url, data=body, headers=headers,
                                   timeout=timeout, allow_redirects=False)
    except Exception as exc:  # noqa: BLE001 - every request must end as exactly one kind
        return Outcome(classify_exception(exc), None, None, detail=f"{type(exc).__name__}: {exc}")
    latency = time.perf_counter() - started
    kind = classify(response.status_code, response.content == body)
    detail = None
    if kind != "success":
        detail = f"HTTP {response.status_code}: {response.content[:120]!r}"
    return Outcome(kind, response.status_code, latency, response.headers.get("X-Upstream"),
                   detail=detail)


def measure(url: str, requests: int, workers: int, timeout: float, payload: int,
            id_offset: int, method: str, progress: bool) -> LoadResult:
    """Send `requests` requests from `workers` threads and aggregate what happened."""
    # (The `requests` parameter hides the library's name here: only `Session` is used.)
    if requests < 1 or workers < 1:
        raise ValueError("requests and workers must be at least 1")
    local = threading.local()
    sessions: list[Session] = []
    sessions_lock = threading.Lock()

    def one(request_id: int) -> Outcome:
        # requests.Session is not thread-safe: one per worker thread, kept for keep-alive.
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = _new_session()
            with sessions_lock:
                sessions.append(session)
        return _send(session, method, url, request_id, payload, timeout)

    outcomes: list[Outcome] = []
    bar = tqdm(total=requests, file=sys.stderr, disable=not progress, unit="req",
               desc=f"{method} {url}")
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="load")
    started = time.perf_counter()
    try:
        futures: list[Future[Outcome]] = [
            executor.submit(one, id_offset + i) for i in range(requests)]
        for future in as_completed(futures):
            outcomes.append(future.result())
            bar.update(1)
        wall = time.perf_counter() - started
    finally:
        # On Ctrl-C, drop what has not started instead of sending it all first.
        executor.shutdown(wait=True, cancel_futures=True)
        bar.close()
        for session in sessions:
            session.close()
    return LoadResult.from_outcomes(outcomes, url=url, workers=workers, id_offset=id_offset,
                                    wall_s=wall, method=method, payload=payload)


def run(args: argparse.Namespace) -> int:
    """Run the load test; 0 when it ran (errors or not), 2 when nothing answered."""
    with watching(args.admin) if args.admin else nullcontext() as watch:
        result = measure(args.url, args.requests, args.workers, args.timeout, args.payload,
                         args.id_offset, args.method, progress=not args.no_progress)
    if args.json:
        print(json.dumps({**result.to_dict(), **({"pool": watch.to_dict()} if watch else {})},
                         indent=2))
    else:
        print(result.report())
        if watch:
            print(watch.report())
    if result.completed == 0:
        print(f"load: no request to {args.url} got an answer", file=sys.stderr)
        return 2
    return 0
