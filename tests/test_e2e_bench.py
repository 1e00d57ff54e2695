"""The benchmark commands end to end: the live matrix, and the simulator agreeing with it."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from bench import load
from bench.scenario import Scenario
from bench.sim import simulate_cell
from tests.support import ROOT, start_balancer, start_echo

pytestmark = pytest.mark.e2e


def test_simulator_and_live_stack_agree_on_a_failing_instance(redis_server, tmp_path):
    failing = (0, 0.5, 0.0)
    simulated = simulate_cell(Scenario(seed=0, instances=3, requests=400, clients=20,
                                       faults=(failing,)), "scored")
    sim_share = simulated.shares["10.0.0.1:80"] / sum(simulated.shares.values())

    echoes = [start_echo(0, tmp_path, ECHO_ERROR_RATE="0.5"),
              start_echo(1, tmp_path), start_echo(2, tmp_path)]
    try:
        proc, url, _ = start_balancer([u for _, u in echoes], redis_server, tmp_path)
        try:
            live = load.measure(url, 400, 20, timeout=10, payload=64, id_offset=0,
                                method="POST", progress=False).to_dict()
        finally:
            proc.stop()
    finally:
        for p, _ in echoes:
            p.stop()
    failing_id = echoes[0][1].removeprefix("http://")
    live_share = live["shares"].get(failing_id, {"count": 0})["count"] / live["successes"]
    # Both push the failing instance far below its third of the successes.
    assert sim_share < 0.15 and live_share < 0.15, (sim_share, live_share)


def test_a_tiny_live_matrix_writes_its_csv_json_and_chart(tmp_path):
    out = tmp_path / "matrix"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "matrix", "--live", "--suite", "quick", "--requests",
         "100", "--workers", "20", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["strategy"] for r in rows} == {"round_robin", "scored"}
    assert all(int(r["requests"]) == 100 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "live" and "seed7-n3" in summary["per_scenario"]
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "round_robin" in done.stdout and "scored" in done.stdout
