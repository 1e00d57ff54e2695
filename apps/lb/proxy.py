"""The balancer's traffic listener: every path and method is forwarded to a backend.

    gunicorn -c gunicorn_conf.py "apps.lb.proxy:create_app()"

A request's path: read the body (bounded by LB_MAX_BODY), ask the pool for a
backend, forward, report the outcome to the pool, relay the answer; when an
attempt fails and may be repeated, do it again on another backend, within the
retry budget and the request's deadline. The balancer's own endpoints are on
the admin listener (apps/lb/admin.py), so no path here is reserved.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Mapping

from dataclasses import dataclass

import urllib3
from flask import Flask, Request, Response, g, request
from werkzeug.exceptions import HTTPException

from apps.lb import metrics
from apps.lb.addresses import AddressPolicy
from apps.lb.body import RequestBody, foreign_codings
from apps.lb.buffered import BufferedBody
from apps.lb.errors import json_error, register_json_errors
from apps.lb.forwarded import hop_of
from apps.lb.health import HealthChecker
from apps.lb.logs import log_through_gunicorn
from apps.lb.policy import InFlight, choose_backend, may_retry, may_start
from apps.lb.upstream import (
    STREAM_CHUNK, BodyStream, UpstreamError, Upstreams, client_response_headers,
    has_no_body, read_capped, request_target, start_stream, upstream_request_headers,
)
from scorer.members import state_file_for
from scorer.pool import TIMEOUT, Outcome, Pool
from apps.config import Backend, Settings, load_settings

log = logging.getLogger("lb.proxy")

# Marks errors the balancer made itself, as opposed to a backend's answers.
SOURCE = "balancer"


class ProxyFlask(Flask):
    """A Flask app without routing: every request goes to the one `forward` view.

    Werkzeug's router answers some requests itself (308 for `/a//b`, 405 for
    odd methods, 400 for a WebSocket handshake), which a transparent proxy
    must not do; skipping it also saves its cost on every request.
    """

    def create_url_adapter(self, request):  # type: ignore[override]
        return None if request is not None else super().create_url_adapter(request)

    def dispatch_request(self) -> Response:  # type: ignore[override]
        return self.view_functions["forward"]()


class UpstreamResponse(Response):
    """A response relayed as the backend sent it: no default Content-Type, and the
    backend's Content-Length kept (a HEAD answer has one but no body)."""

    default_mimetype = None
    automatically_set_content_length = False


@dataclass
class Failure:
    """A failed attempt: a transport error, or a retryable answer (kept, to relay
    if no retry follows)."""

    backend: Backend
    error: UpstreamError | None = None
    response: Response | None = None

    @property
    def delivered(self) -> bool:
        return self.error.delivered if self.error else True

    def describe(self) -> str:
        return str(self.error) if self.error else f"status {self.response.status_code}"


# Every method but CONNECT is forwarded; a 405 must still name some (RFC 9110 15.5.6).
ALLOWED_METHODS = "GET, HEAD, POST, PUT, DELETE, OPTIONS, TRACE, PATCH"


def refusal(req: Request) -> Response | None:
    """The balancer's own answer to a request it does not forward, or None. Decided
    before the body is read or any backend is picked."""
    if req.method == "CONNECT":  # a tunnel to an address the client names: never
        response = json_error(405, "CONNECT is not supported: the balancer is not a forward "
                              "proxy", source=SOURCE)
        response.headers["Allow"] = ALLOWED_METHODS
        return response
    codings = foreign_codings(req.headers.get("Transfer-Encoding", ""))
    if codings:  # gunicorn_conf.py's pre_request closes the connection after this answer
        return json_error(501, f"transfer coding {codings[0]!r} is not supported, only chunked",
                          source=SOURCE)
    upgrade = req.headers.get("Upgrade", "").lower()
    if upgrade and upgrade != "h2c":  # h2c may be ignored; a WebSocket may not
        return json_error(501, f"protocol upgrade to {upgrade!r} is not supported",
                          source=SOURCE)
    return None


class Forwarder:
    """Forwards one request at a time (per thread): attempts, retries, reports."""

    def __init__(self, settings: Settings, pool: Pool, upstreams: Upstreams,
                 inflight: InFlight) -> None:
        self.settings = settings
        self.pool = pool
        self.upstreams = upstreams
        self.inflight = inflight

    def handle(self, req: Request, request_id: str = "") -> Response:
        refused = refusal(req)
        if refused is not None:
            return refused
        settings = self.settings
        # Read whole before any backend is picked (unless LB_REQUEST_BUFFERING=0),
        # so that a slow upload holds no backend and every attempt can send it.
        body = RequestBody.read(req.environ, settings.max_body, settings.retry_buffer,
                                buffering=settings.request_buffering)
        try:
            return self.forward(req, body, request_id)
        finally:
            body.close()  # every attempt has sent the body by now (or failed)

    def forward(self, req: Request, body: RequestBody, request_id: str) -> Response:
        """Attempts and retries, within the retry budget and the request's deadline."""
        settings = self.settings
        target = request_target(req.environ.get("RAW_URI") or req.full_path)
        deadline = time.monotonic() + settings.request_timeout
        tried: list[Backend] = []
        failure: Failure | None = None
        while True:
            remaining = deadline - time.monotonic()
            if not may_start(len(tried), settings.retries, remaining):
                break
            try:
                backend = self.choose(tried)
            except Exception:  # the store degrades by itself; this is a bug, not an outage
                log.exception("pick failed")
                break
            if backend is None:  # retry budget spent, or every backend tried
                break
            if failure:
                metrics.RETRIES.inc()
                log.info("retrying %s %s on %s after %s from %s", req.method, req.path,
                         backend.id, failure.describe(), failure.backend.id)
            tried.append(backend)
            g.attempts = len(tried)
            result = self.attempt(req, backend, target, body, remaining, request_id)
            if isinstance(result, Response):
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

    def attempt(self, req: Request, backend: Backend, target: str, body: RequestBody,
                remaining: float, request_id: str = "") -> Response | Failure:
        """One try on one backend, whose in-flight slot `choose` took: its answer, or
        a Failure to retry or relay. The slot is given back on every path."""
        settings = self.settings
        timeout = urllib3.Timeout(connect=min(settings.connect_timeout, remaining),
                                  read=min(settings.read_timeout, remaining))
        started = time.monotonic()
        try:
            upstream = self.upstreams.send(backend, req.method, target,
                                           self.request_headers(req, backend, body, request_id),
                                           body.upstream(), timeout)
        except UpstreamError as err:
            return self.failed(req, backend, err, time.monotonic() - started)
        except HTTPException:  # the client's body broke off, stalled or grew too large
            self.client_ended(backend)
            raise
        except BaseException:
            self.inflight.release(backend)
            raise
        latency = time.monotonic() - started
        status = upstream.status
        retryable = status in settings.retry_on_status
        length = upstream.headers.get("Content-Length", "")
        try:
            if retryable or has_no_body(req.method, status) or (
                    length.isdigit() and int(length) <= STREAM_CHUNK):
                # Small bodies are read whole; a retryable answer is kept (if small)
                # to relay in case no retry follows.
                content: bytes | BodyStream | BufferedBody | None = read_capped(
                    upstream, STREAM_CHUNK)
                self.inflight.release(backend)
                self.report(Outcome(backend, latency, status=status))
            else:
                on_end = lambda err, complete: self.stream_ended(  # noqa: E731
                    backend, latency, status, err, complete)
                if settings.response_buffering:  # the backend is free when it is done
                    content = BufferedBody(upstream, start_stream(upstream), on_end,
                                           memory=settings.response_buffer,
                                           disk=settings.max_response_temp)
                else:
                    content = BodyStream(upstream, start_stream(upstream), on_end=on_end)
        except UpstreamError as err:
            return self.failed(req, backend, err, latency)
        if content is None:
            response = json_error(502, f"upstream {backend.id} answered {status}",
                                  source=SOURCE, upstream=backend.id)
            response.headers["X-Upstream"] = backend.id
        else:
            response_headers = client_response_headers(upstream.headers.iteritems())
            response_headers.append(("X-Upstream", backend.id))
            response = UpstreamResponse(content, status=status, headers=response_headers,
                                        direct_passthrough=True)
        return Failure(backend, response=response) if retryable else response

    def request_headers(self, req: Request, backend: Backend, body: RequestBody,
                        request_id: str) -> dict[str, str]:
        headers = upstream_request_headers(
            req.headers.items(), backend=backend,
            hop=hop_of(req.environ, self.settings.trusted_proxies),
            preserve_host=self.settings.preserve_host)
        if request_id:
            headers["X-Request-ID"] = request_id
        length = body.content_length()
        headers.pop("Content-Length", None)
        if length is not None:
            headers["Content-Length"] = str(length)
        return headers

    def failed(self, req: Request, backend: Backend, err: UpstreamError,
               latency: float) -> Failure:
        """Book an attempt that got no usable answer."""
        self.inflight.release(backend)
        self.report(Outcome(backend, latency, error=err.kind))
        log.warning("%s %s -> %s: %s", req.method, req.path, backend.id, err)
        return Failure(backend, error=err)

    def stream_ended(self, backend: Backend, latency: float, status: int,
                     err: UpstreamError | None, complete: bool) -> None:
        """A streamed body is done with: free the slot, and report the attempt once,
        unless the client left before its end."""
        if err is None and not complete:
            self.client_ended(backend)
            return
        self.inflight.release(backend)
        if err is None:
            self.report(Outcome(backend, latency, status=status))
        else:
            self.report(Outcome(backend, latency, error=err.kind))
            log.warning("upstream %s broke off a streamed body: %s", backend.id, err)

    def client_ended(self, backend: Backend) -> None:
        """An attempt the client ended (its body broke off, stalled or grew too large
        while streamed; it left or stopped reading a streamed answer): the slot is
        freed, and nothing is reported, as the backend is not at fault. A trial
        ended so stays in flight until LB_REQUEST_TIMEOUT has passed, when the
        next passing health check offers another (report.lua)."""
        self.inflight.release(backend)
        metrics.ATTEMPTS.labels(backend.id, "client").inc()

    def report(self, outcome: Outcome) -> None:
        backend = outcome.backend.id
        result = f"{outcome.status // 100}xx" if outcome.status else outcome.kind
        metrics.ATTEMPTS.labels(backend, result).inc()
        if outcome.status:
            metrics.LATENCY.labels(backend).observe(outcome.latency_s)
        try:
            score, turns = self.pool.report(outcome)
        except Exception:  # bookkeeping must never cost the client its answer
            log.exception("report failed")
            return
        if turns:
            metrics.BLOCKS.labels(backend).inc()
            log.warning("blocked %s for %d turns at score %.1f (why: GET /status)",
                        outcome.backend.id, turns, score)

    def give_up(self, req: Request, failure: Failure | None, attempts: int) -> Response:
        """The answer when no attempt succeeded: the last backend's, or the balancer's."""
        if failure is None:
            return json_error(503, "no backend could be tried", source=SOURCE)
        if failure.response is not None:
            return failure.response
        err = failure.error
        status = 504 if err.kind == TIMEOUT else 502
        response = json_error(status, f"upstream {failure.backend.id}: {err}", source=SOURCE,
                              upstream=failure.backend.id, kind=err.kind, attempts=attempts)
        response.headers["X-Upstream"] = failure.backend.id
        return response


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the proxy app. `config` overrides environment settings (see apps/config.py)."""
    settings = load_settings(overrides=config)
    AddressPolicy.of(settings).check_settings(settings)
    app = ProxyFlask(__name__, static_folder=None)
    register_json_errors(app, source=SOURCE)
    log_through_gunicorn()
    if not settings.tls_verify:
        log.warning("LB_TLS_VERIFY=0: https backends' certificates are NOT checked")

    # Gunicorn's master makes the runtime dir; degraded workers leave a marker there.
    pool = Pool(settings, marker_dir=os.environ.get("LB_RUNTIME_DIR"),
                state_file=state_file_for(settings))
    # Kept-alive connections per backend: as many as this worker sends it at once
    # below its in-flight cap (a pick over the cap opens one more, not kept).
    forwarder = Forwarder(settings, pool, Upstreams(settings, maxsize=settings.max_inflight),
                          InFlight(settings.max_inflight, gauge=metrics.INFLIGHT))
    app.extensions["lb.forwarder"] = forwarder
    if settings.check_interval_s > 0:
        checker = HealthChecker(settings, pool)
        checker.start()
        app.extensions["lb.health"] = checker

    access = access_logger(settings.access_log)

    @app.before_request
    def start() -> None:
        g.started = time.monotonic()
        g.attempts = 0
        g.request_id = request_id_of(request.headers.get("X-Request-ID"))

    @app.endpoint("forward")
    def forward() -> Response:
        return forwarder.handle(request, g.request_id)

    @app.after_request
    def finish(response: Response) -> Response:
        response.headers["X-Request-ID"] = g.request_id
        metrics.REQUESTS.labels(response.headers.get("X-Upstream", "none"),
                                f"{response.status_code // 100}xx").inc()
        if access is not None:
            access.info(json.dumps({
                "ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                "request_id": g.request_id, "client": request.remote_addr,
                "method": request.method,
                "path": request.environ.get("RAW_URI") or request.full_path,
                "status": response.status_code,
                "backend": response.headers.get("X-Upstream"),
                "latency_ms": round((time.monotonic() - g.started) * 1000, 3),
                "attempts": g.attempts,
            }, separators=(",", ":")))
        return response

    return app


# A client's X-Request-ID is kept when it is short and printable; else a new one.
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")


def request_id_of(raw: str | None) -> str:
    """The request's id: the client's X-Request-ID if sane, else a fresh one."""
    return raw if raw and _REQUEST_ID.fullmatch(raw) else uuid.uuid4().hex


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
