"""What the balancer costs per request: against its Flask ceiling, direct, and nginx.

    python -m bench overhead [--duration 8] [--rounds 3] [--connections 32]

Backends answer at once and are not Python: one process of bench/zero_backend.c
serving every port, so what is measured is the proxy, not its backends. In one
run, under the same Gunicorn settings (gunicorn_conf.py), it measures:

    ceiling      a Flask app that answers at once: the most any Flask proxy can do
    direct       one backend, no proxy
    round_robin  the balancer, LB_STRATEGY=round_robin, 3 backends
    scored       the balancer, LB_STRATEGY=scored, 3 backends
    scored-wide  the balancer, scored, --wide backends (20)
    nginx        nginx doing round robin over the 3 backends, when `nginx` is on PATH

For each: throughput at --connections, p50 and p99 there, p50 at concurrency 1,
and the CPU milliseconds per request of its serving processes, read from
/proc (all processes in its process group: Gunicorn's master and workers, or
nginx's). The balancer's Redis is counted apart. Rows are measured in turn,
--rounds times, and each figure is the median over rounds, which keeps one
noisy moment on a shared machine from deciding a ratio. wrk is the client when
it is on PATH, else bench/loadgen.py; the report says which, and checks that
the client drove at least 3x the balancer's throughput (the "direct" row).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from flask import Flask

from bench import loadgen, zero
from apps.launch.stack import (
    ROOT, Proc, free_port, gunicorn, listeners, spawn, start_balancer, start_redis, wait_for,
)

RESULTS = ROOT / "bench" / "results"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# The targets (docs/performance.md): measured here, never asserted in tests.
TARGET_CPU_VS_CEILING = 2.0
TARGET_SCORED_VS_RR = 0.9
TARGET_ADDED_P50_MS = 1.5
STRETCH_ADDED_P50_MS = 1.0
TARGET_WIDE_VS_NARROW = 0.9
GENERATOR_HEADROOM = 3.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=6.0,
                        help="seconds of load per row and round (default 6)")
    parser.add_argument("--c1-duration", type=float, default=3.0,
                        help="seconds at concurrency 1 per row and round (default 3)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds over all rows; medians are reported (default 5)")
    parser.add_argument("--connections", type=int, default=32,
                        help="concurrent keep-alive connections (default 32)")
    parser.add_argument("--backends", type=int, default=3, help="backends of the main rows")
    parser.add_argument("--wide", type=int, default=20,
                        help="backends of the scored-wide row (0: skip it)")
    parser.add_argument("--client", choices=("auto", "wrk", "loadgen"), default="auto",
                        help="load generator (auto: wrk when on PATH)")
    parser.add_argument("--no-nginx", action="store_true", help="skip the nginx row")
    parser.add_argument("--access-log", action="store_true",
                        help="balancer and nginx write their access logs to files "
                             "(default: off, as the ceiling writes none)")
    parser.add_argument("--only", default="",
                        help="comma-separated rows to run (default: all)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile the scored row's workers with py-spy: time by "
                             "layer, and a flame graph in bench/results/")


def create_ceiling_app() -> Flask:
    """A Flask app that answers every path at once: the ceiling for a Flask proxy."""
    app = Flask(__name__)

    @app.route("/", defaults={"path": ""}, methods=["GET", "POST"])
    @app.route("/<path:path>", methods=["GET", "POST"])
    def answer(path: str):
        return b'{"ok":true}', 200, {"Content-Type": "application/json"}

    return app


# --- measuring ---------------------------------------------------------------------


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


# --- the servers --------------------------------------------------------------------


def balancer_worker_class() -> str:
    """The worker class gunicorn_conf.py gives the balancer (environment included)."""
    sys.path.insert(0, str(ROOT))
    import gunicorn_conf
    return gunicorn_conf.worker_class


def balancer_keepalive() -> int:
    """The keep-alive seconds gunicorn_conf.py gives the balancer's clients."""
    sys.path.insert(0, str(ROOT))
    import gunicorn_conf
    return gunicorn_conf.keepalive


def gunicorn_shape() -> tuple[int, int]:
    """Workers and threads as gunicorn_conf.py sets them (environment included)."""
    sys.path.insert(0, str(ROOT))
    import gunicorn_conf
    return gunicorn_conf.workers, gunicorn_conf.threads


def start_nginx(ports: list[int], workers: int, run_dir: Path, access_log: bool) -> tuple[Proc, str]:
    """nginx as a round-robin proxy over `ports`, with keep-alive to them."""
    port = free_port()
    servers = "\n".join(f"        server 127.0.0.1:{p};" for p in ports)
    log = f"access_log {run_dir}/nginx-access.log;" if access_log else "access_log off;"
    conf = run_dir / "nginx.conf"
    conf.write_text(f"""
worker_processes {workers};
daemon off;
pid {run_dir}/nginx.pid;
error_log {run_dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    {log}
    client_body_temp_path {run_dir}/nginx-body;
    proxy_temp_path {run_dir}/nginx-proxy;
    fastcgi_temp_path {run_dir}/nginx-fastcgi;
    uwsgi_temp_path {run_dir}/nginx-uwsgi;
    scgi_temp_path {run_dir}/nginx-scgi;
    keepalive_requests 1000000;
    upstream backends {{
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
""")
    proc = spawn("nginx", ["nginx", "-p", str(run_dir), "-c", str(conf),
                           "-e", str(run_dir / "nginx-error.log")], {}, run_dir, [port])
    return proc, f"http://127.0.0.1:{port}/"


def start_rows(args: argparse.Namespace, run_dir: Path, redis_url: str,
               workers: int, threads: int,
               keep: Callable[[Proc], None]) -> tuple[list[Row], list[str]]:
    """Start every server the run compares, and the backends; `keep` registers each
    process for stopping. Returns the rows and the backends' URLs."""
    wanted = set(filter(None, args.only.split(","))) or None
    ports = [free_port() for _ in range(max(args.backends, args.wide))]
    backends = zero.start(ports, run_dir)
    keep(backends)
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    rows: list[Row] = []

    def want(name: str) -> bool:
        return wanted is None or name in wanted

    if want("ceiling"):
        port = free_port()
        # The balancer's own worker class, so that the ceiling is a like-for-like one.
        # The balancer's Gunicorn settings, without its hooks (no admin listener).
        proc = spawn("ceiling", gunicorn("bench.overhead:create_ceiling_app()", port,
                                         "-w", str(workers), "--threads", str(threads),
                                         "--keep-alive", str(balancer_keepalive()),
                                         "--reuse-port", worker_class=balancer_worker_class()),
                     {}, run_dir, [port])
        keep(proc)
        wait_for(lambda: listeners(port) >= workers, what="every ceiling worker listening")
        rows.append(Row("ceiling", f"http://127.0.0.1:{port}/", [proc]))
    if want("direct"):
        rows.append(Row("direct", f"{urls[0]}/", [backends]))
    balancers = [("round_robin", "round_robin", args.backends),
                 ("scored", "scored", args.backends),
                 ("scored-wide", "scored", args.wide)]
    for name, strategy, count in balancers:
        if not want(name) or count <= 0:
            continue
        env = {"LB_STRATEGY": strategy,
               "LB_ACCESS_LOG": str(run_dir / f"{name}-access.log") if args.access_log else "off"}
        proc, url, _admin = start_balancer(urls[:count], redis_url, run_dir, workers=workers,
                                           threads=threads, name=name, env=env)
        keep(proc)
        rows.append(Row(name, f"{url}/", [proc], uses_redis=True))
    if want("nginx") and not args.no_nginx and shutil.which("nginx"):
        proc, url = start_nginx(ports[:args.backends], workers, run_dir, args.access_log)
        keep(proc)
        rows.append(Row("nginx", url, [proc]))
    return rows, urls


# --- where the time goes ---------------------------------------------------------


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

    spy = shutil.which("py-spy")
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


# --- reporting ----------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ratios(rows: dict[str, Row]) -> list[tuple[str, float, str, bool | None]]:
    """(what, measured, target, met) for every comparison the rows allow."""
    out: list[tuple[str, float, str, bool | None]] = []

    def have(*names: str) -> bool:
        return all(n in rows and rows[n].samples for n in names)

    m = {name: row.median for name, row in rows.items()}
    if have("scored", "ceiling"):
        value = m["scored"]("cpu_ms_per_req") / m["ceiling"]("cpu_ms_per_req")
        out.append(("CPU/request, scored / ceiling", value, f"<= {TARGET_CPU_VS_CEILING}",
                    value <= TARGET_CPU_VS_CEILING))
        out.append(("throughput, scored / ceiling", m["scored"]("rps") / m["ceiling"]("rps"),
                    "about 0.5", None))
    if have("scored", "round_robin"):
        value = m["scored"]("rps") / m["round_robin"]("rps")
        out.append(("throughput, scored / round_robin", value, f">= {TARGET_SCORED_VS_RR}",
                    value >= TARGET_SCORED_VS_RR))
        out.append(("CPU/request, scored / round_robin",
                    m["scored"]("cpu_ms_per_req") / m["round_robin"]("cpu_ms_per_req"), "", None))
    if have("scored", "direct"):
        value = m["scored"]("p50_c1_ms") - m["direct"]("p50_c1_ms")
        out.append(("added p50 at concurrency 1, ms (scored - direct)", value,
                    f"<= {TARGET_ADDED_P50_MS} (stretch {STRETCH_ADDED_P50_MS})",
                    value <= TARGET_ADDED_P50_MS))
        value = m["direct"]("rps") / m["scored"]("rps")
        out.append(("client headroom, direct / scored throughput", value,
                    f">= {GENERATOR_HEADROOM}", value >= GENERATOR_HEADROOM))
    if have("scored-wide", "scored"):
        value = m["scored-wide"]("rps") / m["scored"]("rps")
        out.append(("throughput, scored-wide / scored", value, f">= {TARGET_WIDE_VS_NARROW}",
                    value >= TARGET_WIDE_VS_NARROW))
    if have("nginx", "scored"):
        out.append(("throughput, nginx / scored", m["nginx"]("rps") / m["scored"]("rps"),
                    "", None))
        out.append(("CPU/request, scored / nginx",
                    m["scored"]("cpu_ms_per_req") / m["nginx"]("cpu_ms_per_req"), "", None))
    return out


def report(rows: list[Row], client: str, args: argparse.Namespace, workers: int,
           threads: int) -> dict:
    print(f"\nclient: {client}; {args.connections} connections, {args.duration:g} s per row "
          f"and round, median of {args.rounds} round(s); Gunicorn: {workers} workers of "
          f"{balancer_worker_class()}" + (f" x {threads} threads" if
                                          balancer_worker_class() == "gthread" else "") +
          f"; {os.cpu_count()} CPUs")
    header = (f"{'row':<12} {'req/s':>8} {'req/s range':>15} {'p50 ms':>8} {'p99 ms':>8} {'p50@c1 ms':>10} "
              f"{'CPU ms/req':>11} {'kernel':>7} {'Redis ms/req':>13} {'errors':>7}")
    print(header)
    print("-" * len(header))
    for row in rows:
        errors = sum(s.errors + s.non_2xx for s in row.samples)
        spread = f"{min(s.rps for s in row.samples):.0f}-{max(s.rps for s in row.samples):.0f}"
        print(f"{row.name:<12} {row.median('rps'):>8.0f} {spread:>15} {_fmt(row.median('p50_ms')):>8} "
              f"{_fmt(row.median('p99_ms')):>8} {_fmt(row.median('p50_c1_ms')):>10} "
              f"{_fmt(row.median('cpu_ms_per_req')):>11} {row.median('sys_share'):>7.0%} "
              f"{_fmt(row.median('redis_ms_per_req')):>13} {errors:>7}")
    print()
    found = ratios({row.name: row for row in rows})
    for what, value, target, met in found:
        verdict = "" if met is None else ("  met" if met else "  NOT met")
        print(f"{what:<52} {value:8.3f}   {target}{verdict}")
    return {"client": client, "connections": args.connections, "duration_s": args.duration,
            "rounds": args.rounds, "workers": workers, "threads": threads,
            "cpus": os.cpu_count(),
            "rows": {row.name: [asdict(s) for s in row.samples] for row in rows},
            "ratios": [{"what": w, "value": v, "target": t, "met": m} for w, v, t, m in found]}


def run(args: argparse.Namespace) -> int:
    client = args.client
    if client == "auto":
        client = "wrk" if loadgen.have_wrk() else "loadgen"
    if client == "wrk" and not loadgen.have_wrk():
        print("wrk is not on PATH", file=sys.stderr)
        return 2
    workers, threads = gunicorn_shape()
    load = drive(client)
    procs: list[Proc] = []
    run_dir = Path(tempfile.mkdtemp(prefix="lb-overhead-"))
    try:
        redis_proc, redis_url = start_redis(run_dir)
        procs.append(redis_proc)
        rows, urls = start_rows(args, run_dir, redis_url, workers, threads, procs.append)
        print(f"measuring {', '.join(r.name for r in rows)} with {client}; logs in {run_dir}")
        for round_no in range(1, args.rounds + 1):
            for row in rows:
                sample = measure(row, load, args.connections, args.duration, args.c1_duration,
                                 redis_proc.popen.pid)
                row.samples.append(sample)
                print(f"  round {round_no} {row.name:<12} {sample.rps:8.0f} req/s  "
                      f"{sample.cpu_ms_per_req:.3f} CPU ms/req ({sample.sys_share:.0%} kernel)  "
                      f"p50@c1 {sample.p50_c1_ms:.3f} ms", flush=True)
        summary = report(rows, client, args, workers, threads)
        parts = breakdown(urls, redis_url)
        print("\nwhere a request's CPU goes, one part at a time (this process, one thread):")
        for what, ms in parts:
            print(f"  {what:<44} {ms:7.3f} ms")
        summary["breakdown_ms"] = dict(parts)
        scored = next((r for r in rows if r.name == "scored"), None)
        if args.profile and scored is not None:
            summary["profile"] = dict(profile(scored, load, args.connections, args.duration))
    finally:
        for proc in reversed(procs):
            proc.stop()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"overhead-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(summary, indent=1))
    print(f"\nsaved {out.relative_to(ROOT)}")
    shutil.rmtree(run_dir, ignore_errors=True)
    return 0
