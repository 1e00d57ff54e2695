"""The echo backend: returns the JSON it is given, with seeded faults.

Run one instance per process, e.g.
    ECHO_INSTANCE=0 SEED=7 gunicorn -c apps/echo/gunicorn_conf.py -b 127.0.0.1:9001 "apps.echo.app:create_app()"

Settings (environment, or the `config` mapping in tests):
    SEED            0 = well-behaved; any other integer gives each instance a fixed
                    profile of errors and latency (apps/echo/profiles.py)
    ECHO_INSTANCE   this instance's index (0, 1, 2...), part of its profile
    ECHO_MAX_BODY   largest accepted body in bytes (default 10 MiB); larger gets 413
    ECHO_PROFILE    a named, time-varying profile for this instance instead of the
                    seeded one, e.g. `fail_recover:start=5,period=10` (apps/echo/profiles.py)
    ECHO_SCENARIO   a JSON file mapping instance indexes to such specs, e.g.
                    {"0": "dead:start=2", "2": "flapping:period=3"}
    ECHO_ERROR_RATE, ECHO_MEAN_LATENCY_MS
                    override the profile's base error probability / mean latency
"""
from __future__ import annotations

import collections
import dataclasses
import errno
import functools
import itertools
import json
import os
import socket
import struct
import sys
import threading
import time
from typing import Any, Callable, Iterable, Mapping

from flask import Flask, Response, jsonify, request

from apps.echo import profiles as simulate
from apps.lb.body import RequestBody
from apps.lb.errors import json_error, register_json_errors

ECHO_METHODS = ["POST", "PUT", "PATCH"]
DEFAULT_MAX_BODY = 10 * 1024 * 1024
# A hung request waits this long (until the process stops, in practice).
HANG_S = 3600.0


def _setting(source: Mapping[str, Any], name: str, default: Any, kind: type = int) -> Any:
    raw = source.get(name, default)
    try:
        return kind(raw)
    except (TypeError, ValueError):
        sys.exit(f"echo: invalid setting {name}: {raw!r} is not {kind.__name__}")


def resolve_profile(source: Mapping[str, Any], seed: int, instance: int) -> simulate.Profile:
    """The seeded profile, then a scenario file's spec, ECHO_PROFILE, and the overrides."""
    profile = simulate.profile_for(seed, instance)
    specs = []
    if source.get("ECHO_SCENARIO"):
        try:
            with open(source["ECHO_SCENARIO"]) as handle:
                scenario = json.load(handle)
        except (OSError, ValueError) as exc:
            sys.exit(f"echo: invalid setting ECHO_SCENARIO: {exc}")
        specs.append(scenario.get(str(instance)))
    specs.append(source.get("ECHO_PROFILE"))
    for spec in filter(None, specs):
        try:
            profile = simulate.with_spec(profile, spec)
        except ValueError as exc:
            sys.exit(f"echo: invalid setting ECHO_PROFILE: {exc}")
    return dataclasses.replace(
        profile,
        error_rate=_setting(source, "ECHO_ERROR_RATE", profile.error_rate, float),
        mean_latency_ms=_setting(source, "ECHO_MEAN_LATENCY_MS", profile.mean_latency_ms, float))


class Faults:
    """WSGI middleware that makes each request meet the instance's current phase:
    added latency, a simulated 500 (503 for /health), a hang, or a dropped
    connection. Drops happen here, outside Flask, which would turn an
    exception into a 500 instead of letting the connection go."""

    def __init__(self, app: Callable, profile: simulate.Profile, name: str,
                 clock: Callable[[], float], sleep: Callable[[float], None]) -> None:
        self.app = app
        self.profile = profile
        self.name = name
        self.clock = clock
        self.sleep = sleep
        self.started = clock()
        # The key of a request without X-Request-ID; next() on a count is atomic under the GIL.
        self.counter = itertools.count()
        # Recent health probes, (elapsed, checker id), shown by /profile: a benchmark
        # can then see how many checkers probe this instance, and how often.
        self.probes: collections.deque[tuple[float, str]] = collections.deque(maxlen=500)
        # Requests that reached this instance (not /health, not /profile), shown by
        # /profile: a benchmark can count every attempt, a balancer's retries
        # included, whichever balancer sent them (bench/mixed.py).
        self.served = 0
        self.served_lock = threading.Lock()

    def elapsed(self) -> float:
        return self.clock() - self.started

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/profile":
            return self.app(environ, start_response)
        health = path == "/health"
        if health and environ.get("HTTP_X_HEALTH_CHECK"):
            self.probes.append((round(self.elapsed(), 3), environ["HTTP_X_HEALTH_CHECK"]))
        if not health:
            with self.served_lock:
                self.served += 1
        key = environ.get("HTTP_X_REQUEST_ID") or f"n{next(self.counter)}"
        outcome = simulate.draw(self.profile, f"health:{key}" if health else key, self.elapsed())
        if outcome.hang:
            self.sleep(HANG_S)
        if outcome.dead or outcome.reset or outcome.hang:
            drop_connection(environ)
        if outcome.latency_s:
            self.sleep(outcome.latency_s)
        if outcome.fail:
            response = json_error(503 if health else 500, "simulated failure",
                                  instance=self.name, state=self.state())
            return response(environ, start_response)
        return self.app(environ, start_response)

    def state(self) -> str:
        return simulate.phase_at(self.profile, self.elapsed()).state


def drop_connection(environ: Mapping[str, Any]) -> None:
    """Reset the client's connection: SO_LINGER 0 makes Gunicorn's close send RST."""
    sock = environ.get("gunicorn.socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    # Gunicorn takes ECONNRESET for a client gone and closes quietly.
    raise ConnectionResetError(errno.ECONNRESET, "simulated connection reset")


def close_listeners(worker: Any) -> None:
    """Close the port for good while the process lives on (the `dead` profile).

    Shutting the listening socket down makes the kernel refuse new
    connections for every process sharing it; the worker first stops polling
    it, so it never tries to accept on a dead socket (Gunicorn 27's gthread).
    """
    listeners, worker.sockets = worker.sockets, []
    for listener in listeners:
        try:
            worker.poller.unregister(listener)
        except (KeyError, ValueError):
            pass
        try:
            listener.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    print("echo: port closed (profile `dead`)", flush=True)


def on_worker_init(faults: Faults, worker: Any) -> None:
    """Called by gunicorn_conf's post_worker_init: schedule a `dead` profile's end."""
    if faults.profile.kind == "dead":
        delay = max(0.0, faults.profile.start_s - faults.elapsed())
        timer = threading.Timer(delay, close_listeners, args=(worker,))
        timer.daemon = True
        timer.start()


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build one echo instance. `config` overrides the environment; it may also
    hold `sleep` and `clock`, used for simulated latency and elapsed time (tests
    pass fakes)."""
    source = {**os.environ, **(config or {})}
    seed = _setting(source, "SEED", 0)
    instance = _setting(source, "ECHO_INSTANCE", 0)
    sleep: Callable[[float], None] = source.get("sleep", time.sleep)
    clock: Callable[[], float] = source.get("clock", time.monotonic)

    app = Flask(__name__, static_folder=None)
    max_body = _setting(source, "ECHO_MAX_BODY", DEFAULT_MAX_BODY)
    register_json_errors(app)
    profile = resolve_profile(source, seed, instance)
    name = f"echo-{instance}"
    faults = Faults(app.wsgi_app, profile, name, clock, sleep)
    app.wsgi_app = faults  # type: ignore[method-assign]
    print(f"{name}: profile {json.dumps(dataclasses.asdict(profile))}", flush=True)
    app.extensions["echo.on_worker_init"] = functools.partial(on_worker_init, faults)
    register_routes(app, faults, max_body)
    return app


def register_routes(app: Flask, faults: Faults, max_body: int) -> None:
    """/health and /profile tell the instance's state; /bytes/<n> and every POST, PUT
    and PATCH echo."""
    @app.get("/health")
    def health() -> Response:
        return jsonify(instance=faults.name, state=faults.state())

    @app.get("/profile")
    def show_profile() -> Response:
        return jsonify(id=faults.name, state=faults.state(), elapsed_s=faults.elapsed(),
                       health_probes=list(faults.probes), served=faults.served,
                       **dataclasses.asdict(faults.profile))

    @app.get("/bytes/<int:count>")
    def some_bytes(count: int) -> Response:
        """`count` bytes (at most ECHO_MAX_BODY): a large answer without a large upload,
        for clients that ask for one and never read it (bench/attacks/)."""
        if count > max_body:
            return json_error(413, f"at most {max_body} bytes")
        return Response(b"x" * count, mimetype="application/octet-stream")

    @app.route("/", defaults={"path": ""}, methods=ECHO_METHODS)
    @app.route("/<path:path>", methods=ECHO_METHODS)
    def echo(path: str) -> Response:
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
