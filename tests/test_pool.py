"""The pool's Lua scripts, on fakeredis and on a real Redis server."""
from __future__ import annotations

import threading
from collections import Counter

import redis

from scorer.pool import CONNECT, HTTP_5XX, OK, Outcome, Pool, backend_key, cursor_key
from scorer.settings import load_settings

BACKENDS = "http://127.0.0.1:9001,http://127.0.0.1:9002,http://127.0.0.1:9003"


def make_pool(client: redis.Redis, backends: str = BACKENDS, pool: str = "t",
              clock=lambda: 1000.0) -> Pool:
    settings = load_settings(environ={"LB_BACKENDS": backends, "LB_POOL": pool})
    return Pool(settings, redis_factory=lambda: client, clock=clock)


def test_pick_rotates_in_configured_order(any_redis):
    pool = make_pool(any_redis)
    picks = [pool.pick().port for _ in range(7)]
    assert picks == [9001, 9002, 9003, 9001, 9002, 9003, 9001]


def test_two_workers_share_one_cursor(any_redis):
    first, second = make_pool(any_redis), make_pool(any_redis)
    picks = [p.pick().port for p in (first, second, first, second, second, first)]
    assert picks == [9001, 9002, 9003, 9001, 9002, 9003]


def test_pools_with_different_names_have_separate_cursors(any_redis):
    blue, green = make_pool(any_redis, pool="blue"), make_pool(any_redis, pool="green")
    assert [blue.pick().port, green.pick().port, blue.pick().port] == [9001, 9001, 9002]


def test_cursor_stays_valid_when_the_pool_shrinks(any_redis):
    make_pool(any_redis).pick(), make_pool(any_redis).pick(), make_pool(any_redis).pick()
    two = make_pool(any_redis, backends="http://127.0.0.1:9001,http://127.0.0.1:9002")
    # The cursor sat on slot 2 of 3; modulo 2 the rotation carries on from slot 1.
    assert [two.pick().port for _ in range(3)] == [9002, 9001, 9002]
    assert int(any_redis.get(cursor_key("t"))) < 2


def test_every_key_carries_the_pool_hash_tag(any_redis):
    pool = make_pool(any_redis, pool="alpha")
    backend = pool.pick()
    pool.report(Outcome(backend, 0.01, status=200))
    keys = sorted(k.decode() for k in any_redis.keys("*"))
    assert keys == [backend_key("alpha", backend.id), cursor_key("alpha")]
    assert all("{alpha}" in key for key in keys)


def test_report_counts_outcomes_with_the_callers_clock(any_redis):
    pool = make_pool(any_redis, clock=lambda: 1234.5)
    backend = pool.backends[1]
    pool.report(Outcome(backend, 0.0125, status=200))
    pool.report(Outcome(backend, 0.5, status=503))
    pool.report(Outcome(backend, 0.001, error=CONNECT))
    pool.report(Outcome(backend, 0.002, status=404))
    state = pool.backend_states()[backend.id]
    assert state["requests"] == "4"
    assert (state[f"outcome:{OK}"], state[f"outcome:{HTTP_5XX}"], state[f"outcome:{CONNECT}"]) \
        == ("2", "1", "1")
    assert state["last_seen"] == "1234.5"
    assert float(state["last_latency_ms"]) == 2.0
    assert state["last_outcome"] == OK and state["last_status"] == "404"
    assert pool.backend_states()[pool.backends[0].id] == {}


def test_concurrent_picks_from_many_threads_are_exactly_fair(real_redis, redis_server):
    # Each thread is a worker with its own client, as in Gunicorn.
    counts: Counter[int] = Counter()
    lock = threading.Lock()

    def worker() -> None:
        pool = make_pool(redis.Redis.from_url(redis_server))
        ports = [pool.pick().port for _ in range(30)]
        with lock:
            counts.update(ports)

    threads = [threading.Thread(target=worker) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counts == {9001: 100, 9002: 100, 9003: 100}


def test_scripts_reload_after_the_server_forgets_them(real_redis):
    pool = make_pool(real_redis)
    pool.pick()
    real_redis.script_flush()
    assert pool.pick().port == 9002


def test_outcome_kinds():
    backend = load_settings(environ={}).backends[0]
    assert Outcome(backend, 0, status=200).kind == OK
    assert Outcome(backend, 0, status=499).kind == OK
    assert Outcome(backend, 0, status=500).kind == HTTP_5XX
    assert Outcome(backend, 0, error=CONNECT).kind == CONNECT
