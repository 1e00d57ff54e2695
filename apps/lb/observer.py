"""What the proxy makes known of its traffic: metrics, log lines, reports to the pool.

The Forwarder (apps/lb/proxy.py) tells one Observer of each attempt's end
(how it ended: apps/lb/exchange.py), of each retry, and of each request
answered; the proxy writes no metric and no log line of its own. The report
to the pool goes through here too: the scorer is one more observer of
attempts, and its verdict (a block) is made known from here as well.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Callable

from apps.lb import metrics
from apps.lb.exchange import BROKEN, CLIENT, FAILED
from apps.lb.upstream import UpstreamError
from scorer.pool import Outcome, Pool
from apps.config import Backend

if TYPE_CHECKING:
    from apps.lb.frontend import Incoming
    from apps.lb.proxy import Failure

# The proxy's log lines, under the logger they always had.
log = logging.getLogger("lb.proxy")


class Observer:
    """Counts, logs and reports what the Forwarder tells it; never raises for it."""

    def __init__(self, pool: Pool, access: logging.Logger | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pool = pool
        self.access = access
        self.clock = clock

    def attempt_ended(self, how: str, req: Incoming, backend: Backend,
                      outcome: Outcome | None, error: UpstreamError | None) -> None:
        """One attempt is over (`how`: exchange.ANSWERED, FAILED, BROKEN, CLIENT or
        ABORTED); `outcome` is reported to the pool unless None. An attempt the
        client ended is counted but not reported, as the backend is not at fault;
        a trial ended so stays in flight until LB_REQUEST_TIMEOUT has passed, when
        the next passing health check offers another (report.lua)."""
        if outcome is not None:
            self.report(outcome)
        if how == FAILED:
            log.warning("%s %s -> %s: %s", req.method, req.path, backend.id, error)
        elif how == BROKEN:
            log.warning("upstream %s broke off a streamed body: %s", backend.id, error)
        elif how == CLIENT:
            metrics.ATTEMPTS.labels(backend.id, "client").inc()

    def report(self, outcome: Outcome) -> None:
        """Count an attempt's result and queue it for the pool (sent after the answer,
        or ahead of the next pick); a block it starts is logged when the verdict comes."""
        backend = outcome.backend.id
        result = f"{outcome.status // 100}xx" if outcome.status else outcome.kind
        metrics.ATTEMPTS.labels(backend, result).inc()
        if outcome.status:
            metrics.LATENCY.labels(backend).observe(outcome.latency_s)

        def verdict(reply: tuple[float, int]) -> None:
            score, turns = reply
            if turns:
                metrics.BLOCKS.labels(backend).inc()
                log.warning("blocked %s for %d turns at score %.1f (why: GET /status)",
                            backend, turns, score)

        try:
            self.pool.report_later(outcome, verdict)
        except Exception:  # bookkeeping must never cost the client its answer
            log.exception("report failed")

    def retrying(self, req: Incoming, backend: Backend, failure: Failure) -> None:
        metrics.RETRIES.inc()
        log.info("retrying %s %s on %s after %s from %s", req.method, req.path,
                 backend.id, failure.describe(), failure.backend.id)

    def pick_failed(self) -> None:
        """The pick raised: the store degrades by itself, so this is a bug, not an outage."""
        log.exception("pick failed")

    def answered(self, req: Incoming, status: int, upstream: str | None) -> None:
        """A request is answered: count it, and write its access-log line."""
        metrics.REQUESTS.labels(upstream or "none", f"{status // 100}xx").inc()
        if self.access is None:
            return
        self.access.info(json.dumps({
            "ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "request_id": req.request_id, "client": req.remote_addr,
            "method": req.method,
            "path": req.target,
            "status": status,
            "backend": upstream,
            "latency_ms": round((self.clock() - req.started) * 1000, 3),
            "attempts": req.attempts,
        }, separators=(",", ":")))


def access_logger(target: str) -> logging.Logger | None:
    """The JSON access log: standard output (`-`), a file, or None (`off`)."""
    if target == "off":
        return None
    logger = logging.getLogger("lb.access")
    if not logger.handlers:
        handler = (logging.StreamHandler(sys.stdout) if target == "-"
                   else logging.FileHandler(target))
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger
