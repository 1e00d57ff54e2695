"""The balancer's traffic listener: every path and method is forwarded to a backend.

    gunicorn -c gunicorn_conf.py "apps.proxy:create_app()"

A request's path: read the body (bounded by LB_MAX_BODY), ask the pool for a
backend, forward, report the outcome to the pool, relay the answer. The
balancer's own endpoints are on the admin listener (apps/admin.py), so no path
here is reserved.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Mapping

import redis
from flask import Flask, Response, request
from werkzeug.exceptions import RequestEntityTooLarge

from apps.errors import json_error, register_json_errors
from apps.upstream import (
    UpstreamError, Upstreams, client_response_headers, read_or_stream, request_target,
    upstream_request_headers,
)
from scorer.pool import TIMEOUT, Outcome, Pool
from scorer.settings import Backend, load_settings

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


def read_body(environ: Mapping[str, Any], limit: int) -> bytes:
    """The whole request body, at most `limit` bytes, or RequestEntityTooLarge (413).

    Werkzeug's own limit truncates a chunked body at the limit instead of
    refusing it, so the count is kept here: one byte past the limit is enough.
    """
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH")
    if length:  # Gunicorn has checked it is a number
        if int(length) > limit:
            raise RequestEntityTooLarge()
        return stream.read(int(length))
    if not environ.get("wsgi.input_terminated"):
        return b""  # no length and no chunked framing: there is no body
    chunks, size = [], 0
    while chunk := stream.read(min(64 * 1024, limit + 1 - size)):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise RequestEntityTooLarge()
    return b"".join(chunks)


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the proxy app. `config` overrides environment settings (see scorer/settings.py)."""
    settings = load_settings(overrides=config)
    app = ProxyFlask(__name__, static_folder=None)
    register_json_errors(app, source=SOURCE)

    pool = Pool(settings)
    # Gunicorn's post_fork hook tells each worker its thread count.
    threads = int(os.environ.get("GUNICORN_WORKER_THREADS", "16"))
    upstreams = Upstreams(settings, maxsize=threads)
    app.extensions["lb.pool"] = pool

    def report(outcome: Outcome) -> None:
        try:
            score, turns = pool.report(outcome)
            if turns:
                log.warning("blocked %s for %d turns at score %.1f (why: GET /status)",
                            outcome.backend.id, turns, score)
        except redis.RedisError as exc:
            # The client's answer matters more than the bookkeeping.
            log.warning("could not report to Redis: %s", exc)

    def failure(backend: Backend, err: UpstreamError) -> Response:
        status = 504 if err.kind == TIMEOUT else 502
        log.warning("%s %s -> %s: %s, answered %d", request.method, request.path,
                    backend.id, err, status)
        response = json_error(status, f"upstream {backend.id}: {err}", source=SOURCE,
                              upstream=backend.id, kind=err.kind)
        response.headers["X-Upstream"] = backend.id
        return response

    @app.endpoint("forward")
    def forward() -> Response:
        upgrade = request.headers.get("Upgrade", "").lower()
        if upgrade and upgrade != "h2c":  # h2c may be ignored; a WebSocket may not
            return json_error(501, f"protocol upgrade to {upgrade!r} is not supported",
                              source=SOURCE)
        body = read_body(request.environ, settings.max_body)
        try:
            backend = pool.pick()
        except redis.RedisError as exc:
            log.error("cannot pick a backend, Redis unavailable: %s", exc)
            return json_error(503, "balancer state unavailable (Redis)", source=SOURCE)

        headers = upstream_request_headers(
            request.headers.items(), backend=backend, client_addr=request.remote_addr or "",
            scheme=request.scheme, preserve_host=settings.preserve_host)
        if body or "Content-Length" in headers:
            headers["Content-Length"] = str(len(body))  # a chunked upload arrives whole
        target = request_target(request.environ.get("RAW_URI") or request.full_path)

        started = time.monotonic()
        try:
            upstream = upstreams.send(backend, request.method, target, headers, body or None)
            latency = time.monotonic() - started
            content = read_or_stream(upstream)
        except UpstreamError as err:
            report(Outcome(backend, time.monotonic() - started, error=err.kind))
            return failure(backend, err)
        report(Outcome(backend, latency, status=upstream.status))

        response_headers = client_response_headers(upstream.headers.iteritems())
        response_headers.append(("X-Upstream", backend.id))
        return UpstreamResponse(content, status=upstream.status, headers=response_headers,
                                direct_passthrough=True)

    return app
