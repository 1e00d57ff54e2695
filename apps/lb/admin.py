"""The admin listener: the balancer's own endpoints, on their own port.

It runs in threads of the Gunicorn master (apps/lb/adminserver.py, started by
`when_ready` in gunicorn_conf.py), not in the workers, so it answers even when
every worker thread is busy with traffic. It reads the shared state from Redis, like any
worker would.

    GET /         the dashboard: a live table of backends and charts (apps/lb/dashboard.html)
    GET /status   strategy, Redis reachability, workers, the pool's latency average and
                  panic picks, and per backend: blocked or not, score, smoothed latency,
                  error rate, blocked turns, block end, why it was last blocked, counters
    GET /metrics  Prometheus text: the workers' counters (multiprocess) and the pool's state
    GET /ready    200 while traffic workers are up (with `degraded` when Redis is away),
                  else 503
    GET /backends                the membership: each backend's URL, weight and state
    POST /backends               add one: {"url": "http://host:port", "weight": 1}
    DELETE /backends/<id>        remove one (its in-flight requests finish); 409 for the last
    POST /backends/<id>/drain    no new requests; in-flight ones finish
    POST /backends/<id>/activate undo a drain
    PUT /backends/<id>/weight    {"weight": 0-100}: its share of the rotation
    POST /backends/<id>/reset    clear a backend's score, block and recent history
    Every POST, PUT and DELETE needs `Authorization: Bearer $LB_ADMIN_TOKEN` (off when unset).

The reads are apps/lb/adminstatus.py, the membership changes apps/lb/adminmembers.py,
what a change must bring apps/lb/admininput.py, the HTTP server apps/lb/adminserver.py.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import redis
from flask import Flask, Response

from apps.config import Settings, load_settings
from apps.lb.admininput import MAX_BODY
from apps.lb.adminmembers import register_membership
from apps.lb.adminserver import AdminServer
from apps.lb.adminstatus import register_dashboard, register_status
from apps.lb.errors import json_error, register_json_errors
from apps.lb.logs import log_through_gunicorn
from scorer.members import state_file_for
from scorer.pool import Pool
from scorer.store import describe


def create_app(config: Mapping[str, Any] | None = None, *,
               pool: Pool | None = None,
               workers: Callable[[], Sequence[int]] | None = None) -> Flask:
    """Build the admin app. `workers` lists the live traffic workers' pids (the
    Gunicorn master passes its own list); `pool` defaults to one from settings."""
    settings = load_settings(overrides=config)
    # The admin shows Redis as it is: no in-process stand-in here.
    # It shares the workers' state file, so a change made here survives a Redis
    # restart even if no worker has picked since.
    pool = pool or Pool(settings, degrade=False, state_file=state_file_for(settings))
    app = Flask(__name__, static_folder=None)
    app.json.sort_keys = False
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    register_json_errors(app, source="admin")

    @app.errorhandler(redis.RedisError)
    def redis_away(exc: redis.RedisError) -> Response:
        return json_error(503, f"Redis unavailable: {describe(exc)}", source="admin")

    register_dashboard(app)
    register_status(app, settings, pool, workers)
    register_membership(app, settings, pool)
    return app


def start_admin_server(settings: Settings,
                       workers: Callable[[], Sequence[int]]) -> AdminServer:
    """Bind the admin listener and serve it from its own threads; return the server."""
    log_through_gunicorn()  # the master's lines too: escaped, in Gunicorn's format
    return AdminServer(create_app(workers=workers), settings.admin_host, settings.admin_port,
                       header_timeout=settings.admin_header_timeout,
                       body_timeout=settings.admin_body_timeout,
                       send_timeout=settings.admin_send_timeout,
                       max_connections=settings.admin_max_connections, max_body=MAX_BODY)
