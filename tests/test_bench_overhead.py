"""The overhead benchmark (bench/overhead/): its pieces offline, then one short real run."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest

from bench.overhead.measuring import Row, Sample, group_cpu_s
from bench.overhead.profiling import layer_of
from bench.overhead.reporting import ratios
from tests.support import ROOT

needs_cc = pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")),
                              reason="the zero-latency backend needs a C compiler")


def sample(rps: float, cpu: float, p50_c1: float = 0.5) -> Sample:
    return Sample(rps=rps, p50_ms=1.0, p99_ms=2.0, p50_c1_ms=p50_c1, cpu_ms_per_req=cpu,
                  sys_share=0.3, redis_ms_per_req=None, requests=100, errors=0, non_2xx=0)


def rows(**samples: list[Sample]) -> dict[str, Row]:
    return {name: Row(name, "http://x/", [], samples=list(s)) for name, s in samples.items()}


def test_ratios_use_medians_and_judge_each_target():
    found = {what: (value, met) for what, value, _, met in ratios(rows(
        ceiling=[sample(9000, 0.20), sample(8000, 0.10), sample(9500, 0.18)],  # median 0.18
        scored=[sample(2000, 0.40, 0.9)],
        round_robin=[sample(2500, 0.35)],
        direct=[sample(90000, 0.01, 0.1)],
        **{"scored-wide": [sample(1900, 0.41)]}))}
    value, met = found["CPU/request, scored / ceiling"]
    assert value == pytest.approx(0.40 / 0.18) and not met  # 2.2 > 2
    value, met = found["throughput, scored / round_robin"]
    assert value == pytest.approx(0.8) and not met
    value, met = found["added p50 at concurrency 1, ms (scored - direct)"]
    assert value == pytest.approx(0.8) and met
    value, met = found["throughput, scored-wide / scored"]
    assert value == pytest.approx(0.95) and met
    assert found["client headroom, direct / scored throughput"] == (45, True)
    value, met = found["throughput, scored / ceiling"]
    assert value == pytest.approx(2000 / 9000) and not met  # the median ceiling
    value, met = found["CPU ms/request, scored and its Redis"]
    assert value == pytest.approx(0.40) and met  # these samples measured no Redis


def test_the_cpu_target_counts_the_balancers_redis_too():
    with_redis = dataclasses.replace(sample(2000, 0.40), redis_ms_per_req=0.08)
    found = {what: (value, met) for what, value, _, met in ratios(rows(scored=[with_redis]))}
    value, met = found["CPU ms/request, scored and its Redis"]
    assert value == pytest.approx(0.48) and not met


def test_ratios_skip_comparisons_whose_rows_did_not_run():
    found = [what for what, *_ in ratios(rows(scored=[sample(2000, 0.4)]))]
    assert found == ["CPU ms/request, scored and its Redis"]  # a target, not a comparison


def test_profile_samples_go_to_the_innermost_known_layer():
    stack = ("Thread.run (threading.py:982);ThreadWorker.handle (gunicorn/workers/gthread.py:553);"
             "Flask.wsgi_app (flask/app.py:1511);Forwarder.attempt (apps/lb/proxy.py:150);"
             "Upstreams.send (apps/lb/upstream.py:190);SocketIO.readinto (socket.py:706)")
    assert layer_of(stack) == "upstream HTTP (urllib3, http.client)"
    assert layer_of(stack.rsplit(";", 2)[0]) == "balancer's own code (apps/)"
    assert layer_of("Thread.run (threading.py:982)") == "other"


@pytest.mark.e2e
def test_group_cpu_counts_a_busy_process_group():
    # The child burns 0.3 s of CPU by its own count, then idles: however busy the
    # machine, the group has used at least that much when it says so.
    spin = ("import time\nwhile time.process_time() < 0.3: pass\n"
            "print('spent', flush=True)\ntime.sleep(60)")
    busy = subprocess.Popen([sys.executable, "-c", spin], start_new_session=True,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert busy.stdout.readline() == "spent\n"
        user, system = group_cpu_s(busy.pid)
        assert 0.28 <= user + system < 5
        assert group_cpu_s(os.getpgid(0)) != (user, system)  # another group, other figures
    finally:
        busy.kill()
        busy.wait()


def run_overhead(*args: str, timeout: float) -> tuple[subprocess.CompletedProcess, dict]:
    """One short `python -m bench overhead` with loadgen: its output and saved report."""
    before = set((ROOT / "bench" / "results").glob("overhead-*.json"))
    done = subprocess.run(
        [sys.executable, "-m", "bench", "overhead", "--rounds", "1", "--duration", "1",
         "--c1-duration", "1", "--client", "loadgen", "--wide", "0", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    saved = set((ROOT / "bench" / "results").glob("overhead-*.json")) - before
    assert len(saved) == 1
    return done, json.loads(saved.pop().read_text())


@pytest.mark.e2e
@needs_cc
def test_a_short_run_measures_every_row_and_saves_its_report(tmp_path):
    done, report = run_overhead("--only", "ceiling,direct,scored", "--paced-duration", "0",
                                timeout=110)
    out = done.stdout
    assert "client: loadgen" in out
    for row in ("ceiling", "direct", "scored"):
        assert f"\n{row} " in out
    assert "CPU/request, scored / ceiling" in out and "upstream request and answer" in out
    scored = report["rows"]["scored"][0]
    assert scored["requests"] > 0 and scored["errors"] == 0 and scored["non_2xx"] == 0
    assert scored["cpu_ms_per_req"] > 0 and scored["redis_ms_per_req"] > 0
    assert report["rows"]["ceiling"][0]["cpu_ms_per_req"] > 0


@pytest.mark.e2e
@needs_cc
def test_the_paced_row_measures_the_balancer_and_nginx_beside_it(tmp_path):
    done, report = run_overhead("--only", "paced", "--paced-duration", "2", "--paced-rounds",
                                "1", timeout=120)
    paced = report["paced"]
    fronts = ["balancer", "nginx"] if shutil.which("nginx") else ["balancer"]
    assert list(paced["runs"]) == fronts
    for front in fronts:
        (run,) = paced["runs"][front]
        # 150/s for the second after the first: about 150 answers, all of them 200s
        assert run["answers"] >= 100 and run["errors"] == 0
        assert 0 < run["p50_ms"] <= run["p95_ms"]
        assert f"  {front:<9} p50 " in done.stdout
    if "nginx" in fronts:
        assert [t["what"][:9] for t in paced["targets"]] == ["paced p50", "paced p95"]
