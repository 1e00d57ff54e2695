"""The balancer's decisions, as pure rules: the proxy and the simulator both call them.

Which failed attempt may be tried again, whether another attempt may start,
which backends a pick may take (in-flight caps, backends already tried), and
how a health probe is judged. `bench/sim.py` runs these same functions on its
virtual clock, so the simulator cannot drift from the proxy. Nothing here
does I/O or reads a clock: callers pass the time left and the pick to use.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol, Sequence

from apps.config import Backend
from scorer.pool import CONNECT, PROTOCOL, TIMEOUT, Outcome

# RFC 9110 section 9.2.2.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


@dataclass(frozen=True)
class Fault:
    """How an attempt failed without an HTTP answer: the kind the scorer is told,
    and whether the request may have reached the backend."""

    kind: str
    delivered: bool


# Every UpstreamError (apps/lb/upstream.py) is raised with one of these, so the
# proxy and the simulator read delivery from one table. Whatever fails before
# the connection is open, TLS handshake included, never reached the backend.
CONNECT_REFUSED = Fault(CONNECT, delivered=False)  # refused, unreachable, or address policy
CONNECT_TIMEOUT = Fault(TIMEOUT, delivered=False)
TLS_HANDSHAKE = Fault(CONNECT, delivered=False)
READ_TIMEOUT = Fault(TIMEOUT, delivered=True)      # sent; no answer in time
BROKEN = Fault(PROTOCOL, delivered=True)           # sent; the connection broke, or a bad answer


def may_retry(method: str, *, delivered: bool, non_idempotent: bool,
              body_replayable: bool) -> bool:
    """Whether a failed attempt (an error, or a retryable status) may be repeated.

    As nginx's `proxy_next_upstream`: a request that never reached a backend is
    retried whatever its method; one that may have reached it only when its
    method is idempotent, unless LB_RETRY_NON_IDEMPOTENT says a repeat is
    harmless for all. A streamed body that has started flowing cannot be sent
    again. A retryable status counts as delivered.
    """
    if not body_replayable:
        return False
    if not delivered:
        return True
    return non_idempotent or method.upper() in IDEMPOTENT


def may_start(attempts: int, retries: int, remaining_s: float) -> bool:
    """Whether another attempt may start: `attempts` made so far is within
    LB_RETRIES retries, and the request's deadline has not passed. (The retry
    budget is the pool's to refuse: its pick then returns None.)"""
    return attempts <= retries and remaining_s > 0


class InFlight:
    """Requests under way to each backend, against a cap.

    Per process in the proxy, as HAProxy's `maxconn` is per process: the cap
    exists so that one hanging backend cannot hold every thread of a worker.
    `gauge` (a Prometheus gauge with a `backend` label) follows the counts.
    """

    def __init__(self, cap: int, gauge: Any = None) -> None:
        self._cap = cap
        self._gauge = gauge
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, backend: Backend, over_cap: bool = False) -> bool:
        """Take a slot: False, and none taken, when the backend is at its cap
        (unless `over_cap`). Checked and counted as one step."""
        with self._lock:
            count = self._counts.get(backend.id, 0)
            if count >= self._cap and not over_cap:
                return False
            self._counts[backend.id] = count + 1
        if self._gauge is not None:
            self._gauge.labels(backend.id).inc()
        return True

    def release(self, backend: Backend) -> None:
        with self._lock:
            self._counts[backend.id] -= 1
        if self._gauge is not None:
            self._gauge.labels(backend.id).dec()

    def count(self, backend: Backend) -> int:
        return self._counts.get(backend.id, 0)

    def flags(self, backends: Sequence[Backend], tried: Iterable[Backend]) -> str:
        """pick.lua's flags for `backends` (the pool's current order): 'x' tried by
        this request, 'b' at the cap, '.' eligible."""
        tried_ids = {b.id for b in tried}
        flags = "".join("x" if b.id in tried_ids else
                        "b" if self._counts.get(b.id, 0) >= self._cap else "."
                        for b in backends)
        return "" if flags.count(".") == len(flags) else flags


# Picks one attempt may make when other threads keep taking the last in-flight
# slot of the backend picked (each pick sees the slot gone, and goes elsewhere).
PICKS_PER_ATTEMPT = 3


class Pick(Protocol):
    """The pool's pick (`scorer.pool.Pool.pick`): `flags` makes pick.lua's flags
    for the pool's current backends."""

    def __call__(self, flags: Callable[[Sequence[Backend]], str],
                 retry: bool = False) -> Backend | None: ...


def choose_backend(pick: Pick, inflight: InFlight,
                   tried: Sequence[Backend]) -> Backend | None:
    """Pick a backend with `pick(flags, retry=...)` (the pool's) and take one of
    `inflight`'s slots on it; None when the pool refused (retry budget spent,
    or every backend tried).

    The busy flags are read before the pick and the slot is taken after it,
    so another thread may take the last slot in between: then pick again,
    with that backend now busy. A pick that went over the cap because every
    candidate was busy keeps its slot regardless.
    """
    busy: set[str] = set()

    def flags(backends: Sequence[Backend]) -> str:
        made = inflight.flags(backends, tried)
        busy.clear()
        busy.update(b.id for b, flag in zip(backends, made) if flag == "b")
        return made

    backend = None
    for _ in range(PICKS_PER_ATTEMPT):
        backend = pick(flags, retry=bool(tried))
        if backend is None or inflight.take(backend, over_cap=backend.id in busy):
            return backend
    inflight.take(backend, over_cap=True)  # still racing: the cap gives way
    return backend


def judge_probe(backend: Backend, latency_s: float, *, status: int | None = None,
                error: str | None = None) -> Outcome:
    """The outcome a health probe reports: its transport error's kind (`error`),
    else its status. 2xx and 3xx pass; a 5xx is scored as a 5xx; a 4xx (the
    check path is wrong, or refused) fails as its own kind."""
    if error is not None:
        return Outcome(backend, latency_s, error=error)
    if status is not None and 400 <= status < 500:
        return Outcome(backend, latency_s, error=f"http_{status // 100}xx")
    return Outcome(backend, latency_s, status=status)
