"""bench/mixed.py's static_mixed pool started for real: each instance's profile, and
one short run through the balancer recording answers and attempts."""
from __future__ import annotations

import argparse
import time

import pytest
import requests

from bench.mixed import run_mode, start_instances
from bench.mixed_scenarios import LIVE
from tests.support import start_redis

pytestmark = pytest.mark.e2e


def timed_posts(url: str, count: int = 3) -> float:
    started = time.monotonic()
    for n in range(count):  # fixed ids: the same draws on every run
        requests.post(f"{url}/x", json={"n": n}, headers={"X-Request-ID": f"t{n}"}, timeout=10)
    return time.monotonic() - started


def test_static_mixed_instances_and_one_short_run(tmp_path):
    redis_proc, redis_url = start_redis(tmp_path)
    echoes = start_instances("static_mixed", tmp_path)
    try:
        urls = [u for _, u in echoes]
        for url, backend in zip(urls, LIVE["static_mixed"], strict=True):
            profile = requests.get(f"{url}/profile", timeout=5).json()
            assert (profile["mean_latency_ms"], profile["error_rate"], profile["kind"]) == (
                backend.latency_ms, backend.error_rate, "steady")
        assert timed_posts(urls[1]) > timed_posts(urls[0])  # 300 ms against 5 ms
        args = argparse.Namespace(duration=1.0, rate=20, threads=2)
        run = run_mode("static_mixed", "default", urls, redis_url, tmp_path, args)
        assert run.answers and run.statuses
        # Every answer was at least one attempt that some instance counted.
        assert sum(run.served["end"]) - sum(run.served["start"]) >= len(run.answers)
    finally:
        for proc, _ in echoes:
            proc.stop()
        redis_proc.stop()
