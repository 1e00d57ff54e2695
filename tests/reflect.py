"""A test backend that describes the request it received, run under real Gunicorn.

    GET  /any/path?x=1     -> JSON: method, raw target, headers, body length and hash
    GET  /sleep/<seconds>  -> answers after a delay (for timeouts and saturation)
    GET  /big/<n>          -> n bytes, streamed without Content-Length
    GET  /gzip             -> a gzip-encoded body with Content-Encoding: gzip
    GET  /cookies          -> two Set-Cookie headers
    GET  /status/<code>    -> that status
"""
from __future__ import annotations

import gzip
import hashlib
import time

from flask import Flask, Response, jsonify, request


def create_app() -> Flask:
    app = Flask(__name__)
    app.url_map.merge_slashes = False

    @app.route("/sleep/<float:seconds>", methods=["GET", "POST", "PUT"])
    def sleep(seconds: float) -> Response:
        time.sleep(seconds)
        return jsonify(slept=seconds)

    @app.get("/big/<int:size>")
    def big(size: int) -> Response:
        def chunks():
            for start in range(0, size, 10_000):
                yield bytes((start + i) % 251 for i in range(min(10_000, size - start)))
        return Response(chunks(), mimetype="application/octet-stream")

    @app.get("/gzip")
    def gzipped() -> Response:
        body = gzip.compress(b'{"compressed": true}', mtime=0)
        return Response(body, mimetype="application/json", headers={"Content-Encoding": "gzip"})

    @app.get("/cookies")
    def cookies() -> Response:
        response = jsonify(ok=True)
        response.headers.add("Set-Cookie", "a=1")
        response.headers.add("Set-Cookie", "b=2")
        return response

    @app.get("/status/<int:code>")
    def status(code: int) -> Response:
        return jsonify(status=code), code

    @app.route("/", defaults={"path": ""}, methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"])
    @app.route("/<path:path>", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"])
    def describe(path: str) -> Response:
        body = request.get_data()
        return jsonify(method=request.method, target=request.environ.get("RAW_URI"),
                       headers=[[k, v] for k, v in request.headers.items()],
                       body_length=len(body), body_sha256=hashlib.sha256(body).hexdigest())

    return app
