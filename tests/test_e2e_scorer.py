"""End to end: the scorer moves real traffic away from a failing or slow echo instance."""
from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.support import assert_shares, start_balancer, start_echo

pytestmark = pytest.mark.e2e


@pytest.fixture
def log_dir(tmp_path):
    return tmp_path


def echo_pool(log_dir, faulty: dict[str, str]):
    """Three echo instances; the first has the fault given by `faulty`."""
    return [start_echo(0, log_dir, **faulty), start_echo(1, log_dir), start_echo(2, log_dir)]


def shares(url: str, requests_total: int = 300, clients: int = 20) -> Counter[str]:
    """Send concurrent echo requests; count which backend served each (any status)."""
    local = threading.local()

    def one(i: int) -> str:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        response = local.session.post(f"{url}/r", json={"i": i}, timeout=30)
        assert response.status_code in (200, 500), response.text
        return response.headers["X-Upstream"]

    with ThreadPoolExecutor(clients) as pool:
        return Counter(pool.map(one, range(requests_total)))


def even(echoes, each: int = 100) -> dict[str, int]:
    return {url.removeprefix("http://"): each for _, url in echoes}


def compare_strategies(echoes, redis_server, log_dir) -> dict[str, Counter[str]]:
    """Each strategy's shares; under round_robin (scores ignored) exactly even."""
    urls = [url for _, url in echoes]
    results = {}
    for strategy in ("round_robin", "scored"):
        proc, url, admin = start_balancer(urls, redis_server, log_dir,
                                          name=f"proxy-{strategy}",
                                          env={"LB_STRATEGY": strategy})
        try:
            results[strategy] = shares(url)
            if strategy == "round_robin":
                assert_shares(results[strategy], even(echoes), admin)
        finally:
            proc.stop()
        assert "Traceback" not in proc.output()
    return results


def test_healthy_pool_under_scored_splits_exactly(redis_server, log_dir):
    echoes = [start_echo(i, log_dir) for i in range(3)]
    try:
        proc, url, admin = start_balancer([u for _, u in echoes], redis_server, log_dir,
                                          env={"LB_STRATEGY": "scored"})
        try:
            assert_shares(shares(url), even(echoes), admin)
            status = requests.get(f"{admin}/status", timeout=5).json()
        finally:
            proc.stop()
        assert status["strategy"] == "scored"
        assert [b["blocks"] for b in status["backends"]] == [0, 0, 0]
    finally:
        for p, _ in echoes:
            p.stop()


@pytest.mark.parametrize("fault", [{"ECHO_ERROR_RATE": "0.5"},
                                   {"ECHO_MEAN_LATENCY_MS": "300"}], ids=["failing", "slow"])
def test_a_faulty_instance_serves_clearly_fewer_under_scored(redis_server, log_dir, fault):
    echoes = echo_pool(log_dir, fault)
    try:
        results = compare_strategies(echoes, redis_server, log_dir)
    finally:
        for p, _ in echoes:
            p.stop()
    faulty, *healthy = [url.removeprefix("http://") for _, url in echoes]
    scored = results["scored"]
    assert scored[faulty] < 50, scored
    assert all(scored[h] > 125 for h in healthy), scored
