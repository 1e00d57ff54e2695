"""Several balancer hosts sharing one Redis: one cursor, one set of scores."""
from __future__ import annotations

from collections import Counter

import pytest
import requests

from tests.support import assert_shares, fire, start_balancer, start_echo, wait_for

pytestmark = pytest.mark.e2e


def shared(pool: str) -> dict[str, str]:
    """Settings for two balancers of one pool (a pool of this test's own)."""
    return {"LB_POOL": pool, "LB_CHECK_INTERVAL_S": "0"}


def test_two_balancers_of_two_workers_share_one_cursor_and_one_set_of_scores(redis_server,
                                                                             tmp_path):
    echoes = [start_echo(i, tmp_path) for i in range(3)]
    urls = [u for _, u in echoes]
    balancers = [start_balancer(urls, redis_server, tmp_path, workers=2, name=f"lb-{n}",
                                env=shared("two-hosts-cursor")) for n in "ab"]
    try:
        # 300 requests, half through each balancer, all at once.
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(2) as pool:
            halves = list(pool.map(lambda b: fire(b[1], 150, 20, "POST", keepalive=False),
                                   balancers))
        results = halves[0] + halves[1]
        assert all(r.status == 200 and r.body_ok for r in results)
        assert_shares(Counter(r.upstream for r in results),
                      {u.removeprefix("http://"): 100 for u in urls},
                      *(admin for _, _, admin in balancers))
    finally:
        for proc, _, _ in balancers:
            proc.stop()
        for proc, _ in echoes:
            proc.stop()


def test_a_backend_blocked_through_one_balancer_is_blocked_for_the_other(redis_server,
                                                                        tmp_path):
    failing = start_echo(0, tmp_path, ECHO_ERROR_RATE="1")
    echoes = [failing, start_echo(1, tmp_path), start_echo(2, tmp_path)]
    urls = [u for _, u in echoes]
    (a, a_url, a_admin), (b, b_url, b_admin) = [
        start_balancer(urls, redis_server, tmp_path, workers=2, name=f"lb-{n}",
                       env=shared("two-hosts-blocks"))
        for n in "ab"]
    failing_id = failing[1].removeprefix("http://")
    try:
        fire(a_url, 30, 3, "POST")  # only balancer a sees the failures
        blocked = lambda admin: requests.get(f"{admin}/status", timeout=5).json()[  # noqa
            "backends"][0]["blocked"]
        wait_for(lambda: blocked(a_admin), what="blocked through a")
        assert blocked(b_admin)
        results = fire(b_url, 30, 3, "POST")  # balancer b sends it nothing
        assert all(r.upstream != failing_id for r in results)
        assert all(r.status == 200 for r in results)
    finally:
        for proc in (a, b):
            proc.stop()
        for proc, _ in echoes:
            proc.stop()
