"""The client's side of the traffic listener: the app's shape, and what the balancer
answers itself (refusals), names (request ids) or relays untouched (a backend's response).
"""
from __future__ import annotations

import re
import uuid

from flask import Flask, Request, Response

from apps.lb.body import foreign_codings
from apps.lb.errors import json_error
from apps.lb.exchange import Answer
from apps.lb.headers import client_response_headers
from apps.config import Backend

# Marks errors the balancer made itself, as opposed to a backend's answers.
SOURCE = "balancer"


class ProxyFlask(Flask):
    """A Flask app without routing: every request goes to the one `forward` view.

    Werkzeug's router answers some requests itself (308 for `/a//b`, 405 for
    odd methods, 400 for a WebSocket handshake), which a transparent proxy
    must not do; skipping it also saves its cost on every request.
    """

    def create_url_adapter(self, request):  # type: ignore[override]
        return None if request is not None else super().create_url_adapter(request)

    def dispatch_request(self) -> Response:  # type: ignore[override]
        return self.view_functions["forward"]()


class UpstreamResponse(Response):
    """A response relayed as the backend sent it: no default Content-Type, and the
    backend's Content-Length kept (a HEAD answer has one but no body)."""

    default_mimetype = None
    automatically_set_content_length = False


def relayed(backend: Backend, answer: Answer) -> Response:
    """The client's response for a backend's answer."""
    if answer.body is None:  # a retryable answer too large to keep
        response = json_error(502, f"upstream {backend.id} answered {answer.status}",
                              source=SOURCE, upstream=backend.id)
        response.headers["X-Upstream"] = backend.id
        return response
    headers = client_response_headers(answer.headers.iteritems())
    headers.append(("X-Upstream", backend.id))
    return UpstreamResponse(answer.body, status=answer.status, headers=headers,
                            direct_passthrough=True)


# Every method but CONNECT is forwarded; a 405 must still name some (RFC 9110 15.5.6).
ALLOWED_METHODS = "GET, HEAD, POST, PUT, DELETE, OPTIONS, TRACE, PATCH"


def refusal(req: Request) -> Response | None:
    """The balancer's own answer to a request it does not forward, or None. Decided
    before the body is read or any backend is picked."""
    if req.method == "CONNECT":  # a tunnel to an address the client names: never
        response = json_error(405, "CONNECT is not supported: the balancer is not a forward "
                              "proxy", source=SOURCE)
        response.headers["Allow"] = ALLOWED_METHODS
        return response
    codings = foreign_codings(req.headers.get("Transfer-Encoding", ""))
    if codings:  # gunicorn_conf.py's pre_request closes the connection after this answer
        return json_error(501, f"transfer coding {codings[0]!r} is not supported, only chunked",
                          source=SOURCE)
    upgrade = req.headers.get("Upgrade", "").lower()
    if upgrade and upgrade != "h2c":  # h2c may be ignored; a WebSocket may not
        return json_error(501, f"protocol upgrade to {upgrade!r} is not supported",
                          source=SOURCE)
    return None


# A client's X-Request-ID is kept when it is short and printable; else a new one.
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")


def request_id_of(raw: str | None) -> str:
    """The request's id: the client's X-Request-ID if sane, else a fresh one."""
    return raw if raw and _REQUEST_ID.fullmatch(raw) else uuid.uuid4().hex
