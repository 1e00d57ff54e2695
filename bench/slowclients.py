"""The balancer against slow, idle and crowded clients: what a paced probe sees meanwhile.

    python -m bench slowclients [--duration 10] [--mixes slowloris,idle,all] [--set LB_X=V]

Starts its own stack (Redis, 3 echo backends and the balancer under Gunicorn,
apps/launch/stack.py), warms it up, and runs the probe alone for --baseline seconds
(bench/attacks/: --rate PUTs a second from 127.0.0.1, each on a new
connection unless --keepalive, each answer checked against its own body). Then
for each mix (each attack kind alone, then `all` of them together) it holds
the attack for --ramp + --duration seconds, from --sources addresses of its own
per kind (127.0.<n>.x), with the probe running for the last --duration,
stops it, and waits up to --settle seconds for every worker's descriptors to
come back to within SETTLED_FDS of what it held before.

Per mix it prints the probe's success rate, lost requests, p50 and p99 beside
the baseline's, p99 / baseline p99 against the target (at most 2, and nothing
lost); what the balancer did to the attack's connections (closed, 408, 503...);
and the workers' RSS, open descriptors and threads (summed over workers, from
/proc) before, during (at the attack's end) and after. Results are saved to
bench/results/slowclients-<time>.json, with the command, the commit and the
Gunicorn worker class that ran (the printing: bench/slowclients_report.py).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import attacks
from bench.slowclients_report import TARGET_P99_RATIO, fmt_ms, report
from apps.launch.stack import ROOT, Proc, start_balancer, start_echo, start_redis, usage_of, worker_pids

RESULTS = ROOT / "bench" / "results"
# Issue 13's test counts.
COUNTS = {"slowloris": 200, "slow_body_small": 200, "slow_body_large": 200,
          "endless_chunked": 200, "never_read": 100, "idle": 2000}
SETTLED_FDS = 5                 # "back to baseline": within this many descriptors per worker
PROBE_SOURCE = "127.0.0.1"
WARMUP_S = 2.0


def _setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.startswith(("LB_", "GUNICORN_", "REDIS_")):
        raise argparse.ArgumentTypeError(f"expected LB_X=VALUE, got {text!r}")
    return name, value


def _count(text: str) -> tuple[str, int]:
    kind, sep, value = text.partition("=")
    if not sep or kind not in attacks.KINDS or not value.isdigit():
        raise argparse.ArgumentTypeError(
            f"expected KIND=N with KIND one of {', '.join(attacks.KINDS)}, got {text!r}")
    return kind, int(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds the probe runs beside each attack (default 10)")
    parser.add_argument("--baseline", type=float, default=10.0,
                        help="seconds of the probe alone (default 10)")
    parser.add_argument("--ramp", type=float, default=1.0,
                        help="seconds each attack runs before the probe starts (default 1)")
    parser.add_argument("--settle", type=float, default=15.0,
                        help="seconds allowed for descriptors to come back after (default 15)")
    parser.add_argument("--rate", type=float, default=50.0,
                        help="probe requests per second (default 50)")
    parser.add_argument("--timeout", type=float, default=5.0,
                        help="seconds a probe request may take before it counts as lost")
    parser.add_argument("--keepalive", action="store_true",
                        help="the probe keeps its connections alive (default: one per request)")
    parser.add_argument("--mixes", default=",".join([*attacks.KINDS, "all"]),
                        help="comma-separated attack kinds to run one by one, `all` for "
                             "every kind at once (default: each kind, then all)")
    parser.add_argument("--count", type=_count, action="append", default=[], metavar="KIND=N",
                        help="connections of one kind (defaults: "
                             + ", ".join(f"{k} {n}" for k, n in COUNTS.items()) + ")")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every count, e.g. 0.1 for a light run")
    parser.add_argument("--sources", type=int, default=20,
                        help="source addresses per attack kind (default 20)")
    parser.add_argument("--workers", type=int, default=2, help="balancer workers (default 2)")
    parser.add_argument("--threads", type=int, default=16,
                        help="GUNICORN_THREADS of the balancer (default 16)")
    parser.add_argument("--set", type=_setting, action="append", default=[], metavar="LB_X=V",
                        help="a balancer setting, e.g. --set LB_CLIENT_HEADER_TIMEOUT=2")


def mixes_of(args: argparse.Namespace) -> list[tuple[str, dict[str, int]]]:
    """(name, {kind: connections}) for each mix asked for."""
    counts = {**COUNTS, **dict(args.count)}
    counts = {kind: max(1, round(n * args.scale)) for kind, n in counts.items()}
    mixes = []
    for name in filter(None, args.mixes.split(",")):
        if name == "all":
            mixes.append(("all", counts))
        elif name in attacks.KINDS:
            mixes.append((name, {name: counts[name]}))
        else:
            raise SystemExit(f"unknown mix {name!r}: one of {', '.join(attacks.KINDS)}, all")
    return mixes


def sources_of(per_kind: int) -> dict[str, list[str]]:
    """Each kind's own `per_kind` source addresses: 127.0.2.x for the first kind, and so on."""
    return {kind: attacks.addresses(f"127.0.{n}", per_kind)
            for n, kind in enumerate(attacks.KINDS, start=2)}


def workers_usage(master: int) -> dict[int, dict[str, int]]:
    usage = {}
    for pid in worker_pids(master):
        try:
            usage[pid] = asdict(usage_of(pid))
        except OSError:  # gone meanwhile
            pass
    return usage


def settle(master: int, before: dict[int, dict[str, int]], limit_s: float) -> float | None:
    """Seconds until every worker holds at most SETTLED_FDS more descriptors than
    `before`, or None if that did not happen within `limit_s`."""
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        now = workers_usage(master)
        if all(pid in now and now[pid]["fds"] <= u["fds"] + SETTLED_FDS
               for pid, u in before.items()):
            return round(time.monotonic() - started, 2)
        time.sleep(0.2)
    return None


def run_probe(target: attacks.Target, args: argparse.Namespace, seconds: float) -> list:
    runner, _ = attacks.start_probe(target, args.rate, seconds, PROBE_SOURCE,
                                    keepalive=args.keepalive, timeout=args.timeout)
    return runner.result(seconds + args.timeout + 30)


def run_mix(name: str, counts: dict[str, int], target: attacks.Target, master: int,
            args: argparse.Namespace, baseline_p99: float | None) -> dict[str, Any]:
    before = workers_usage(master)
    runner, _ = attacks.start_attack(target, counts, args.ramp + args.duration + args.timeout
                                     + 60, sources_of(args.sources))
    try:
        time.sleep(args.ramp)
        probed = attacks.summary(run_probe(target, args, args.duration))
        during = workers_usage(master)
    finally:
        tallies = runner.stop()
    settled = settle(master, before, args.settle)
    after = workers_usage(master)
    ratio = (probed["p99_ms"] / baseline_p99 if probed["p99_ms"] is not None and baseline_p99
             else None)
    return {"mix": name, "counts": counts, "probe": probed, "p99_ratio": ratio,
            "met": probed["lost"] == 0 and ratio is not None and ratio <= TARGET_P99_RATIO,
            "attack": {kind: tally.as_dict() for kind, tally in tallies.items()},
            "workers": {"before": before, "during": during, "after": after},
            "workers_changed": sorted(before) != sorted(after), "settled_s": settled}


def worker_class(balancer: Proc) -> str | None:
    found = re.search(r"Using worker: (\S+)", balancer.output())
    return found[1] if found else None


def commit() -> str | None:
    done = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                          capture_output=True, text=True)
    return done.stdout.strip() or None


def run(args: argparse.Namespace) -> int:
    mixes = mixes_of(args)
    attacks.raise_fd_limit()
    run_dir = Path(tempfile.mkdtemp(prefix="lb-slowclients-"))
    procs: list[Proc] = []
    settings = dict(args.set)
    try:
        redis_proc, redis_url = start_redis(run_dir)
        procs.append(redis_proc)
        backends = []
        for i in range(3):
            echo, url = start_echo(i, run_dir)
            procs.append(echo)
            backends.append(url)
        balancer, traffic, _admin = start_balancer(
            backends, redis_url, run_dir, workers=args.workers, threads=args.threads,
            env={"LB_ACCESS_LOG": "off", **settings})
        procs.append(balancer)
        host, port = traffic.removeprefix("http://").rsplit(":", 1)
        target, master = (host, int(port)), balancer.popen.pid
        print(f"balancer {traffic} ({worker_class(balancer)} workers: {args.workers}), "
              f"settings {settings or 'default'}; logs in {run_dir}", flush=True)
        run_probe(target, args, WARMUP_S)
        baseline = attacks.summary(run_probe(target, args, args.baseline))
        print(f"  probe alone: {baseline['ok']}/{baseline['sent']} ok, "
              f"p99 {fmt_ms(baseline['p99_ms'])} ms", flush=True)
        results = []
        for name, counts in mixes:
            result = run_mix(name, counts, target, master, args, baseline["p99_ms"])
            results.append(result)
            p = result["probe"]
            print(f"  {name:<16} probe {p['ok']}/{p['sent']} ok, p99 {fmt_ms(p['p99_ms'])} ms, "
                  f"errors {p['errors'] or 'none'}", flush=True)
        report(baseline, results)
        summary = {"argv": sys.argv[1:],
                   "commit": commit(), "worker_class": worker_class(balancer),
                   "settings": settings, "args": {k: v for k, v in vars(args).items()
                                                  if k not in ("set", "count")},
                   "target_p99_ratio": TARGET_P99_RATIO, "baseline": baseline,
                   "mixes": results}
    finally:
        for proc in reversed(procs):
            proc.stop()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"slowclients-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(summary, indent=1))
    print(f"\nsaved {out.relative_to(ROOT)}")
    shutil.rmtree(run_dir, ignore_errors=True)
    return 0
