"""A client connection under deadlines, as Gunicorn's parser and response see it.

The phase of the connection (idle, head, request) decides how long each read may
wait: a keep-alive connection with nothing to say is closed after Gunicorn's
`keepalive`; a head must arrive within LB_CLIENT_HEADER_TIMEOUT of its first byte
(else 408); a body may stall at most LB_CLIENT_BODY_TIMEOUT between reads and must
keep up LB_CLIENT_BODY_MIN_RATE after a grace (else 408, apps/lb/body.py); an
answer the client does not read for LB_CLIENT_SEND_TIMEOUT is dropped.
"""
from __future__ import annotations

import contextlib
import errno
import json
import socket
import time
from typing import Any, Callable

# Phases of a client connection.
IDLE, HEAD, REQUEST = "idle", "head", "request"


def canned(status: int, reason: str, message: str) -> bytes:
    """A complete JSON error answer that closes the connection, written without the app
    (there is no request to give it: the head never arrived, or it is not admitted)."""
    body = json.dumps({"error": message, "status": status, "source": "balancer"}).encode() + b"\n"
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


HEAD_TIMEOUT_ANSWER = canned(408, "Request Timeout", "the request head did not arrive in time")


class ClientSocket:
    """A client connection under deadlines, as Gunicorn's parser and response see it.

    Gunicorn reads and writes through this object exactly as through a socket;
    the phase decides how long each read may wait. `cut` ends the connection:
    reads then see the end of the stream, which Gunicorn closes quietly.
    """

    def __init__(self, raw: socket.socket, peer: str, limits: Any,
                 keepalive_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.raw, self.peer, self.limits, self.keepalive_s = raw, peer, limits, keepalive_s
        self.clock = clock
        self.phase = IDLE
        self.since = clock()  # when the current phase began
        self.cut = False
        self.request: Any = None  # Gunicorn's request, while one is being served
        self._head_deadline = 0.0
        self._body_started = 0.0
        self._body_bytes = 0
        self._timeout: float | None = None

    # --- what the worker calls -----------------------------------------------------

    def begin_request(self, request: Any) -> None:
        """The head is in: from now on reads are the body's."""
        self.phase, self.request = REQUEST, request
        self.since = self._body_started = self.clock()
        self._body_bytes = 0

    def end_request(self) -> None:
        self.phase, self.request, self.since = IDLE, None, self.clock()

    def evict(self) -> None:
        """Close it to make room for another: its reader wakes to the end of the stream."""
        self.cut = True
        with contextlib.suppress(OSError):
            self.raw.shutdown(socket.SHUT_RDWR)

    # --- the socket interface Gunicorn uses ---------------------------------------

    def recv(self, size: int) -> bytes:
        if self.cut:
            return b""
        if self.phase == REQUEST:
            return self._recv_body(size)
        if self.phase == IDLE:
            data = self._recv(size, self.keepalive_s)
            if data is None:  # nothing said within the keep-alive time: close quietly
                self.cut = True
                return b""
            if data:
                self.phase, self.since = HEAD, self.clock()
                self._head_deadline = self.since + self.limits.client_header_timeout
            return data
        data = self._recv(size, self._head_deadline - self.clock())
        if data is None:  # a head begun and not finished in time
            self.cut = True
            with contextlib.suppress(OSError):
                self._send(HEAD_TIMEOUT_ANSWER)
            return b""
        return data

    def sendall(self, data: bytes) -> None:
        try:
            self._send(data)
        except TimeoutError:
            self.cut = True
            raise ConnectionResetError(errno.ECONNRESET, "the client stopped reading") from None

    def __getattr__(self, name: str) -> Any:  # fileno, getpeername, close, setsockopt...
        return getattr(self.raw, name)

    # --- inside ----------------------------------------------------------------------

    def _recv_body(self, size: int) -> bytes:
        data = self._recv(size, self.limits.client_body_timeout)
        if data is None:
            self._fail_body("the request body stalled")
        self._body_bytes += len(data)
        elapsed = self.clock() - self._body_started
        rate = self.limits.client_body_min_rate
        if data and elapsed > self.limits.client_body_grace_s and \
                self._body_bytes < rate * elapsed:
            self._fail_body(f"the request body arrived slower than {rate:g} bytes/s")
        return data

    def _fail_body(self, why: str) -> None:
        """The body is too slow: apps/lb/body.py answers 408, and the connection closes."""
        self.cut = True
        if self.request is not None:
            self.request.force_close()
        raise TimeoutError(why)

    def _recv(self, size: int, timeout: float) -> bytes | None:
        """Up to `size` bytes, or None when `timeout` seconds pass first."""
        if timeout <= 0:
            return None
        self._set_timeout(timeout)
        try:
            return self.raw.recv(size)
        except TimeoutError:
            return None
        except OSError:
            if self.cut:  # evicted meanwhile: gevent wakes the reader with EBADF
                return b""
            raise

    def _send(self, data: bytes) -> None:
        self._set_timeout(self.limits.client_send_timeout)
        self.raw.sendall(data)

    def _set_timeout(self, timeout: float) -> None:
        if timeout != self._timeout:
            self.raw.settimeout(timeout)
            self._timeout = timeout

