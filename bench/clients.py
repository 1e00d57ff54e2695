"""Compare upstream clients: CPU per request of requests.Session and urllib3, one thread.

Starts one echo instance (SEED=0) under Gunicorn on a free port, sends the same
small JSON POST through each client, and prints wall time and this process's
CPU time per request. The proxy forwards with whichever costs less CPU.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests
import urllib3

ROOT = Path(__file__).resolve().parent.parent
BODY = b'{"hello": "world", "n": 12345}'
HEADERS = {"Content-Type": "application/json"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=3000, help="requests per client")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; best is kept")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_open(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port}")


def _measure(send, n: int) -> tuple[float, float]:
    """Wall and CPU microseconds per request for `n` calls of `send`."""
    send()  # warm the connection
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        send()
    return ((time.perf_counter() - wall) / n * 1e6, (time.process_time() - cpu) / n * 1e6)


def run(args: argparse.Namespace) -> int:
    port = _free_port()
    url = f"http://127.0.0.1:{port}/bench"
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "gunicorn"), "-c", "apps/echo/gunicorn_conf.py",
         "-b", f"127.0.0.1:{port}", "-w", "1", "--threads", "4", "--log-level", "warning",
         "apps.echo.app:create_app()"],
        cwd=ROOT, env={**os.environ, "SEED": "0"}, stdout=subprocess.DEVNULL)
    try:
        _wait_open(port)
        session = requests.Session()
        pool = urllib3.HTTPConnectionPool("127.0.0.1", port, maxsize=1, retries=False)

        def via_requests() -> None:
            assert session.post(url, data=BODY, headers=HEADERS, timeout=5).content == BODY

        def via_urllib3() -> None:
            assert pool.urlopen("POST", "/bench", body=BODY, headers=HEADERS,
                                timeout=5).data == BODY

        best: dict[str, tuple[float, float]] = {}
        for _ in range(args.rounds):
            for name, send in (("requests.Session", via_requests), ("urllib3 pool", via_urllib3)):
                wall, cpu = _measure(send, args.requests)
                if name not in best or cpu < best[name][1]:
                    best[name] = (wall, cpu)
        print(f"{args.requests} sequential POSTs per client, best of {args.rounds} rounds, "
              f"{os.cpu_count()} CPUs")
        print(f"{'client':<18}{'wall us/req':>12}{'client CPU us/req':>20}")
        for name, (wall, cpu) in best.items():
            print(f"{name:<18}{wall:>12.0f}{cpu:>20.0f}")
        ratio = best["requests.Session"][1] / best["urllib3 pool"][1]
        print(f"requests costs {ratio:.2f}x the client CPU of urllib3")
    finally:
        server.terminate()
        server.wait(10)
    return 0
