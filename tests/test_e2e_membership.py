"""End to end: runtime membership through the admin listener, across balancer hosts."""
from __future__ import annotations

import json
import signal
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from apps.launch.redis_server import server_command
from tests.support import (
    assert_shares, connections_to, fire, free_port, gunicorn, spawn, start_balancer, start_echo,
    wait_for,
)

pytestmark = pytest.mark.e2e

TOKEN = "members-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def env(pool: str) -> dict[str, str]:
    return {"LB_POOL": pool, "LB_ADMIN_TOKEN": TOKEN, "LB_CHECK_INTERVAL_S": "0"}


def served(url: str, n: int = 30) -> Counter[str]:
    """Which backend answered each of `n` requests (200s only)."""
    return Counter(r.upstream for r in fire(url, n, 3, "POST") if r.status == 200)


def each(ids: list[str], n: int = 30) -> dict[str, int]:
    """`n` requests split exactly over `ids`."""
    return {i: n // len(ids) for i in ids}


def test_a_change_through_one_balancer_applies_to_the_other_at_once(redis_server, tmp_path):
    echoes = [start_echo(i, tmp_path) for i in range(3)]
    ids = [u.removeprefix("http://") for _, u in echoes]
    first_two = [u for _, u in echoes[:2]]
    (a, a_url, a_admin), (b, b_url, b_admin) = [
        start_balancer(first_two, redis_server, tmp_path, name=f"lb-{n}", env=env("members-ab"))
        for n in "ab"]
    try:
        assert_shares(served(b_url), each(ids[:2]), b_admin)
        added = requests.post(f"{a_admin}/backends", json={"url": echoes[2][1]}, headers=AUTH,
                              timeout=5)
        assert added.status_code == 201
        assert_shares(served(b_url), each(ids), b_admin)  # b follows at once
        assert requests.delete(f"{b_admin}/backends/{ids[0]}", headers=AUTH,
                               timeout=5).status_code == 200
        assert_shares(served(a_url), each(ids[1:]), a_admin)
        listed = requests.get(f"{a_admin}/backends", timeout=5).json()["backends"]
        assert [m["id"] for m in listed] == ids[1:]
    finally:
        for proc in (a, b):
            proc.stop()
        for proc, _ in echoes:
            proc.stop()


def test_a_draining_backend_finishes_its_requests_and_gets_no_new_ones(redis_server, tmp_path):
    port = free_port()
    reflect = spawn("reflect", gunicorn("tests.reflect:create_app()", port, "-w", "1",
                                        "--threads", "16"), {}, tmp_path, [port])
    slow = f"http://127.0.0.1:{port}"
    echo, echo_url = start_echo(0, tmp_path)
    proc, url, admin = start_balancer([slow, echo_url], redis_server, tmp_path,
                                      env=env("members-drain"))
    try:
        with ThreadPoolExecutor(4) as pool:
            # GET /sleep goes to both in turn; those on the reflect backend take 2 s.
            in_flight = [pool.submit(requests.get, f"{url}/sleep/2.0", timeout=10)
                         for _ in range(4)]
            # Wait until the slow backend holds requests.
            wait_for(lambda: connections_to(port) >= 1, what="requests in flight")
            drained = requests.post(f"{admin}/backends/127.0.0.1:{port}/drain", headers=AUTH,
                                    timeout=5)
            assert drained.status_code == 200
            after = fire(url, 20, 4, "POST")
            assert all(r.upstream == echo_url.removeprefix("http://") for r in after)
            finished = [f.result() for f in in_flight]
        # The requests already on the draining backend were answered, not cut (the
        # echo answers a GET with 405: also an answer).
        on_drained = [r for r in finished if r.headers["X-Upstream"] == f"127.0.0.1:{port}"]
        assert on_drained and all(r.status_code == 200 for r in on_drained)
    finally:
        proc.stop()
        echo.stop()
        reflect.stop()


@pytest.fixture
def restartable(tmp_path, request):
    """Three echoes behind a balancer on a Redis of its own that `restart()` kills and
    starts again empty; yields (url, admin, ids, restart)."""
    redis_port = free_port()
    redis_proc = [spawn("redis", server_command(redis_port), {}, tmp_path, [redis_port])]
    echoes = [start_echo(i, tmp_path) for i in range(3)]
    proc, url, admin = start_balancer([u for _, u in echoes], f"redis://127.0.0.1:{redis_port}/0",
                                      tmp_path, env=env(request.param))

    def restart() -> None:
        redis_proc.pop().stop(signal.SIGKILL)
        redis_proc.append(spawn(f"redis-{len(redis_proc)}", server_command(redis_port), {},
                                tmp_path, [redis_port]))  # empty: no keys

    yield url, admin, [u.removeprefix("http://") for _, u in echoes], restart
    proc.stop()
    for p in redis_proc:
        p.stop()
    for p, _ in echoes:
        p.stop()


@pytest.mark.parametrize("restartable", ["members-restart"], indirect=True)
def test_the_membership_survives_a_redis_restart(restartable, tmp_path):
    url, admin, ids, restart = restartable
    assert requests.delete(f"{admin}/backends/{ids[1]}", headers=AUTH,
                           timeout=5).status_code == 200
    assert_shares(served(url), each([ids[0], ids[2]]), admin)
    restart()
    wait_for(lambda: requests.get(f"{admin}/status", timeout=5).json()["mode"] == "shared",
             what="workers back on Redis")
    # Not silently reset to the start-up list: the removed backend stays out. (Which
    # backends, not how many each: a worker may only now find Redis gone and back.)
    assert_shares(set(served(url)), {ids[0], ids[2]}, admin)
    listed = requests.get(f"{admin}/backends", timeout=5).json()["backends"]
    assert [m["id"] for m in listed] == [ids[0], ids[2]]
    saved = json.loads((tmp_path / "lb-state" / "members-members-restart.json").read_text())
    assert [m["id"] for m in saved["members"]] == [ids[0], ids[2]]


@pytest.mark.parametrize("restartable", ["members-last"], indirect=True)
def test_removals_hold_for_every_worker_even_across_a_redis_restart(restartable):
    url, admin, ids, restart = restartable
    assert set(served(url)) == set(ids)
    # Three quick removals: the last one is refused, and the first two hold.
    answers = [requests.delete(f"{admin}/backends/{i}", headers=AUTH, timeout=5) for i in ids]
    assert [a.status_code for a in answers] == [200, 200, 409]
    listed = requests.get(f"{admin}/backends", timeout=5).json()["backends"]
    assert [m["id"] for m in listed] == ids[2:]
    restart()  # before any worker has picked since: their copies are stale
    assert served(url, 60) == {ids[2]: 60}
    listed = requests.get(f"{admin}/backends", timeout=5).json()["backends"]
    assert [m["id"] for m in listed] == ids[2:]
