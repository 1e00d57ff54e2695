"""The faults benchmark's scenarios and their targets: what one run recorded, and each
scenario's check of it (bench/faults.py runs them)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from apps.echo import profiles as simulate

BASE_LATENCY_MS = "20"  # every instance's base latency, so "3x slower" means something


@dataclass
class Scenario:
    name: str
    spec: str                 # the first instance's profile
    duration_s: float
    check: Callable[["Run"], dict[str, Any]]


@dataclass
class Run:
    """What one scenario recorded: answers on the changing instance's clock, and
    /status snapshots."""

    spec: str
    target: str               # host:port of the changing instance
    others: list[str]
    answers: list[tuple[float, str, int, float]] = field(default_factory=list)
    statuses: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    probes: list[tuple[float, str]] = field(default_factory=list)

    @property
    def profile(self) -> simulate.Profile:
        return simulate.with_spec(simulate.profile_for(0, 0), self.spec)

    def share(self, start: float, end: float) -> tuple[float, int]:
        window = [a for a in self.answers if start <= a[0] < end and a[2] < 500]
        served = sum(1 for a in window if a[1] == self.target)
        return (served / len(window) if window else float("nan")), len(window)

    def backend_state(self, status: dict[str, Any]) -> dict[str, Any]:
        return next(b for b in status["backends"] if b["id"] == self.target)


def check_dead(run: Run) -> dict[str, Any]:
    dead_at = run.profile.start_s
    begin = _status_at(run, dead_at + 2)
    end = run.statuses[-1][1]
    sent = run.backend_state(end)["requests"] - run.backend_state(begin)["requests"]
    total = (sum(b["requests"] for b in end["backends"])
             - sum(b["requests"] for b in begin["backends"]))
    share = sent / total if total else float("nan")
    return {"measured": f"{share:.2%} of {total} attempts after the first 2 s",
            "target": "<= 1 %", "met": share <= 0.01}


def check_fail_recover(run: Run) -> dict[str, Any]:
    recovered = run.profile.start_s + run.profile.period_s
    share, count = run.share(recovered + 4, recovered + 5)
    fair = 1 / (1 + len(run.others))
    return {"measured": f"{share / fair:.0%} of a fair share ({count} answers in the window)",
            "target": ">= 80 %", "met": share >= 0.8 * fair}


def check_degrading(run: Run) -> dict[str, Any]:
    profile = run.profile
    others = float(BASE_LATENCY_MS)
    # The instance's own latency is known exactly: its profile's mean at each moment.
    crossed = next(t / 10 for t in range(0, int(run.answers[-1][0] * 10))
                   if simulate.phase_at(profile, t / 10).mean_latency_ms >= 3 * others)
    share, count = run.share(crossed, run.answers[-1][0])
    return {"measured": f"{share:.2%} of {count} requests from {crossed:.1f} s, when it "
                        f"reached 3x the others' {others:.0f} ms",
            "target": "<= 5 %", "met": share <= 0.05}


def check_flapping(run: Run) -> dict[str, Any]:
    profile = run.profile
    windows = []
    for index in range(int((run.statuses[-1][0] - profile.start_s) // profile.period_s)):
        start = profile.start_s + index * profile.period_s
        failing = index % 2 == 1
        states = [run.backend_state(s)["blocked"] for t, s in run.statuses
                  if start <= t < start + profile.period_s]
        wrong = sum(1 for blocked in states if blocked != failing) / max(1, len(states))
        windows.append({"window": index, "failing": failing, "wrong_share": round(wrong, 3)})
    return {"measured": ", ".join(f"{'failing' if w['failing'] else 'healthy'} "
                                  f"{w['wrong_share']:.0%}" for w in windows),
            "target": "reported: share of each window in the wrong state",
            "met": None, "windows": windows}


SCENARIOS = [
    Scenario("dead", "dead:start=4", 14, check_dead),
    Scenario("fail_recover", "fail_recover:start=3,period=5", 16, check_fail_recover),
    Scenario("degrading", f"degrading:start=3,period=10,factor=10,latency={BASE_LATENCY_MS}",
             16, check_degrading),
    Scenario("flapping", "flapping:start=3,period=4", 20, check_flapping),
]


def _status_at(run: Run, moment: float) -> dict[str, Any]:
    return min(run.statuses, key=lambda s: abs(s[0] - moment))[1]


def checkers(run: Run) -> int:
    """The most distinct checkers seen probing within any one second."""
    most = 0
    for t, _ in run.probes:
        most = max(most, len({owner for s, owner in run.probes if t <= s < t + 1}))
    return most
