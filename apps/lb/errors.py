"""JSON error bodies shared by every app: a client always gets JSON, never HTML."""
from __future__ import annotations

from typing import Any

from flask import Flask, Response, json
from werkzeug.exceptions import HTTPException


def json_error(status: int, message: str, **extra: Any) -> Response:
    """A JSON error response: `{"error": message, "status": status, ...}`."""
    body = json.dumps({"error": message, "status": status, **extra})
    return Response(body + "\n", status=status, mimetype="application/json")


def register_json_errors(app: Flask, **extra: Any) -> None:
    """Answer every HTTP error Flask raises (404, 405, 413...) with a JSON body."""

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        response = json_error(exc.code or 500, exc.description or exc.name, **extra)
        allow = exc.get_headers() and dict(exc.get_headers()).get("Allow")
        if allow:  # 405 must say which methods are allowed
            response.headers["Allow"] = allow
        return response
