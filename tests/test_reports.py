"""Reports off the answer's path: queued, sent ahead of the next pick in one round trip
(scorer/traffic.py), or by the sender; and the store's batches (Store.run_many)."""
from __future__ import annotations

import pytest
import redis

from apps.config import load_settings
from scorer import traffic
from scorer.pool import Outcome, Pool
from scorer.store import Store
from tests.pools import BACKENDS, ERRORS_ONLY, RULES, state
from tests.support import wait_for


def queued_pool(client: redis.Redis, *, sender: bool = False, **env: str) -> Pool:
    settings = load_settings(environ={**RULES, **ERRORS_ONLY, "LB_BACKENDS": BACKENDS,
                                      "LB_POOL": "q", **env})
    return Pool(settings, redis_factory=lambda: client, clock=lambda: 1000.0,
                report_sender=sender)


def failed(pool: Pool, index: int) -> Outcome:
    return Outcome(pool.backends[index], 0.01, status=500)


def test_a_batch_runs_in_order_with_a_script_error_in_its_place(any_redis):
    store = Store(lambda: any_redis, {"echo": "return ARGV[1]",
                                      "bad": "return redis.call('NO_SUCH_COMMAND')"},
                  degrade=False)
    replies = store.run_many([("echo", [], ["a"]), ("bad", [], []), ("echo", [], ["c"])])
    assert replies[0] == b"a" and replies[2] == b"c"
    assert isinstance(replies[1], redis.ResponseError)
    with pytest.raises(redis.ResponseError):  # run() raises it, as before batches
        store.run("bad", [], [])


def test_a_batch_after_scripts_were_flushed_loads_them_and_runs_each_once(any_redis):
    store = Store(lambda: any_redis, {"count": "return redis.call('INCR', KEYS[1])"},
                  degrade=False)
    key = "lb:test:count"
    any_redis.delete(key)
    assert store.run("count", [key], []) == 1
    any_redis.script_flush()
    assert store.run_many([("count", [key], [])] * 3) == [2, 3, 4]
    assert int(any_redis.get(key)) == 4


def test_a_queued_report_is_scored_ahead_of_the_next_pick_in_the_same_call(any_redis):
    pool = queued_pool(any_redis, LB_SCORE_THRESHOLD="8")
    verdicts = []
    pool.report_later(failed(pool, 0), verdicts.append)
    assert state(pool, 0)["requests"] == 0  # queued, not sent
    assert pool.traffic.queued == 1
    # The cursor is at 9001; the report blocks it first, so this very pick skips it.
    assert pool.pick().port == 9002
    assert state(pool, 0)["blocked"] and state(pool, 0)["requests"] == 1
    assert verdicts and verdicts[0][1] > 0  # the verdict: a block of so many turns
    assert pool.traffic.queued == 0


def test_queued_reports_keep_their_order_and_their_time(any_redis):
    now = [1000.0]
    settings = load_settings(environ={**RULES, **ERRORS_ONLY, "LB_BACKENDS": BACKENDS,
                                      "LB_POOL": "q"})
    pool = Pool(settings, redis_factory=lambda: any_redis, clock=lambda: now[0],
                report_sender=False)
    pool.report_later(failed(pool, 1))
    now[0] = 1005.0
    pool.report_later(Outcome(pool.backends[1], 0.01, status=200))
    now[0] = 1100.0  # sent long after: each is scored at the time it was made
    pool.flush_reports()
    seen = state(pool, 1)
    assert seen["requests"] == 2 and seen["last_status"] == 200
    assert seen["last_seen"] == 1005.0


def test_a_full_queue_drops_the_oldest_and_counts_them(any_redis, monkeypatch):
    monkeypatch.setattr(traffic, "REPORT_QUEUE_MAX", 3)
    pool = queued_pool(any_redis)
    for index in (0, 1, 1, 2):
        pool.report_later(failed(pool, index))
    assert pool.traffic.dropped == 1
    pool.flush_reports()
    assert [state(pool, i)["requests"] for i in range(3)] == [0, 2, 1]


def test_a_batch_is_at_most_report_batch_long(any_redis, monkeypatch):
    monkeypatch.setattr(traffic, "REPORT_BATCH", 2)
    pool = queued_pool(any_redis)
    for _ in range(5):
        pool.report_later(failed(pool, 2))
    pool.pick()  # takes two reports along
    assert pool.traffic.queued == 3 and state(pool, 2)["requests"] == 2
    pool.flush_reports()  # sends the rest, two at a time
    assert pool.traffic.queued == 0 and state(pool, 2)["requests"] == 5


def test_a_report_for_a_backend_removed_meanwhile_is_dropped(any_redis):
    pool = queued_pool(any_redis)
    pool.report_later(failed(pool, 2))
    pool.change(lambda members: ("remove", "127.0.0.1:9003"))
    pool.flush_reports()
    assert pool.traffic.queued == 0
    assert [b["requests"] for b in pool.status()["backends"]] == [0, 0]


def test_the_sender_sends_queued_reports_with_no_pick_to_carry_them(any_redis):
    pool = queued_pool(any_redis, sender=True)
    pool.report_later(failed(pool, 0))
    wait_for(lambda: state(pool, 0)["requests"] == 1, what="the sender's report")
    assert pool.traffic.queued == 0
