"""The way back from a block, judged like traffic (issue 15, part 1): trials by the
pool's yardstick and error rate, health checks against the other backends' checks,
and no trial flag outliving its block. Each test on fakeredis and the real server, on
a fake clock."""
from __future__ import annotations

import redis

from scorer.keys import backend_key
from scorer.pool import Outcome, Pool
from tests.pools import Clock, make_pool, ports, report, state

SINGLE = "http://127.0.0.1:9001"


def check(pool: Pool, index: int, latency_ms: float = 1.0, status: int | None = 200,
          error: str | None = None) -> tuple[float, int]:
    return pool.report(Outcome(pool.backends[index], latency_ms / 1000, status, error),
                       check=True)


def history(pool: Pool, requests: int = 30, latency_ms: float = 10.0,
            indices: tuple[int, ...] | None = None) -> None:
    """Each backend (of `indices`, default all) answers `requests` requests alike: a
    quiet pool to judge against."""
    for _ in range(requests):
        for index in indices if indices is not None else range(len(pool.backends)):
            report(pool, index, latency_ms)


def recovery_pool(client: redis.Redis, clock: Clock, **env: str) -> Pool:
    """One failure blocks, even from the lowest score (-10 + 35 reaches the threshold
    of 20), for more turns than any test takes, so only a trial can end the block."""
    return make_pool(client, clock, **{"LB_ERROR_POINTS": "35", "LB_BLOCK_TURNS": "1000", **env})


def offer_trial(pool: Pool, index: int, latency_ms: float = 1.0) -> None:
    """Block backend `index` by one failure, pass LB_CHECK_RISE (2) checks and send
    the trial it is then offered."""
    assert report(pool, index, status=500)[1] > 0
    check(pool, index, latency_ms), check(pool, index, latency_ms)
    assert state(pool, index)["trial"] == "offered"
    send_trial(pool, index)


def release(pool: Pool, clock: Clock, index: int) -> None:
    """Let the block of backend `index` run its course: its time, then its turns."""
    clock.now = max(clock.now, state(pool, index)["block_until"])
    port = pool.backends[index].port
    assert any(pool.pick().port == port for _ in range(1000)), "the block never ended"


def send_trial(pool: Pool, index: int) -> None:
    port = pool.backends[index].port
    assert port in ports(pool, len(pool.backends))
    assert state(pool, index)["trial"] == "in flight"


# --- 1. a trial's latency, against the pool's yardstick ---------------------

def test_a_slow_trial_keeps_the_block_and_the_next_offence_escalates(any_redis, clock):
    pool = recovery_pool(any_redis, clock, LB_BLOCK_TURNS="3")
    history(pool)
    offer_trial(pool, 1)
    report(pool, 1, 300)  # it answers, 30 times slower than its peers
    s = state(pool, 1)
    assert s["blocked"] and s["trial"] is None
    assert s["trials"] == {"passed": 0, "failed": 1} and s["checks"]["passing_streak"] == 0
    # Its block runs its course; blocked again soon after, it gets twice the time.
    release(pool, clock, 1)
    report(pool, 1, status=500)
    s = state(pool, 1)
    assert s["blocked"] and s["block_level"] == 1 and s["block_until"] == clock.now + 4


def test_a_trial_that_answers_like_its_peers_ends_the_block(any_redis, clock):
    pool = recovery_pool(any_redis, clock)
    history(pool)
    offer_trial(pool, 1)
    report(pool, 1, 12)
    s = state(pool, 1)
    assert not s["blocked"] and s["trials"] == {"passed": 1, "failed": 0}


# --- 2. a trial's error rate, against the pool's ------------------------------

def test_a_backend_erring_far_more_than_the_pool_needs_several_trials_in_a_row(
        any_redis, clock):
    pool = recovery_pool(any_redis, clock, LB_ERROR_POINTS="8", LB_RELATIVE_CREDIT="0")
    history(pool, requests=40, indices=(0, 2))
    for _ in range(3):  # half its answers fail, against 3 % for the pool
        report(pool, 1, 10, status=500)
        report(pool, 1, 10)
    assert state(pool, 1)["blocked"]
    check(pool, 1), check(pool, 1)
    # Its rate, over the pool's 5 % floor, asks for more than LB_TRIAL_MAX (5): five.
    for passed in range(1, 5):
        send_trial(pool, 1)
        report(pool, 1, 10)
        s = state(pool, 1)
        assert s["blocked"] and s["trial"] == "offered", passed  # the next one at once
    # A failed trial starts the count again, once checks pass again.
    send_trial(pool, 1)
    report(pool, 1, 10, status=500)
    assert state(pool, 1)["trial"] is None
    check(pool, 1), check(pool, 1)
    for _ in range(4):
        send_trial(pool, 1)
        report(pool, 1, 10)
    assert state(pool, 1)["blocked"]
    send_trial(pool, 1)
    report(pool, 1, 10)
    s = state(pool, 1)
    assert not s["blocked"] and s["trials"] == {"passed": 9, "failed": 1}


def test_a_backend_erring_no_more_than_the_pool_needs_one_trial(any_redis, clock):
    pool = recovery_pool(any_redis, clock)
    history(pool)  # its one failure in 31 is within the pool's 5 % floor
    offer_trial(pool, 1)
    report(pool, 1, 10)
    assert not state(pool, 1)["blocked"]


# --- 3. health checks, against the other backends' checks -------------------

def test_a_passing_but_slow_check_does_not_count_toward_rise(any_redis, clock):
    pool = recovery_pool(any_redis, clock)
    history(pool)
    for _ in range(5):  # every backend's /health answers in about 5 ms
        for index in range(3):
            check(pool, index, 5)
    report(pool, 1, status=500)
    check(pool, 1, 300), check(pool, 1, 300)  # 60 times slower than the others'
    s = state(pool, 1)
    assert s["trial"] is None and s["checks"]["last"] == "slow"
    assert s["checks"]["passing_streak"] == 0 and s["checks"]["failed"] == 0
    check(pool, 1, 6)
    check(pool, 1, 300)  # a slow one breaks the streak
    check(pool, 1, 6)
    assert state(pool, 1)["trial"] is None
    check(pool, 1, 6)
    assert state(pool, 1)["trial"] == "offered"


def test_a_slow_check_does_not_hold_a_block_past_its_end(any_redis, clock):
    pool = make_pool(any_redis, clock, LB_ERROR_POINTS="35", LB_CHECK_INTERVAL_S="1")
    history(pool)
    for _ in range(5):
        for index in range(3):
            check(pool, index, 5)
    report(pool, 1, status=500)
    clock.now = state(pool, 1)["block_until"]
    check(pool, 1, 300)  # slow, not failed: the block ends with its turns and time
    assert 9002 in ports(pool, 90)  # 25 turns: 75 picks


def test_a_pool_whose_checks_are_all_slower_than_traffic_still_recovers(any_redis, clock):
    pool = recovery_pool(any_redis, clock)
    history(pool)  # traffic answers in 10 ms...
    for _ in range(5):  # ...and every /health in 200 ms (it pings a database, say)
        for index in range(3):
            check(pool, index, 200)
    offer_trial(pool, 1, latency_ms=200)
    assert state(pool, 1)["checks"]["last"] == "ok"
    report(pool, 1, 10)
    assert not state(pool, 1)["blocked"]


def test_one_backend_alone_is_judged_against_nothing_and_recovers(any_redis, clock):
    pool = recovery_pool(any_redis, clock, backends=SINGLE, LB_MIN_UNBLOCKED="0")
    history(pool)
    for _ in range(10):
        check(pool, 0, 400)  # no other backend's checks to compare with: never slow
    assert state(pool, 0)["checks"]["last"] == "ok"
    offer_trial(pool, 0, latency_ms=400)
    report(pool, 0, 10)
    s = state(pool, 0)
    assert not s["blocked"] and s["trials"] == {"passed": 1, "failed": 0}


# --- 5. no trial flag outlives its block ---------------------------------------

def test_a_block_cut_short_by_a_swap_drops_its_offered_trial(any_redis, clock):
    pool = recovery_pool(any_redis, clock, LB_BLOCK_TURNS="3")
    for _ in range(5):
        report(pool, 0, 50)  # backend 0 fast...
    report(pool, 0, 50, status=500)  # ...then blocked
    check(pool, 0), check(pool, 0)
    assert state(pool, 0)["trial"] == "offered"
    report(pool, 1, 50, status=500)
    report(pool, 2, 3000, status=None, error="timeout")  # worse: takes backend 0's block
    s = state(pool, 0)
    assert not s["blocked"] and s["trial"] is None  # not "offered" while serving
    # Blocked again, it waits for fresh checks: no trial at once.
    release(pool, clock, 1)  # a free slot
    report(pool, 0, 50, status=500)
    assert state(pool, 0)["blocked"] and state(pool, 0)["trial"] is None
    assert 9001 not in ports(pool, 6)


def test_a_block_starts_with_no_trial_and_no_passing_checks_behind_it(any_redis, clock):
    pool = recovery_pool(any_redis, clock)
    for _ in range(5):
        check(pool, 1)  # passing checks while traffic fails
    # A flag left on an unblocked backend (by an older version's swap, say).
    any_redis.hset(backend_key(pool.settings.pool, pool.backends[1].id), "trial", 1)
    report(pool, 1, status=500)
    s = state(pool, 1)
    assert s["blocked"] and s["trial"] is None and s["checks"]["passing_streak"] == 0
    assert 9002 not in ports(pool, 6)
    check(pool, 1)
    assert state(pool, 1)["trial"] is None  # one fresh pass is not LB_CHECK_RISE (2)
    check(pool, 1)
    assert state(pool, 1)["trial"] == "offered"
