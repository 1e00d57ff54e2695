"""A backend that misbehaves on purpose, written on raw sockets (a thread in the test).

    /headbig       200 with a chunked body of 200 KB (headers only for HEAD)
    /dieafterhead  a head promising 100000 bytes, then the connection closes
    /diemidbody    a chunked head, 100 KB of body, then the connection closes
    /early         103 Early Hints before the real 200
    /tecl          both Transfer-Encoding: chunked and a (wrong) Content-Length
    anything else  200 with the raw request line and headers as the JSON body
"""
from __future__ import annotations

import json
import socket

from tests.support import SocketServer


class RawBackend(SocketServer):
    connections = 0  # accepted so far: a test can tell it was never reached

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
                reader.read(length)
                method, target, _ = request_line.decode("latin-1").split(" ", 2)
                if not self._answer(conn, method, target, headers):
                    return

    def _answer(self, conn: socket.socket, method: str, target: str, headers: list[str]) -> bool:
        """Send the answer for `target`; False when the connection must close."""
        if target == "/headbig":
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            if method != "HEAD":
                chunk = b"x" * 20_000
                conn.sendall(b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(10))
                             + b"0\r\n\r\n")
            return True
        if target == "/dieafterhead":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
            return False
        if target == "/diemidbody":
            chunk = b"y" * 50_000
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + b"%x\r\n%s\r\n" % (len(chunk), chunk) * 2)
            return False
        if target == "/early":
            conn.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
                         b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            return True
        if target == "/tecl":
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
                         b"a\r\n0123456789\r\n0\r\n\r\n")
            return True
        body = json.dumps({"method": method, "target": target, "headers": headers}).encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        return True
