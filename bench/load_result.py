"""The threaded benchmark's figures: how each request ended (Outcome), and what the run
measured (LoadResult), its JSON document and its text report (bench/load.py defines them)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

from bench.stats import percentile

ERROR_KINDS = ("4xx", "5xx", "timeout", "connection", "bad_body", "other")
PERCENTILES = (50, 90, 99)
# Shares key for a success without X-Upstream (e.g. an echo instance hit directly).
NO_UPSTREAM = "(no X-Upstream)"


@dataclass(frozen=True)
class Outcome:
    """How one request ended, as the client saw it."""

    kind: str                 # "success" or one of ERROR_KINDS
    status: int | None        # None when no HTTP answer arrived
    latency_s: float | None   # None when no HTTP answer arrived
    upstream: str | None = None
    detail: str | None = None  # the exception, for transport errors


@dataclass
class LoadResult:
    """The outcome of one load run, with the derived figures the report shows."""

    url: str
    requests: int
    workers: int
    id_offset: int
    wall_s: float
    successes: int
    errors: dict[str, int]
    latencies_ms: list[float] = field(repr=False)    # sorted, one per answered request
    shares: dict[str, int] = field(default_factory=dict)  # successes per X-Upstream
    method: str = "POST"
    payload: int = 0
    error_examples: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_outcomes(cls, outcomes: Iterable[Outcome], *, url: str, workers: int,
                      id_offset: int, wall_s: float, method: str = "POST",
                      payload: int = 0) -> "LoadResult":
        """Aggregate per-request outcomes (pure: no network)."""
        outcomes = list(outcomes)
        errors = {kind: 0 for kind in ERROR_KINDS}
        examples: dict[str, str] = {}
        shares: Counter[str] = Counter()
        for outcome in outcomes:
            if outcome.kind == "success":
                shares[outcome.upstream or NO_UPSTREAM] += 1
            else:
                errors[outcome.kind] += 1
                # One example per kind, so an "other" is never a mystery.
                examples.setdefault(outcome.kind, outcome.detail or f"HTTP {outcome.status}")
        latencies = sorted(o.latency_s * 1000 for o in outcomes if o.latency_s is not None)
        return cls(url=url, requests=len(outcomes), workers=workers, id_offset=id_offset,
                   wall_s=wall_s, successes=sum(shares.values()), errors=errors,
                   latencies_ms=latencies, shares=dict(sorted(shares.items())),
                   method=method, payload=payload, error_examples=examples)

    @property
    def completed(self) -> int:
        """Requests that got an HTTP answer (any status)."""
        return len(self.latencies_ms)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def error_rate(self) -> float:
        return self.error_count / self.requests if self.requests else 0.0

    @property
    def throughput_rps(self) -> float:
        return self.completed / self.wall_s if self.wall_s > 0 else 0.0

    def latency_ms(self) -> dict[str, float | None]:
        """p50/p90/p99/max over answered requests; None for each when nothing answered."""
        if not self.latencies_ms:
            return {**{f"p{q}": None for q in PERCENTILES}, "max": None}
        return {**{f"p{q}": percentile(self.latencies_ms, q) for q in PERCENTILES},
                "max": self.latencies_ms[-1]}

    def share_fractions(self) -> dict[str, dict[str, float]]:
        return {backend: {"count": count, "fraction": count / self.successes}
                for backend, count in self.shares.items()}

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of `--json`; keys are stable."""
        return {
            "url": self.url,
            "requests": self.requests,
            "workers": self.workers,
            "wall_s": self.wall_s,
            "successes": self.successes,
            "errors": dict(self.errors),
            "error_rate": self.error_rate,
            "throughput_rps": self.throughput_rps,
            "latency_ms": self.latency_ms(),
            "shares": self.share_fractions(),
            "id_offset": self.id_offset,
            "completed": self.completed,
            "method": self.method,
            "payload": self.payload,
            "error_examples": dict(self.error_examples),
        }

    def report(self) -> str:
        """A plain-text table of the run."""
        last_id = self.id_offset + self.requests - 1
        lines = [
            f"{self.method} {self.url}: {self.requests} requests from {self.workers} workers, "
            f"{self.payload}-byte JSON bodies, X-Request-ID {self.id_offset}..{last_id}",
            f"{'wall time':<22}{self.wall_s:>10.3f} s",
            f"{'successes':<22}{self.successes:>10}  "
            f"({_pct(self.successes, self.requests)}, 2xx echoing the body sent)",
            f"{'errors':<22}{self.error_count:>10}  ({_pct(self.error_count, self.requests)})",
        ]
        lines += [f"  {kind:<20}{self.errors[kind]:>10}" for kind in ERROR_KINDS]
        lines += [f"    e.g. {kind}: {example}" for kind, example in self.error_examples.items()]
        lines.append(f"{'throughput':<22}{self.throughput_rps:>10.1f} req/s  "
                     f"({self.completed} answered / wall time)")
        lines.append(f"latency, ms, nearest rank over all {self.completed} answered requests "
                     "(any status):")
        lines += [f"  {name:<20}{_ms(value):>10}" for name, value in self.latency_ms().items()]
        lines.append("shares of the successful requests (X-Upstream):")
        if not self.shares:
            lines.append("  (no successes)")
        for backend, share in self.share_fractions().items():
            lines.append(f"  {backend:<20}{share['count']:>10}  {share['fraction']:>7.1%}")
        return "\n".join(lines)


def _pct(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "n/a"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"
