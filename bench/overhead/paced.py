"""The paced row: the latency the balancer adds at a steady, modest load, against nginx
in the same run.

Throughput rows load the proxy to its limit; this one asks what a client sees in
normal traffic: 150 requests a second from 16 threads (bench/paced.py, as `python -m
bench mixed` paces its load) in front of three Python echo backends that take 5 ms
(log-normal around it, as mixed's healthy3), through the balancer (`scored`) and
through nginx doing round robin over the same three. Fronts take turns within each
round; the first second of each run (connections opening) is left out; each figure
is the median over rounds.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from apps.launch.stack import Proc, start_balancer, start_echo
from bench.mixed_scenarios import LIVE, RATE, THREADS
from bench.overhead.servers import start_nginx
from bench.paced import drive
from bench.stats import percentile

SETTLE_S = 1.0          # the first second of each run is left out: connections opening
# Issue 16's targets: the balancer's p50 and p95 at most this much above nginx's.
TARGET_P50_MS = 1.0
TARGET_P95_MS = 1.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--paced-duration", type=float, default=10.0,
                        help="seconds of paced load per front and round (0: skip the paced "
                             "row; default 10)")
    parser.add_argument("--paced-rounds", type=int, default=3,
                        help="rounds of the paced row (default 3)")


def one_run(url: str, seconds: float) -> dict[str, float]:
    """p50, p95 and errors of one paced run against `url`."""
    run = SimpleNamespace(answers=[], statuses=[])
    started = time.monotonic()
    clock: Callable[[], float] = lambda: time.monotonic() - started  # noqa: E731
    drive(url, None, run, clock, seconds, RATE, threads_n=THREADS)
    kept = sorted(a[3] * 1000 for a in run.answers if a[0] >= SETTLE_S)
    return {"p50_ms": percentile(kept, 50), "p95_ms": percentile(kept, 95),
            "answers": len(kept), "errors": sum(1 for a in run.answers if a[2] != 200)}


def run_paced(args: argparse.Namespace, run_dir: Path, redis_url: str, workers: int,
              keep: Callable[[Proc], None]) -> dict[str, Any]:
    """Start the backends and both fronts, run the rounds, print and return the figures."""
    backends = []
    for i, instance in enumerate(LIVE["healthy3"]):
        proc, url = start_echo(i, run_dir, threads=instance.threads, **instance.echo_env())
        keep(proc)
        backends.append(url)
    fronts: dict[str, str] = {}
    proc, url, _admin = start_balancer(backends, redis_url, run_dir, workers=workers,
                                       name="paced", env={"LB_ACCESS_LOG": "off"})
    keep(proc)
    fronts["balancer"] = url
    if not args.no_nginx and shutil.which("nginx"):
        nginx_dir = run_dir / "paced-nginx"
        nginx_dir.mkdir()
        proc, url = start_nginx([int(u.rsplit(":", 1)[1]) for u in backends], workers,
                                nginx_dir, access_log=False)
        keep(proc)
        fronts["nginx"] = url.rstrip("/")
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in fronts}
    for round_no in range(1, args.paced_rounds + 1):
        for name, url in fronts.items():
            found = one_run(url, args.paced_duration)
            runs[name].append(found)
            print(f"  paced round {round_no} {name:<9} p50 {found['p50_ms']:.2f} ms  "
                  f"p95 {found['p95_ms']:.2f} ms  ({found['answers']} answers, "
                  f"{found['errors']} errors)", flush=True)
    summary = {name: {key: statistics.median(r[key] for r in found)
                      for key in ("p50_ms", "p95_ms")} for name, found in runs.items()}
    print(f"\npaced: {RATE:g} req/s from {THREADS} threads, {args.paced_duration:g} s per "
          f"front and round, median of {args.paced_rounds}; backends: three echo "
          "instances of 5 ms")
    for name, figures in summary.items():
        print(f"  {name:<9} p50 {figures['p50_ms']:.2f} ms   p95 {figures['p95_ms']:.2f} ms")
    verdicts = []
    if "nginx" in summary:
        for key, target in (("p50_ms", TARGET_P50_MS), ("p95_ms", TARGET_P95_MS)):
            added = summary["balancer"][key] - summary["nginx"][key]
            met = added <= target
            verdicts.append({"what": f"paced {key[:3]}, balancer - nginx, ms", "value": added,
                             "target": f"<= {target}", "met": met})
            print(f"  {key[:3]} added over nginx {added:6.2f} ms   <= {target}  "
                  f"{'met' if met else 'NOT met'}")
    return {"runs": runs, "medians": summary, "targets": verdicts}
