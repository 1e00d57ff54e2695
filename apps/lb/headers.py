"""Header rules of the proxy (pure functions): what goes upstream, what comes back.

Hop-by-hop headers stop here (RFC 9110 7.6.1); the balancer sets its own
X-Forwarded-*, X-Real-IP, Forwarded, Host and X-Request-ID, and hides the
backend's Date, Server and its own names' look-alikes from the client.
"""
from __future__ import annotations

import re
from typing import Iterable
from urllib.parse import urlsplit

from apps.lb import forwarded
from apps.lb.forwarded import Hop
from apps.config import Backend

# RFC 9110 section 7.6.1, plus the non-standard ones proxies still meet.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer",
    "transfer-encoding", "upgrade", "proxy-authenticate", "proxy-authorization",
})
# Set afresh by the balancer, so a client cannot forge them (X-Request-ID: the
# client's is kept if sane, see apps/lb/frontend.py); and Expect, since the balancer
# has already taken the body (or is streaming it) by then.
REPLACED_REQUEST_HEADERS = frozenset({"host", "expect", "x-request-id"}) | forwarded.OWNED
# The balancer's own server sends these; forwarding the backend's would
# duplicate them (as nginx's proxy_hide_header does by default). X-Upstream and
# X-Request-ID are the balancer's own: a backend's would pass for them, in the
# client's eyes, the access log and the metrics.
REPLACED_RESPONSE_HEADERS = frozenset({"date", "server", "x-upstream", "x-request-id"})


def hop_by_hop(headers: Iterable[tuple[str, str]]) -> frozenset[str]:
    """Lower-case names not to forward: the fixed set plus those `Connection` lists."""
    named = {token.strip().lower()
             for name, value in headers if name.lower() == "connection"
             for token in value.split(",") if token.strip()}
    return HOP_BY_HOP | named


def request_target(raw_uri: str) -> str:
    """The origin-form target (path and query) to send upstream.

    An absolute-form target (`GET http://other/x`) keeps only its path and
    query: the balancer, not the client, chooses where a request goes.
    """
    if raw_uri.startswith("/") or raw_uri == "*":  # "*": OPTIONS * asks the server itself
        return raw_uri
    parts = urlsplit(raw_uri)
    target = parts.path or "/"
    if not target.startswith("/"):
        target = "/" + target
    return f"{target}?{parts.query}" if parts.query else target


# A cookie value holds no comma (RFC 6265 4.1.1): a comma before the next
# `name=` is where Gunicorn joined repeated Cookie lines, and servers expect
# those joined with "; " (RFC 9113 8.2.3). Other commas (a non-conforming
# value) are left alone.
_JOINED_COOKIES = re.compile(rf",\s*(?={forwarded.TOKEN.pattern}=)")


def cookie_header(value: str) -> str:
    """A Cookie header as Gunicorn passed it, with repeated lines joined by "; "."""
    return _JOINED_COOKIES.sub("; ", value)


def upstream_request_headers(headers: Iterable[tuple[str, str]], *, backend: Backend,
                             hop: Hop, preserve_host: bool) -> dict[str, str]:
    """The headers to send upstream: the client's minus hop-by-hop, plus the
    balancer's own X-Forwarded-*, X-Real-IP and Forwarded (apps/lb/forwarded.py)."""
    headers = list(headers)
    skip = hop_by_hop(headers) | REPLACED_REQUEST_HEADERS
    if not hop.trusted:
        skip = skip | forwarded.SCHEME_CLAIMS
    out: dict[str, str] = {}
    sent: dict[str, str] = {}
    for name, value in headers:
        lower = name.lower()
        if lower in forwarded.OWNED or lower == "host":
            sent[lower] = value
        if lower in skip:
            continue
        # Gunicorn has already joined repeated request headers with ",".
        out[name] = cookie_header(value) if lower == "cookie" else value
    client_host = sent.get("host", "")
    out.update(forwarded.forwarded_headers(sent, hop, client_host))
    default_port = 443 if backend.scheme == "https" else 80
    own_host = backend.netloc_host if backend.port == default_port else backend.id
    out["Host"] = client_host if preserve_host and client_host else own_host
    return out


def client_response_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The backend's response headers to pass on: all but hop-by-hop and those the
    balancer sets itself (REPLACED_RESPONSE_HEADERS)."""
    headers = list(headers)
    skip = hop_by_hop(headers) | REPLACED_RESPONSE_HEADERS
    if any(name.lower() == "transfer-encoding" for name, _ in headers):
        # Chunked framing overrides a Content-Length (RFC 9112 6.3): passing the
        # length on would make the client cut the body short.
        skip = skip | {"content-length"}
    return [(name, value) for name, value in headers if name.lower() not in skip]
