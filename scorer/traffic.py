"""Traffic through the pool: pick a backend, report an attempt's outcome, and
the health checker's lock.

The rules live in scorer/lua/pick.lua and report.lua; this module passes the
clock, the settings and the membership's keys, and converts replies.

A request's report need not hold up its answer: `report_later` queues it, and
the queue goes to Redis ahead of this process's next pick, in the same round
trip, or, when no pick comes first, from a sender thread (a greenlet under the
gevent worker) as soon as the process has nothing else to run. So under load
an attempt costs one round trip, not two, and a worker's picks always see
every report it made before them, as when each report was sent at once.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

from apps.config import Backend, Settings, script_params
from scorer.keys import checker_key
from scorer.membership import Membership
from scorer.store import Call, Store

log = logging.getLogger("lb.traffic")

# Most queued reports sent in one round trip. A batch this size costs Redis well
# under a millisecond, so a pick behind it waits little; under load a worker
# queues a few at a time.
REPORT_BATCH = 64
# Most reports a process keeps queued while Redis is slow to take them; past it
# the oldest are dropped (and counted), so that a stalled Redis cannot grow the queue
# without bound. Far above what a worker makes in one Redis timeout.
REPORT_QUEUE_MAX = 10_000

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


# What report.lua's reply means to the caller: the new score, and the turns of a
# block it started (0 for none).
Verdict = tuple[float, int]


class Queued(NamedTuple):
    """A report waiting to be sent: the outcome, its time, and who hears the verdict."""

    outcome: Outcome
    at: float
    done: Callable[[Verdict], None] | None


# The settings report.lua reads, in its ARGV order (ARGV[8] onwards): the rows of
# apps/config/table.py marked script="report", in their order.
REPORT_PARAMS = script_params("report")


class Traffic:
    """Picks and reports of one worker, by its current membership."""

    def __init__(self, settings: Settings, store: Store, membership: Membership,
                 clock: Callable[[], float], *, sender: bool = True) -> None:
        self.store = store
        self.membership = membership
        self.clock = clock
        self._queue: deque[Queued] = deque()
        self.dropped = 0  # reports dropped from a full queue, ever (see REPORT_QUEUE_MAX)
        self._sender = sender
        self._wake = threading.Event()
        self._sender_pid: int | None = None
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
            pick: Call = ("pick", members.keys, [
                repr(self.clock()), self._scored, flags(backends) if callable(flags) else flags,
                "1" if retry else "0", *self._pick_params, members.weights, version])
            reports = self._take_queued()
            calls = [call for call in map(self._report_call, reports) if call is not None]
            replies = self.store.run_many([*(c for _, c in calls), pick])
            self._deliver([q for q, _ in calls], replies[:-1])
            if isinstance(replies[-1], Exception):
                raise replies[-1]
            index, _panic, _rev = replies[-1]
            if int(index) != -2:
                return None if int(index) < 0 else backends[int(index)]
            members.sync()  # the membership changed (or Redis lost it): reload, ask again
            if not callable(flags):
                flags = ""  # made for the old list
        raise RuntimeError("the membership keeps changing under pick")

    def report(self, outcome: Outcome, check: bool = False) -> Verdict:
        """Score one attempt's outcome (or a health check's, with `check`) now; return
        the new score and the turns of a block it started (0 for none). A backend
        removed from the pool meanwhile is not scored."""
        call = self._call(outcome, self.clock(), check)
        if call is None:
            return 0.0, 0
        return _verdict(self.store.run(*call))

    def report_later(self, outcome: Outcome,
                     done: Callable[[Verdict], None] | None = None) -> None:
        """Queue an attempt's outcome, timed now, to be scored ahead of this process's
        next pick or by the sender, whichever comes first; `done` hears the verdict."""
        if len(self._queue) >= REPORT_QUEUE_MAX:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(Queued(outcome, self.clock(), done))
        if self._sender:
            self._wake_sender()

    def flush(self) -> None:
        """Send every queued report now (the sender's work; also at a worker's exit)."""
        while self._queue:
            calls = [c for c in map(self._report_call, self._take_queued()) if c is not None]
            if calls:
                self._deliver([q for q, _ in calls], self.store.run_many([c for _, c in calls]))

    @property
    def queued(self) -> int:
        """Reports waiting to be sent."""
        return len(self._queue)

    def _take_queued(self) -> list[Queued]:
        taken: list[Queued] = []
        while self._queue and len(taken) < REPORT_BATCH:
            try:
                taken.append(self._queue.popleft())
            except IndexError:  # another thread took the last one
                break
        return taken

    def _call(self, outcome: Outcome, at: float, check: bool) -> Call | None:
        # The index is looked up when the call is made, so a queued report follows
        # a membership change made meanwhile.
        index = self.membership.index.get(outcome.backend.id)
        if index is None:
            return None
        return ("report", self.membership.keys,
                [repr(at), index, f"{outcome.latency_s * 1000:.3f}", outcome.kind,
                 outcome.status or 0, self._scored, "1" if check else "0", *self._params])

    def _report_call(self, queued: Queued) -> tuple[Queued, Call] | None:
        call = self._call(queued.outcome, queued.at, check=False)
        return None if call is None else (queued, call)

    @staticmethod
    def _deliver(reports: Sequence[Queued], replies: Sequence[object]) -> None:
        for queued, reply in zip(reports, replies):
            if isinstance(reply, Exception):  # a script error: a bug, never the client's cost
                log.error("report of %s failed: %s", queued.outcome.backend.id, reply)
            elif queued.done is not None:
                try:
                    queued.done(_verdict(reply))
                except Exception:
                    log.exception("a report's verdict could not be handled")

    def _wake_sender(self) -> None:
        if self._sender_pid != os.getpid():  # none yet in this process (or forked since)
            self._sender_pid = os.getpid()
            threading.Thread(target=self._send_queued, name="lb-reports", daemon=True).start()
        self._wake.set()

    def _send_queued(self) -> None:
        """The sender: whatever is queued once woken. Under gevent it runs when the
        worker's other greenlets wait, so after the answers that queued the reports."""
        while True:
            self._wake.wait()
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # the store degrades by itself: this is a bug; keep sending
                log.exception("sending reports failed")

    def hold_checker(self, owner: str, ttl_s: float) -> bool:
        """Take or renew the pool's health-checker lock; whether `owner` holds it."""
        return bool(self.store.run("checker", [self._checker_key],
                                   [owner, str(int(ttl_s * 1000))]))


def _verdict(reply: object) -> Verdict:
    score, turns = reply  # type: ignore[misc]
    return float(score), int(turns)
