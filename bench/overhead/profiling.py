"""Where a request's time goes: its parts' CPU one at a time, and the workers' Python
work by layer (py-spy)."""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from bench.overhead.measuring import Row
from bench.overhead.reporting import RESULTS
from apps.launch.stack import ROOT


def cpu_per_call_ms(call: Callable[[], object], calls: int) -> float:
    """CPU milliseconds (user + system, this process) per call of `call`."""
    call()
    started = time.process_time()
    for _ in range(calls):
        call()
    return (time.process_time() - started) * 1000 / calls


def breakdown(backend_urls: list[str], redis_url: str, calls: int = 2000) -> list[tuple[str, float]]:
    """The CPU of a request's parts, one at a time, in this process with one thread:
    the upstream request, each Redis script, and the floor of any socket round trip."""
    import http.client
    import socket

    import urllib3

    from apps.lb.upstream import Upstreams, read_capped
    from scorer.pool import Outcome, Pool
    from apps.config import load_settings

    settings = load_settings(environ={"LB_BACKENDS": ",".join(backend_urls[:3]),
                                      "REDIS_URL": redis_url, "LB_POOL": "breakdown"})
    pool = Pool(settings, degrade=False)
    upstreams = Upstreams(settings, maxsize=1)
    backend = settings.backends[0]
    timeout = urllib3.Timeout(connect=settings.connect_timeout, read=settings.read_timeout)
    headers = {"Host": backend.id, "User-Agent": "bench", "X-Forwarded-For": "127.0.0.1"}

    def upstream() -> None:
        read_capped(upstreams.send(backend, "GET", "/", headers, None, timeout), 65536)

    bare = http.client.HTTPConnection(backend.host, backend.port)

    def bare_request() -> None:
        bare.request("GET", "/", headers=headers)
        bare.getresponse().read()

    with socket.create_connection((backend.host, backend.port)) as sock:
        request = f"GET / HTTP/1.1\r\nHost: {backend.id}\r\n\r\n".encode()

        def round_trip() -> None:
            sock.sendall(request)
            sock.recv(65536)

        floor = cpu_per_call_ms(round_trip, calls)
    parts = [("upstream request and answer (urllib3)", cpu_per_call_ms(upstream, calls)),
             ("  the same on bare http.client, for scale", cpu_per_call_ms(bare_request, calls)),
             ("Redis pick (pick.lua, client side)", cpu_per_call_ms(pool.pick, calls)),
             ("Redis report (report.lua, client side)",
              cpu_per_call_ms(lambda: pool.report(Outcome(backend, 0.001, status=200)), calls)),
             ("floor: one raw socket send + receive", floor)]
    pool.forget()
    bare.close()
    return parts


# Layers of the proxy's stack, by where their code lives; a sample counts for
# the innermost frame that belongs to one (socket calls count for their caller).
LAYERS = (
    ("Redis client (scorer/, redis-py)", ("(redis/", "(scorer/")),
    ("upstream HTTP (urllib3, http.client)", ("(urllib3/", "(http/client.py", "(email/",
                                               "(apps/lb/upstream.py", "(apps/lb/relay.py")),
    ("metrics (prometheus_client)", ("(prometheus_client/",)),
    ("balancer's own code (apps/)", ("(apps/",)),
    ("Flask and Werkzeug", ("(flask/", "(werkzeug/")),
    ("Gunicorn (gthread worker, HTTP parsing)", ("(gunicorn/", "(concurrent/futures",
                                                  "(selectors.py")),
)


def layer_of(stack: str) -> str:
    for frame in reversed(stack.split(";")):
        for name, markers in LAYERS:
            if any(marker in frame for marker in markers):
                return name
    return "other"


def profile(row: Row, load: Callable, connections: int, duration: float) -> list[tuple[str, float]]:
    """Sample the row's Gunicorn workers with py-spy under load; return each layer's share
    of the Python work, and leave a flame graph in bench/results/."""
    import subprocess
    import threading

    # requirements.txt installs it beside this Python, which need not be on PATH.
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        raise RuntimeError("--profile needs py-spy (pip install py-spy)")
    raw = Path(tempfile.mkdtemp(prefix="lb-profile-")) / "raw.txt"
    RESULTS.mkdir(parents=True, exist_ok=True)
    svg = RESULTS / f"profile-{row.name}-{time.strftime('%Y%m%d-%H%M%S')}.svg"
    master = str(row.procs[0].popen.pid)
    seconds = str(max(1, int(duration) - 1))
    loader = threading.Thread(target=load, args=(row.url, connections, duration + 1))
    loader.start()
    time.sleep(0.5)
    # --gil: only the thread holding the GIL, i.e. Python work; time in system
    # calls is the table's "kernel" share. Without it, threads waiting on a
    # socket are counted as busy here (py-spy cannot tell them idle).
    record = [spy, "record", "--subprocesses", "--gil", "-r", "200", "-d", seconds,
              "-p", master]
    subprocess.run([*record, "-f", "raw", "-o", str(raw)], capture_output=True, check=True)
    loader.join()
    loader = threading.Thread(target=load, args=(row.url, connections, duration + 1))
    loader.start()
    time.sleep(0.5)
    subprocess.run([*record, "-o", str(svg)], capture_output=True, check=True)
    loader.join()
    counts: dict[str, int] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        layer = layer_of(stack)
        counts[layer] = counts.get(layer, 0) + int(count)
    shutil.rmtree(raw.parent, ignore_errors=True)
    total = sum(counts.values()) or 1
    print(f"\nPython work in the {row.name} row's workers (py-spy --gil, {seconds} s; flame graph "
          f"{svg.relative_to(ROOT)}):")
    shares = sorted(((name, n / total) for name, n in counts.items()), key=lambda x: -x[1])
    for name, share in shares:
        print(f"  {share:6.1%}  {name}")
    return shares
