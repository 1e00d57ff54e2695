"""Shares that follow latency inside the round robin (pick.lua), on fakeredis and
the real server: exact counts, since the credit makes every sequence deterministic."""
from __future__ import annotations

import math

import pytest

from scorer.pool import Outcome
from tests.pools import BACKENDS, make_pool, ports, put, report, state

# Slowness never blocks here, so that the shares alone decide; power 2, whose shares
# are easy to count; and the rules' other numbers fixed, as tests/pools.py's RULES
# fix the scorer's, so that these tests check the rules, not the tuned defaults.
NO_BLOCKS = {"LB_SLOW_POINTS": "0", "LB_SHARE_POWER": "2", "LB_SHARE_NOISE_Z": "2",
             "LB_SHARE_MIN_SAMPLES": "20"}
FOUR = BACKENDS + ",http://127.0.0.1:9004"


def teach(pool, latencies_ms, samples=40):
    """Give each backend `samples` reports at its latency, all at one instant."""
    for index, latency in enumerate(latencies_ms):
        for _ in range(samples):
            report(pool, index, latency)


def counts(pool, picks, backends=(9001, 9002, 9003)):
    got = ports(pool, picks)
    return [got.count(port) for port in backends]


def test_a_pool_within_the_dead_band_splits_exactly_evenly(any_redis, clock):
    pool = make_pool(any_redis, clock, **NO_BLOCKS)
    teach(pool, [4, 5, 6])  # the bar: max(4 x 1.25, 4 + 2) = 6 ms, 6 included
    assert counts(pool, 300) == [100, 100, 100]
    assert [b["share"] for b in pool.status()["backends"]] == [1.0, 1.0, 1.0]


def test_a_slower_backend_gets_bar_over_latency_to_the_power(any_redis, clock):
    pool = make_pool(any_redis, clock, **NO_BLOCKS)
    teach(pool, [4, 4, 12])  # bar 6 ms: share (6 / 12)^2 = 1/4
    assert counts(pool, 900) == [400, 400, 100]
    assert state(pool, 2)["share"] == 0.25


def test_the_share_shrinks_continuously_with_latency(any_redis, clock):
    shares = []
    for number, latency in enumerate([7, 9, 12, 18, 24]):
        pool = make_pool(any_redis, clock, pool=f"s{number}", **NO_BLOCKS)
        teach(pool, [4, 4, latency])
        pool.pick()
        shares.append(state(pool, 2)["share"])
    assert shares == sorted(shares, reverse=True)
    assert shares[0] == pytest.approx((6 / 7) ** 2, abs=1e-3)
    assert shares[-1] == pytest.approx((6 / 24) ** 2, abs=1e-3)


def test_a_very_slow_backend_keeps_the_floor_so_it_stays_measured(any_redis, clock):
    pool = make_pool(any_redis, clock, LB_SHARE_FLOOR="0.1", **NO_BLOCKS)
    teach(pool, [4, 4, 600])
    assert counts(pool, 210) == [100, 100, 10]


def test_the_fastest_sets_the_bar_so_slow_traffic_cannot_raise_it(any_redis, clock):
    # A pool average would sit near 26 ms here and let 15 ms through at full share.
    pool = make_pool(any_redis, clock, backends=FOUR, **NO_BLOCKS)
    teach(pool, [4, 15, 60, 30])
    pool.pick()
    shares = [b["share"] for b in pool.status()["backends"]]
    assert shares[0] == 1.0
    assert shares[1] == pytest.approx((6 / 15) ** 2, abs=1e-3)


def test_failures_are_priced_into_the_latency_that_sets_a_share(any_redis, clock):
    pool = make_pool(any_redis, clock,
                     **{**NO_BLOCKS, "LB_ERROR_POINTS": "0", "LB_SHARE_NOISE_Z": "0"})
    teach(pool, [4, 4, 4])
    for _ in range(20):  # as fast as the others, but failing one in two
        report(pool, 2, 4, status=500)
        report(pool, 2, 4)
    pool.pick()
    # A failure enters at 4 x max(average, 20 ms slack) = 80 ms: 60 samples of 4 ms
    # and 20 of 80 have a geometric mean of 4^0.75 x 80^0.25, about 8.5 ms.
    priced = 4 ** 0.75 * 80 ** 0.25
    assert state(pool, 2)["share"] == pytest.approx((6 / priced) ** 2, abs=1e-3)
    assert [state(pool, i)["share"] for i in (0, 1)] == [1.0, 1.0]


def test_a_rare_spike_does_not_cut_a_share(any_redis, clock):
    # The share reads a geometric mean: one 300 ms answer in 40 barely moves it.
    pool = make_pool(any_redis, clock, **NO_BLOCKS)
    teach(pool, [4, 4, 4], samples=39)
    report(pool, 2, 300)
    assert counts(pool, 300) == [100, 100, 100]


def test_a_difference_within_noise_keeps_a_full_share(any_redis, clock):
    # Both have a geometric mean of 8 ms against the fastest's 4 ms (bar 6 ms); the
    # steady one is cut to (6/8)^2, the noisy one (4 and 16 ms in turn) is not yet
    # sure to be slower: two standard errors of 20 such samples widen its bar.
    pool = make_pool(any_redis, clock, backends=FOUR, **NO_BLOCKS)
    teach(pool, [4, 4, 8], samples=20)
    for _ in range(10):
        report(pool, 3, 4)
        report(pool, 3, 16)
    pool.pick()
    assert state(pool, 2)["share"] == pytest.approx((6 / 8) ** 2, abs=1e-3)
    assert state(pool, 3)["share"] == 1.0
    for _ in range(200):  # with ten times the samples it is sure
        report(pool, 3, 4)
        report(pool, 3, 16)
    ports(pool, 4)  # a turn of the cursor: the shares are computed again
    assert state(pool, 3)["share"] < 0.8


def test_too_few_samples_keep_a_full_share(any_redis, clock):
    pool = make_pool(any_redis, clock, **NO_BLOCKS)
    teach(pool, [4, 4, 40], samples=10)  # under LB_SHARE_MIN_SAMPLES (20)
    assert counts(pool, 300) == [100, 100, 100]


def test_a_backend_held_low_is_judged_on_its_fewer_samples(any_redis, clock):
    pool = make_pool(any_redis, clock, **NO_BLOCKS)
    teach(pool, [4, 4, 12])
    pool.pick()
    assert state(pool, 2)["share"] == 0.25
    # Later, its history has faded to what a quarter share brings (8 of 20 asked
    # for at a full share): still judged, still a quarter, not back to full.
    clock.advance(5 * 1.5)  # LB_LATENCY_TAU_S is 5 in these tests: weight 40 -> ~9
    teach(pool, [4, 4], samples=40)
    assert counts(pool, 900) == [400, 400, 100]


def test_power_zero_turns_shares_off(any_redis, clock):
    pool = make_pool(any_redis, clock, **{**NO_BLOCKS, "LB_SHARE_POWER": "0"})
    teach(pool, [4, 4, 40])
    assert counts(pool, 300) == [100, 100, 100]


def test_round_robin_ignores_shares(any_redis, clock):
    pool = make_pool(any_redis, clock, LB_STRATEGY="round_robin")
    teach(pool, [4, 4, 40])
    assert counts(pool, 300) == [100, 100, 100]


def test_static_weights_multiply_the_share(any_redis, clock):
    pool = make_pool(any_redis, clock, **NO_BLOCKS)
    put(pool, "http://127.0.0.1:9003", weight=2)
    teach(pool, [4, 4, 12])  # share 1/4 of a weight of 2: half a full share
    assert counts(pool, 500) == [200, 200, 100]


def test_a_ramp_and_a_share_multiply(any_redis, clock):
    pool = make_pool(any_redis, clock, LB_SLOW_START_S="10", **NO_BLOCKS)
    teach(pool, [4, 4, 12])
    any_redis.hset(pool.membership.keys[3], mapping={"ramp_at": clock(), "credit": 0})
    clock.advance(5)  # half way up the ramp: 1/2 x 1/4
    assert counts(pool, 1700) == [800, 800, 100]


def test_a_short_backend_is_still_taken_when_the_full_ones_are_busy(any_redis, clock):
    pool = make_pool(any_redis, clock, **NO_BLOCKS)
    teach(pool, [4, 4, 12])
    picks = [pool.pick(flags="bb.").port for _ in range(8)]
    assert picks == [9003] * 8
    assert pool.status()["over_cap_picks"] == 0
    assert pool.status()["panic_picks"] == 0


def test_a_retry_takes_the_only_untried_backend_whatever_its_share(any_redis, clock):
    pool = make_pool(any_redis, clock, **NO_BLOCKS)
    teach(pool, [4, 4, 600])
    assert pool.pick(flags="xx.", retry=True).port == 9003


def test_a_blocked_backend_sets_no_bar(any_redis, clock):
    pool = make_pool(any_redis, clock, **NO_BLOCKS)
    teach(pool, [2, 12, 12])
    any_redis.hset(pool.membership.keys[1], mapping={"in_block": 1, "blocked_turns": 1000})
    assert counts(pool, 200) == [0, 100, 100]


def test_shares_follow_recovery(any_redis, clock):
    pool = make_pool(any_redis, clock, **NO_BLOCKS)
    teach(pool, [4, 4, 12])
    assert counts(pool, 90) == [40, 40, 10]
    clock.advance(20)  # its old answers fade (tau 5 s); new fast ones take over
    teach(pool, [4, 4, 4])
    assert counts(pool, 300) == [100, 100, 100]
    assert state(pool, 2)["share"] == 1.0


def test_a_backend_answering_fast_4xx_does_not_set_the_bar(any_redis, clock):
    # Misconfigured, it answers every request with a 404 in a fraction of a
    # millisecond: fast, and "ok" (a 4xx is the client's fault), yet no measure of
    # how fast it serves. Counted, it would cut the healthy backends to the floor.
    pool = make_pool(any_redis, clock, **NO_BLOCKS)
    teach(pool, [8, 8])
    for _ in range(40):
        report(pool, 2, 0.3, status=404)
    assert counts(pool, 300) == [100, 100, 100]
    for _ in range(40):  # its real answers count as any backend's
        report(pool, 2, 30)
    pool.pick()
    assert state(pool, 2)["share"] == pytest.approx((10 / 30) ** 2, abs=1e-3)


def test_every_worker_sees_the_same_sequence(any_redis, clock):
    one = make_pool(any_redis, clock, **NO_BLOCKS)
    two = make_pool(any_redis, clock, **NO_BLOCKS)  # another worker, same pool
    teach(one, [4, 4, 12])
    got = [(one if i % 2 else two).pick().port for i in range(900)]
    assert [got.count(p) for p in (9001, 9002, 9003)] == [400, 400, 100]


def test_an_outcome_report_keeps_the_geometric_mean(any_redis, clock):
    pool = make_pool(any_redis, clock, **NO_BLOCKS)
    for latency in (2, 8):
        pool.report(Outcome(pool.backends[0], latency / 1000, status=200))
    stored = any_redis.hgetall(pool.membership.keys[1])
    mean = math.exp(float(stored[b"log_lat_sum"]) / float(stored[b"log_weight"]))
    assert mean == pytest.approx(4.0, rel=1e-6)


def test_shares_are_kept_for_a_turn_of_the_cursor_and_then_computed_again(any_redis, clock):
    pool = make_pool(any_redis, clock, **NO_BLOCKS)
    teach(pool, [4, 4, 12])
    pool.pick()  # computed here, a quarter share: kept for the next two picks
    clock.advance(5 * 10)  # the old answers fade away (tau 5 s)
    teach(pool, [4, 4, 4])
    pool.pick()
    pool.pick()
    assert state(pool, 2)["share"] == 0.25  # still the kept quarter
    pool.pick()  # a turn later: computed again
    assert state(pool, 2)["share"] == 1.0


def test_a_membership_change_computes_the_shares_again_at_once(any_redis, clock):
    pool = make_pool(any_redis, clock, backends=FOUR, **NO_BLOCKS)
    teach(pool, [4, 4, 12, 4])
    pool.pick()
    assert state(pool, 2)["share"] == 0.25
    teach(pool, [4, 4, 4, 4], samples=400)  # now as fast as the others...
    put(pool, "http://127.0.0.1:9002", weight=0)  # ...and the kept list is for the old pool
    pool.pick()
    assert state(pool, 2)["share"] == 1.0


def test_a_backend_taken_on_credit_owes_at_most_one_pick(any_redis, clock):
    pool = make_pool(any_redis, clock, **NO_BLOCKS)
    teach(pool, [4, 4, 12])  # a quarter share
    for _ in range(50):  # the full-share ones busy for a long spell
        assert pool.pick(flags="bb.").port == 9003
    # Then it is back to its quarter, one pick late at most, not starved for
    # 50 x 4 passes.
    assert counts(pool, 90) in ([40, 40, 10], [41, 40, 9], [40, 41, 9])
