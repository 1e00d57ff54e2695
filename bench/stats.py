"""Statistics shared by the benchmarks and the simulator."""
from __future__ import annotations

import math
from typing import Sequence


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least q % of values at or below it.

    `sorted_values` must be sorted ascending; 0 <= q <= 100 (else ValueError).
    Never interpolates: the answer is always a real sample. No values give NaN,
    as the benchmarks' other missing measurements do (loadgen's, the matrix's):
    a run in which nothing was answered has no latency, and 0 would pass for one.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is not within 0..100")
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]
