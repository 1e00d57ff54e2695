"""The headers that tell a backend where a request came from: the balancer owns them.

From a peer in LB_TRUSTED_PROXIES (a proxy in front of the balancer) the
chain it sent is kept and this hop is added to it; from anyone else, whatever
the client wrote is replaced by what this hop saw, so that no client can pose
to the backends as another address, scheme or host.
"""
from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from typing import Mapping

from apps.config import Network, address_in

# Set by the balancer (lower-case names).
OWNED = frozenset({"forwarded", "x-forwarded-for", "x-real-ip", "x-forwarded-proto",
                   "x-forwarded-host", "x-forwarded-port"})
# Other claims of the scheme (Gunicorn's secure_scheme_headers, Rack's): passed on
# from a trusted proxy, dropped from anyone else.
SCHEME_CLAIMS = frozenset({"x-forwarded-ssl", "x-forwarded-protocol", "x-forwarded-scheme"})

TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


@dataclass(frozen=True)
class Hop:
    """This hop's own view of a request."""

    peer: str      # the address the connection came from
    scheme: str    # http, or https when Gunicorn terminated TLS itself
    port: str      # the listener's port
    trusted: bool  # the peer is in LB_TRUSTED_PROXIES


def hop_of(environ: Mapping[str, object], trusted: tuple[Network, ...]) -> Hop:
    peer = str(environ.get("REMOTE_ADDR") or "")
    # Not wsgi.url_scheme: Gunicorn takes that from a trusted peer's X-Forwarded-Proto.
    sock = environ.get("gunicorn.socket")
    sock = getattr(sock, "raw", sock)  # apps/lb/clientsocket.py's ClientSocket wraps the real one
    scheme = "https" if isinstance(sock, ssl.SSLSocket) else "http"
    return Hop(peer, scheme, str(environ.get("SERVER_PORT", "")),
               bool(trusted) and address_in(peer, trusted))


def forwarded_headers(sent: Mapping[str, str], hop: Hop, host: str) -> dict[str, str]:
    """The OWNED headers to send upstream. `sent`: the client's, by lower-case name;
    `host`: its Host header."""
    theirs = sent if hop.trusted else {}
    out = {"X-Forwarded-For": _append(theirs.get("x-forwarded-for"), hop.peer),
           "X-Real-IP": theirs.get("x-real-ip") or hop.peer,
           "X-Forwarded-Proto": theirs.get("x-forwarded-proto") or hop.scheme,
           "X-Forwarded-Host": theirs.get("x-forwarded-host") or host,
           "X-Forwarded-Port": theirs.get("x-forwarded-port") or hop.port,
           "Forwarded": _append(theirs.get("forwarded"), forwarded_element(hop, host))}
    return {name: value for name, value in out.items() if value}


def forwarded_element(hop: Hop, host: str) -> str:
    """This hop's RFC 7239 element: `for=...;host=...;proto=...`."""
    node = (f'"[{hop.peer}]"' if ":" in hop.peer else hop.peer) or "unknown"
    pairs = [f"for={node}"] + ([f"host={_value(host)}"] if host else []) + [f"proto={hop.scheme}"]
    return ";".join(pairs)


def _value(text: str) -> str:
    """A token, or else a quoted-string (RFC 7230 3.2.6)."""
    if TOKEN.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _append(chain: str | None, item: str) -> str:
    return f"{chain}, {item}" if chain and item else chain or item
