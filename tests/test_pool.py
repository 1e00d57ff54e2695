"""The pool's Lua scripts: every rule on fakeredis and on a real Redis server, on a fake clock."""
from __future__ import annotations

import random
import re
import threading
from collections import Counter

import pytest
import redis

from scorer.keys import backend_key, load_lua, pool_key
from scorer.pool import CONNECT, HTTP_5XX, OK, TIMEOUT, Outcome, Pool
from scorer.traffic import REPORT_PARAMS
from apps.config import load_settings
from tests.pools import ERRORS_ONLY, Clock, make_pool, ports, remove, report, state


# --- the cursor -------------------------------------------------------------

def test_pick_rotates_in_configured_order(any_redis):
    assert ports(make_pool(any_redis), 7) == [9001, 9002, 9003, 9001, 9002, 9003, 9001]


def test_two_workers_share_one_cursor(any_redis):
    first, second = make_pool(any_redis), make_pool(any_redis)
    picks = [p.pick().port for p in (first, second, first, second, second, first)]
    assert picks == [9001, 9002, 9003, 9001, 9002, 9003]


def test_pools_with_different_names_have_separate_cursors(any_redis):
    blue, green = make_pool(any_redis, pool="blue"), make_pool(any_redis, pool="green")
    assert [blue.pick().port, green.pick().port, blue.pick().port] == [9001, 9001, 9002]


def test_cursor_stays_valid_when_the_pool_shrinks(any_redis):
    pool = make_pool(any_redis)
    ports(pool, 3)
    remove(pool, "127.0.0.1:9003")
    # The cursor sat on slot 2 of 3; modulo 2 the rotation carries on from slot 1.
    assert ports(pool, 3) == [9002, 9001, 9002]
    assert int(any_redis.hget(pool_key("t"), "cursor")) < 2


def test_every_key_carries_the_pool_hash_tag(any_redis):
    pool = make_pool(any_redis, pool="alpha")
    backend = pool.pick()
    pool.report(Outcome(backend, 0.01, status=200))
    keys = sorted(k.decode() for k in any_redis.keys("*"))
    assert keys == [backend_key("alpha", backend.id), "lb:{alpha}:member_order",
                    "lb:{alpha}:members", pool_key("alpha")]
    assert all("{alpha}" in key for key in keys)


def test_report_counts_outcomes_with_the_callers_clock(any_redis):
    pool = make_pool(any_redis, clock=lambda: 1234.5)
    report(pool, 1, 12.5)
    report(pool, 1, 500, status=503)
    report(pool, 1, 1, status=None, error=CONNECT)
    report(pool, 1, 2, status=404)
    s = state(pool, 1)
    assert s["requests"] == 4
    assert s["outcomes"] == {OK: 2, HTTP_5XX: 1, CONNECT: 1}
    assert s["last_seen"] == 1234.5 and s["last_latency_ms"] == 2.0
    assert (s["last_outcome"], s["last_status"]) == (OK, 404)
    assert state(pool, 0)["requests"] == 0


@pytest.mark.e2e
def test_concurrent_picks_from_many_threads_are_exactly_fair(real_redis, redis_server):
    # Each thread is a worker with its own client, as in Gunicorn.
    counts: Counter[int] = Counter()
    lock = threading.Lock()

    def worker() -> None:
        picked = ports(make_pool(redis.Redis.from_url(redis_server)), 30)
        with lock:
            counts.update(picked)

    threads = [threading.Thread(target=worker) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counts == {9001: 100, 9002: 100, 9003: 100}


@pytest.mark.e2e
def test_scripts_reload_after_the_server_forgets_them(real_redis):
    pool = make_pool(real_redis)
    pool.pick()
    real_redis.script_flush()
    assert pool.pick().port == 9002
    report(pool, 0)
    assert state(pool, 0)["requests"] == 1


def test_outcome_kinds():
    backend = load_settings(environ={}).backends[0]
    assert Outcome(backend, 0, status=200).kind == OK
    assert Outcome(backend, 0, status=499).kind == OK
    assert Outcome(backend, 0, status=500).kind == HTTP_5XX
    assert Outcome(backend, 0, error=CONNECT).kind == CONNECT


def test_the_scripts_argv_matches_the_settings_python_sends():
    source = load_lua("report")
    header = dict(re.findall(r"^-- ARGV\[(\d+)\]\s+(\w+)", source, re.MULTILINE))
    locals_ = dict(re.findall(r"^local (\w+) = (?:tonumber\()?ARGV\[(\d+)\]", source, re.MULTILINE))
    names = [header[str(i)] for i in range(8, 8 + len(REPORT_PARAMS))]
    assert names == list(REPORT_PARAMS)
    assert all(locals_[name] == str(i) for i, name in enumerate(REPORT_PARAMS, start=8))
    assert str(8 + len(REPORT_PARAMS)) not in header


# --- errors -----------------------------------------------------------------

def test_errors_cost_points_and_a_clean_record_earns_a_little(any_redis, clock):
    pool = make_pool(any_redis, clock, **ERRORS_ONLY)
    assert report(pool, 0, status=500)[0] == 8
    assert report(pool, 0, status=None, error=TIMEOUT)[0] == 16
    # Successes right after errors earn nothing: the recent error rate is high.
    assert report(pool, 0)[0] == 16
    clock.advance(120)  # the error rate fades (tau 10 s); the score barely (half-life 1e9 s)
    assert report(pool, 0)[0] == pytest.approx(15)
    assert report(pool, 0)[0] == pytest.approx(14)


def test_a_4xx_is_the_clients_fault_not_the_backends(any_redis, clock):
    pool = make_pool(any_redis, clock, **ERRORS_ONLY)
    assert report(pool, 0, status=404)[0] == -1
    assert state(pool, 0)["error_rate"] == 0


def test_a_fast_error_counts_as_slow_too(any_redis, clock):
    pool = make_pool(any_redis, clock, LB_STRATEGY="round_robin", LB_SCORE_HALF_LIFE_S="1e9")
    for _ in range(20):
        report(pool, 0, 50)  # the pool averages 50 ms
    scores = [report(pool, 1, 1, status=503)[0] for _ in range(6)]  # 1 ms failures
    # Each failure enters the latency as 4 x max(50 ms avg, 20 ms slack) = 200 ms,
    # so once five requests are in, each also pays the latency cap (5).
    assert scores == [8, 16, 24, 32, 45, 58]
    assert state(pool, 1)["latency_ms"] == 200
    assert pool.status()["latency_avg_ms"] == 50  # failures do not move the yardstick


def test_a_success_earns_what_it_is_worth_against_the_pools_error_rate(any_redis, clock):
    pool = make_pool(any_redis, clock, LB_LATENCY_MIN_SAMPLES="1e9", LB_SCORE_HALF_LIFE_S="1e9",
                     LB_STRATEGY="round_robin")
    for _ in range(5):
        report(pool, 0, status=500)
        report(pool, 1)
    # The pool's error rate is now 5/11 with this success: it earns 8 x (5/11) / (6/11),
    # plus the clean-record bonus of 1.
    assert report(pool, 2)[0] == pytest.approx(-(8 * 5 / 6 + 1))
    assert pool.status()["error_rate"] == pytest.approx(5 / 11)


def test_a_backend_failing_as_often_as_the_pool_breaks_even(any_redis, clock):
    pool = make_pool(any_redis, clock, LB_STRATEGY="round_robin",
                     **{**ERRORS_ONLY, "LB_RELATIVE_CREDIT": "1", "LB_SUCCESS_BONUS": "0"})
    for round_ in range(40):  # every backend fails one request in four
        for index in range(3):
            report(pool, index, status=500 if (round_ + index) % 4 == 0 else 200)
    scores = [b["score"] for b in pool.status()["backends"]]
    assert all(abs(score) < 12 for score in scores), scores  # one error's worth, no drift


def test_the_least_failing_backend_keeps_the_most_traffic(any_redis, clock):
    rng = random.Random(3)
    error_rates = [0.45, 0.19, 0.37]  # a pool where every backend is poor
    pool = make_pool(any_redis, clock, LB_LATENCY_MIN_SAMPLES="1e9")
    served = Counter()
    for _ in range(1500):
        backend = pool.pick()
        index = pool.backends.index(backend)
        served[index] += 1
        failed = rng.random() < error_rates[index]
        pool.report(Outcome(backend, 0.05, status=500 if failed else 200))
        clock.advance(0.01)
    assert served.most_common(1)[0][0] == 1, served
    assert served[1] > 600, served


# --- latency ----------------------------------------------------------------

def pool_with_average(client, clock, avg_ms: float = 100.0, **env: str) -> Pool:
    """A pool whose latency average is `avg_ms` (set by backend 0); scores do not
    fade, latency is judged from the first request and its cost is uncapped."""
    settings = {"LB_SCORE_HALF_LIFE_S": "1e9", "LB_SLOW_MAX_POINTS": "100",
                "LB_LATENCY_MIN_SAMPLES": "1", **env}
    pool = make_pool(client, clock, **settings)
    for _ in range(1000):
        report(pool, 0, avg_ms)
    return pool


@pytest.mark.parametrize("latency_ms, points", [(200, 5), (300, 10), (400, 15)])
def test_slower_costs_points_in_proportion(any_redis, clock, latency_ms, points):
    pool = pool_with_average(any_redis, clock)
    # 5 points per 100 % above the average, less the success bonus of 1.
    assert report(pool, 1, latency_ms)[0] == pytest.approx(points - 1, rel=0.01)


def test_the_latency_cost_of_one_request_is_capped(any_redis, clock):
    pool = pool_with_average(any_redis, clock, LB_SLOW_MAX_POINTS="5")
    assert report(pool, 1, 5000)[0] == 5 - 1


def test_faster_earns_a_small_bonus(any_redis, clock):
    pool = pool_with_average(any_redis, clock)
    assert report(pool, 1, 20)[0] == -1.5  # success bonus 1 + fast bonus 0.5


def test_the_slack_ignores_small_absolute_differences(any_redis, clock):
    pool = pool_with_average(any_redis, clock, avg_ms=2)
    assert report(pool, 1, 10)[0] == -1  # 5x the 2 ms average, but only 8 ms above it
    assert report(pool, 2, 21)[0] == -1  # 19 ms above: still under the 20 ms slack
    fresh = pool_with_average(any_redis, clock, avg_ms=2, LB_POOL="fresh")
    assert report(fresh, 2, 40)[0] > 0  # 38 ms above: past both ratio and slack


def test_latency_is_judged_only_after_enough_requests(any_redis, clock):
    pool = pool_with_average(any_redis, clock, LB_LATENCY_MIN_SAMPLES="5",
                             LB_SLOW_MAX_POINTS="5")
    assert [report(pool, 1, 300)[0] for _ in range(5)] == [-1, -2, -3, -4, 0]


def test_a_lone_spike_is_paid_for_once(any_redis, clock):
    # Light traffic, so the smoothed latency remembers the spike for a while.
    pool = make_pool(any_redis, clock)
    for second in range(60):
        for index in range(3):
            report(pool, index, 2000 if (second, index) == (30, 1) else 10)
        clock.advance(1)
    s = state(pool, 1)
    assert s["blocks"] == 0 and not s["blocked"]
    assert s["score"] <= 0


def test_a_noisy_healthy_pool_is_never_blocked(any_redis, clock):
    rng = random.Random(7)
    pool = make_pool(any_redis, clock)
    for _ in range(1500):
        backend = pool.pick()
        latency = rng.lognormvariate(1, 0.5) * (15 if rng.random() < 0.01 else 1)
        pool.report(Outcome(backend, latency / 1000, status=200))
        clock.advance(rng.expovariate(200))
    status = pool.status()
    assert [b["blocks"] for b in status["backends"]] == [0, 0, 0]
    assert all(b["score"] <= 0 for b in status["backends"])
    assert [b["requests"] for b in status["backends"]] == [500, 500, 500]


def test_the_pool_average_follows_time_not_request_count(any_redis, clock):
    pool = make_pool(any_redis, clock)
    for latency in range(10, 101, 10):  # reports at the same instant all count
        report(pool, 0, latency)
    assert pool.status()["latency_avg_ms"] == pytest.approx(55)
    for _ in range(100):
        report(pool, 0, 100)
    clock.advance(300)  # 10 time constants later, one request outweighs a hundred old ones
    report(pool, 1, 10)
    assert pool.status()["latency_avg_ms"] == pytest.approx(10.4, abs=0.1)


# --- score ------------------------------------------------------------------

def test_the_score_is_bounded(any_redis, clock):
    pool = make_pool(any_redis, clock, LB_STRATEGY="round_robin", **ERRORS_ONLY)
    assert max(report(pool, 0, status=500)[0] for _ in range(20)) == 60
    assert min(report(pool, 1)[0] for _ in range(50)) == -10


def test_the_score_fades_toward_zero_with_time(any_redis, clock):
    pool = make_pool(any_redis, clock, LB_LATENCY_MIN_SAMPLES="1e9", LB_RELATIVE_CREDIT="0")
    assert report(pool, 0, status=500)[0] == 8
    clock.advance(30)  # one half-life; the error rate (tau 10 s) is still above 2 %
    assert report(pool, 0)[0] == pytest.approx(4)
    clock.advance(60)  # two more half-lives, and now no recent errors: bonus
    assert report(pool, 0)[0] == pytest.approx(0)


def test_a_clock_step_backwards_counts_as_no_time(any_redis, clock):
    pool = make_pool(any_redis, clock, LB_LATENCY_MIN_SAMPLES="1e9")
    assert report(pool, 0, status=500)[0] == 8
    clock.advance(-10)  # another host, 10 s behind: no negative fading (no growth)
    assert report(pool, 0, status=500)[0] == 16
    clock.advance(40)  # 30 s after the newest report seen, not 40 after the late one
    assert report(pool, 0, status=500)[0] == pytest.approx(16 * 0.5 + 8)
    assert pool.status()["latency_avg_ms"] is None  # only failures so far


# --- blocking ---------------------------------------------------------------

def blocking_pool(client, clock, points: float = 25, **env: str) -> Pool:
    """Errors only, and one failure is worth `points`."""
    return make_pool(client, clock, LB_ERROR_POINTS=str(points), **{**ERRORS_ONLY, **env})


def release(pool: Pool, clock: Clock, index: int) -> int:
    """Let the block of backend `index` run out; return the picks it took."""
    clock.now = max(clock.now, state(pool, index)["block_until"])
    for picks in range(1, 10_000):
        if pool.pick() is pool.backends[index]:
            return picks
    raise AssertionError("the block never ended")


@pytest.mark.parametrize("points, turns", [(20, 10), (25, 15), (33, 23)])
def test_reaching_the_threshold_blocks_for_turns_growing_with_the_excess(
        any_redis, clock, points, turns):
    pool = blocking_pool(any_redis, clock, points)
    assert report(pool, 1, status=500) == (points, turns)
    s = state(pool, 1)
    assert s["blocked"] and s["blocked_turns"] == turns and s["score"] == 0
    assert s["block_until"] == clock.now + 2
    assert s["block_reason"].startswith(f"score {points:.1f} reached 20: last http_5xx")
    assert s["blocks"] == 1 and s["block_level"] == 0


def test_below_the_threshold_nothing_is_blocked(any_redis, clock):
    pool = blocking_pool(any_redis, clock, points=19.9)
    assert report(pool, 1, status=500) == (19.9, 0)
    assert ports(pool, 3) == [9001, 9002, 9003]


def test_each_pass_of_the_cursor_costs_a_blocked_turn_and_time_must_pass_too(any_redis, clock):
    pool = blocking_pool(any_redis, clock)
    report(pool, 1, status=500)  # 15 turns, 2 s
    picks = ports(pool, 40)  # passes backend 1 twenty times
    assert 9002 not in picks and picks.count(9001) == picks.count(9003) == 20
    s = state(pool, 1)
    assert s["blocked_turns"] == 0 and s["blocked"]  # turns used up, but 2 s have not passed
    clock.advance(2)
    assert 9002 in ports(pool, 3)
    assert not state(pool, 1)["blocked"]


def test_turns_must_be_used_up_however_much_time_passes(any_redis, clock):
    pool = blocking_pool(any_redis, clock)
    report(pool, 1, status=500)
    clock.advance(3600)
    assert ports(pool, 4) == [9001, 9003, 9001, 9003]
    assert state(pool, 1)["blocked_turns"] == 13


def test_reoffending_doubles_the_block_up_to_the_cap(any_redis, clock):
    pool = blocking_pool(any_redis, clock, LB_BLOCK_TURNS="2", LB_BLOCK_TURNS_PER_POINT="0")
    for level in range(8):
        _, turns = report(pool, 1, status=500)
        factor = min(2 ** level, 60 / 2)  # LB_BLOCK_MAX_S / LB_BLOCK_MIN_S
        s = state(pool, 1)
        assert (s["block_level"], turns) == (level, 2 * factor)
        assert s["block_until"] - clock.now == pytest.approx(2 * factor)
        release(pool, clock, 1)
        clock.advance(10)  # reoffends 10 s after the block's end: within LB_REOFFEND_S


def test_a_backend_that_stays_good_long_enough_starts_again_from_a_short_block(any_redis, clock):
    pool = blocking_pool(any_redis, clock)
    report(pool, 1, status=500)
    release(pool, clock, 1)
    report(pool, 1, status=500)
    assert state(pool, 1)["block_level"] == 1
    release(pool, clock, 1)
    clock.advance(31)
    report(pool, 1, status=500)
    s = state(pool, 1)
    assert s["block_level"] == 0 and s["block_until"] == clock.now + 2


def test_a_backend_that_behaves_again_gets_its_full_share_back(any_redis, clock):
    pool = blocking_pool(any_redis, clock)
    report(pool, 1, status=500)
    release(pool, clock, 1)
    for backend in [pool.pick() for _ in range(300)]:
        pool.report(Outcome(backend, 0.01, status=200))
    assert [b["requests"] for b in pool.status()["backends"]][1] == 1 + 100


def test_answers_that_arrive_during_a_block_do_not_block_it_again_on_return(any_redis, clock):
    pool = blocking_pool(any_redis, clock)
    report(pool, 1, status=500)
    for _ in range(3):  # requests that were in flight when the block began
        report(pool, 1, status=None, error=TIMEOUT)
    assert state(pool, 1)["score"] == 60  # still scored, so panic mode can rank it
    release(pool, clock, 1)
    assert state(pool, 1)["score"] == 0 and not state(pool, 1)["blocked"]
    assert report(pool, 1) == (0, 0)  # a success (no bonus yet: recent errors)
    assert state(pool, 1)["blocks"] == 1


def test_a_retry_never_goes_to_a_blocked_backend(any_redis, clock):
    pool = blocking_pool(any_redis, clock)
    report(pool, 0, status=500)
    report(pool, 1, status=500)
    assert pool.pick("..x", retry=True) is None
    assert pool.status()["panic_picks"] == 0


def test_a_failure_never_earns_the_fast_bonus(any_redis, clock):
    pool = pool_with_average(any_redis, clock, LB_RELATIVE_CREDIT="0")
    for _ in range(200):
        report(pool, 1, 10)  # fast: smoothed latency far under the 100 ms average
    before = state(pool, 1)["score"]
    assert report(pool, 1, 10, status=503)[0] == before + 8


def test_at_most_all_but_one_backend_is_blocked_by_default(any_redis, clock):
    pool = blocking_pool(any_redis, clock)
    assert report(pool, 0, status=500)[1] > 0
    assert report(pool, 1, status=500)[1] > 0
    assert report(pool, 2, status=500) == (25, 0)  # deferred: it is the last one
    assert pool.status()["blocks_deferred"] == 1
    assert ports(pool, 3) == [9003, 9003, 9003]
    release(pool, clock, 0)
    assert report(pool, 2, status=500)[1] > 0  # a slot is free: blocked now


def test_when_the_cap_is_full_a_worse_backend_takes_a_better_ones_block(any_redis, clock):
    pool = blocking_pool(any_redis, clock)
    for _ in range(5):
        report(pool, 0, 50)   # a fast backend (score -5)...
    report(pool, 0, 50, status=500)  # ...blocked after a failure (score 20)
    report(pool, 1, 50, status=500)
    assert [b["blocked"] for b in pool.status()["backends"]] == [True, True, False]
    report(pool, 2, 3000, status=None, error=TIMEOUT)  # slower than every blocked one
    status = pool.status()
    # Backend 0 (the best of the blocked) is released; the worst one is blocked instead.
    assert [b["blocked"] for b in status["backends"]] == [False, True, True]
    assert status["block_swaps"] == 1 and status["blocks_deferred"] == 0
    assert status["backends"][0]["score"] == 0


def test_latency_is_judged_against_every_request_failures_priced_in(any_redis, clock):
    pool = pool_with_average(any_redis, clock, avg_ms=100)
    for _ in range(1000):  # half the pool's requests fail: each counts as 400 ms
        report(pool, 1, 100, status=500)
    status = pool.status()
    assert status["latency_avg_ms"] == pytest.approx(100)
    assert status["latency_yardstick_ms"] == pytest.approx(250, rel=0.01)
    # A backend answering in 200 ms is slower than the successes, not than the pool.
    assert report(pool, 2, 200)[0] < 0


def test_the_blocked_share_is_configurable(any_redis, clock):
    pool = blocking_pool(any_redis, clock, LB_MAX_BLOCKED_SHARE="0.34")
    assert report(pool, 0, status=500)[1] > 0
    assert report(pool, 1, status=500)[1] == 0


def test_when_every_backend_is_blocked_the_lowest_score_is_picked(any_redis, clock):
    pool = blocking_pool(any_redis, clock, LB_MIN_UNBLOCKED="0")
    for index in range(3):
        assert report(pool, index, status=500)[1] > 0
    # Equal scores: panic picks still rotate.
    assert ports(pool, 3) == [9001, 9002, 9003]
    report(pool, 0, status=500)  # scores 25, 0, 25 (a blocked backend is not blocked again)
    report(pool, 2, status=500)
    assert ports(pool, 2) == [9002, 9002]
    assert pool.status()["panic_picks"] == 5


def test_round_robin_ignores_scores_but_keeps_them(any_redis, clock):
    pool = blocking_pool(any_redis, clock, LB_STRATEGY="round_robin")
    assert report(pool, 1, status=500) == (25, 0)
    assert ports(pool, 3) == [9001, 9002, 9003]
    assert state(pool, 1)["score"] == 25


# --- flags from the caller: tried and busy backends ------------------------------

def test_a_tried_backend_is_never_picked_again(any_redis, clock):
    pool = make_pool(any_redis, clock)
    assert pool.pick("x..", retry=True).port == 9002
    assert pool.pick(".xx", retry=True).port == 9001
    assert pool.pick("xxx", retry=True) is None


def test_a_busy_backend_is_passed_over_like_a_blocked_one(any_redis, clock):
    pool = make_pool(any_redis, clock)
    assert ports(pool, 1) == [9001]
    assert pool.pick(".b.").port == 9003
    assert pool.status()["panic_picks"] == 0


def test_when_every_backend_is_busy_the_request_still_goes_out(any_redis, clock):
    pool = make_pool(any_redis, clock)
    report(pool, 0, status=500)  # scores 8, 0, 0
    assert pool.pick("bbb").port == 9002  # the lowest score, in cursor order
    assert pool.pick("bbx").port == 9002
    status = pool.status()
    assert (status["over_cap_picks"], status["panic_picks"]) == (2, 0)


def test_over_the_cap_on_a_healthy_backend_beats_a_blocked_one(any_redis, clock):
    pool = blocking_pool(any_redis, clock)
    report(pool, 0, status=500)  # blocked, score reset to 0
    report(pool, 1, status=503)  # 25: deferred, the cap of blocks is full... see below
    status = pool.status()
    assert [b["blocked"] for b in status["backends"]] == [True, True, False]
    for _ in range(3):
        report(pool, 2)  # the healthy one: score -3
    assert pool.pick("..b").port == 9003  # busy, but not blocked
    assert pool.status()["panic_picks"] == 0


def test_round_robin_also_skips_tried_and_busy_backends(any_redis, clock):
    pool = make_pool(any_redis, clock, LB_STRATEGY="round_robin")
    assert pool.pick("xb.", retry=True).port == 9003


def test_the_retry_budget_allows_a_few_then_a_share_of_recent_requests(any_redis, clock):
    pool = make_pool(any_redis, clock, LB_RETRY_BUDGET="0.2", LB_RETRY_BUDGET_MIN="3")
    # No traffic yet: the minimum of 3 retries, then no more.
    assert [pool.pick(retry=True) is not None for _ in range(4)] == [True] * 3 + [False]
    for _ in range(20):
        pool.pick()
    # 20 requests earn 20 % = 4 retries on top of the 3 already used... 3 + 4 = 7 in all.
    assert [pool.pick(retry=True) is not None for _ in range(5)] == [True] * 4 + [False]
    assert pool.status()["retries_denied"] == 2


def test_the_retry_budget_recovers_with_time(any_redis, clock):
    pool = make_pool(any_redis, clock, LB_RETRY_BUDGET="0", LB_RETRY_BUDGET_MIN="2")
    assert [pool.pick(retry=True) is not None for _ in range(3)] == [True, True, False]
    clock.advance(100)  # ten time constants: the old retries have faded
    assert pool.pick(retry=True) is not None


# --- the way back: trials after passing checks, and slow start ------------------

def check(pool: Pool, index: int, status: int | None = 200, error: str | None = None):
    return pool.report(Outcome(pool.backends[index], 0.001, status, error), check=True)


def test_failed_checks_count_against_a_backend_without_traffic(any_redis, clock):
    pool = blocking_pool(any_redis, clock, LB_CHECK_FAIL_POINTS="10")
    assert check(pool, 1, status=None, error=CONNECT)[0] == 10
    _, turns = check(pool, 1, status=503)
    assert turns > 0 and state(pool, 1)["blocked"]
    s = state(pool, 1)
    assert s["checks"]["failed"] == 2 and s["requests"] == 0  # checks are not traffic


def test_passing_checks_earn_nothing(any_redis, clock):
    pool = blocking_pool(any_redis, clock)
    assert check(pool, 1) == (0, 0)
    assert state(pool, 1)["checks"] == {"passed": 1, "failed": 0, "passing_streak": 1,
                                        "last": "ok"}


def test_a_blocked_backend_whose_checks_pass_comes_back_through_a_trial(any_redis, clock):
    pool = blocking_pool(any_redis, clock, LB_BLOCK_TURNS="1000")
    report(pool, 1, status=500)
    check(pool, 1)
    assert state(pool, 1)["trial"] is None  # one pass is not enough (rise 2)
    check(pool, 1)
    assert state(pool, 1)["trial"] == "offered"
    # The cursor reaches it: one trial request, however long the block was.
    assert ports(pool, 3) == [9001, 9002, 9003]
    assert state(pool, 1)["trial"] == "in flight"
    assert 9002 not in ports(pool, 6)  # no more until the trial answers
    report(pool, 1)  # the trial succeeds: the block ends at once
    s = state(pool, 1)
    assert not s["blocked"] and s["score"] == 0 and s["trials"] == {"passed": 1, "failed": 0}
    assert 9002 in ports(pool, 3)
    assert pool.status()["trial_picks"] == 1


def test_a_failed_trial_keeps_the_block_until_checks_pass_again(any_redis, clock):
    pool = blocking_pool(any_redis, clock, LB_BLOCK_TURNS="1000")
    report(pool, 1, status=500)
    check(pool, 1), check(pool, 1)
    ports(pool, 2)  # the trial goes out
    report(pool, 1, status=503)
    s = state(pool, 1)
    assert s["blocked"] and s["trial"] is None and s["trials"]["failed"] == 1
    assert 9002 not in ports(pool, 6)
    check(pool, 1), check(pool, 1)
    assert state(pool, 1)["trial"] == "offered"


def test_a_retry_is_never_a_trial(any_redis, clock):
    pool = blocking_pool(any_redis, clock, LB_BLOCK_TURNS="1000")
    report(pool, 1, status=500)
    check(pool, 1), check(pool, 1)
    assert pool.pick("x..", retry=True).port == 9003
    assert state(pool, 1)["trial"] == "offered"


def test_a_backend_back_from_a_block_ramps_its_share_up(any_redis, clock):
    pool = blocking_pool(any_redis, clock, LB_SLOW_START_S="10")
    report(pool, 1, status=500)
    release_time = state(pool, 1)["block_until"]
    clock.now = release_time
    shares = []
    for second in range(12):  # 300 picks a second, at each second of the ramp
        picks = ports(pool, 300)
        shares.append(picks.count(9002) / len(picks))
        clock.advance(1)
    fair = 1 / 3
    assert shares[0] < 0.05 * fair + 0.02        # starts near nothing
    assert 0.3 * fair < shares[5] < 0.75 * fair  # about half way at 5 s
    assert shares[11] == pytest.approx(fair, abs=0.01)  # full share after 10 s
    assert all(a <= b + 0.02 for a, b in zip(shares, shares[1:]))  # never going back


def test_turning_slow_start_off_gives_the_full_share_at_once(any_redis, clock):
    pool = blocking_pool(any_redis, clock, LB_SLOW_START_S="0")
    report(pool, 1, status=500)
    release(pool, clock, 1)
    assert ports(pool, 3).count(9002) == 1


def test_a_block_lasts_while_fresh_checks_keep_failing(any_redis, clock):
    pool = blocking_pool(any_redis, clock, LB_CHECK_INTERVAL_S="1")
    report(pool, 1, status=500)
    clock.advance(3)  # its minimum time is over...
    check(pool, 1, status=503)  # ...but it has just failed a check
    assert 9002 not in ports(pool, 60)
    clock.advance(3.5)  # that check is now stale (over 3 intervals old): the block may end
    assert 9002 in ports(pool, 3)
