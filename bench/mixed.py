"""`python -m bench mixed`: issue 15's fixed-profile pools, live, against its targets.

Each scenario (bench/mixed_scenarios.py) starts its echo instances once, then,
in turn, the balancer with the default settings (`default`), the balancer with
retries on 5xx for every method (`retry`), and nginx with proxy_next_upstream on
errors, timeouts and 5xx, non-idempotent requests included (`nginx`, when on
PATH), each in front of the same instances, under the same paced load (bench/paced.py).
Each backend's count of requests served (its /profile) gives the shares, retries
included. Prints a table per run and each target (bench/mixed_report.py); writes JSON.

A command of its own, not in `bench faults`: those scenarios follow one changing
instance on its own clock against three fixed ones; these are whole pools of fixed
profiles, each run under three modes, one of them nginx.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import requests

from apps.launch.stack import Proc, start_balancer, start_echo, start_redis
from bench.mixed_report import WARMUP_S, MixedRun, describe, figures, format_report, targets
from bench.mixed_scenarios import DURATION_S, LIVE, RATE, THREADS
from bench.overhead.servers import start_nginx
from bench.paced import drive

MODES = ("default", "retry", "nginx")
RETRY_ENV = {"LB_RETRY_NON_IDEMPOTENT": "1", "LB_RETRY_ON_STATUS": "500,502,503,504"}
# Issue 15's nginx line, word for word.
NGINX_RETRY = "proxy_next_upstream error timeout http_500 http_502 http_503 non_idempotent;"
WORKERS = 2                        # the balancer's Gunicorn workers, and nginx's


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=float, default=RATE, help="requests per second")
    parser.add_argument("--threads", type=int, default=THREADS, help="client threads")
    parser.add_argument("--duration", type=float, default=DURATION_S,
                        help="seconds of load per run")
    parser.add_argument("--only", type=_names(LIVE), default=list(LIVE),
                        help=f"scenarios, comma-separated (default: {','.join(LIVE)})")
    parser.add_argument("--modes", type=_names(MODES), default=list(MODES),
                        help="default, retry and/or nginx (skipped when nginx is not on PATH)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/mixed.json"))
    parser.add_argument("--yardstick", type=Path,
                        help="an earlier run's JSON whose healthy3 runs judge static_mixed's "
                             "p95, when this run leaves healthy3 out")


def _names(known) -> Callable[[str], list[str]]:
    """A comma-separated list of names, each one of `known`."""
    def parse(raw: str) -> list[str]:
        names = [n for n in raw.split(",") if n]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown: {', '.join(unknown)} "
                                             f"(one of {', '.join(known)})")
        return names
    return parse


def served(urls: list[str]) -> list[int]:
    return [requests.get(f"{u}/profile", timeout=5).json()["served"] for u in urls]


def start_front(mode: str, urls: list[str], redis_url: str, logs: Path,
                name: str) -> tuple[Proc, str, str | None]:
    """The balancer (with its admin URL) or nginx (none) in front of `urls`."""
    if mode == "nginx":
        run_dir = Path(tempfile.mkdtemp(prefix=f"nginx-{name}-", dir=logs))
        proc, url = start_nginx([int(u.rsplit(":", 1)[1]) for u in urls], WORKERS, run_dir,
                                access_log=False, location_extra=NGINX_RETRY)
        return proc, url.rstrip("/"), None
    env = {"LB_POOL": f"mixed-{name}-{mode}", **(RETRY_ENV if mode == "retry" else {})}
    return start_balancer(urls, redis_url, logs, workers=WORKERS, env=env)


def run_mode(name: str, mode: str, urls: list[str], redis_url: str, logs: Path,
             args: argparse.Namespace) -> MixedRun:
    proc, url, admin = start_front(mode, urls, redis_url, logs, name)
    try:
        run = MixedRun(name, mode)
        started = time.monotonic()
        clock: Callable[[], float] = lambda: time.monotonic() - started  # noqa: E731
        run.served["start"] = served(urls)
        # The counts when the balancer's learning time is over, taken beside the load.
        warmup = threading.Timer(WARMUP_S, lambda: run.served.update(warmup=served(urls)))
        warmup.start()
        drive(url, admin, run, clock, args.duration, args.rate, threads_n=args.threads)
        warmup.cancel()
        run.served["end"] = served(urls)
        return run
    finally:
        proc.stop()


def start_instances(name: str, logs: Path) -> list[tuple[Proc, str]]:
    """The scenario's echo instances, each with its fixed profile."""
    started: list[tuple[Proc, str]] = []
    try:
        for i, backend in enumerate(LIVE[name]):
            started.append(start_echo(i, logs, threads=backend.threads, **backend.echo_env()))
    except BaseException:
        for proc, _ in started:
            proc.stop()
        raise
    return started


def run_scenario(name: str, modes: list[str], redis_url: str, logs: Path,
                 args: argparse.Namespace) -> list[MixedRun]:
    echoes = start_instances(name, logs)
    try:
        urls = [u for _, u in echoes]
        return [run_mode(name, mode, urls, redis_url, logs, args) for mode in modes]
    finally:
        for proc, _ in reversed(echoes):
            proc.stop()


def run(args: argparse.Namespace) -> int:
    modes = [m for m in args.modes if m != "nginx" or shutil.which("nginx")]
    if len(modes) < len(args.modes):
        print("nginx is not on PATH: its runs are left out")
    logs = Path(tempfile.mkdtemp(prefix="lb-mixed-"))
    redis_proc, redis_url = start_redis(logs)
    results = []
    try:
        for name in args.only:
            print(f"{name}: {describe(name)}; {args.duration:g} s at {args.rate:g} req/s "
                  f"from {args.threads} threads, modes {', '.join(modes)}", flush=True)
            results += [figures(r) for r in run_scenario(name, modes, redis_url, logs, args)]
    finally:
        redis_proc.stop()
    earlier = json.loads(args.yardstick.read_text())["runs"] if args.yardstick else []
    found = targets(results, [r for r in earlier if r["scenario"] == "healthy3"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": results, "targets": found}, indent=1))
    print()
    print(format_report(results, found))
    print(f"\nwrote {args.out}")
    return 0
