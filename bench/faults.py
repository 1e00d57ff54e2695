"""`python -m bench faults`: time-varying backends, live, against the targets.

Each scenario starts a real stack (three echo instances, the first with a
time-varying profile; the balancer under Gunicorn with 2 x 16 threads and active
health checks) and sends a steady, paced load while it records every answer
and polls the admin listener. Times are on the changing instance's own clock
(its /profile says how long it has been up), the clock its profile follows.

Targets:
    dead          after the first 2 s, at most 1 % of attempts go to the dead port
    fail_recover  its share in the 1-s window ending 5 s after recovery is at
                  least 80 % of a fair share
    degrading     once its latency is 3x the median of the others', it serves at
                  most 5 % of requests
    flapping      blocked while failing, serving while healthy: the share of each
                  window spent in the wrong state is reported
    checkers      never more than one checker probing a backend at a time
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import requests

from bench.faults_targets import BASE_LATENCY_MS, SCENARIOS, Run, Scenario, checkers
from bench.paced import drive
from apps.launch.stack import start_balancer, start_echo, start_redis


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=float, default=100, help="requests per second")
    parser.add_argument("--only", help="run only this scenario (dead, fail_recover, ...)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/faults.json"))


def run_scenario(scenario: Scenario, redis_url: str, logs: Path, rate: float) -> Run:
    echoes = [start_echo(0, logs, threads=64, ECHO_PROFILE=scenario.spec,
                         ECHO_MEAN_LATENCY_MS=BASE_LATENCY_MS)]
    echoes += [start_echo(i, logs, threads=64, ECHO_MEAN_LATENCY_MS=BASE_LATENCY_MS)
               for i in (1, 2)]
    procs = [p for p, _ in echoes]
    try:
        balancer, url, admin = start_balancer([u for _, u in echoes], redis_url, logs,
                                              workers=2, threads=16,
                                              env={"LB_POOL": f"faults-{scenario.name}"})
        procs.append(balancer)
        first = echoes[0][1]
        up = requests.get(f"{first}/profile", timeout=5).json()["elapsed_s"]
        origin = time.monotonic() - up  # the changing instance's clock starts here
        run = Run(scenario.spec, first.removeprefix("http://"),
                  [u.removeprefix("http://") for _, u in echoes[1:]])
        clock = lambda: time.monotonic() - origin  # noqa: E731
        drive(url, admin, run, clock, scenario.duration_s, rate)
        # Probes as a healthy instance saw them (a dead one cannot say).
        run.probes = [tuple(p) for p in requests.get(f"{echoes[1][1]}/profile", timeout=5)
                      .json()["health_probes"]]
        return run
    finally:
        for proc in reversed(procs):
            proc.stop()


def run(args: argparse.Namespace) -> int:
    logs = Path(tempfile.mkdtemp(prefix="lb-faults-"))
    redis_proc, redis_url = start_redis(logs)
    results = {}
    try:
        for scenario in SCENARIOS:
            if args.only and scenario.name != args.only:
                continue
            print(f"{scenario.name}: {scenario.spec}, {scenario.duration_s:.0f} s at "
                  f"{args.rate:.0f} req/s", flush=True)
            recorded = run_scenario(scenario, redis_url, logs, args.rate)
            result = scenario.check(recorded)
            result["checkers_at_once"] = checkers(recorded)
            result["answers"] = len(recorded.answers)
            result["errors"] = sum(1 for a in recorded.answers if a[2] >= 500)
            results[scenario.name] = result
    finally:
        redis_proc.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print()
    print(f"{'scenario':<14}{'target':<26}{'met':<6}measured")
    for name, result in results.items():
        met = {True: "yes", False: "NO", None: "-"}[result["met"]]
        print(f"{name:<14}{result['target'][:24]:<26}{met:<6}{result['measured']}")
    most = max((r["checkers_at_once"] for r in results.values()), default=0)
    print(f"{'checkers':<14}{'never more than 1':<26}{'yes' if most <= 1 else 'NO':<6}"
          f"at most {most} checker(s) probing within any second")
    print("client-visible errors: " + ", ".join(f"{n} {r['errors']}/{r['answers']}"
                                                 for n, r in results.items()))
    print(f"\nwrote {args.out}")
    return 0
