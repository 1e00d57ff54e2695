"""The Python face of the shared pool: one object a worker or the admin holds.

`Pool` builds the parts and passes calls on:
- scorer/keys.py: key names, the Lua sources, the Redis client;
- scorer/membership.py: which backends, synced with Redis (`sync`, `change`);
- scorer/traffic.py: `pick`, `report`, the checker lock, and `Outcome`;
- scorer/status.py: the status read model and the admin's edits on raw Redis;
- scorer/fields.py: the fields of the hashes the scripts keep.
`Outcome` and its kinds are re-exported: they are what `report` takes.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

from redis import Redis

from apps.config import Backend, Settings
from scorer.keys import connect, load_lua
from scorer.members import Member, Snapshot, StateFile
from scorer.membership import Membership
from scorer.status import Status
from scorer.store import Store
from scorer.traffic import CONNECT, HTTP_5XX, OK, OUTCOMES, PROTOCOL, TIMEOUT, Outcome, Traffic

__all__ = ["Pool", "Outcome", "OK", "HTTP_5XX", "CONNECT", "TIMEOUT", "PROTOCOL", "OUTCOMES"]

SCRIPTS = ("pick", "report", "checker", "members")


class Pool:
    """One balancer's view of the shared pool of backends."""

    def __init__(self, settings: Settings,
                 redis_factory: Callable[[], Redis] | None = None,
                 clock: Callable[[], float] = time.time, *,
                 degrade: bool = True, marker_dir: str | None = None,
                 state_file: StateFile | None = None, report_sender: bool = True) -> None:
        self.settings = settings
        self.store = Store(redis_factory or (lambda: connect(settings)),
                           {name: load_lua(name) for name in SCRIPTS},
                           degrade=degrade, retry_s=settings.redis_retry_s,
                           marker_dir=marker_dir, connections=settings.redis_connections)
        self.membership = Membership(settings, self.store, state_file)
        # report_sender=False: queued reports wait for the next pick or `flush_reports`
        # (tests that must know when a report lands).
        self.traffic = Traffic(settings, self.store, self.membership, clock,
                               sender=report_sender)
        self.view = Status(settings, self.store, self.membership)

    # --- membership ---------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot:
        return self.membership.snapshot

    @property
    def members(self) -> list[Member]:
        return self.membership.members

    @property
    def backends(self) -> list[Backend]:
        return self.membership.backends

    @property
    def rev(self) -> int:
        return self.membership.rev

    def sync(self) -> None:
        """Reload the membership from Redis (see Membership.sync)."""
        self.membership.sync()

    def change(self, decide: Callable[[list[Member]], Sequence[str]]) -> list[Member]:
        """Apply one membership change, decided on the current one (see Membership.change)."""
        return self.membership.change(decide)

    # --- traffic ------------------------------------------------------------------

    def pick(self, flags: str | Callable[[Sequence[Backend]], str] = "",
             retry: bool = False) -> Backend | None:
        """The next backend for a request, or None for a refused retry (see Traffic.pick)."""
        return self.traffic.pick(flags, retry)

    def report(self, outcome: Outcome, check: bool = False) -> tuple[float, int]:
        """Score one outcome: the new score and a new block's turns (see Traffic.report)."""
        return self.traffic.report(outcome, check)

    def report_later(self, outcome: Outcome,
                     done: Callable[[tuple[float, int]], None] | None = None) -> None:
        """Queue an outcome to be scored ahead of the next pick, or soon after, off the
        answer's path; `done` hears (score, turns) (see Traffic.report_later)."""
        self.traffic.report_later(outcome, done)

    def flush_reports(self) -> None:
        """Send every queued report now."""
        self.traffic.flush()

    def hold_checker(self, owner: str, ttl_s: float) -> bool:
        """Take or renew the pool's health-checker lock; whether `owner` holds it."""
        return self.traffic.hold_checker(owner, ttl_s)

    # --- status and the admin's edits -----------------------------------------------

    @property
    def redis(self) -> Redis:
        return self.store.redis

    def redis_problem(self) -> str | None:
        """None when Redis answers now, else what is wrong with it."""
        return self.store.problem()

    def raw_state(self) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
        """The pool's hash and each backend's hash, as stored in Redis."""
        return self.view.raw_state()

    def status(self) -> dict[str, Any]:
        """The pool as the admin listener shows it."""
        return self.view.status()

    def checker(self) -> str | None:
        """Who holds the health-checker lock now."""
        return self.view.checker()

    def reset(self, backend: Backend) -> None:
        """Forget a backend's score, block and recent history (its counters stay)."""
        self.view.reset(backend)

    def forget(self) -> None:
        """Delete this pool's keys (a finished simulation's)."""
        self.view.forget()
