"""Talking to backends: pooled keep-alive clients, and reading what they answer.

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

import http.client
import threading
from typing import Any, Iterator, Mapping

import urllib3
from urllib3.connection import HTTPConnection
from urllib3.exceptions import (
    ConnectTimeoutError, HTTPError, NewConnectionError, ProtocolError, ReadTimeoutError,
)
from urllib3.util import SKIP_HEADER
from urllib3.util.ssl_match_hostname import CertificateError

from apps.lb.addresses import AddressPolicy, AddressRefused, guarded_connections
from apps.lb.policy import (
    BROKEN, CONNECT_REFUSED, CONNECT_TIMEOUT, READ_TIMEOUT, TLS_HANDSHAKE, Fault,
)
from apps.config import Backend, Settings

NO_RETRIES = urllib3.Retry(False)
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
            raise UpstreamError(BROKEN, f"interim answer {response.status} is not supported")
        return response


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


def discard(response: urllib3.BaseHTTPResponse) -> None:
    """Throw away a response that will not be relayed, and free its connection."""
    response.close()
    response.release_conn()

