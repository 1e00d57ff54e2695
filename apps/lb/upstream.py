"""Talking to backends: pooled keep-alive connections, and reading what they answer.

urllib3's connection classes open the connections (its connect timeout, TLS with
certificate and host-name checks, and the address policy of addresses.py); the
exchange on them is lean: the request head is written here, in one send with a
body in bytes, and the answer read by http.client. urllib3's pool, request and
response layers cost twice what http.client alone does per request
(`python -m bench overhead`'s breakdown), and the proxy used none of what they
add (retries, redirects, decoding). Faults keep urllib3's exceptions, so
classify() and the relay see what they saw before. One pool per backend, built
once per worker, keeps connections alive across requests.

Each backend gets its own pool, so the request target can never pick the
address: whatever the client sends as a path, the socket goes to a configured
backend.
"""
from __future__ import annotations

import errno
import http.client
import re
import threading
from typing import Any, Iterator, Mapping

import urllib3
from urllib3.connection import HTTPConnection
from urllib3.exceptions import (
    ConnectTimeoutError, HTTPError, NewConnectionError, ProtocolError, ReadTimeoutError,
)
from urllib3.util.ssl_match_hostname import CertificateError

from apps.lb.addresses import AddressPolicy, AddressRefused, guarded_connections
from scorer.store import readable_now
from apps.lb.policy import (
    BROKEN, CONNECT_REFUSED, CONNECT_TIMEOUT, READ_TIMEOUT, TLS_HANDSHAKE, Fault,
)
from apps.config import Backend, Settings

# Bodies whose length is known and at most this big are read in one go;
# larger or unknown ones are streamed to the client in chunks of this size.
STREAM_CHUNK = 64 * 1024


class UpstreamError(Exception):
    """An attempt that produced no HTTP answer: one of policy.py's faults, whose
    `kind` (CONNECT, TIMEOUT or PROTOCOL) the scorer is told and whose
    `delivered` is False when nothing reached the backend, so that any request
    may safely be sent elsewhere."""

    def __init__(self, fault: Fault, detail: str) -> None:
        super().__init__(detail)
        self.kind = fault.kind
        self.delivered = fault.delivered


def classify(exc: HTTPError) -> UpstreamError:
    """Turn a urllib3 failure on an open connection into an UpstreamError (the
    request may have reached the backend)."""
    if isinstance(exc, ReadTimeoutError):
        return UpstreamError(READ_TIMEOUT, "timed out waiting for an answer")
    if isinstance(exc, ProtocolError):
        return UpstreamError(BROKEN, f"connection broken: {exc.args[-1]!r}")
    return UpstreamError(BROKEN, f"{type(exc).__name__}: {exc}")


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
            raise UpstreamError(CONNECT_REFUSED,
                                f"refused by the address policy: {exc.__cause__}") from exc
        raise UpstreamError(CONNECT_REFUSED, "connection refused or unreachable") from exc
    except (ConnectTimeoutError, TimeoutError) as exc:  # TimeoutError: in the handshake
        raise UpstreamError(CONNECT_TIMEOUT, "timed out connecting") from exc
    except (HTTPError, OSError, CertificateError) as exc:  # what is left is the handshake
        raise UpstreamError(TLS_HANDSHAKE, f"TLS handshake failed: {exc}") from exc


class Upstreams:
    """One keep-alive pool of connections per backend, shared by a worker's greenlets."""

    def __init__(self, settings: Settings, maxsize: int) -> None:
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
        self._pools: dict[str, Connections] = {}
        for backend in settings.backends:
            self.pool_for(backend)

    def pool_for(self, backend: Backend) -> Connections:
        """The backend's connections, made on first use (membership changes at run time)."""
        pool = self._pools.get(backend.id)
        if pool is None:
            with self._lock:
                pool = self._pools.get(backend.id)
                if pool is None:
                    tls = self._tls if backend.scheme == "https" else {}
                    pool = Connections(self._connections[backend.scheme], backend,
                                       self._maxsize, tls)
                    self._pools[backend.id] = pool
        return pool

    def send(self, backend: Backend, method: str, target: str, headers: Mapping[str, str],
             body: bytes | Iterator[bytes] | None, timeout: urllib3.Timeout) -> Response:
        """Send one request and return once the final response head has arrived.

        Raises UpstreamError when no HTTP answer came back. The body is left
        unread: the caller streams it on as it came. The target goes out exactly
        as the client sent it (`%zz` stays `%zz`).
        """
        pool = self.pool_for(backend)
        conn = pool.get()
        try:
            if conn.sock is None:  # a new connection, not a kept-alive one
                open_connection(conn, timeout)
            # As urllib3 did: the request is sent within the connect timeout...
            conn.sock.settimeout(timeout.connect_timeout)
            send_request(conn.sock, backend.id, method, target, headers, body)
            if timeout.read_timeout == 0:
                raise ReadTimeoutError(None, target, "Read timed out (no time left)")
            # ...and the answer's head is waited for within the read timeout.
            conn.sock.settimeout(timeout.read_timeout)
            answer = http.client.HTTPResponse(conn.sock, method=method)
            try:
                answer.begin()
            except TimeoutError as exc:
                raise ReadTimeoutError(None, target, "Read timed out") from exc
        except BaseException as exc:
            conn.close()
            if isinstance(exc, HTTPError):
                raise classify(exc) from exc
            if isinstance(exc, (OSError, http.client.HTTPException)):
                raise classify(ProtocolError("Connection aborted.", exc)) from exc
            raise
        response = Response(answer, conn, pool)
        if response.status < 200:
            # http.client skips only 100 Continue; a 102/103 would pass for the answer.
            discard(response)
            raise UpstreamError(BROKEN, f"interim answer {response.status} is not supported")
        return response


class Connections:
    """One backend's idle keep-alive connections (urllib3's connection classes, for
    their connect, TLS and address policy; the exchange itself is http.client's).
    At most `maxsize` are kept; more may be open at once, and are closed when done."""

    def __init__(self, connection_class: type, backend: Backend, maxsize: int,
                 tls: Mapping[str, Any]) -> None:
        self._new = lambda: connection_class(backend.host, backend.port, **tls)
        self._idle: list[HTTPConnection] = []
        self._maxsize = maxsize

    def get(self) -> HTTPConnection:
        """The most recently used idle connection still open, else a new one."""
        while self._idle:
            conn = self._idle.pop()
            if not readable_now(conn.sock):  # readable while idle: closed, or junk
                return conn
            conn.close()
        return self._new()

    def put(self, conn: HTTPConnection) -> None:
        if len(self._idle) < self._maxsize:
            self._idle.append(conn)
        else:
            conn.close()


# Methods whose requests carry no body unless they say so (as urllib3 frames them).
_NO_BODY_EXPECTED = frozenset(("GET", "HEAD", "DELETE", "TRACE", "OPTIONS", "CONNECT"))
# What may not appear in a header value: it would start a line of the client's making.
_BREAKS_A_LINE = re.compile(r"[\r\n\x00]")


def send_request(sock: Any, host: str, method: str, target: str,
                 headers: Mapping[str, str], body: bytes | Iterator[bytes] | None) -> None:
    """Write the request head and body, framed as urllib3 framed them: the caller's
    Content-Length, else chunked for an iterator, else the length of the bytes (or 0
    for a method that expects a body). A head and a body in bytes go in one send.

    A backend that closes or resets while the body goes may already have answered
    (a 413, say): as in urllib3, that is left for reading the answer to find."""
    names = {name.lower() for name in headers}
    lines = [f"{method} {target} HTTP/1.1\r\n".encode("ascii")]
    if "host" not in names:
        lines.append(f"Host: {host}\r\n".encode("latin-1"))
    chunked = False
    if "content-length" not in names and "transfer-encoding" not in names:
        if isinstance(body, bytes):
            lines.append(b"Content-Length: %d\r\n" % len(body))
        elif body is not None:
            chunked = True
            lines.append(b"Transfer-Encoding: chunked\r\n")
        elif method.upper() not in _NO_BODY_EXPECTED:
            lines.append(b"Content-Length: 0\r\n")
    elif "transfer-encoding" in names and "content-length" not in names:
        chunked = body is not None and not isinstance(body, bytes)
    for name, value in headers.items():
        if _BREAKS_A_LINE.search(value) or _BREAKS_A_LINE.search(name):
            raise ValueError(f"invalid header {name!r}")
        lines.append(f"{name}: {value}\r\n".encode("latin-1"))
    lines.append(b"\r\n")
    if isinstance(body, bytes):
        lines.append(body)
    try:
        sock.sendall(b"".join(lines))
        if body is not None and not isinstance(body, bytes):
            for piece in body:
                if piece:
                    sock.sendall(b"%x\r\n%b\r\n" % (len(piece), piece) if chunked else piece)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
    except BrokenPipeError:
        pass
    except OSError as exc:
        if exc.errno not in (errno.EPROTOTYPE, errno.ECONNRESET):
            raise


class Response:
    """A backend's answer, read with http.client, with the part of urllib3's response
    interface that the relay uses (`status`, `headers`, `read`, `stream`, `close`,
    `release_conn`), and urllib3's exceptions for its faults: a timeout is a
    ReadTimeoutError, a body that breaks off (or ends before its Content-Length) a
    ProtocolError."""

    __slots__ = ("_answer", "_conn", "_pool", "status", "headers")

    def __init__(self, answer: http.client.HTTPResponse, conn: HTTPConnection,
                 pool: Connections) -> None:
        self._answer, self._conn, self._pool = answer, conn, pool
        self.status = answer.status
        self.headers = answer.msg  # repeated headers kept, in order; get() ignores case

    def read(self, amt: int | None = None, decode_content: bool = False) -> bytes:
        answer = self._answer
        try:
            data = answer.read(amt)
        except TimeoutError as exc:
            raise ReadTimeoutError(None, None, "Read timed out") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise ProtocolError(f"Connection broken: {exc!r}", exc) from exc
        if not data and amt and answer.length:  # http.client ends a short body quietly
            short = http.client.IncompleteRead(b"", answer.length)
            raise ProtocolError(f"Connection broken: {short!r}", short)
        return data

    def stream(self, amt: int, decode_content: bool = False) -> Iterator[bytes]:
        while True:
            data = self.read(amt)
            if not data:
                return
            yield data

    def close(self) -> None:
        """Drop the answer and its connection (what is left of the body must not reach
        the next request on it)."""
        self._answer.close()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def release_conn(self) -> None:
        """Give the connection back for the next request if the answer was read to its
        end and the backend keeps it open; else close it."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._answer.isclosed() and not self._answer.will_close:
            self._pool.put(conn)
        else:
            conn.close()


def read_capped(response: Response, cap: int) -> bytes | None:
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


def discard(response: Response) -> None:
    """Throw away a response that will not be relayed, and free its connection."""
    response.close()
    response.release_conn()

