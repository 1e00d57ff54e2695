"""Active health checks: one checker per pool, feeding the scorer.

Every balancer worker runs a HealthChecker thread, but only the holder of the
pool's lock in Redis (scorer/lua/checker.lua) probes: one checker per pool
whatever the number of workers and hosts. The holder renews the lock each
interval; when it dies the lock expires and another worker takes over. Each
probe is a GET of LB_CHECK_PATH with LB_CHECK_TIMEOUT_S; its result goes to
the scorer through report.lua, like a request's, marked as a check. While
Redis is away there is no lock to elect a checker, so checks pause.
"""
from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import urllib3

from apps.lb.policy import judge_probe
from apps.lb.upstream import STREAM_CHUNK, UpstreamError, Upstreams, read_capped
from scorer.pool import Outcome, Pool
from apps.config import Backend, Settings

log = logging.getLogger("lb.health")

# Sent with every probe, so a backend (or a test) can tell checks apart and
# see which checker sent them.
CHECK_HEADER = "X-Health-Check"


def checker_id() -> str:
    """An id for this process's checker: host, pid and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class HealthChecker:
    """Probes every backend each interval, while this process holds the lock."""

    def __init__(self, settings: Settings, pool: Pool, owner: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.pool = pool
        self.owner = owner or checker_id()
        self.clock = clock
        # Outlives a missed renewal or two, but not a dead holder for long.
        self.ttl_s = max(3 * settings.check_interval_s,
                         settings.check_interval_s + settings.check_timeout_s + 0.5)
        self.timeout = urllib3.Timeout(connect=settings.check_timeout_s,
                                       read=settings.check_timeout_s)
        self.upstreams = Upstreams(settings, maxsize=1)
        self._probes = ThreadPoolExecutor(max_workers=16, thread_name_prefix="lb-check")
        self._stop = threading.Event()
        self.holding = False

    def start(self) -> None:
        threading.Thread(target=self._loop, name="lb-health", daemon=True).start()

    def stop(self) -> None:
        """End the loop after the round under way (Gunicorn's worker_exit calls this)."""
        self._stop.set()
        self._probes.shutdown(wait=False, cancel_futures=True)

    def _loop(self) -> None:
        interval = self.settings.check_interval_s
        while not self._stop.is_set():
            started = self.clock()
            try:
                self.run_once()
            except Exception:  # a checker must outlive any one bad round
                if self._stop.is_set():
                    return  # stopped mid-round: its executor refuses work, nothing is wrong
                log.exception("health check round failed")
            self._stop.wait(max(0.0, interval - (self.clock() - started)))

    def run_once(self) -> bool:
        """One interval: hold the lock, and if held, probe every backend and report."""
        if self.pool.store.degraded:
            self.holding = False
            return False
        held = self.pool.hold_checker(self.owner, self.ttl_s)
        if held != self.holding:
            log.info("health checker %s: %s", self.owner, "taking over" if held else "standing by")
        self.holding = held
        if held:
            for outcome in self._probes.map(self.probe, list(self.pool.backends)):
                self.pool.report(outcome, check=True)
        return held

    def probe(self, backend: Backend) -> Outcome:
        """GET the check path, judged by `policy.judge_probe`."""
        started = time.monotonic()
        try:
            response = self.upstreams.send(
                backend, "GET", self.settings.check_path, {CHECK_HEADER: self.owner},
                None, self.timeout)
            read_capped(response, STREAM_CHUNK)
        except UpstreamError as err:
            return judge_probe(backend, time.monotonic() - started, error=err.kind)
        return judge_probe(backend, time.monotonic() - started, status=response.status)
