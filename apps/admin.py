"""The admin listener: the balancer's own endpoints, on their own port.

It runs in a thread of the Gunicorn master (started by `when_ready` in
gunicorn_conf.py), not in the workers, so it answers even when every worker
thread is busy with traffic. It reads the shared state from Redis, like any
worker would.

    GET /status   strategy, Redis reachability, workers, the pool's latency average and
                  panic picks, and per backend: blocked or not, score, smoothed latency,
                  error rate, blocked turns, block end, why it was last blocked, counters
    GET /metrics  Prometheus text: the workers' counters (multiprocess) and the pool's state
    GET /ready    200 while traffic workers are up (with `degraded` when Redis is away),
                  else 503
    POST /backends/<id>/reset   clear a backend's score, block and recent history;
                  needs `Authorization: Bearer $LB_ADMIN_TOKEN` (off when unset)
"""
from __future__ import annotations

import hmac
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

import redis
from flask import Flask, Response, jsonify, request
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from apps import metrics
from apps.errors import json_error, register_json_errors
from scorer.pool import Pool
from scorer.settings import Settings, load_settings

log = logging.getLogger("lb.admin")


def redacted(url: str) -> str:
    """The URL without its password, fit to show."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def create_app(config: Mapping[str, Any] | None = None, *,
               pool: Pool | None = None,
               workers: Callable[[], Sequence[int]] | None = None) -> Flask:
    """Build the admin app. `workers` lists the live traffic workers' pids (the
    Gunicorn master passes its own list); `pool` defaults to one from settings."""
    settings = load_settings(overrides=config)
    # The admin shows Redis as it is: no in-process stand-in here.
    pool = pool or Pool(settings, degrade=False)
    runtime_dir = os.environ.get("LB_RUNTIME_DIR")
    app = Flask(__name__, static_folder=None)
    app.json.sort_keys = False
    register_json_errors(app, source="admin")

    def degraded_workers() -> list[int]:
        """Workers serving from their own state because Redis failed them."""
        if not runtime_dir or workers is None:
            return []
        alive = set(workers())
        marked = (int(p.name.removeprefix("degraded-"))
                  for p in Path(runtime_dir).glob("degraded-*"))
        return sorted(pid for pid in marked if pid in alive)

    @app.get("/status")
    def status() -> Response:
        try:
            shared, reachable = pool.status(), True
            shared["checker"] = pool.checker()
        except redis.RedisError:
            shared = {"backends": [{"id": b.id, "url": b.url} for b in settings.backends]}
            reachable = False
        degraded = degraded_workers()
        return jsonify(
            strategy=settings.strategy,
            pool=settings.pool,
            mode="degraded" if degraded or not reachable else "shared",
            redis={"url": redacted(settings.redis_url), "reachable": reachable},
            workers=len(workers()) if workers else None,
            degraded_workers=degraded,
            **shared,
        )

    @app.get("/metrics")
    def prometheus() -> Response:
        try:
            return Response(metrics.render(pool), mimetype=None,
                            headers={"Content-Type": metrics.CONTENT_TYPE})
        except redis.RedisError as exc:
            return json_error(503, f"Redis unavailable: {exc}", source="admin")

    @app.get("/ready")
    def ready() -> tuple[Response, int]:
        if workers is not None and not workers():
            return jsonify(ready=False, reasons=["no traffic worker is running"]), 503
        # Without Redis the balancer still serves, from per-worker state: ready, degraded.
        notes = [] if pool.ping() else ["Redis is unreachable: workers serve from their own state"]
        return jsonify(ready=True, degraded=bool(notes), reasons=notes), 200

    @app.post("/backends/<backend_id>/reset")
    def reset(backend_id: str) -> Response:
        denied = check_token(settings.admin_token, request.headers.get("Authorization", ""))
        if denied:
            return denied
        backend = next((b for b in settings.backends if b.id == backend_id), None)
        if backend is None:
            return json_error(404, f"no backend {backend_id!r} in this pool", source="admin")
        try:
            pool.reset(backend)
        except redis.RedisError as exc:
            return json_error(503, f"Redis unavailable: {exc}", source="admin")
        log.warning("admin reset the score and block of %s", backend.id)
        return jsonify(reset=backend.id)

    return app


def check_token(expected: str, authorization: str) -> Response | None:
    """None when `authorization` carries the right bearer token, else the error to send.

    Compared in constant time; the token is never logged or echoed.
    """
    if not expected:
        return json_error(403, "admin changes are off: set LB_ADMIN_TOKEN to enable them",
                          source="admin")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), expected.encode()):
        response = json_error(401, "missing or wrong bearer token", source="admin")
        response.headers["WWW-Authenticate"] = 'Bearer realm="lb-admin"'
        return response
    return None


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass  # status polls would drown the balancer's own log


def start_admin_server(settings: Settings,
                       workers: Callable[[], Sequence[int]]) -> BaseWSGIServer:
    """Bind the admin listener and serve it from a daemon thread; return the server."""
    app = create_app(workers=workers)
    server = make_server(settings.admin_host, settings.admin_port, app,
                         threaded=True, request_handler=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="lb-admin", daemon=True).start()
    return server
