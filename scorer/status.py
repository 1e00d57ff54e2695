"""The pool as the admin listener shows it, and the admin's edits on raw Redis.

Reads and hand edits only: every rule that changes a score or a block lives in
the Lua scripts. The fields read here are declared in scorer/fields.py.
"""
from __future__ import annotations

from typing import Any, Mapping

from apps.config import Backend, Settings
from scorer.fields import BACKEND, POOL, RESET_FIELDS, Reading
from scorer.keys import backend_key, checker_key
from scorer.membership import Membership
from scorer.store import Store


class Status:
    """The status read model of one pool, and the edits that bypass the scripts."""

    def __init__(self, settings: Settings, store: Store, membership: Membership) -> None:
        self.settings = settings
        self.store = store
        self.membership = membership

    def raw_state(self) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
        """The pool's hash and each backend's hash, as stored in Redis."""
        self.membership.sync()
        pipe = self.store.redis.pipeline(transaction=False)
        for key in self.membership.keys:
            pipe.hgetall(key)
        pool, *backends = [{k.decode(): v.decode() for k, v in reply.items()}
                           for reply in pipe.execute()]
        return pool, {b.id: state for b, state in zip(self.membership.backends, backends)}

    def status(self) -> dict[str, Any]:
        """The pool as the admin listener shows it (values as of each last report)."""
        pool_state, backends = self.raw_state()
        pool = Reading(pool_state, POOL)
        counters = ("panic_picks", "over_cap_picks", "blocks_deferred", "block_swaps",
                    "retries_denied", "trial_picks")
        return {
            "latency_avg_ms": pool.ratio("avg_sum", "avg_weight"),
            "latency_yardstick_ms": pool.ratio("all_sum", "all_weight"),
            "error_rate": pool.ratio("err_sum", "err_weight"),
            **{name: int(pool.number(name)) for name in counters},
            "members_rev": self.membership.rev,
            "backends": [{**m.as_dict(), **describe_backend(backends[m.id])}
                         for m in self.membership.members],
        }

    def checker(self) -> str | None:
        """Who holds the health-checker lock now."""
        holder = self.store.redis.get(checker_key(self.settings.pool))
        return holder.decode() if holder else None

    def reset(self, backend: Backend) -> None:
        """Forget a backend's score, block and recent history (its counters stay)."""
        self.store.redis.hdel(backend_key(self.settings.pool, backend.id), *RESET_FIELDS)

    def forget(self) -> None:
        """Delete this pool's keys (a finished simulation's)."""
        self.store.redis.delete(*self.membership.keys, checker_key(self.settings.pool),
                                *self.membership.member_keys[1:])  # [0] is in `keys`


def describe_backend(state: Mapping[str, str]) -> dict[str, Any]:
    """One backend's stored state in readable form."""
    b = Reading(state, BACKEND)
    return {
        # Until the cursor finds the block over (see pick.lua), even past its end.
        "blocked": b.text("in_block") == "1",
        "score": round(b.number("score"), 3),
        "latency_ms": b.ratio("lat_sum", "lat_weight"),
        "error_rate": b.ratio("err_sum", "err_weight"),
        "blocked_turns": int(b.number("blocked_turns")),
        "block_until": b.number("block_until") or None,
        "block_level": int(b.number("block_level")),
        "blocks": int(b.number("blocks")),
        "last_block_at": b.number("last_block_at") or None,
        "block_reason": b.text("block_reason"),
        "trial": {"1": "offered", "2": "in flight"}.get(b.text("trial") or "", None),
        "ramp_started_at": b.number("ramp_at") or None,
        # Its share per turn of the cursor among unblocked backends (pick.lua).
        "share": b.number("share") if b.has("share") else 1.0,
        "checks": {"passed": int(b.number("checks_passed")),
                   "failed": int(b.number("checks_failed")),
                   "passing_streak": int(b.number("check_ok_streak")),
                   "last": b.text("last_check_outcome")},
        "trials": {"passed": int(b.number("trials_passed")),
                   "failed": int(b.number("trials_failed"))},
        "requests": int(b.number("requests")),
        "outcomes": b.counts("outcome:"),
        "last_status": int(b.number("last_status")) or None,
        "last_outcome": b.text("last_outcome"),
        "last_latency_ms": b.number("last_latency_ms") if b.has("last_latency_ms") else None,
        "last_seen": b.number("last_seen") or None,
    }
