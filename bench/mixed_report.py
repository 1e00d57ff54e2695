"""What one run of bench/mixed.py recorded, its figures, issue 15's targets on them,
and the printed table (pure: no I/O, so the tests give it made-up runs)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from bench.mixed_scenarios import LIVE, SLOW_INSTANCE
from bench.stats import percentile

# The balancer may take this long to learn: static_mixed's targets count from here.
WARMUP_S = 3.0
SLOW_SHARE_TARGET = 0.005          # of attempts to static_mixed's 300 ms backend after WARMUP_S
P95_MARGIN_MS = 1.0                # static_mixed's p95 against healthy3's, same mode
GRADED_P95_MS = 15.0
# Modes where a failed attempt is retried elsewhere: graded must show no error there.
RETRYING_MODES = ("retry", "nginx")


@dataclass
class MixedRun:
    """One scenario under one mode. Answers are (sent, X-Upstream, status, latency_s)
    on the run's clock; `served` holds each backend's count of requests it served (its
    /profile's), at the start, at WARMUP_S and at the end: every attempt, retries
    included, whichever balancer sent it."""

    scenario: str
    mode: str
    answers: list[tuple[float, str, int, float]] = field(default_factory=list)
    statuses: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    served: dict[str, list[int]] = field(default_factory=dict)


def figures(run: MixedRun) -> dict[str, Any]:
    """Latency percentiles (all answers; p95 also from WARMUP_S on), client-visible
    errors (anything but a 2xx), each backend's share of the attempts, and the slow
    backend's share after WARMUP_S (static_mixed)."""
    latencies = sorted(a[3] * 1000 for a in run.answers)
    settled = sorted(a[3] * 1000 for a in run.answers if a[0] >= WARMUP_S)
    start, end = run.served.get("start", []), run.served.get("end", [])
    warm = run.served.get("warmup") or end  # a run shorter than WARMUP_S: an empty window
    result = {"scenario": run.scenario, "mode": run.mode, "answers": len(run.answers),
              "errors": sum(1 for a in run.answers if not 200 <= a[2] < 300),
              "p50_ms": percentile(latencies, 50), "p95_ms": percentile(latencies, 95),
              "p99_ms": percentile(latencies, 99),
              "p95_after_warmup_ms": percentile(settled, 95),
              "shares": _shares(start, end),
              # The balancer's blocks by the end (nginx has no /status: None).
              "blocks": sum(b["blocks"] for b in run.statuses[-1][1]["backends"])
              if run.statuses else None}
    if run.scenario == "static_mixed":
        after = _shares(warm, end)
        result["slow_share_after_warmup"] = after[SLOW_INSTANCE] if after else math.nan
    return result


def _shares(before: list[int], after: list[int]) -> list[float]:
    counts = [b - a for a, b in zip(before, after)]
    total = sum(counts)
    return [c / total if total else math.nan for c in counts]


def targets(results: list[dict[str, Any]],
            yardstick: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """Issue 15's targets, one per scenario, mode and check: what, measured, met.
    `yardstick`: healthy3's figures from an earlier run, where this one has none."""
    healthy = {r["mode"]: r for r in [*yardstick, *results] if r["scenario"] == "healthy3"}
    found = []
    for r in results:
        where = f"{r['scenario']}/{r['mode']}"
        if r["scenario"] == "static_mixed":
            share = r["slow_share_after_warmup"]
            found.append(_target(where, f"<= {SLOW_SHARE_TARGET:.1%} of attempts to the 300 ms "
                                 f"backend after {WARMUP_S:g} s", f"{share:.2%}",
                                 share <= SLOW_SHARE_TARGET))
            yardstick = healthy.get(r["mode"])
            if yardstick is None:
                found.append(_target(where, "p95 within 1 ms of healthy3's",
                                     "healthy3 not run", None))
            else:
                mine, theirs = r["p95_after_warmup_ms"], yardstick["p95_after_warmup_ms"]
                found.append(_target(where, f"p95 after {WARMUP_S:g} s within {P95_MARGIN_MS:g} "
                                     f"ms of healthy3's ({theirs:.1f} ms)", f"{mine:.1f} ms",
                                     mine <= theirs + P95_MARGIN_MS))
        elif r["scenario"] == "graded":
            found.append(_target(where, f"p95 <= {GRADED_P95_MS:g} ms", f"{r['p95_ms']:.1f} ms",
                                 r["p95_ms"] <= GRADED_P95_MS))
            if r["mode"] in RETRYING_MODES:
                found.append(_target(where, "no client-visible error",
                                     f"{r['errors']} of {r['answers']}", r["errors"] == 0))
    return found


def _target(where: str, what: str, measured: str, met: bool | None) -> dict[str, Any]:
    return {"where": where, "target": what, "measured": measured, "met": met}


def format_report(results: list[dict[str, Any]], found: list[dict[str, Any]]) -> str:
    head = (f"{'scenario':<14}{'mode':<9}{'p50':>7}{'p95':>7}{'p99':>7}{'errors':>12}"
            f"{'slow>3s':>9}{'blocks':>7}  shares of attempts, backend by backend")
    lines = [head, "-" * len(head)]
    for r in results:
        slow = r.get("slow_share_after_warmup")
        lines.append(
            f"{r['scenario']:<14}{r['mode']:<9}{r['p50_ms']:>7.1f}{r['p95_ms']:>7.1f}"
            f"{r['p99_ms']:>7.1f}{r['errors']:>6}/{r['answers']:<5}"
            f"{'-' if slow is None else f'{slow:.2%}':>9}"
            f"{'-' if r['blocks'] is None else r['blocks']:>7}  "
            + " ".join(f"{s:.1%}" for s in r["shares"]))
    lines.append("")
    for t in found:
        met = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        lines.append(f"target {t['where']}: {t['target']}, measured {t['measured']}: {met}")
    return "\n".join(lines)


def describe(scenario: str) -> str:
    return ", ".join(b.describe() for b in LIVE[scenario])
