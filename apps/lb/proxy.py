"""The balancer's traffic listener: every path and method is forwarded to a backend.

    gunicorn -c gunicorn_conf.py "apps.lb.proxy:create_app()"

A request's path: read the body (bounded by LB_MAX_BODY), ask the pool for a
backend, make one exchange with it (apps/lb/exchange.py), relay the answer;
when an attempt fails and may be repeated, do it again on another backend,
within the retry budget and the request's deadline. Each attempt's end is
counted, logged and reported to the pool by one observer (apps/lb/observer.py).
The balancer's own endpoints are on the admin listener (apps/lb/admin.py), so
no path here is reserved.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Iterable, Mapping

from dataclasses import dataclass

from flask import Flask
from werkzeug.exceptions import HTTPException

from apps.lb.addresses import AddressPolicy
from apps.lb.body import RequestBody
from apps.lb.errors import register_json_errors
from apps.lb.exchange import Exchange
from apps.lb.forwarded import hop_of
from apps.lb.frontend import (
    SOURCE, Incoming, Outgoing, ProxyFlask, http_error_answer, json_answer, refusal, relayed,
)
from apps.lb.headers import request_target, upstream_request_headers
from apps.lb.health import HealthChecker
from apps.lb.logs import log_through_gunicorn
from apps.lb import metrics
from apps.lb.observer import Observer, access_logger
from apps.lb.policy import InFlight, choose_backend, may_retry, may_start
from apps.lb.upstream import UpstreamError, Upstreams
from scorer.members import state_file_for
from scorer.pool import TIMEOUT, Outcome, Pool
from apps.config import Backend, Settings, load_settings

log = logging.getLogger("lb.proxy")


@dataclass
class Failure:
    """A failed attempt: a transport error, or a retryable answer (kept, to relay
    if no retry follows)."""

    backend: Backend
    error: UpstreamError | None = None
    response: Outgoing | None = None

    @property
    def delivered(self) -> bool:
        return self.error.delivered if self.error else True

    def describe(self) -> str:
        return str(self.error) if self.error else f"status {self.response.status}"




class Forwarder:
    """Forwards requests (one at a time per thread): picks, attempts and retries, each
    attempt one exchange (apps/lb/exchange.py), each end told to the observer."""

    def __init__(self, settings: Settings, pool: Pool, upstreams: Upstreams,
                 inflight: InFlight, *, observer: Observer | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.pool = pool
        self.inflight = inflight
        self.observer = observer or Observer(pool, clock=clock)
        self.clock = clock
        self.exchange = Exchange(settings, upstreams, clock)

    def handle(self, req: Incoming) -> Outgoing:
        refused = refusal(req)
        if refused is not None:
            return refused
        settings = self.settings
        # Read whole before any backend is picked (unless LB_REQUEST_BUFFERING=0),
        # so that a slow upload holds no backend and every attempt can send it.
        body = RequestBody.read(req.environ, settings.max_body, settings.retry_buffer,
                                buffering=settings.request_buffering)
        try:
            return self.forward(req, body)
        finally:
            body.close()  # every attempt has sent the body by now (or failed)

    def forward(self, req: Incoming, body: RequestBody) -> Outgoing:
        """Attempts and retries, within the retry budget and the request's deadline."""
        settings = self.settings
        target = request_target(req.target)
        deadline = self.clock() + settings.request_timeout
        tried: list[Backend] = []
        failure: Failure | None = None
        while True:
            remaining = deadline - self.clock()
            if not may_start(len(tried), settings.retries, remaining):
                break
            try:
                backend = self.choose(tried)
            except Exception:  # the store degrades by itself; this is a bug, not an outage
                self.observer.pick_failed()
                break
            if backend is None:  # retry budget spent, or every backend tried
                break
            if failure:
                self.observer.retrying(req, backend, failure)
            tried.append(backend)
            req.attempts = len(tried)
            result = self.attempt(req, backend, target, body, remaining)
            if isinstance(result, Outgoing):
                return result
            failure = result
            if not may_retry(req.method, delivered=failure.delivered,
                             non_idempotent=settings.retry_non_idempotent,
                             body_replayable=body.replayable):
                break
        return self.give_up(req, failure, len(tried))

    def choose(self, tried: list[Backend]) -> Backend | None:
        """Pick a backend and take one of this worker's in-flight slots on it."""
        return choose_backend(self.pool.pick, self.inflight, tried)

    def attempt(self, req: Incoming, backend: Backend, target: str, body: RequestBody,
                remaining: float) -> Outgoing | Failure:
        """One try on one backend, whose in-flight slot `choose` took: its answer, or
        a Failure to retry or relay. The slot is given back when the attempt ends,
        whichever way (for a relayed body, when the relay ends)."""
        def ended(how: str, backend: Backend, outcome: Outcome | None,
                  error: UpstreamError | None) -> None:
            self.inflight.release(backend)
            self.observer.attempt_ended(how, req, backend, outcome, error)

        try:
            headers = self.request_headers(req, backend, body)
        except BaseException:  # nothing was sent: only the slot to give back
            self.inflight.release(backend)
            raise
        try:
            answer = self.exchange(backend, req.method, target, headers, body.upstream(),
                                   remaining, ended)
        except UpstreamError as err:
            return Failure(backend, error=err)
        response = relayed(backend, answer)
        return Failure(backend, response=response) if answer.retryable else response

    def request_headers(self, req: Incoming, backend: Backend,
                        body: RequestBody) -> dict[str, str]:
        headers = upstream_request_headers(
            req.headers, backend=backend,
            hop=hop_of(req.environ, self.settings.trusted_proxies),
            preserve_host=self.settings.preserve_host)
        if req.request_id:
            headers["X-Request-ID"] = req.request_id
        length = body.content_length()
        headers.pop("Content-Length", None)
        if length is not None:
            headers["Content-Length"] = str(length)
        return headers

    def give_up(self, req: Incoming, failure: Failure | None, attempts: int) -> Outgoing:
        """The answer when no attempt succeeded: the last backend's, or the balancer's."""
        if failure is None:
            return json_answer(503, "no backend could be tried", source=SOURCE)
        if failure.response is not None:
            return failure.response
        err = failure.error
        status = 504 if err.kind == TIMEOUT else 502
        return json_answer(status, f"upstream {failure.backend.id}: {err}", source=SOURCE,
                           upstream=failure.backend.id, kind=err.kind, attempts=attempts)


def create_app(config: Mapping[str, Any] | None = None, *, pool: Pool | None = None,
               upstreams: Upstreams | None = None,
               clock: Callable[[], float] = time.monotonic) -> Flask:
    """Build the proxy app. `config` overrides environment settings (apps/config/table.py);
    `pool`, `upstreams` and `clock` replace the parts built from the settings (tests
    pass a pool on fakeredis, fake backends and a clock they move)."""
    settings = load_settings(overrides=config)
    AddressPolicy.of(settings).check_settings(settings)
    app = ProxyFlask(__name__, static_folder=None)
    register_json_errors(app, source=SOURCE)
    log_through_gunicorn()
    if not settings.tls_verify:
        log.warning("LB_TLS_VERIFY=0: https backends' certificates are NOT checked")

    if pool is None:  # Gunicorn's master makes the runtime dir; degraded workers mark it
        pool = Pool(settings, marker_dir=os.environ.get("LB_RUNTIME_DIR"),
                    state_file=state_file_for(settings))
    if upstreams is None:
        # Kept-alive connections per backend: as many as this worker sends it at once
        # below its in-flight cap (a pick over the cap opens one more, not kept).
        upstreams = Upstreams(settings, maxsize=settings.max_inflight)
    observer = Observer(pool, access_logger(settings.access_log), clock)
    inflight = InFlight(settings.max_inflight, gauge=metrics.INFLIGHT)
    forwarder = Forwarder(settings, pool, upstreams, inflight, observer=observer, clock=clock)
    app.extensions["lb.forwarder"] = forwarder
    if settings.check_interval_s > 0:
        checker = HealthChecker(settings, pool, clock=clock)
        checker.start()
        app.extensions["lb.health"] = checker

    def serve(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        """One request, in plain WSGI (apps/lb/frontend.py): forwarded, or refused."""
        req = Incoming(environ, clock())
        try:
            answer = forwarder.handle(req)
        except HTTPException as exc:  # the client's body: too large, broken off, too slow
            answer = http_error_answer(exc)
        answer.headers.append(("X-Request-ID", req.request_id))
        observer.answered(req, answer.status, answer.upstream)
        return answer(environ, start_response)

    app.serve = serve
    return app
