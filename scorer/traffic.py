"""Traffic through the pool: pick a backend, report an attempt's outcome, and
the health checker's lock.

The rules live in scorer/lua/pick.lua and report.lua; this module passes the
clock, the settings and the membership's keys, and converts replies. Each
upstream attempt costs at most two Redis round trips: one pick, one report.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from apps.config import Backend, Settings, script_params
from scorer.keys import checker_key
from scorer.membership import Membership
from scorer.store import Store

# Outcome kinds of one upstream attempt. "ok" is any HTTP answer below 500:
# a 4xx is the client's fault, not the backend's.
OK, HTTP_5XX, CONNECT, TIMEOUT, PROTOCOL = "ok", "http_5xx", "connect", "timeout", "protocol"
OUTCOMES = (OK, HTTP_5XX, CONNECT, TIMEOUT, PROTOCOL)


@dataclass(frozen=True)
class Outcome:
    """What one upstream attempt produced: an HTTP status or a transport error."""

    backend: Backend
    latency_s: float
    status: int | None = None
    error: str | None = None  # CONNECT, TIMEOUT or PROTOCOL when there is no status

    @property
    def kind(self) -> str:
        if self.status is None:
            return self.error or PROTOCOL
        return HTTP_5XX if self.status >= 500 else OK


# The settings report.lua reads, in its ARGV order (ARGV[8] onwards): the rows of
# apps/config/table.py marked script="report", in their order.
REPORT_PARAMS = script_params("report")


class Traffic:
    """Picks and reports of one worker, by its current membership."""

    def __init__(self, settings: Settings, store: Store, membership: Membership,
                 clock: Callable[[], float]) -> None:
        self.store = store
        self.membership = membership
        self.clock = clock
        self._checker_key = checker_key(settings.pool)
        self._scored = "1" if settings.strategy == "scored" else "0"
        self._pick_params = [repr(getattr(settings, name)) for name in script_params("pick")]
        self._params = [repr(getattr(settings, name)) for name in REPORT_PARAMS]

    def pick(self, flags: str | Callable[[Sequence[Backend]], str] = "",
             retry: bool = False) -> Backend | None:
        """Advance the shared cursor past blocked backends and return the one it lands on.

        `flags` has one character per backend: '.' eligible, 'b' busy (passed over
        like a blocked one), 'x' already tried (never picked); or it is a function
        making them for a list of backends, asked again if the membership changes.
        A retry may be refused (retry budget, or nothing untried left): then None.
        """
        members = self.membership
        if not members.synced:
            members.sync()
        for _ in range(3):
            backends, version = members.backends, members.snapshot.version
            index, _panic, _rev = self.store.run(
                "pick", members.keys,
                [repr(self.clock()), self._scored, flags(backends) if callable(flags) else flags,
                 "1" if retry else "0", *self._pick_params, members.weights, version])
            if int(index) != -2:
                return None if int(index) < 0 else backends[int(index)]
            members.sync()  # the membership changed (or Redis lost it): reload, ask again
            if not callable(flags):
                flags = ""  # made for the old list
        raise RuntimeError("the membership keeps changing under pick")

    def report(self, outcome: Outcome, check: bool = False) -> tuple[float, int]:
        """Score one attempt's outcome (or a health check's, with `check`); return
        the new score and the turns of a block it started (0 for none). A backend
        removed from the pool meanwhile is not scored."""
        index = self.membership.index.get(outcome.backend.id)
        if index is None:
            return 0.0, 0
        score, turns = self.store.run(
            "report", self.membership.keys,
            [repr(self.clock()), index, f"{outcome.latency_s * 1000:.3f}", outcome.kind,
             outcome.status or 0, self._scored, "1" if check else "0", *self._params])
        return float(score), int(turns)

    def hold_checker(self, owner: str, ttl_s: float) -> bool:
        """Take or renew the pool's health-checker lock; whether `owner` holds it."""
        return bool(self.store.run("checker", [self._checker_key],
                                   [owner, str(int(ttl_s * 1000))]))
