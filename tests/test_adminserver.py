"""The admin listener's own HTTP server, in-process on a free port: requests reach the
app intact, and slow, idle, oversized and crowding clients are cut off by deadlines
and caps (on a clock the test moves) without ever growing the threads."""
from __future__ import annotations

import http.client
import json
import os
import socket
import threading
from contextlib import contextmanager
from typing import Iterator

import fakeredis
import pytest
from flask import Flask, jsonify, request

from apps.lb.admin import MAX_BODY, create_app
from apps.lb.adminconnections import MAX_HEAD
from apps.lb.adminhttp import Refusal, parse_head
from apps.lb.adminserver import HANDLERS, AdminServer
from scorer.pool import Pool
from apps.config import load_settings
from tests.support import wait_for

TIMEOUT = 10.0  # every deadline in these tests; only the fake clock ever reaches it


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def reflecting_app() -> Flask:
    app = Flask("reflect")
    calls = app.config["CALLS"] = []

    @app.route("/<path:path>", methods=["GET", "HEAD", "POST", "PUT"])
    def reflect(path: str):
        calls.append(path)
        if path == "big":
            return "x" * (8 * 1024 * 1024)
        return jsonify(path=request.path, args=request.args, body=request.get_data().hex(),
                       thing=request.headers.get("X-Thing"), cookie=request.headers.get("Cookie"),
                       remote=request.remote_addr, method=request.method)
    return app


@contextmanager
def serving(app=None, max_connections: int = 256) -> Iterator[tuple[AdminServer, Clock]]:
    clock = Clock()
    server = AdminServer(app or reflecting_app(), "127.0.0.1", 0, header_timeout=TIMEOUT,
                         body_timeout=TIMEOUT, send_timeout=TIMEOUT,
                         max_connections=max_connections, max_body=MAX_BODY, clock=clock)
    try:
        yield server, clock
    finally:
        server.stop()


CLIENTS: list[socket.socket] = []


@pytest.fixture(autouse=True)
def close_clients() -> Iterator[None]:
    yield
    for sock in CLIENTS:
        sock.close()
    CLIENTS.clear()


def connect(server: AdminServer, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection(server.address, timeout=10)
    CLIENTS.append(sock)
    if data:
        sock.sendall(data)
    return sock


def get(server: AdminServer, path: str, method: str = "GET", **kwargs) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection(*server.address, timeout=10)
    try:
        conn.request(method, path, **kwargs)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (or resets) the connection."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def after(clock: Clock, server: AdminServer, seconds: float) -> None:
    clock.now += seconds
    server.wake()


def admin_threads() -> int:
    return sum(t.name.startswith("lb-admin") for t in threading.enumerate())


def status_and_json(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


def test_a_request_reaches_the_app_as_sent_and_its_answer_closes_the_connection():
    with serving() as (server, _):
        body = os.urandom(MAX_BODY)
        status, headers, raw = get(server, "/a%20b/%C3%A9?x=1&y=%20", method="PUT", body=body,
                                   headers={"X-Thing": "v", "Cookie": "a=1"})
        assert status == 200 and headers["Connection"] == "close"
        assert json.loads(raw) == {"path": "/a b/é", "args": {"x": "1", "y": " "},
                                   "body": body.hex(), "thing": "v", "cookie": "a=1",
                                   "remote": "127.0.0.1", "method": "PUT"}
        status, headers, raw = get(server, "/x", method="HEAD")
        assert status == 200 and raw == b"" and int(headers["Content-Length"]) > 0


def test_the_admin_app_answers_through_it():
    settings = load_settings(environ={})
    server = fakeredis.FakeServer()
    pool = Pool(settings, redis_factory=lambda: fakeredis.FakeRedis(server=server))
    app = create_app({"LB_ADMIN_TOKEN": "t"}, pool=pool, workers=lambda: [1])
    with serving(app) as (admin, _):
        status, _, raw = get(admin, "/status")
        assert status == 200 and json.loads(raw)["workers"] == 1
        status, _, raw = get(admin, "/backends", method="POST", body=b"{}",
                             headers={"Content-Type": "application/json"})
        assert status == 401 and json.loads(raw)["source"] == "admin"


def test_a_head_not_complete_within_the_deadline_gets_408():
    with serving() as (server, clock):
        sock = connect(server, b"GET /status HTTP/1.1\r\nHost: x\r\nX-Thi")
        wait_for(lambda: server.connections() == {"head": 1}, what="the connection accepted")
        after(clock, server, TIMEOUT)
        status, error = status_and_json(read_all(sock))
        assert status == 408 and "head" in error["error"] and error["source"] == "admin"
        sock.close()  # the server lingers until the client is done
        wait_for(lambda: not server.connections(), what="the connection closed")


def test_a_connection_that_sends_nothing_is_closed_without_an_answer():
    with serving() as (server, clock):
        sock = connect(server)
        wait_for(lambda: server.connections() == {"head": 1}, what="the connection accepted")
        after(clock, server, TIMEOUT)
        assert read_all(sock) == b""
        assert not server.connections()


def test_a_body_not_complete_within_the_deadline_gets_408_and_reaches_no_handler():
    app = reflecting_app()
    with serving(app) as (server, clock):
        sock = connect(server, b"PUT /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345")
        wait_for(lambda: server.connections() == {"body": 1}, what="the head read")
        after(clock, server, TIMEOUT)
        status, error = status_and_json(read_all(sock))
        assert status == 408 and "body" in error["error"]
        assert app.config["CALLS"] == []


@pytest.mark.parametrize("expect", [b"", b"Expect: 100-continue\r\n"])
def test_a_body_over_the_cap_gets_413_before_it_is_read(expect):
    app = reflecting_app()
    with serving(app) as (server, _):
        sock = connect(server, b"POST /big HTTP/1.1\r\nHost: x\r\n" + expect +
                       f"Content-Length: {MAX_BODY + 1}\r\n\r\n".encode())
        # No "100 Continue": the answer is the refusal, and the body is never sent.
        status, error = status_and_json(read_all(sock))
        assert status == 413 and str(MAX_BODY) in error["error"]
        assert app.config["CALLS"] == []


def test_expect_100_continue_gets_the_go_ahead_then_the_answer():
    with serving() as (server, _):
        sock = connect(server, b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                               b"Expect: 100-continue\r\n\r\n")
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"abc")
        status, answer = status_and_json(read_all(sock))
        assert status == 200 and answer["body"] == b"abc".hex()


def test_a_head_over_16_kib_gets_431():
    with serving() as (server, _):
        sock = connect(server, b"GET / HTTP/1.1\r\nX-Long: " + b"a" * MAX_HEAD)
        assert status_and_json(read_all(sock))[0] == 431


@pytest.mark.parametrize("head, status", [
    (b"GET /x", 400),
    (b"GET  /x HTTP/1.1", 400),
    (b"GET x HTTP/1.1\r\nHost: a", 400),
    (b"GET /x HTTP/2.0\r\nHost: a", 505),
    (b"GET /x HTTP/1.1", 400),  # no Host
    (b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b", 400),
    (b"GET /x HTTP/1.1\r\nHost: a\r\nBad Name: 1", 400),
    (b"GET /x HTTP/1.1\r\nHost: a\r\n folded", 400),
    (b"GET /x HTTP/1.1\r\nHost: a\r\nX: a\x00b", 400),
    (b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked", 411),
    (b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 2", 400),
    (b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: -1", 400),
    (b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: \xd9\xa1", 400),
    (b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999", 413),
    (b"POST /x HTTP/1.1\r\nHost: a\r\nExpect: something", 417),
])
def test_heads_that_cannot_be_served_are_refused(head, status):
    with pytest.raises(Refusal) as refused:
        parse_head(head, MAX_BODY)
    assert refused.value.status == status


def test_heads_that_can_be_served():
    head = parse_head(b"GET http://h:1/a%2Fb?q=1#f HTTP/1.1\r\nHost: h\r\n"
                      b"Content-Length: 2, 2\r\nX:  v \t", MAX_BODY)
    assert (head.method, head.path, head.query, head.length) == ("GET", "/a%2Fb", "q=1", 2)
    assert head.headers[-1] == ("X", "v")
    assert parse_head(b"GET /x HTTP/1.0", MAX_BODY).path == "/x"  # HTTP/1.0 needs no Host


def test_at_the_cap_the_oldest_slow_connection_makes_room_for_a_new_request():
    with serving(max_connections=3) as (server, _):
        slow = [connect(server, b"GET / HTTP/1.1\r\nHo") for _ in range(3)]
        wait_for(lambda: server.connections() == {"head": 3}, what="three slow connections")
        status, _, _ = get(server, "/status")
        assert status == 200
        assert read_all(slow[0]) == b""  # closed, without an answer
        for sock in slow[1:]:  # still open: no data, no end
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)


def test_an_answer_the_client_does_not_read_is_dropped_after_the_send_timeout():
    with serving() as (server, clock):
        sock = socket.socket()
        CLIENTS.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(10)
        sock.connect(server.address)
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.recv(1, socket.MSG_PEEK)  # the answer has started
        # Whatever the kernel still takes moves the deadline, so move the clock until it bites.
        wait_for(lambda: after(clock, server, TIMEOUT) or not server.connections(),
                 what="the stalled answer dropped")
        assert len(read_all(sock)) < 8 * 1024 * 1024


def test_2000_half_heads_never_lock_out_a_probe_and_add_no_thread():
    # Rounds of 100 slow heads, each past the cap, a probe after each. (A probe that
    # raced a flood could be pushed out between connecting and sending its request:
    # no cap helps a client that is slower than the flood turning the cap over.)
    with serving(max_connections=64) as (server, _):
        threads = threading.active_count()
        for _ in range(20):
            for _ in range(100):
                connect(server, b"GET /status HTTP/1.1\r\nHost: x\r\nX-")
            assert get(server, "/status")[0] == 200
            assert server.connections().total() <= 64 and admin_threads() == HANDLERS + 1
        assert len(CLIENTS) == 2000 and threading.active_count() == threads
