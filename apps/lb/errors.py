"""JSON error bodies shared by every app: a client always gets JSON, never HTML."""
from __future__ import annotations

import json
from typing import Any

from flask import Flask, Response
from werkzeug.exceptions import HTTPException


def error_body(status: int, message: str, **extra: Any) -> bytes:
    """`{"error": message, "status": status, ...}` and a newline, as bytes (keys sorted,
    ASCII only, as Flask's own JSON has them)."""
    return (json.dumps({"error": message, "status": status, **extra}, sort_keys=True)
            + "\n").encode()


def json_error(status: int, message: str, **extra: Any) -> Response:
    """A JSON error response: `{"error": message, "status": status, ...}`."""
    return Response(error_body(status, message, **extra), status=status,
                    mimetype="application/json")


def register_json_errors(app: Flask, **extra: Any) -> None:
    """Answer every HTTP error Flask raises (404, 405, 413...) with a JSON body."""

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        response = json_error(exc.code or 500, exc.description or exc.name, **extra)
        allow = exc.get_headers() and dict(exc.get_headers()).get("Allow")
        if allow:  # 405 must say which methods are allowed
            response.headers["Allow"] = allow
        return response
