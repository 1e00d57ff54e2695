"""The client side's deadlines and caps (apps/lb/clientsocket.py, apps/lb/clientcaps.py),
on fake sockets and a moved clock."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from apps.lb.clientcaps import BUSY_ANSWER, ClientConnections
from apps.lb.clientsocket import HEAD, HEAD_TIMEOUT_ANSWER, IDLE, REQUEST, ClientSocket

LIMITS = SimpleNamespace(client_header_timeout=10.0, client_body_timeout=10.0,
                         client_body_min_rate=1024, client_body_grace_s=5.0,
                         client_send_timeout=10.0)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeSocket:
    """Answers recv from a script: bytes, or "wait N" (that long passes: a timeout if
    the socket's timeout is shorter, else nothing arrives and the next item is read)."""

    def __init__(self, clock: Clock, script: list) -> None:
        self.clock, self.script = clock, list(script)
        self.timeout: float | None = None
        self.sent = b""
        self.shut = False
        self.send_blocks = False

    def settimeout(self, timeout: float) -> None:
        self.timeout = timeout

    def recv(self, size: int) -> bytes:
        while self.script:
            item = self.script.pop(0)
            if isinstance(item, bytes):
                return item
            wait = float(item.split()[1])
            if wait >= self.timeout:
                self.clock.now += self.timeout
                self.script.insert(0, f"wait {wait - self.timeout}")
                raise TimeoutError("timed out")
            self.clock.now += wait
        return b""

    def sendall(self, data: bytes) -> None:
        if self.send_blocks:
            raise TimeoutError("timed out")
        self.sent += data

    def shutdown(self, how: int) -> None:
        self.shut = True


def client(script: list, keepalive: float = 5.0) -> tuple[ClientSocket, FakeSocket, Clock]:
    clock = Clock()
    raw = FakeSocket(clock, script)
    return ClientSocket(raw, "10.0.0.1", LIMITS, keepalive, clock=clock), raw, clock


def test_a_head_in_time_passes_and_the_deadline_runs_from_its_first_byte():
    conn, raw, _ = client(["wait 4", b"GET / HT", "wait 9", b"TP/1.1\r\n\r\n"])
    assert conn.recv(100) == b"GET / HT" and conn.phase == HEAD
    assert conn.recv(100) == b"TP/1.1\r\n\r\n"  # 9 s after its first byte: in time
    assert raw.sent == b""


def test_a_slow_head_gets_408_and_then_the_end_of_the_stream():
    conn, raw, _ = client([b"GET / HT", "wait 4", b"T", "wait 7", b"P/1.1"])
    assert conn.recv(100) == b"GET / HT" and conn.recv(100) == b"T"
    assert conn.recv(100) == b""  # 11 s after the first byte
    assert raw.sent == HEAD_TIMEOUT_ANSWER and conn.cut
    assert conn.recv(100) == b""


def test_a_connection_that_says_nothing_closes_quietly_after_the_keepalive_time():
    conn, raw, clock = client(["wait 60"], keepalive=5.0)
    assert conn.recv(100) == b"" and conn.cut and raw.sent == b""
    assert clock.now == 105.0


class Request:
    closed = False

    def force_close(self) -> None:
        self.closed = True


def test_a_stalled_body_times_out_and_closes_the_connection():
    conn, _, _ = client([b"abc", "wait 11"])
    request = Request()
    conn.begin_request(request)
    assert conn.recv(100) == b"abc"
    with pytest.raises(TimeoutError, match="stalled"):
        conn.recv(100)
    assert request.closed and conn.cut and conn.recv(100) == b""


def test_a_trickling_body_is_cut_once_the_grace_is_over():
    conn, _, _ = client([b"x" * 4000] + ["wait 1", b"x"] * 10)
    conn.begin_request(Request())
    got = conn.recv(8192)  # 4000 bytes at once: well above the rate
    with pytest.raises(TimeoutError, match="slower than 1024 bytes/s"):
        while True:  # a byte a second: under 1024 bytes/s on average after about 4 s
            got += conn.recv(8192)
    assert 4000 < len(got) < 4011


def test_a_fast_body_after_the_grace_is_fine():
    conn, _, _ = client([b"x" * 8000, "wait 6", b"x" * 8000])
    conn.begin_request(Request())
    assert len(conn.recv(10000) + conn.recv(10000)) == 16000


def test_an_answer_the_client_does_not_read_drops_the_connection():
    conn, raw, _ = client([])
    conn.begin_request(Request())
    raw.send_blocks = True
    with pytest.raises(ConnectionResetError):
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
    assert conn.cut and raw.timeout == LIMITS.client_send_timeout


def test_after_a_request_the_connection_is_idle_again():
    conn, _, _ = client([b"GET / HTTP/1.1\r\n\r\n", "wait 60"])
    conn.recv(100)
    conn.begin_request(Request())
    assert conn.phase == REQUEST
    conn.end_request()
    assert conn.phase == IDLE and conn.recv(100) == b""  # keep-alive time over


def connections(cap: int, per_client: int = 0, exempt=lambda peer: False,
                clock=lambda: 0.0) -> ClientConnections:
    return ClientConnections(cap, per_client, exempt, clock=clock)


def conn_from(peer: str, phase: str = IDLE, since: float = 0.0) -> ClientSocket:
    clock = Clock()
    conn = ClientSocket(FakeSocket(clock, []), peer, LIMITS, 5.0, clock=clock)
    conn.phase, conn.since = phase, since
    return conn


def test_at_the_cap_the_connection_idle_longest_makes_room():
    pool = connections(cap=2)
    old, recent = conn_from("a", since=1.0), conn_from("b", since=2.0)
    assert pool.admit(old) and pool.admit(recent)
    newcomer = conn_from("c")
    assert pool.admit(newcomer)
    assert old.cut and old.raw.shut and not recent.cut
    assert pool.open == {recent, newcomer} and pool.evicted == 1


def test_busy_connections_are_never_evicted_and_a_newcomer_then_gets_503():
    pool = connections(cap=1)
    busy = conn_from("a", phase=REQUEST)
    assert pool.admit(busy)
    assert not pool.admit(conn_from("b")) and not busy.cut and pool.refused == 1
    assert b"503" in BUSY_ANSWER.split(b"\r\n")[0]


def test_a_slow_head_makes_room_when_nothing_is_idle():
    pool = connections(cap=1, clock=lambda: 100.0)
    slow = conn_from("a", phase=HEAD, since=90.0)  # 10 s into its head
    assert pool.admit(slow) and pool.admit(conn_from("b"))
    assert slow.cut


def test_one_address_cannot_take_every_connection():
    pool = connections(cap=100, per_client=2)
    first, second = conn_from("a", phase=REQUEST), conn_from("a", phase=REQUEST)
    assert pool.admit(first) and pool.admit(second)
    assert not pool.admit(conn_from("a", phase=REQUEST))  # its own are busy: refused
    assert pool.admit(conn_from("b"))  # others still get in
    idle = conn_from("c", since=1.0)
    assert pool.admit(idle) and pool.admit(conn_from("c", since=2.0))
    assert pool.admit(conn_from("c", since=3.0))
    assert idle.cut  # its own idle connection made room, nobody else's
    assert pool.by_peer["c"] == 2


def test_trusted_proxies_are_not_held_to_the_per_client_cap():
    pool = connections(cap=100, per_client=1, exempt=lambda peer: peer == "proxy")
    assert all(pool.admit(conn_from("proxy", phase=REQUEST)) for _ in range(5))


def test_released_connections_free_their_place():
    pool = connections(cap=1, per_client=1)
    conn = conn_from("a", phase=REQUEST)
    assert pool.admit(conn)
    pool.release(conn)
    assert pool.admit(conn_from("a", phase=REQUEST)) and "a" in pool.by_peer
