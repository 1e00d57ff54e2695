"""Talking to backends: header rules (pure functions) and pooled keep-alive clients.

The client is urllib3, used directly rather than through `requests`: a
`requests.Session` is not thread-safe (one per thread would multiply the
connections) and adds a layer of per-request work (hooks, cookie jar, header
merging) that a proxy does not want. One thread-safe connection pool per
backend, built once per worker, keeps connections alive across requests.
`python -m bench clients` measures the difference on this machine.

Each backend gets its own pool, so the request target can never pick the
address: whatever the client sends as a path, the socket goes to a configured
backend.
"""
from __future__ import annotations

import errno
import http.client
import re
import threading
from typing import Any, Callable, Iterable, Iterator, Mapping
from urllib.parse import urlsplit

import urllib3
from urllib3.connection import HTTPConnection
from urllib3.exceptions import (
    ConnectTimeoutError, HTTPError, NewConnectionError, ProtocolError, ReadTimeoutError,
)
from urllib3.util import SKIP_HEADER
from urllib3.util.ssl_match_hostname import CertificateError

from apps.lb import forwarded
from apps.lb.addresses import AddressPolicy, AddressRefused, guarded_connections
from apps.lb.forwarded import Hop
from scorer.pool import CONNECT, PROTOCOL, TIMEOUT
from apps.config import Backend, Settings

# RFC 9110 section 7.6.1, plus the non-standard ones proxies still meet.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer",
    "transfer-encoding", "upgrade", "proxy-authenticate", "proxy-authorization",
})
# Set afresh by the balancer, so a client cannot forge them (X-Request-ID: the
# client's is kept if sane, see apps/lb/proxy.py); and Expect, since the balancer
# has already taken the body (or is streaming it) by then.
REPLACED_REQUEST_HEADERS = frozenset({"host", "expect", "x-request-id"}) | forwarded.OWNED
# The balancer's own server sends these; forwarding the backend's would
# duplicate them (as nginx's proxy_hide_header does by default). X-Upstream and
# X-Request-ID are the balancer's own: a backend's would pass for them, in the
# client's eyes, the access log and the metrics.
REPLACED_RESPONSE_HEADERS = frozenset({"date", "server", "x-upstream", "x-request-id"})
NO_RETRIES = urllib3.Retry(False)
# Bodies whose length is known and at most this big are read in one go;
# larger or unknown ones are streamed to the client in chunks of this size.
STREAM_CHUNK = 64 * 1024


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


class UpstreamError(Exception):
    """An attempt that produced no HTTP answer; `kind` is CONNECT, TIMEOUT or PROTOCOL.

    `delivered` is False when no connection was made, so nothing reached the
    backend and any request may safely be sent elsewhere.
    """

    def __init__(self, kind: str, detail: str, delivered: bool = True) -> None:
        super().__init__(detail)
        self.kind = kind
        self.delivered = delivered


def classify(exc: HTTPError) -> UpstreamError:
    """Turn a urllib3 failure on an open connection into an UpstreamError (the
    request may have reached the backend)."""
    if isinstance(exc, ReadTimeoutError):
        return UpstreamError(TIMEOUT, "timed out waiting for an answer")
    if isinstance(exc, ProtocolError):
        return UpstreamError(PROTOCOL, f"connection broken: {exc.args[-1]!r}")
    return UpstreamError(PROTOCOL, f"{type(exc).__name__}: {exc}")


def open_connection(conn: HTTPConnection, timeout: urllib3.Timeout) -> None:
    """Connect, TLS handshake included, before anything is sent: whatever fails
    here never reached the backend, so any method may be retried elsewhere.

    urllib3 alone would report a handshake that times out as a read timeout and
    one reset by the backend as a broken connection, as if a request had gone.
    """
    conn.timeout = timeout.connect_timeout
    try:
        conn.connect()
    # NewConnectionError subclasses ConnectTimeoutError, so it is tested first.
    except NewConnectionError as exc:
        if isinstance(exc.__cause__, AddressRefused):
            raise UpstreamError(CONNECT, f"refused by the address policy: {exc.__cause__}",
                                delivered=False) from exc
        raise UpstreamError(CONNECT, "connection refused or unreachable",
                            delivered=False) from exc
    except (ConnectTimeoutError, TimeoutError) as exc:  # TimeoutError: in the handshake
        raise UpstreamError(TIMEOUT, "timed out connecting", delivered=False) from exc
    except (HTTPError, OSError, CertificateError) as exc:  # what is left is the handshake
        raise UpstreamError(CONNECT, f"TLS handshake failed: {exc}", delivered=False) from exc


class Upstreams:
    """One keep-alive connection pool per backend, shared by a worker's threads."""

    def __init__(self, settings: Settings, maxsize: int) -> None:
        self._timeout = urllib3.Timeout(connect=settings.connect_timeout,
                                        read=settings.read_timeout)
        self._maxsize = maxsize
        # For https:// backends: certificates and host names are checked unless
        # LB_TLS_VERIFY=0, against LB_TLS_CA_FILE or the system's trust store.
        self._tls: dict[str, Any] = {"cert_reqs": "CERT_REQUIRED" if settings.tls_verify
                                     else "CERT_NONE"}
        if settings.tls_ca_file:
            self._tls["ca_certs"] = settings.tls_ca_file
        if not settings.tls_verify:
            self._tls["assert_hostname"] = False
        self._connections = guarded_connections(AddressPolicy.of(settings))
        self._lock = threading.Lock()
        self._pools: dict[str, urllib3.HTTPConnectionPool] = {}
        for backend in settings.backends:
            self.pool_for(backend)

    def pool_for(self, backend: Backend) -> urllib3.HTTPConnectionPool:
        """The backend's connection pool, made on first use (membership changes at run time)."""
        pool = self._pools.get(backend.id)
        if pool is None:
            with self._lock:
                pool = self._pools.get(backend.id)
                if pool is None:
                    tls = self._tls if backend.scheme == "https" else {}
                    pool = urllib3.connection_from_url(
                        backend.url, maxsize=self._maxsize, block=False,
                        timeout=self._timeout, retries=False, **tls)
                    pool.ConnectionCls = self._connections[backend.scheme]
                    self._pools[backend.id] = pool
        return pool

    def send(self, backend: Backend, method: str, target: str, headers: Mapping[str, str],
             body: bytes | Iterator[bytes] | None,
             timeout: urllib3.Timeout) -> urllib3.BaseHTTPResponse:
        """Send one request and return once the final response head has arrived.

        Raises UpstreamError when no HTTP answer came back. The body is left
        unread and undecoded: the caller streams it on as it came.

        `urlopen` would percent-encode the target (`%zz` becomes `%25zz`), so
        the request goes through the pool's own `_make_request` with the target
        exactly as the client sent it (urllib3 is pinned for this).
        """
        pool = self.pool_for(backend)
        headers = dict(headers)
        for name in ("User-Agent", "Accept-Encoding"):  # urllib3 would add its own
            if not any(h.lower() == name.lower() for h in headers):
                headers[name] = SKIP_HEADER
        conn = pool._get_conn()
        try:
            if conn.is_closed:  # a new connection, not a kept-alive one
                open_connection(conn, timeout)
            response = pool._make_request(
                conn, method, target, body=body, headers=headers, timeout=timeout,
                retries=NO_RETRIES, response_conn=conn,
                preload_content=False, decode_content=False)
        except BaseException as exc:
            conn.close()
            pool._put_conn(None)  # the pool's slot comes back; the connection does not
            if isinstance(exc, HTTPError):
                raise classify(exc) from exc
            if isinstance(exc, (OSError, http.client.HTTPException)):
                raise classify(ProtocolError("Connection aborted.", exc)) from exc
            raise
        if response.status < 200:
            # http.client skips only 100 Continue; a 102/103 would pass for the answer.
            discard(response)
            raise UpstreamError(PROTOCOL, f"interim answer {response.status} is not supported")
        return response


def has_no_body(method: str, status: int) -> bool:
    """Answers that never carry a body, whatever their Content-Length says."""
    return method == "HEAD" or status in (204, 304)


def read_capped(response: urllib3.BaseHTTPResponse, cap: int) -> bytes | None:
    """The whole body if it is at most `cap` bytes, else None (the rest is dropped).

    Raises UpstreamError when the body breaks off before its end.
    """
    try:
        body = response.read(cap + 1, decode_content=False)
        if len(body) > cap or response.read(1, decode_content=False):
            response.close()
            return None
        return body
    except HTTPError as exc:
        response.close()
        raise classify(exc) from exc
    finally:
        response.release_conn()


def start_stream(response: urllib3.BaseHTTPResponse) -> tuple[bytes, Iterator[bytes]]:
    """The first piece of a body to be streamed, and the iterator for the rest.

    Reading the first piece before answering means a backend that fails right
    after its head still gets a clean 502/504 and a retry. Raises UpstreamError.
    """
    pieces = response.stream(STREAM_CHUNK, decode_content=False)
    try:
        return next(pieces, b""), pieces
    except HTTPError as exc:
        discard(response)
        raise classify(exc) from exc


class BodyStream:
    """A response body relayed piece by piece.

    `on_end(error, complete)` runs exactly once: (None, True) when the body is
    done; (the UpstreamError, False) when the backend cut it short; (None,
    False) when the WSGI server closed the stream before its end, even if it
    was never iterated: the client left or stopped reading, no fault of the
    backend's.
    """

    def __init__(self, response: urllib3.BaseHTTPResponse,
                 start: tuple[bytes, Iterator[bytes]],
                 on_end: Callable[[UpstreamError | None, bool], None]) -> None:
        self._first, self._rest = start
        self._end = Ending(response, on_end)

    def __iter__(self) -> Iterator[bytes]:
        try:
            if self._first:
                yield self._first
            yield from self._rest
        except HTTPError as exc:
            error = classify(exc)
            self._end(error, complete=False)
            # Ending quietly would let Gunicorn close a chunked body as if it were
            # whole; a reset drops the client's connection (Gunicorn logs it at debug).
            raise ConnectionResetError(errno.ECONNRESET, f"upstream broke off: {error}") from exc
        self._end(None, complete=True)

    def close(self) -> None:
        self._end(None, complete=False)


class Ending:
    """Ends the relay of an answer exactly once: frees its connection (dropping what
    is left of a body that did not end whole) and calls `on_end(error, complete)`."""

    def __init__(self, response: urllib3.BaseHTTPResponse,
                 on_end: Callable[[UpstreamError | None, bool], None]) -> None:
        self._response, self._on_end = response, on_end
        self._ended = False

    def __call__(self, error: UpstreamError | None, complete: bool) -> None:
        if self._ended:
            return
        self._ended = True
        if not complete:  # leftovers must not reach the next request on this connection
            self._response.close()
        self._response.release_conn()
        self._on_end(error, complete)


def discard(response: urllib3.BaseHTTPResponse) -> None:
    """Throw away a response that will not be relayed, and free its connection."""
    response.close()
    response.release_conn()

