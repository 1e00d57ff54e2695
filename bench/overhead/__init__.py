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

    paced        the latency added at 150 requests a second in front of Python
                 backends of 5 ms, beside nginx (paced.py; --paced-duration 0 skips it)

For each of the others: throughput at --connections, p50 and p99 there, p50 at concurrency 1,
and the CPU milliseconds per request of its serving processes, read from
/proc (all processes in its process group: Gunicorn's master and workers, or
nginx's). The balancer's Redis is counted apart. Rows are measured in turn,
--rounds times, and each figure is the median over rounds, which keeps one
noisy moment on a shared machine from deciding a ratio. wrk is the client when
it is on PATH, else bench/loadgen/; the report says which, and checks that
the client drove at least 3x the balancer's throughput (the "direct" row).

The parts: servers.py (starting the rows), measuring.py (CPU and a Sample per
round), reporting.py (the table, the ratios, the targets), profiling.py (where a
request's time goes).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import loadgen
from bench.overhead import paced
from bench.overhead.measuring import drive, measure
from bench.overhead.profiling import breakdown, profile
from bench.overhead.reporting import RESULTS, report
from bench.overhead.servers import gunicorn_shape, start_rows
from apps.launch.stack import ROOT, Proc, start_redis


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
    paced.add_arguments(parser)



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
        wanted = set(filter(None, args.only.split(",")))
        if args.paced_duration > 0 and (not wanted or "paced" in wanted):
            for row in rows:  # the throughput rows' servers would share the cores
                for proc in row.procs:
                    if proc is not redis_proc:
                        proc.stop()
            print()
            summary["paced"] = paced.run_paced(args, run_dir, redis_url, workers, procs.append)
    finally:
        for proc in reversed(procs):
            proc.stop()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"overhead-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(summary, indent=1))
    print(f"\nsaved {out.relative_to(ROOT)}")
    shutil.rmtree(run_dir, ignore_errors=True)
    return 0
