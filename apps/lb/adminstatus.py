"""The admin's reads: the dashboard (GET /), /status, /metrics and /ready."""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import urlsplit, urlunsplit

import redis
from flask import Flask, Response, jsonify

from apps.config import Settings
from apps.lb import metrics
from scorer.pool import Pool
from scorer.store import describe

Workers = Callable[[], Sequence[int]]


def redacted(url: str) -> str:
    """The URL without its password, fit to show."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def degraded_workers(runtime_dir: str | None, workers: Workers | None) -> list[int]:
    """Workers serving from their own state because Redis failed them."""
    if not runtime_dir or workers is None:
        return []
    alive = set(workers())
    marked = (int(p.name.removeprefix("degraded-"))
              for p in Path(runtime_dir).glob("degraded-*"))
    return sorted(pid for pid in marked if pid in alive)


def client_load(settings: Settings, workers: Workers | None) -> list[dict[str, int]]:
    """Each live traffic worker's open client connections, requests under way and cap."""
    alive = set(workers()) if workers is not None else set()
    return [{"pid": pid, "connections": load.get("connections", 0),
             "requests": load.get("requests", 0), "cap": settings.max_client_connections}
            for pid, load in sorted(metrics.worker_clients().items()) if pid in alive]


def register_dashboard(app: Flask) -> None:
    """GET /: the dashboard, a page that polls /status (apps/lb/dashboard.html)."""
    dashboard = resources.files("apps.lb").joinpath("dashboard.html").read_bytes()

    @app.get("/")
    def show_dashboard() -> Response:
        return Response(dashboard, mimetype="text/html")


def register_status(app: Flask, settings: Settings, pool: Pool,
                    workers: Workers | None) -> None:
    """GET /status, /metrics and /ready. `workers` lists the live traffic workers' pids."""
    runtime_dir = os.environ.get("LB_RUNTIME_DIR")

    @app.get("/status")
    def status() -> Response:
        try:
            shared, problem = pool.status(), None
            shared["checker"] = pool.checker()
        except redis.RedisError as exc:
            shared = {"backends": [{"id": b.id, "url": b.url} for b in settings.backends]}
            problem = describe(exc)
        degraded = degraded_workers(runtime_dir, workers)
        return jsonify(
            clients=client_load(settings, workers),
            strategy=settings.strategy,
            pool=settings.pool,
            mode="degraded" if degraded or problem else "shared",
            redis={"url": redacted(settings.redis_url), "reachable": problem is None,
                   "problem": problem},
            workers=len(workers()) if workers else None,
            degraded_workers=degraded,
            **shared,
        )

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(metrics.render(pool), mimetype=None,
                        headers={"Content-Type": metrics.CONTENT_TYPE})

    @app.get("/ready")
    def ready() -> tuple[Response, int]:
        if workers is not None and not workers():
            return jsonify(ready=False, reasons=["no traffic worker is running"]), 503
        load = client_load(settings, workers)
        if load and len(load) == len(workers()) and \
                all(w["connections"] >= w["cap"] for w in load):
            return jsonify(ready=False,
                           reasons=["every worker is at LB_MAX_CLIENT_CONNECTIONS"]), 503
        # Without Redis the balancer still serves, from per-worker state: ready, degraded.
        problem = pool.redis_problem()
        notes = [] if problem is None else [f"Redis {problem}: workers serve from their own state"]
        return jsonify(ready=True, degraded=bool(notes), reasons=notes), 200
