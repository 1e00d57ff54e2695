"""`python -m bench matrix`: seeds x instance counts x strategies, simulated or live.

Each cell is one scenario (seed, instances) under one strategy, repeated with
different request-id offsets to measure run-to-run noise. The simulator
(bench/sim.py) is the default; `--live` starts a real stack per cell (Redis,
echo instances with that seed, the balancer under Gunicorn) and runs the
threaded benchmark (bench/load.py) against it. Writes results.csv,
results.json, summary.json and chart.png, and prints a table and the targets
(bench/matrix_report.py). This module plans the cells and runs them.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.matrix_report import (
    format_convergence, format_p95_shares, format_table, summarize, write_outputs,
)
from bench.mixed_scenarios import sim_names, sim_scenario
from bench.scenario import Scenario
from bench.sim import sim_redis, simulate_cell

SUITES = {
    # name: (seeds, instance counts, requests per cell, repeats)
    "default": (list(range(1, 9)), [3, 5], 4000, 2),
    "full": (list(range(1, 21)), [3, 5, 8], 10000, 3),
    "quick": ([1, 2], [3], 1000, 1),
}
# Suites of named pools instead of seeds, each pool under its paced load
# (bench/mixed_scenarios.py): repeats.
NAMED_SUITES = {"issue15": 2}
SEEDED_STRATEGIES = ["round_robin", "scored", "oracle"]
# Issue 15 asks how scored compares with "everything to the fastest" too.
NAMED_STRATEGIES = ["round_robin", "fastest", "scored", "oracle"]
SIM_ONLY_STRATEGIES = ("oracle", "fastest")  # the balancer has neither
CLOSED_LOOP_CLIENTS = 100          # the seeded suites' clients (the benchmark's workers)
LIVE_SUITES = {
    "default": ([1, 2, 3, 7], [3, 5], 500, 2),
    "full": (list(range(1, 9)), [3, 5], 1000, 2),
    "quick": ([7], [3], 200, 1),
}
ID_OFFSET_STEP = 1_000_000  # repeats use disjoint request ids: independent draws
LIVE_TIMEOUT_S = 30  # the live benchmark client's timeout


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--live", action="store_true",
                        help="run each cell on a real stack instead of the simulator")
    parser.add_argument("--suite", choices=sorted({*SUITES, *NAMED_SUITES}), default="default",
                        help="issue15: its fixed pools (static_mixed, graded, healthy3, "
                             "small_fast) under the live benchmark's paced load, with p95 "
                             "and shares by strategy, and whether the shares settle")
    parser.add_argument("--seeds", type=_ints, help="override the suite's seeds, e.g. 1,2,3")
    parser.add_argument("--instances", type=_ints, help="override the instance counts, e.g. 3,5")
    parser.add_argument("--requests", type=int,
                        help="requests per cell (issue15: rate x duration)")
    parser.add_argument("--repeats", type=int, help="repeats per cell (request-id offsets)")
    parser.add_argument("--workers", type=int,
                        help=f"concurrent clients (the benchmark's workers, default "
                             f"{CLOSED_LOOP_CLIENTS}); issue15: pacing threads")
    parser.add_argument("--strategies", type=lambda s: s.split(","),
                        help=f"default {','.join(SEEDED_STRATEGIES)}; "
                             f"issue15: {','.join(NAMED_STRATEGIES)}")
    parser.add_argument("--set", action="append", default=[], metavar="LB_X=VALUE",
                        help="a balancer setting for every cell (repeatable)")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for the results (default bench/results/matrix-<time>)")
    parser.add_argument("--fakeredis", action="store_true",
                        help="simulate on fakeredis instead of the bundled Redis server (slower)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="simulations run in parallel")


def _ints(raw: str) -> list[int]:
    return [int(part) for part in raw.split(",") if part]


@dataclass(frozen=True)
class Cell:
    scenario: Scenario
    strategy: str
    repeat: int


def plan(args: argparse.Namespace) -> list[Cell]:
    named = args.suite in NAMED_SUITES
    asked = args.strategies or (NAMED_STRATEGIES if named else SEEDED_STRATEGIES)
    strategies = [s for s in asked if not (args.live and s in SIM_ONLY_STRATEGIES)]
    if named:
        return plan_named(args, strategies)
    seeds, instances, requests, repeats = (LIVE_SUITES if args.live else SUITES)[args.suite]
    seeds = args.seeds or seeds
    instances = args.instances or instances
    requests = args.requests or requests
    repeats = args.repeats or repeats
    clients = args.workers or CLOSED_LOOP_CLIENTS
    return [Cell(Scenario(seed=seed, instances=n, requests=requests, clients=clients,
                          id_offset=repeat * ID_OFFSET_STEP), strategy, repeat)
            for seed in seeds for n in instances for repeat in range(repeats)
            for strategy in strategies]


def plan_named(args: argparse.Namespace, strategies: list[str]) -> list[Cell]:
    repeats = args.repeats or NAMED_SUITES[args.suite]
    return [Cell(sim_scenario(name, repeat * ID_OFFSET_STEP, args.requests, args.workers),
                 strategy, repeat)
            for name in sim_names() for repeat in range(repeats) for strategy in strategies]


def run(args: argparse.Namespace) -> int:
    env = dict(item.split("=", 1) for item in args.set)
    cells = plan(args)
    out = args.out or Path("bench/results") / f"matrix-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if args.live:
        rows = run_live(cells, env, out)
    else:
        with sim_redis(args.fakeredis):
            rows = run_simulated(cells, env, args.jobs)
    (out / "results.json").write_text(json.dumps(rows, indent=1))  # kept even if a step fails
    summary = summarize(rows)
    summary["mode"] = "live" if args.live else "simulated"
    summary["wall_s"] = round(time.monotonic() - started, 1)
    write_outputs(rows, summary, out)
    print(format_table(rows, summary))
    if args.suite in NAMED_SUITES:
        print("\n" + format_p95_shares(rows))
        convergence = format_convergence(rows)
        if convergence:  # simulated: live rows have no windows
            print("\n" + convergence)
    print(f"\nwrote {out}/results.csv, results.json, summary.json, chart.png "
          f"in {summary['wall_s']} s")
    return 0


def run_simulated(cells: list[Cell], env: dict[str, str], jobs: int) -> list[dict[str, Any]]:
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(_simulate, cells, [env] * len(cells)))
    return [{**r, "repeat": c.repeat} for c, r in zip(cells, results)]


def _simulate(cell: Cell, env: dict[str, str]) -> dict[str, Any]:
    return simulate_cell(cell.scenario, cell.strategy, env).to_dict()


def run_live(cells: list[Cell], env: dict[str, str], out: Path) -> list[dict[str, Any]]:
    """One real stack per cell; everything is stopped even on Ctrl-C."""
    from bench import load
    from apps.launch.stack import start_balancer, start_echo, start_redis
    logs = Path(tempfile.mkdtemp(prefix="lb-matrix-"))
    redis_proc, redis_url = start_redis(logs)
    rows = []
    try:
        for number, cell in enumerate(cells, 1):
            s = cell.scenario
            print(f"[{number}/{len(cells)}] live {s.name} {cell.strategy} repeat {cell.repeat}",
                  flush=True)
            procs = []
            try:
                echoes = [start_echo(i, logs, seed=s.seed, threads=s.threads_of(i),
                                     **_fault_env(s, i))
                          for i in range(s.instances)]
                procs += [p for p, _ in echoes]
                balancer, url, admin = start_balancer(
                    [u for _, u in echoes], redis_url, logs, workers=s.balancer_workers,
                    env={**env, "LB_STRATEGY": cell.strategy})
                procs.append(balancer)
                result = load.measure(url, s.requests, s.clients, timeout=LIVE_TIMEOUT_S,
                                      payload=64, id_offset=s.id_offset, method=s.method,
                                      progress=False)
                rows.append(_live_row(cell, result.to_dict(), admin))
                print(f"    errors {rows[-1]['errors']}/{s.requests}, "
                      f"p99 {rows[-1]['p99_ms']:.0f} ms", flush=True)
            finally:
                for proc in reversed(procs):
                    proc.stop()
    finally:
        redis_proc.stop()
    return rows


def _fault_env(scenario: Scenario, instance: int) -> dict[str, str]:
    """The echo settings that give `instance` the scenario's profile and fault, if any."""
    env = {}
    for index, spec in scenario.specs:
        if index == instance:
            env["ECHO_PROFILE"] = spec
    for index, error_rate, mean_latency_ms in scenario.faults:
        if index == instance:
            env.update(ECHO_ERROR_RATE=str(error_rate),
                       ECHO_MEAN_LATENCY_MS=str(mean_latency_ms))
    return env


def _live_row(cell: Cell, measured: dict[str, Any], admin: str) -> dict[str, Any]:
    import requests
    try:
        status = requests.get(f"{admin}/status", timeout=5).json()
        blocks = sum(b.get("blocks", 0) for b in status["backends"])
        panic, over_cap = status.get("panic_picks", 0), status.get("over_cap_picks", 0)
    except requests.RequestException:
        blocks = panic = over_cap = -1
    s = cell.scenario
    errors = sum(measured["errors"].values())
    latency = dict(measured["latency_ms"])
    if latency["p99"] is None:
        # Not one answer (every request timed out or was refused): the slowest
        # a request can be is the client's timeout.
        latency = {k: LIVE_TIMEOUT_S * 1000 for k in ("p50", "p90", "p99", "max")}
    return {
        "scenario": s.name, "strategy": cell.strategy, "seed": s.seed,
        "instances": s.instances, "id_offset": s.id_offset, "requests": s.requests,
        "errors": errors, "error_rate": errors / s.requests,
        "p50_ms": latency["p50"], "p90_ms": latency["p90"],
        "p99_ms": latency["p99"], "max_ms": latency["max"],
        "virtual_s": measured["wall_s"], "retries": 0, "blocks": blocks,
        "panic_picks": panic, "over_cap_picks": over_cap,
        "shares": {k: v["count"] for k, v in measured["shares"].items()},
        "repeat": cell.repeat,
    }
