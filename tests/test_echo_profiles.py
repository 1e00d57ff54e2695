"""Seeded echo profiles: reproducible, within the prototype's ranges, quiet at SEED=0."""
from __future__ import annotations

import statistics

import pytest

from apps.echo.profiles import (
    LATENCY_CAP_FACTOR, MAX_ERROR_RATE, MAX_MEAN_LATENCY_MS, Profile, draw, parse_spec, phase_at,
    profile_for, with_spec,
)


def test_seed_zero_is_well_behaved():
    for instance in range(5):
        profile = profile_for(0, instance)
        assert (profile.error_rate, profile.mean_latency_ms) == (0.0, 0.0)
        assert all(draw(profile, str(k)).latency_s == 0 and not draw(profile, str(k)).fail
                   for k in range(200))


def test_profiles_are_fixed_by_seed_and_instance():
    assert profile_for(7, 1) == profile_for(7, 1)
    assert profile_for(7, 1) != profile_for(7, 2)
    assert profile_for(7, 1) != profile_for(8, 1)


def test_profiles_stay_within_the_stated_ranges():
    profiles = [profile_for(seed, i) for seed in range(1, 200) for i in range(5)]
    assert all(0 <= p.error_rate < MAX_ERROR_RATE for p in profiles)
    assert all(0 <= p.mean_latency_ms < MAX_MEAN_LATENCY_MS for p in profiles)
    # The draws cover the ranges rather than clustering in one corner.
    assert max(p.error_rate for p in profiles) > 0.45 and min(p.error_rate for p in profiles) < 0.05
    assert max(p.mean_latency_ms for p in profiles) > 450 and min(p.mean_latency_ms for p in profiles) < 50


def test_draws_depend_only_on_seed_instance_and_key():
    profile = profile_for(42, 0)
    keys = [str(k) for k in range(300)]
    forwards = [draw(profile, k) for k in keys]
    backwards = [draw(profile, k) for k in reversed(keys)][::-1]
    assert forwards == backwards
    assert draw(profile, "7") != draw(profile_for(42, 1), "7")


def test_error_rate_and_mean_latency_match_the_profile():
    profile = Profile(seed=3, instance=0, error_rate=0.3, mean_latency_ms=200)
    draws = [draw(profile, str(k)) for k in range(20000)]
    assert sum(d.fail for d in draws) / len(draws) == pytest.approx(0.3, abs=0.015)
    latencies = [d.latency_s for d in draws]
    assert statistics.fmean(latencies) == pytest.approx(0.2, rel=0.03)
    # A real spread with a tail, not an on/off sleep.
    assert len(set(latencies)) > 19000
    q = statistics.quantiles(latencies, n=100)
    assert q[98] > 2 * q[49]
    assert max(latencies) <= LATENCY_CAP_FACTOR * 0.2


@pytest.mark.parametrize("spec, times, states", [
    ("steady:start=0", [0, 100], ["healthy", "healthy"]),
    ("degrading:start=5,period=10", [0, 6, 20], ["healthy", "degrading", "degrading"]),
    ("fail_recover:start=5,period=10", [4.9, 5, 14.9, 15], ["healthy", "failing", "failing",
                                                             "healthy"]),
    ("flapping:start=2,period=3", [1, 2, 4.9, 5, 8, 11], ["healthy", "healthy", "healthy",
                                                          "failing", "healthy", "failing"]),
    ("hang:start=3", [2.9, 3], ["healthy", "hanging"]),
    ("dead:start=3", [2.9, 3], ["healthy", "dead"]),
    ("reset:start=1,factor=0.2", [0, 1], ["healthy", "resetting"]),
])
def test_each_profile_follows_its_timeline(spec, times, states):
    profile = with_spec(profile_for(0, 0), spec)
    assert [phase_at(profile, t).state for t in times] == states


def test_a_degrading_latency_ramps_to_its_peak():
    profile = with_spec(profile_for(0, 0), "degrading:start=0,period=10,factor=4,latency=50")
    means = [phase_at(profile, t).mean_latency_ms for t in (0, 5, 10, 60)]
    assert means == [50, 125, 200, 200]


def test_draws_follow_the_phase():
    profile = with_spec(profile_for(0, 0), "fail_recover:start=5,period=5")
    assert not draw(profile, "k", 1).fail and draw(profile, "k", 6).fail
    assert draw(with_spec(profile, "hang:start=0"), "k").hang
    assert draw(with_spec(profile, "dead:start=0"), "k").dead
    resets = [draw(with_spec(profile, "reset:start=0,factor=0.3"), str(k)).reset
              for k in range(2000)]
    assert sum(resets) / 2000 == pytest.approx(0.3, abs=0.04)


def test_seeds_also_draw_changing_profiles():
    kinds = [profile_for(seed, i).kind for seed in range(1, 200) for i in range(5)]
    steady = kinds.count("steady") / len(kinds)
    assert steady == pytest.approx(0.7, abs=0.05)
    assert set(kinds) == {"steady", "degrading", "fail_recover", "flapping", "hang", "dead",
                          "reset"}


@pytest.mark.parametrize("spec, message", [
    ("melting", "unknown profile kind"), ("hang:when=3", "unknown profile parameter"),
    ("hang:start=soon", "is not a number"),
])
def test_bad_specs_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_spec(spec)
