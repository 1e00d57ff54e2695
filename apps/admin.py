"""The admin listener: the balancer's own endpoints, on their own port.

It runs in a thread of the Gunicorn master (started by `when_ready` in
gunicorn_conf.py), not in the workers, so it answers even when every worker
thread is busy with traffic. It reads the shared state from Redis, like any
worker would.

    GET /status   strategy, Redis reachability, workers, the pool's latency average and
                  panic picks, and per backend: blocked or not, score, smoothed latency,
                  error rate, blocked turns, block end, why it was last blocked, counters
    GET /ready    200 when workers are up and Redis answers, else 503 with the reasons
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit, urlunsplit

import redis
from flask import Flask, Response, jsonify
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from apps.errors import register_json_errors
from scorer.pool import Pool
from scorer.settings import Settings, load_settings


def redacted(url: str) -> str:
    """The URL without its password, fit to show."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def create_app(config: Mapping[str, Any] | None = None, *,
               pool: Pool | None = None,
               workers_alive: Callable[[], int] | None = None) -> Flask:
    """Build the admin app. `workers_alive` counts live traffic workers (the
    Gunicorn master passes its own count); `pool` defaults to one from settings."""
    settings = load_settings(overrides=config)
    pool = pool or Pool(settings)
    app = Flask(__name__, static_folder=None)
    app.json.sort_keys = False
    register_json_errors(app, source="admin")

    @app.get("/status")
    def status() -> Response:
        try:
            shared, reachable = pool.status(), True
        except redis.RedisError:
            shared = {"backends": [{"id": b.id, "url": b.url} for b in settings.backends]}
            reachable = False
        return jsonify(
            strategy=settings.strategy,
            pool=settings.pool,
            redis={"url": redacted(settings.redis_url), "reachable": reachable},
            workers=workers_alive() if workers_alive else None,
            **shared,
        )

    @app.get("/ready")
    def ready() -> tuple[Response, int]:
        reasons = []
        if workers_alive is not None and workers_alive() == 0:
            reasons.append("no traffic worker is running")
        if not pool.ping():
            reasons.append("Redis is unreachable")
        return jsonify(ready=not reasons, reasons=reasons), 503 if reasons else 200

    return app


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass  # status polls would drown the balancer's own log


def start_admin_server(settings: Settings,
                       workers_alive: Callable[[], int]) -> BaseWSGIServer:
    """Bind the admin listener and serve it from a daemon thread; return the server."""
    app = create_app(workers_alive=workers_alive)
    server = make_server(settings.admin_host, settings.admin_port, app,
                         threaded=True, request_handler=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="lb-admin", daemon=True).start()
    return server
