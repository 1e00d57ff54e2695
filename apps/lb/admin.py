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
"""
from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import os
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

import redis
from flask import Flask, Response, abort, jsonify, request

from apps.lb import metrics
from apps.lb.addresses import AddressPolicy
from apps.lb.adminserver import AdminServer
from apps.lb.errors import json_error, register_json_errors
from apps.lb.logs import log_through_gunicorn
from scorer.members import (
    ACTIVE, DRAINING, LastBackendError, Member, check_still_serving, check_weight, new_member,
    state_file_for, with_change,
)
from scorer.pool import Pool
from apps.config import Settings, load_settings, quoted
from scorer.store import describe

log = logging.getLogger("lb.admin")

# Admin bodies hold a URL and a weight. Larger ones get 413 before anything is
# parsed, and nesting is capped before json.loads, which a deep enough
# document would send into a RecursionError.
MAX_BODY = 64 * 1024
MAX_JSON_DEPTH = 20


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
    # It shares the workers' state file, so a change made here survives a Redis
    # restart even if no worker has picked since.
    pool = pool or Pool(settings, degrade=False, state_file=state_file_for(settings))
    runtime_dir = os.environ.get("LB_RUNTIME_DIR")
    app = Flask(__name__, static_folder=None)
    app.json.sort_keys = False
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    addresses = AddressPolicy.of(settings)
    register_json_errors(app, source="admin")

    @app.errorhandler(redis.RedisError)
    def redis_away(exc: redis.RedisError) -> Response:
        return json_error(503, f"Redis unavailable: {describe(exc)}", source="admin")

    def degraded_workers() -> list[int]:
        """Workers serving from their own state because Redis failed them."""
        if not runtime_dir or workers is None:
            return []
        alive = set(workers())
        marked = (int(p.name.removeprefix("degraded-"))
                  for p in Path(runtime_dir).glob("degraded-*"))
        return sorted(pid for pid in marked if pid in alive)

    dashboard = resources.files("apps.lb").joinpath("dashboard.html").read_bytes()

    @app.get("/")
    def show_dashboard() -> Response:
        return Response(dashboard, mimetype="text/html")

    @app.get("/status")
    def status() -> Response:
        try:
            shared, problem = pool.status(), None
            shared["checker"] = pool.checker()
        except redis.RedisError as exc:
            shared = {"backends": [{"id": b.id, "url": b.url} for b in settings.backends]}
            problem = describe(exc)
        degraded = degraded_workers()
        return jsonify(
            clients=client_load(),
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

    def client_load() -> list[dict[str, int]]:
        """Each live traffic worker's open client connections, requests under way and cap."""
        alive = set(workers()) if workers is not None else set()
        return [{"pid": pid, "connections": load.get("connections", 0),
                 "requests": load.get("requests", 0), "cap": settings.max_client_connections}
                for pid, load in sorted(metrics.worker_clients().items()) if pid in alive]

    @app.get("/ready")
    def ready() -> tuple[Response, int]:
        if workers is not None and not workers():
            return jsonify(ready=False, reasons=["no traffic worker is running"]), 503
        load = client_load()
        if load and len(load) == len(workers()) and \
                all(w["connections"] >= w["cap"] for w in load):
            return jsonify(ready=False, reasons=["every worker is at LB_MAX_CLIENT_CONNECTIONS"]), 503
        # Without Redis the balancer still serves, from per-worker state: ready, degraded.
        problem = pool.redis_problem()
        notes = [] if problem is None else [f"Redis {problem}: workers serve from their own state"]
        return jsonify(ready=True, degraded=bool(notes), reasons=notes), 200

    def changing(action: Callable[[], Response]) -> Response:
        """Run a state change once the token checks out (503 from Redis if it is away)."""
        denied = check_token(settings.admin_token, request.headers.get("Authorization", ""))
        return denied or action()

    def known(members: Sequence[Member], backend_id: str) -> Member:
        member = next((m for m in members if m.id == backend_id), None)
        if member is None:
            abort(404, f"no backend {quoted(backend_id)} in this pool")
        return member

    def members_reply(status: int = 200) -> tuple[Response, int]:
        return jsonify(members_rev=pool.rev, backends=[m.as_dict() for m in pool.members]), status

    def apply(decide: Callable[[list[Member]], Sequence[str]]) -> None:
        """Make one membership change; 409 if it would leave nothing to serve."""
        try:
            pool.change(decide)
        except LastBackendError as exc:
            abort(409, str(exc))

    @app.get("/backends")
    def list_backends() -> tuple[Response, int]:
        pool.sync()
        return members_reply()

    @app.post("/backends")
    def add_backend() -> Response:
        def add() -> Response:
            data = json_body()
            if not isinstance(data, dict) or not isinstance(data.get("url"), str):
                abort(400, 'expected JSON {"url": "http://host:port", "weight": 1}')
            try:
                member = new_member(data["url"], data.get("weight", 1))
                addresses.check(member.backend)
            except ValueError as exc:
                abort(400, str(exc))

            def decide(members: list[Member]) -> Sequence[str]:
                if any(m.id == member.id for m in members):
                    abort(409, f"backend {member.id} is already in the pool")
                return "put", member.id, member.to_json()

            apply(decide)
            log.warning("admin added backend %s (weight %d)", member.id, member.weight)
            return members_reply(201)
        return changing(add)

    @app.delete("/backends/<backend_id>")
    def remove_backend(backend_id: str) -> Response:
        def remove() -> Response:
            def decide(members: list[Member]) -> Sequence[str]:
                known(members, backend_id)
                check_still_serving(members, [m for m in members if m.id != backend_id])
                return "remove", backend_id

            apply(decide)
            log.warning("admin removed backend %s", backend_id)
            return members_reply()
        return changing(remove)

    def set_member(backend_id: str, **change: Any) -> Response:
        def decide(members: list[Member]) -> Sequence[str]:
            member = dataclasses.replace(known(members, backend_id), **change)
            check_still_serving(members, with_change(members, member))
            return "put", member.id, member.to_json()

        apply(decide)
        log.warning("admin set backend %s: %s", backend_id, change)
        return members_reply()

    @app.post("/backends/<backend_id>/drain")
    def drain(backend_id: str) -> Response:
        return changing(lambda: set_member(backend_id, state=DRAINING))

    @app.post("/backends/<backend_id>/activate")
    def activate(backend_id: str) -> Response:
        return changing(lambda: set_member(backend_id, state=ACTIVE))

    @app.put("/backends/<backend_id>/weight")
    def weight(backend_id: str) -> Response:
        def set_weight() -> Response:
            data = json_body()
            try:
                value = check_weight(data.get("weight") if isinstance(data, dict) else None)
            except ValueError as exc:
                abort(400, str(exc))
            return set_member(backend_id, weight=value)
        return changing(set_weight)

    @app.post("/backends/<backend_id>/reset")
    def reset(backend_id: str) -> Response:
        def do_reset() -> Response:
            pool.sync()
            pool.reset(known(pool.members, backend_id).backend)
            log.warning("admin reset the score and block of %s", backend_id)
            return jsonify(reset=backend_id)
        return changing(do_reset)

    return app


def json_body() -> Any:
    """The request's JSON document, or None when it is not JSON; 413 past MAX_BODY
    (Flask's MAX_CONTENT_LENGTH), 400 past MAX_JSON_DEPTH."""
    if not request.is_json:
        return None
    raw = request.get_data()
    if nested_deeper(raw, MAX_JSON_DEPTH):
        abort(400, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(raw)
    except ValueError:
        return None


def nested_deeper(raw: bytes, limit: int) -> bool:
    """Whether a JSON text opens more than `limit` arrays or objects at once."""
    depth, in_string, escaped = 0, False, False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # closing quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in b"[{":
            depth += 1
            if depth > limit:
                return True
        elif byte in b"]}":
            depth -= 1
    return False


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


def start_admin_server(settings: Settings,
                       workers: Callable[[], Sequence[int]]) -> AdminServer:
    """Bind the admin listener and serve it from its own threads; return the server."""
    log_through_gunicorn()  # the master's lines too: escaped, in Gunicorn's format
    return AdminServer(create_app(workers=workers), settings.admin_host, settings.admin_port,
                       header_timeout=settings.admin_header_timeout,
                       body_timeout=settings.admin_body_timeout,
                       send_timeout=settings.admin_send_timeout,
                       max_connections=settings.admin_max_connections, max_body=MAX_BODY)
