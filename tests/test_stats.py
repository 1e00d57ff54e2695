"""The benchmarks' one percentile (bench/stats.py): bench/load.py, bench/attacks/ and the
simulator all use it."""
from __future__ import annotations

import math

import pytest

from bench.stats import percentile


def test_percentile_is_nearest_rank():
    values = [15, 20, 35, 40, 50]  # the textbook example
    assert percentile(values, 5) == 15
    assert percentile(values, 30) == 20
    assert percentile(values, 40) == 20
    assert percentile(values, 50) == 35
    assert percentile(values, 100) == 50


def test_percentile_of_1_to_100_is_the_rank_itself():
    values = list(range(1, 101))
    assert [percentile(values, q) for q in (1, 50, 90, 99, 100)] == [1, 50, 90, 99, 100]
    assert percentile(values, 99.5) == 100  # never interpolates: always a real sample


def test_percentile_edges():
    assert percentile([7.0], 0) == 7.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([5.0], 99) == 5.0
    assert percentile([1, 2], 0) == 1
    with pytest.raises(ValueError):
        percentile([1], 101)
    with pytest.raises(ValueError):
        percentile([1], -1)


def test_the_percentile_of_no_values_is_nan():
    # bench/load.py raised ValueError here, bench/sim.py answered NaN: NaN is the one
    # answer now, as for the benchmarks' other missing measurements.
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):  # a q out of range is still a mistake, values or none
        percentile([], 101)
