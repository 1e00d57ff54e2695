"""The client's side of the traffic listener: the request as the proxy reads it, the
answer as it goes back, and what the balancer answers itself (refusals), names
(request ids) or relays untouched (a backend's response).

A forwarded request never becomes a Werkzeug Request or Response: `Incoming` reads
the WSGI environ directly and `Outgoing` is handed to the WSGI server as it is,
which took a tenth of a worker's time under load (docs/performance.md). Flask
remains the app around them: it answers whatever the proxy raises (a 500 for a
bug, logged by Flask), and tests drive the app through its test client.
"""
from __future__ import annotations

import re
import uuid
from typing import Any, Callable, Iterable
from urllib.parse import quote

from flask import Flask
from werkzeug.exceptions import HTTPException
from werkzeug.http import HTTP_STATUS_CODES, remove_entity_headers

from apps.lb.body import foreign_codings
from apps.lb.errors import error_body
from apps.lb.exchange import Answer
from apps.lb.headers import client_response_headers
from apps.config import Backend

# Marks errors the balancer made itself, as opposed to a backend's answers.
SOURCE = "balancer"

# Request headers the WSGI environ holds without the HTTP_ prefix.
_CONTENT_HEADERS = {"CONTENT_TYPE": "Content-Type", "CONTENT_LENGTH": "Content-Length"}


class Incoming:
    """The client's request, read from the WSGI environ as the proxy needs it."""

    __slots__ = ("environ", "method", "request_id", "started", "attempts", "_headers")

    def __init__(self, environ: dict[str, Any], started: float) -> None:
        self.environ = environ
        self.method: str = environ["REQUEST_METHOD"]
        self.request_id = request_id_of(environ.get("HTTP_X_REQUEST_ID"))
        self.started = started
        self.attempts = 0  # upstream attempts made so far (for the access log)
        self._headers: list[tuple[str, str]] | None = None

    @property
    def headers(self) -> list[tuple[str, str]]:
        """The request's headers, named as Werkzeug names them (`X-Forwarded-For`);
        the server has joined repeated ones with commas."""
        if self._headers is None:
            found = []
            for key, value in self.environ.items():
                if key.startswith("HTTP_"):
                    if key not in ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"):
                        found.append((key[5:].replace("_", "-").title(), value))
                elif key in _CONTENT_HEADERS and value:
                    found.append((_CONTENT_HEADERS[key], value))
            self._headers = found
        return self._headers

    def header(self, name: str) -> str:
        """One request header's value, or ""."""
        key = name.upper().replace("-", "_")
        return self.environ.get(key if key in _CONTENT_HEADERS else f"HTTP_{key}", "")

    @property
    def target(self) -> str:
        """The request target as the client sent it (path and query)."""
        raw = self.environ.get("RAW_URI") or self.environ.get("REQUEST_URI")
        if raw:
            return raw
        query = self.environ.get("QUERY_STRING", "")
        path = quote(self.environ.get("PATH_INFO", "").encode("latin-1"), safe="/:@!$&'()*+,;=")
        return f"{path}?{query}" if query else path

    @property
    def path(self) -> str:
        """The path, percent-decoded as UTF-8 as Werkzeug decodes it (for log lines)."""
        raw = self.environ.get("PATH_INFO", "")
        return "/" + raw.encode("latin-1").decode("utf-8", "replace").lstrip("/")

    @property
    def remote_addr(self) -> str | None:
        return self.environ.get("REMOTE_ADDR")


class Outgoing:
    """An answer to the client: status, headers and a body (bytes, or an iterable the
    WSGI server closes when it is done), handed to the server as it is."""

    __slots__ = ("status", "headers", "body", "upstream")

    def __init__(self, status: int, headers: list[tuple[str, str]],
                 body: bytes | Iterable[bytes], upstream: str | None = None) -> None:
        self.status, self.headers, self.body, self.upstream = status, headers, body, upstream
        if upstream is not None:
            headers.append(("X-Upstream", upstream))

    def __call__(self, environ: dict[str, Any],
                 start_response: Callable[..., Any]) -> Iterable[bytes]:
        """Start the WSGI response and return its body, with the rules Werkzeug's
        Response applied before: no body (and no Content-Length) where HTTP allows
        none, and a 304 without the headers that describe a body."""
        status, headers, body = self.status, self.headers, self.body
        if status == 204 or status < 200:
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        elif status == 304:
            remove_entity_headers(headers)
        start_response(f"{status} {_REASONS.get(status, 'UNKNOWN')}", headers)
        empty = environ["REQUEST_METHOD"] == "HEAD" or status < 200 or status in (204, 304)
        if isinstance(body, bytes):
            return [] if empty else [body]
        if empty:
            close = getattr(body, "close", None)
            if close is not None:
                close()
            return []
        return body


_REASONS = {code: phrase.upper() for code, phrase in HTTP_STATUS_CODES.items()}


def json_answer(status: int, message: str, *, upstream: str | None = None,
                **extra: Any) -> Outgoing:
    """The balancer's own JSON error answer (errors.py's body)."""
    if upstream is not None:
        extra["upstream"] = upstream
    body = error_body(status, message, **extra)
    return Outgoing(status, [("Content-Type", "application/json"),
                             ("Content-Length", str(len(body)))], body, upstream)


def http_error_answer(exc: HTTPException) -> Outgoing:
    """A Werkzeug HTTP error raised on the proxy's path (the client's body: too large,
    broken, too slow) as the JSON answer errors.py gives every HTTP error."""
    return json_answer(exc.code or 500, exc.description or exc.name, source=SOURCE)


class ProxyFlask(Flask):
    """A Flask app whose every request goes to one plain-WSGI handler (`serve`, set by
    create_app): no routing, no Werkzeug Request or Response.

    Werkzeug's router would answer some requests itself (308 for `/a//b`, 405 for
    odd methods, 400 for a WebSocket handshake), which a transparent proxy must
    not do. Whatever `serve` raises but a client's HTTP error is Flask's to answer:
    it logs the exception and answers a JSON 500 (errors.py).
    """

    serve: Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

    def wsgi_app(self, environ: dict[str, Any],  # type: ignore[override]
                 start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            return self.serve(environ, start_response)
        except Exception as exc:  # a bug: Flask's handling, as for any view
            with self.request_context(environ):
                response = self.handle_exception(exc)
            return response(environ, start_response)


def relayed(backend: Backend, answer: Answer) -> Outgoing:
    """The client's answer for a backend's answer."""
    if answer.body is None:  # a retryable answer too large to keep
        return json_answer(502, f"upstream {backend.id} answered {answer.status}",
                           source=SOURCE, upstream=backend.id)
    headers = client_response_headers(answer.headers.items())
    return Outgoing(answer.status, headers, answer.body, backend.id)


# Every method but CONNECT is forwarded; a 405 must still name some (RFC 9110 15.5.6).
ALLOWED_METHODS = "GET, HEAD, POST, PUT, DELETE, OPTIONS, TRACE, PATCH"


def refusal(req: Incoming) -> Outgoing | None:
    """The balancer's own answer to a request it does not forward, or None. Decided
    before the body is read or any backend is picked."""
    if req.method == "CONNECT":  # a tunnel to an address the client names: never
        answer = json_answer(405, "CONNECT is not supported: the balancer is not a forward "
                             "proxy", source=SOURCE)
        answer.headers.append(("Allow", ALLOWED_METHODS))
        return answer
    codings = foreign_codings(req.header("Transfer-Encoding"))
    if codings:  # gunicorn_conf.py's pre_request closes the connection after this answer
        return json_answer(501, f"transfer coding {codings[0]!r} is not supported, only chunked",
                           source=SOURCE)
    upgrade = req.header("Upgrade").lower()
    if upgrade and upgrade != "h2c":  # h2c may be ignored; a WebSocket may not
        return json_answer(501, f"protocol upgrade to {upgrade!r} is not supported",
                           source=SOURCE)
    return None


# A client's X-Request-ID is kept when it is short and printable; else a new one.
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")


def request_id_of(raw: str | None) -> str:
    """The request's id: the client's X-Request-ID if sane, else a fresh one."""
    return raw if raw and _REQUEST_ID.fullmatch(raw) else uuid.uuid4().hex
