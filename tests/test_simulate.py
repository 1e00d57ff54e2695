"""Seeded echo profiles: reproducible, within the prototype's ranges, quiet at SEED=0."""
from __future__ import annotations

import statistics

import pytest

from apps.simulate import (
    LATENCY_CAP_FACTOR, MAX_ERROR_RATE, MAX_MEAN_LATENCY_MS, Profile, draw, profile_for,
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
