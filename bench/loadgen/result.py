"""What one load run measured (LoadResult), and the latency histogram behind its percentiles."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

# Latency histogram: log-spaced buckets 1% wide (100 per factor e), 1 us to 100 s.
# Percentiles from it are within 0.5% of the exact ones, and a process returns
# ~1,850 counts instead of one float per request.
PER_E = 100
MIN_US = 1.0
BUCKETS = int(math.log(100e6 / MIN_US) * PER_E) + 1


@dataclass
class LoadResult:
    """What one load run measured (see bench/loadgen/__init__.py for the definitions)."""

    requests: int
    errors: int
    non_2xx: int          # wrk counts only 4xx and 5xx here ("Non-2xx or 3xx responses")
    duration_s: float
    p50_ms: float         # nan when there were no requests
    p90_ms: float
    p99_ms: float
    generator: str        # "loadgen" or "wrk"
    cpu_s: float | None = None   # CPU of the generator's processes (loadgen: the window only)
    connections: int = 0
    statuses: dict[str, int] = field(default_factory=dict)   # "2xx": n, ... (loadgen only)
    started_at: float | None = None   # time.time() when the window opened (loadgen only)

    @property
    def rps(self) -> float:
        """Completed requests per second of the measured window."""
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0


def percentile_ms(hist: list[int], total: int, q: float) -> float:
    """Nearest-rank percentile from the merged histogram (bucket's geometric middle)."""
    if total == 0:
        return math.nan
    rank, seen = max(1, math.ceil(q * total)), 0
    for bucket, count in enumerate(hist):
        seen += count
        if seen >= rank:
            return MIN_US * math.exp((bucket + 0.5) / PER_E) / 1000
    return math.nan


def merged(done: list, duration_s: float, connections: int,
           started_at: float) -> LoadResult:
    """One LoadResult from each process's (requests, errors, classes, histogram, CPU)."""
    hist, classes = [0] * BUCKETS, [0] * 6
    requests = errors = 0
    cpu_s = 0.0
    for count, errs, child_classes, child_hist, cpu in done:
        requests, errors, cpu_s = requests + count, errors + errs, cpu_s + cpu
        classes = [a + b for a, b in zip(classes, child_classes)]
        hist = [a + b for a, b in zip(hist, child_hist)]
    return LoadResult(
        requests=requests, errors=errors, non_2xx=requests - classes[2],
        duration_s=float(duration_s),
        p50_ms=percentile_ms(hist, requests, 0.50), p90_ms=percentile_ms(hist, requests, 0.90),
        p99_ms=percentile_ms(hist, requests, 0.99), generator="loadgen", cpu_s=cpu_s,
        connections=connections, statuses={f"{i}xx": n for i, n in enumerate(classes) if n},
        started_at=started_at)
