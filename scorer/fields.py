"""The fields of the pool's Redis hashes, declared once.

`BACKEND` lays out each backend's hash, `lb:{pool}:b:<id>`; `POOL` the pool's,
`lb:{pool}:pool`. For each field: what it holds, the scripts (scorer/lua/) that
write it, who reads it ("status": scorer/status.py, for the admin listener), and
whether the admin's reset clears it. tests/test_fields.py holds the Lua sources
to this declaration both ways, so a field cannot be added, renamed or dropped
in one place only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class Field:
    """One field of a hash."""

    name: str  # for a `prefix` field, what every such name starts with
    meaning: str
    writers: tuple[str, ...]
    readers: tuple[str, ...]
    reset: bool = False  # cleared by the admin's reset (scorer/status.py)
    prefix: bool = False


def _layout(*fields: tuple) -> dict[str, Field]:
    """(name, "writer ...", "reader ...", meaning[, reset]) -> the fields by name."""
    out = {}
    for name, writers, readers, meaning, *reset in fields:
        out[name] = Field(name, meaning, tuple(writers.split()), tuple(readers.split()),
                          bool(reset and reset[0]), name.endswith(":"))
    return out


RESET = True

BACKEND = _layout(
    # The score and the block it leads to.
    ("score", "report pick", "report pick status", "points; a block ends at 0", RESET),
    ("updated_at", "report", "report", "time of the last report, for fading", RESET),
    ("lat_sum", "report", "report status", "decayed latency sum (failures priced)", RESET),
    ("lat_weight", "report", "report status", "its decayed weight", RESET),
    ("log_lat_sum", "report", "report pick", "decayed sum of ln(latency), 4xx left out", RESET),
    ("log_sq_sum", "report", "report pick", "decayed sum of ln(latency)^2: its spread", RESET),
    ("log_weight", "report", "report pick", "their decayed weight", RESET),
    ("err_sum", "report", "report status", "decayed count of failures", RESET),
    ("err_weight", "report", "report status", "decayed count of outcomes", RESET),
    ("in_block", "report pick", "report pick status", "1 while blocked", RESET),
    ("blocked_turns", "report pick", "pick status", "turns of the cursor left to skip", RESET),
    ("block_until", "report", "report pick status", "earliest end of the block", RESET),
    ("block_level", "report", "report status", "reoffences in a row: doubles the time", RESET),
    ("blocks", "report", "status", "blocks so far"),
    ("last_block_at", "report", "status", "when the last block began"),
    ("block_reason", "report", "status", "why, in words"),
    # The way back: trials after passing checks, and slow start.
    ("trial", "report pick", "report pick status", "1 offered, 2 in flight, 0 none", RESET),
    ("trial_at", "pick", "report", "when the trial request went out"),
    ("trial_streak", "report pick", "report", "trials passed in a row in this block"),
    ("trials_passed", "report", "status", "trials passed (a run of enough ends a block)"),
    ("trials_failed", "report", "status", "trials failed or slow: the block stayed"),
    ("ramp_at", "report pick", "pick status", "start of the slow start", RESET),
    ("credit", "report pick", "pick", "credit toward the next pick of a share below 1", RESET),
    ("share", "pick", "pick status", "share per turn of the cursor (3 digits; absent: 1)", RESET),
    # Active health checks.
    ("last_check", "report", "pick", "time of the last check"),
    ("last_check_outcome", "report", "pick status", "its outcome kind, or 'slow' (passed)"),
    ("check_ok_streak", "report", "report status", "checks passed, not slow, in a row"),
    ("check_lat_sum", "report", "report", "decayed latency sum of its passing checks"),
    ("check_lat_weight", "report", "report", "its decayed weight"),
    ("check_at", "report", "report", "time of its last passing check, for fading"),
    ("checks_passed", "report", "status", "checks passed so far"),
    ("checks_failed", "report", "status", "checks failed so far"),
    # Traffic counters.
    ("requests", "report", "status", "reported attempts"),
    ("outcome:", "report", "status", "outcome:<kind>: attempts per outcome kind"),
    ("last_seen", "report", "status", "time of the last report"),
    ("last_latency_ms", "report", "status", "its latency"),
    ("last_outcome", "report", "status", "its outcome kind"),
    ("last_status", "report", "status", "its HTTP status, 0 for none"),
)

POOL = _layout(
    # The shared cursor and the retry budget.
    ("cursor", "pick", "pick", "index of the last backend picked"),
    ("turn_served", "pick", "pick", "picks of it in this turn (weights)"),
    ("req_sum", "pick", "pick", "decayed count of first attempts"),
    ("retry_sum", "pick", "pick", "decayed count of retries"),
    ("budget_at", "pick", "pick", "time of the last count"),
    ("retries_denied", "pick", "status", "retries refused by the budget"),
    ("panic_picks", "pick", "status", "picks among blocked backends only"),
    ("over_cap_picks", "pick", "status", "picks over a backend's in-flight cap"),
    ("trial_picks", "pick", "status", "trial requests sent"),
    ("shares", "pick", "pick", "every backend's share, comma-separated, in the pool's order"),
    ("shares_left", "pick", "pick", "picks left before they are computed again"),
    ("shares_version", "pick", "pick", "the membership version they were computed for"),
    # The yardsticks every report is judged against.
    ("avg_sum", "report", "report status", "decayed latency sum of successes"),
    ("avg_weight", "report", "report status", "its decayed weight"),
    ("all_sum", "report", "report status", "decayed latency sum, failures priced"),
    ("all_weight", "report", "report status", "its decayed weight"),
    ("err_sum", "report", "report status", "decayed count of failures"),
    ("err_weight", "report", "report status", "decayed count of outcomes"),
    ("updated_at", "report", "report", "time of the last report, for fading"),
    ("check_sum", "report", "report", "decayed latency sum of every passing check"),
    ("check_weight", "report", "report", "its decayed weight"),
    ("check_at", "report", "report", "time of the last passing check, for fading"),
    ("blocks_deferred", "report", "status", "blocks refused: the cap was full"),
    ("block_swaps", "report", "status", "blocks given up for a worse backend"),
    # The membership's version (the members themselves have keys of their own).
    ("members_rev", "members", "members pick", "revision, bumped by every change"),
    ("members_epoch", "members", "members pick", "who seeded it: tells copies apart"),
    ("members_config", "members", "members", "the start-up list it grew from"),
    ("members_seq", "members", "", "last rotation place given out"),
)

# What an admin reset clears: score, block and the decayed history behind them.
RESET_FIELDS = tuple(name for name, field in BACKEND.items() if field.reset)


class Reading:
    """One stored hash, read by declared field names only: an undeclared one is a KeyError."""

    def __init__(self, state: Mapping[str, str], layout: Mapping[str, Field]) -> None:
        self._state, self._layout = state, layout

    def _declared(self, name: str) -> str:
        if name not in self._layout:
            raise KeyError(f"{name!r} is not declared in scorer/fields.py")
        return name

    def text(self, name: str) -> str | None:
        return self._state.get(self._declared(name))

    def has(self, name: str) -> bool:
        return self._declared(name) in self._state

    def number(self, name: str) -> float:
        return float(self.text(name) or 0)

    def ratio(self, total: str, weight: str) -> float | None:
        total_, weight_ = self.number(total), self.number(weight)
        return total_ / weight_ if weight_ else None

    def counts(self, prefix: str) -> dict[str, int]:
        """The fields under a declared prefix, by what follows it."""
        prefix = self._declared(prefix)
        return {key.removeprefix(prefix): int(value)
                for key, value in self._state.items() if key.startswith(prefix)}
