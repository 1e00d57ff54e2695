"""A backend that misbehaves on purpose, written on raw sockets (a thread in the test).

Routes go by the first path segment (`/dieafterhead/x` dies too):

    /headbig       200 with a chunked body of 200 KB (headers only for HEAD)
    /dieafterhead  a head promising 100000 bytes, then the connection closes
    /diemidbody    a chunked head, 100 KB of body, then the connection closes
    /endless       a chunked body that never ends, until the reader hangs up
    /early         103 Early Hints before the real 200
    /tecl          both Transfer-Encoding: chunked and a (wrong) Content-Length
    /ownheaders    200 with the backend's own X-Upstream and X-Request-ID
    anything else  200 with the raw request line and headers as the JSON body

Every request it gets is recorded in `requests`: (method, target, headers, body).

ScriptedBackend answers every request alike, as a test sets it (status, delay,
health check answer), to count what reached each backend.
"""
from __future__ import annotations

import json
import socket
import threading
from http import HTTPStatus
from typing import NamedTuple

from tests.support import SocketServer


class Seen(NamedTuple):
    """One request as it reached the backend."""

    method: str
    target: str
    headers: list[str]
    body: bytes


class RawBackend(SocketServer):
    connections = 0  # accepted so far: a test can tell it was never reached

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        super().__init__()

    @property
    def requests(self) -> list[Seen]:
        return self.seen

    def handle(self, conn: socket.socket) -> None:
        self.connections += 1
        with conn:
            reader = conn.makefile("rb")
            while True:  # keep-alive: one request after another
                request_line = reader.readline()
                if not request_line:
                    return
                headers = []
                while (line := reader.readline()) not in (b"\r\n", b"\n", b""):
                    headers.append(line.decode("latin-1").rstrip("\r\n"))
                length = next((int(h.split(":", 1)[1]) for h in headers
                               if h.lower().startswith("content-length:")), 0)
                body = reader.read(length)
                method, target, _ = request_line.decode("latin-1").split(" ", 2)
                self.seen.append(Seen(method, target, headers, body))
                if not self._answer(conn, method, target, headers):
                    return

    def _answer(self, conn: socket.socket, method: str, target: str, headers: list[str]) -> bool:
        """Send the answer for `target`; False when the connection must close."""
        route = "/" + target.lstrip("/").split("/", 1)[0].split("?", 1)[0]
        if route == "/headbig":
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            if method != "HEAD":
                chunk = b"x" * 20_000
                conn.sendall(b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(10))
                             + b"0\r\n\r\n")
            return True
        if route == "/dieafterhead":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
            return False
        if route == "/diemidbody":
            chunk = b"y" * 50_000
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + b"%x\r\n%s\r\n" % (len(chunk), chunk) * 2)
            return False
        if route == "/endless":
            chunk = b"z" * 65536
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            try:
                while True:
                    conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:  # the balancer let go of it
                return False
        if route == "/early":
            conn.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
                         b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            return True
        if route == "/tecl":
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
                         b"a\r\n0123456789\r\n0\r\n\r\n")
            return True
        if route == "/ownheaders":
            conn.sendall(b"HTTP/1.1 200 OK\r\nX-Upstream: 203.0.113.9:80\r\n"
                         b"X-Request-ID: from-the-backend\r\nContent-Length: 2\r\n\r\nok")
            return True
        body = json.dumps({"method": method, "target": target, "headers": headers}).encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        return True


class ScriptedBackend(RawBackend):
    """Answers every request with `status` after `delay` seconds (None: never), the
    body naming the backend; GET /health answers `health` at once. A test may change
    all three while it runs. `requests` is what reached it, health checks left out."""

    def __init__(self, status: int = 200, delay: float | None = 0.0, health: int = 200) -> None:
        self.status, self.delay, self.health = status, delay, health
        self._closed = threading.Event()
        super().__init__()

    @property
    def requests(self) -> list[Seen]:
        return [seen for seen in self.seen if seen.target != "/health"]

    def close(self) -> None:
        self._closed.set()  # frees the threads of hung requests
        super().close()

    def handle(self, conn: socket.socket) -> None:
        try:
            super().handle(conn)
        except OSError:  # the balancer gave up on a late answer and hung up
            pass

    def _answer(self, conn: socket.socket, method: str, target: str, headers: list[str]) -> bool:
        if target == "/health":
            status = self.health
        elif self._closed.wait(self.delay):  # closed while waiting: never answer
            return False
        else:
            status = self.status
        body = json.dumps({"backend": self.port, "status": status}).encode()
        location = "Location: /elsewhere\r\n" if 300 <= status < 400 else ""
        conn.sendall(f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n{location}"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                     .encode() + body)
        return True
