"""The echo backend: returns the JSON it is given, with seeded faults.

Run one instance per process, e.g.
    ECHO_INSTANCE=0 SEED=7 gunicorn -c gunicorn_conf.py -b 127.0.0.1:9001 "apps.echo:create_app()"

Settings (environment, or the `config` mapping in tests):
    SEED            0 = well-behaved; any other integer gives each instance a fixed
                    profile of errors and latency (apps/simulate.py)
    ECHO_INSTANCE   this instance's index (0, 1, 2...), part of its profile
    ECHO_MAX_BODY   largest accepted body in bytes (default 10 MiB); larger gets 413
    ECHO_ERROR_RATE, ECHO_MEAN_LATENCY_MS
                    override the seeded profile's error probability / mean latency,
                    to give one instance a known fault
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sys
import time
from typing import Any, Callable, Mapping

from flask import Flask, Response, jsonify, request

from apps import simulate
from apps.body import RequestBody
from apps.errors import json_error, register_json_errors

ECHO_METHODS = ["POST", "PUT", "PATCH"]
DEFAULT_MAX_BODY = 10 * 1024 * 1024


def _setting(source: Mapping[str, Any], name: str, default: Any, kind: type = int) -> Any:
    raw = source.get(name, default)
    try:
        return kind(raw)
    except (TypeError, ValueError):
        sys.exit(f"echo: invalid setting {name}: {raw!r} is not {kind.__name__}")


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build one echo instance. `config` overrides the environment; it may also
    hold `sleep`, the function used for simulated latency (tests pass a fake)."""
    source = {**os.environ, **(config or {})}
    seed = _setting(source, "SEED", 0)
    instance = _setting(source, "ECHO_INSTANCE", 0)
    sleep: Callable[[float], None] = source.get("sleep", time.sleep)

    app = Flask(__name__, static_folder=None)
    max_body = _setting(source, "ECHO_MAX_BODY", DEFAULT_MAX_BODY)
    register_json_errors(app)
    profile = simulate.profile_for(seed, instance)
    profile = dataclasses.replace(
        profile,
        error_rate=_setting(source, "ECHO_ERROR_RATE", profile.error_rate, float),
        mean_latency_ms=_setting(source, "ECHO_MEAN_LATENCY_MS", profile.mean_latency_ms, float))
    name = f"echo-{instance}"
    # The key of a request without X-Request-ID; next() on a count is atomic under the GIL.
    counter = itertools.count()
    print(f"{name}: profile {json.dumps(dataclasses.asdict(profile))}", flush=True)

    @app.get("/health")
    def health() -> Response:
        return jsonify(instance=name, state=profile.state)

    @app.get("/profile")
    def show_profile() -> Response:
        return jsonify(id=name, **dataclasses.asdict(profile))

    @app.route("/", defaults={"path": ""}, methods=ECHO_METHODS)
    @app.route("/<path:path>", methods=ECHO_METHODS)
    def echo(path: str) -> Response:
        key = request.headers.get("X-Request-ID") or f"n{next(counter)}"
        outcome = simulate.draw(profile, key)
        if outcome.latency_s:
            sleep(outcome.latency_s)
        if outcome.fail:
            return json_error(500, "simulated failure", instance=name)
        if not request.is_json:
            return json_error(415, "expected Content-Type: application/json",
                              got=request.content_type)
        # Counted here: Werkzeug's own limit cuts a chunked body short instead of refusing it.
        body = RequestBody.read(request.environ, max_body, max_body).prefix
        if not body:
            return json_error(400, "empty body: expected a JSON document")
        try:
            json.loads(body)
        except ValueError as exc:
            return json_error(400, f"malformed JSON: {exc}")
        # The exact bytes go back: re-serialising could reorder or reformat them.
        return Response(body, status=200, mimetype="application/json")

    return app
