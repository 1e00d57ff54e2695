"""The lean upstream client (apps/lb/upstream.py): what goes on the wire, keep-alive,
and urllib3's faults for what breaks, against a scripted backend on a real socket."""
from __future__ import annotations

import socket
import threading

import pytest
import urllib3

from apps.config import load_settings
from apps.lb.policy import BROKEN, READ_TIMEOUT
from apps.lb.upstream import Upstreams, UpstreamError, read_capped
from tests.support import SocketServer

TIMEOUT = urllib3.Timeout(connect=2, read=2)


class Scripted(SocketServer):
    """Reads each request's bytes up to the blank line (and `body_bytes` more), then
    sends the next scripted answer; None closes the connection at once, and so does
    every answer when `close_after` is set."""

    def __init__(self, answers: list[bytes | None], body_bytes: int = 0,
                 close_after: bool = False) -> None:
        self.answers, self.body_bytes, self.close_after = answers, body_bytes, close_after
        self.received: list[bytes] = []
        self.connections = 0
        self.lock = threading.Lock()
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        self.connections += 1
        with conn:
            data = b""
            while True:
                while b"\r\n\r\n" not in data:
                    more = conn.recv(65536)
                    if not more:
                        return
                    data += more
                head, _, data = data.partition(b"\r\n\r\n")
                while len(data) < self.body_bytes:
                    data += conn.recv(65536)
                self.received.append(head + b"\r\n\r\n" + data)
                data = b""
                with self.lock:
                    answer = self.answers.pop(0) if self.answers else None
                if answer is None:
                    return
                conn.sendall(answer)
                if self.close_after:
                    return


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def upstreams_for(server: Scripted) -> tuple[Upstreams, object]:
    settings = load_settings(environ={"LB_BACKENDS": server.url, "LB_CHECK_INTERVAL_S": "0"})
    return Upstreams(settings, maxsize=2), settings.backends[0]


def test_head_and_body_go_as_given_and_the_connection_is_kept():
    server = Scripted([OK, OK])
    upstreams, backend = upstreams_for(server)
    for _ in range(2):
        response = upstreams.send(backend, "POST", "/a%zz?q", {"Host": "h", "X-A": "1"},
                                  b"{}", TIMEOUT)
        assert response.status == 200 and read_capped(response, 100) == b"ok"
    assert server.connections == 1  # kept alive
    first = server.received[0]
    assert first.startswith(b"POST /a%zz?q HTTP/1.1\r\n")  # the target exactly as sent
    assert b"\r\nContent-Length: 2\r\n" in first and first.endswith(b"\r\n\r\n{}")
    assert b"User-Agent" not in first and b"Accept-Encoding" not in first


def test_an_iterator_without_a_length_goes_chunked():
    server = Scripted([OK], body_bytes=len(b"2\r\nab\r\n1\r\nc\r\n0\r\n\r\n"))
    upstreams, backend = upstreams_for(server)
    read_capped(upstreams.send(backend, "PUT", "/", {"Host": "h"}, iter([b"ab", b"", b"c"]),
                               TIMEOUT), 100)
    assert server.received[0].endswith(
        b"Transfer-Encoding: chunked\r\nHost: h\r\n\r\n2\r\nab\r\n1\r\nc\r\n0\r\n\r\n")


def test_a_post_without_a_body_says_so_and_a_get_does_not():
    server = Scripted([OK, OK])
    upstreams, backend = upstreams_for(server)
    for method in ("POST", "GET"):
        read_capped(upstreams.send(backend, method, "/", {"Host": "h"}, None, TIMEOUT), 100)
    assert b"Content-Length: 0" in server.received[0]
    assert b"Content-Length" not in server.received[1]


def test_a_connection_the_backend_closed_while_idle_is_not_reused():
    server = Scripted([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", None, OK])
    upstreams, backend = upstreams_for(server)
    read_capped(upstreams.send(backend, "GET", "/", {"Host": "h"}, None, TIMEOUT), 100)
    # The backend closes the kept connection when it reads the next request...
    with pytest.raises(UpstreamError) as caught:
        upstreams.send(backend, "GET", "/", {"Host": "h"}, None, TIMEOUT)
    assert caught.value.kind == BROKEN.kind
    # ...and that broken connection is dropped: the next request opens a new one.
    assert read_capped(upstreams.send(backend, "GET", "/", {"Host": "h"}, None, TIMEOUT),
                       100) == b"ok"
    assert server.connections == 2


def test_an_answer_that_says_close_is_not_kept():
    server = Scripted([b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
                       OK])
    upstreams, backend = upstreams_for(server)
    for _ in range(2):
        read_capped(upstreams.send(backend, "GET", "/", {"Host": "h"}, None, TIMEOUT), 100)
    assert server.connections == 2


def test_a_body_shorter_than_its_length_is_broken_not_short():
    server = Scripted([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"], close_after=True)
    upstreams, backend = upstreams_for(server)
    response = upstreams.send(backend, "GET", "/", {"Host": "h"}, None, TIMEOUT)
    with pytest.raises(UpstreamError) as caught:
        read_capped(response, 100)
    assert caught.value.kind == BROKEN.kind and "IncompleteRead" in str(caught.value)


def test_no_answer_in_time_is_a_read_timeout():
    server = Scripted([])  # reads the request, answers nothing, then waits
    server.answers = [b""]  # an empty send: the connection stays open and silent
    upstreams, backend = upstreams_for(server)
    with pytest.raises(UpstreamError) as caught:
        upstreams.send(backend, "GET", "/", {"Host": "h"}, None,
                       urllib3.Timeout(connect=2, read=0.2))
    assert caught.value.kind == READ_TIMEOUT.kind


def test_a_header_value_with_a_line_break_is_never_sent():
    server = Scripted([OK])
    upstreams, backend = upstreams_for(server)
    with pytest.raises(ValueError):
        upstreams.send(backend, "GET", "/", {"Host": "h", "X-A": "1\r\nX-Forged: 1"}, None,
                       TIMEOUT)
    assert server.received == []
