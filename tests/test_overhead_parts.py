"""The parts of `python -m bench overhead`: the C zero backend, the load generator, wrk's parser."""
from __future__ import annotations

import math
import shutil
import socket
import subprocess
import threading
import time

import pytest

from bench import loadgen, zero
from tests.support import SocketServer, free_port

OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n"
OK = OK_HEAD + b'{"ok":true}'

needs_cc = pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")),
                              reason="no C compiler (cc or gcc) on PATH to build zero_backend.c")


@pytest.fixture(scope="module")
def zero_ports(tmp_path_factory):
    """One zero_backend process serving two ports."""
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler (cc or gcc) on PATH to build zero_backend.c")
    ports = [free_port(), free_port()]
    proc = zero.start(ports, tmp_path_factory.mktemp("zero"))
    yield ports
    assert proc.stop() == 0, proc.output()       # a clean exit on SIGTERM
    assert proc.output() == ""


def exchange(port: int, *parts: bytes, pause: float = 0.0) -> bytes:
    """Send `parts` (pausing between them), half-close, and read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        for part in parts:
            sock.sendall(part)
            time.sleep(pause)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


# ---------------------------------------------------------------- the zero backend

@pytest.mark.e2e
def test_get_head_and_post(zero_ports):
    port = zero_ports[0]
    assert exchange(port, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n") == OK
    assert exchange(port, b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n") == OK_HEAD
    body = b'{"n": 1}' * 1000
    assert exchange(port, b"POST / HTTP/1.1\r\ncOnTeNt-LeNgTh: %d\r\n\r\n" % len(body) + body
                    + b"GET / HTTP/1.1\r\n\r\n") == OK * 2


@pytest.mark.e2e
def test_a_chunked_body_is_read_and_skipped(zero_ports):
    request = (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n")
    assert exchange(zero_ports[0], request + b"GET / HTTP/1.1\r\n\r\n") == OK * 2


@pytest.mark.e2e
def test_pipelined_requests_are_answered_in_order(zero_ports):
    two = b"GET /1 HTTP/1.1\r\n\r\nHEAD /2 HTTP/1.1\r\n\r\n"
    assert exchange(zero_ports[0], two) == OK + OK_HEAD
    # More answers than the output buffer holds: the server must wait for us to read.
    assert exchange(zero_ports[0], b"GET / HTTP/1.1\r\n\r\n" * 3000) == OK * 3000


@pytest.mark.e2e
def test_a_request_split_across_sends(zero_ports):
    request = b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody"
    assert exchange(zero_ports[0], request[:10], request[10:40], request[40:],
                    pause=0.05) == OK


@pytest.mark.e2e
def test_keep_alive_and_connection_close(zero_ports):
    with socket.create_connection(("127.0.0.1", zero_ports[0]), timeout=5) as sock:
        for _ in range(3):      # HTTP/1.1 stays open by default
            sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
            assert read_exactly(sock, len(OK)) == OK
        sock.sendall(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\nGET /ignored HTTP/1.1\r\n\r\n")
        assert read_exactly(sock, len(OK)) == OK
        assert sock.recv(100) == b""                 # closed, the pipelined one unanswered
    assert exchange(zero_ports[0], b"GET / HTTP/1.0\r\n\r\nGET / HTTP/1.0\r\n\r\n") == OK
    with socket.create_connection(("127.0.0.1", zero_ports[0]), timeout=5) as sock:
        for _ in range(2):      # HTTP/1.0 stays open only when asked to
            sock.sendall(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            assert read_exactly(sock, len(OK)) == OK


@pytest.mark.e2e
def test_bad_requests_get_an_error_and_a_close(zero_ports):
    with socket.create_connection(("127.0.0.1", zero_ports[0]), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nX: " + b"a" * 17000 + b"\r\n\r\n")
        # It closes with our excess head unread, so a reset may follow the answer.
        assert sock.recv(100).startswith(b"HTTP/1.1 431 ")
    answer = exchange(zero_ports[0], b"POST / HTTP/1.1\r\nContent-Length: 4x\r\n\r\nbody")
    assert answer.startswith(b"HTTP/1.1 400 ")


@pytest.mark.e2e
def test_clients_vanishing_mid_request_do_not_hurt_it(zero_ports):
    for request in (b"GET / HT", b"POST / HTTP/1.1\r\nContent-Length: 100\r\n\r\nabc",
                    b"GET / HTTP/1.1\r\n\r\n" * 2000):
        sock = socket.create_connection(("127.0.0.1", zero_ports[0]))
        sock.sendall(request)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()            # with linger 0: a reset, not a polite close
    assert exchange(zero_ports[0], b"GET / HTTP/1.1\r\n\r\n") == OK


@pytest.mark.e2e
def test_one_process_serves_every_port(zero_ports):
    for port in zero_ports:
        assert exchange(port, b"GET / HTTP/1.1\r\n\r\n") == OK
    # A port already taken: it exits at once, with a message (and no output on success).
    taken = subprocess.run([zero.build(), str(free_port()), str(zero_ports[1])],
                           capture_output=True, text=True, timeout=5)
    assert taken.returncode != 0 and "Address already in use" in taken.stderr


@pytest.mark.e2e
@needs_cc
def test_the_build_is_cached_by_source_hash(tmp_path, monkeypatch):
    first = zero.build()
    assert zero.build() == first and first.exists() and first.parent == zero.CACHE
    edited = tmp_path / "zero_backend.c"
    edited.write_bytes(zero.SOURCE.read_bytes() + b"/* edited */\n")
    monkeypatch.setattr(zero, "SOURCE", edited)
    monkeypatch.setattr(zero, "CACHE", tmp_path / "bin")
    second = zero.build()
    assert second.parent == tmp_path / "bin" and second.name != first.name


def test_building_without_a_compiler_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(zero, "CACHE", tmp_path)          # nothing cached there
    monkeypatch.setattr(zero.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="neither `cc` nor `gcc`"):
        zero.build()


# ---------------------------------------------------------------- the load generator

class RotatingServer(SocketServer):
    """A threaded Python server that counts requests, answering them in turn with:
    103 then 200 with a length, 200 chunked, 404, and 200 delimited by a close."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests, self.not_found, self.bodies, self.targets = 0, 0, set(), set()
        self.arrivals: list[float] = []      # time.time() of each request
        super().__init__()
        self.url += "/path?q=1"

    def handle(self, conn: socket.socket) -> None:
        try:
            self._answer(conn)
        except OSError:
            pass            # the load generator resets its connections when it stops

    def _answer(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as reader:
            while request_line := reader.readline():
                length = 0
                while (line := reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                body = reader.read(length)
                with self.lock:
                    self.arrivals.append(time.time())
                    kind = self.requests % 4
                    self.requests += 1
                    self.not_found += kind == 2
                    self.bodies.add(body)
                    self.targets.add(request_line.split()[1])
                if kind == 0:
                    conn.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                                 b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                elif kind == 1:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\nT: 1\r\n\r\n")
                elif kind == 2:
                    conn.sendall(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                else:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
                    return


@pytest.mark.e2e
def test_loadgen_against_the_zero_backend(zero_ports):
    result = loadgen.run(f"http://127.0.0.1:{zero_ports[1]}/", connections=4, duration_s=1.0,
                         warmup_s=0.2)
    assert result.generator == "loadgen" and result.duration_s == 1.0
    assert result.requests > 0 and result.errors == 0 and result.non_2xx == 0
    assert result.statuses == {"2xx": result.requests}
    assert 0 < result.p50_ms <= result.p90_ms <= result.p99_ms
    assert result.rps == result.requests / 1.0 and result.cpu_s > 0


@pytest.mark.parametrize("warmup_s", [0.0, 0.3])
def test_loadgen_counts_agree_with_the_server(warmup_s):
    server = RotatingServer()
    connections = 4
    try:
        result = loadgen.run(server.url, connections=connections, duration_s=0.4, processes=2,
                             method="POST", body=b'{"a": 1}', warmup_s=warmup_s)
    finally:
        server.close()
    assert result.requests > 0 and result.errors == 0
    # Requests that arrived during the window count; a connection may add one sent
    # before the window opened, or lose one still in flight when it closed.
    in_window = sum(result.started_at <= t <= result.started_at + 0.4 for t in server.arrivals)
    assert in_window - connections <= result.requests <= in_window + connections
    if warmup_s == 0:       # nothing before the window, so nothing uncounted but the last ones
        assert server.requests - connections <= result.requests <= server.requests
        assert server.not_found - connections <= result.non_2xx <= server.not_found
    else:
        assert result.requests < server.requests - connections
    assert result.statuses["4xx"] == result.non_2xx > 0
    assert server.bodies == {b'{"a": 1}'} and server.targets == {b"/path?q=1"}


def test_loadgen_counts_unanswered_requests_as_errors():
    silent = socket.create_server(("127.0.0.1", 0), backlog=64)   # accepts, never answers
    try:
        result = loadgen.run(f"http://127.0.0.1:{silent.getsockname()[1]}/", connections=2,
                             duration_s=0.5, processes=1, warmup_s=0.0, timeout_s=0.15)
    finally:
        silent.close()
    assert result.requests == 0 and result.errors >= 2
    assert math.isnan(result.p50_ms)


def test_loadgen_times_out_on_a_kept_alive_connection():
    """Answers each connection's first request only; the second one must time out."""
    server = socket.create_server(("127.0.0.1", 0), backlog=64)

    def answer_once(conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                while conn.recv(65536):
                    pass        # and never again, until the client gives up
            except OSError:
                pass

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=answer_once, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        result = loadgen.run(f"http://127.0.0.1:{server.getsockname()[1]}/", connections=2,
                             duration_s=0.5, processes=1, warmup_s=0.0, timeout_s=0.15)
    finally:
        server.close()
    assert result.requests >= 2 and result.errors >= 2 and result.non_2xx == 0


def test_loadgen_counts_refused_connections_as_errors():
    port = free_port()      # nothing listens there
    result = loadgen.run(f"http://127.0.0.1:{port}/", connections=1, duration_s=0.2,
                         warmup_s=0.0)
    assert result.requests == 0 and result.errors > 0


# ---------------------------------------------------------------- wrk

# Captured from `wrk --latency -t 2 -c 32 -d 2s` against zero_backend on this machine.
WRK_ZERO = """\
Running 2s test @ http://127.0.0.1:56285/
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   280.93us  486.93us   8.15ms   96.33%
    Req/Sec    71.54k    31.50k  155.45k    60.98%
  Latency Distribution
     50%  131.00us
     75%  323.00us
     90%  539.00us
     99%    2.96ms
  291784 requests in 2.10s, 22.82MB read
Requests/sec: 138949.99
Transfer/sec:     10.87MB
"""

# Captured from `wrk --latency -t 1 -c 4 -d 1s` against RotatingServer (404s and closes).
WRK_ERRORS = """\
Running 1s test @ http://127.0.0.1:42853/path?q=1
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   375.62us  339.93us   4.39ms   83.32%
    Req/Sec    14.56k     1.20k   15.85k    72.73%
  Latency Distribution
     50%  285.00us
     75%  555.00us
     90%  797.00us
     99%    1.40ms
  15942 requests in 1.10s, 787.74KB read
  Socket errors: connect 0, read 3188, write 0, timeout 0
  Non-2xx or 3xx responses: 3188
Requests/sec:  14495.90
Transfer/sec:    716.28KB
"""


def test_parse_wrk_output():
    result = loadgen.parse_wrk(WRK_ZERO, connections=32)
    assert result.generator == "wrk" and result.connections == 32
    assert (result.requests, result.errors, result.non_2xx) == (291784, 0, 0)
    assert result.duration_s == pytest.approx(2.10)
    assert result.rps == pytest.approx(138_944, rel=1e-3)    # wrk said 138949.99
    assert (result.p50_ms, result.p90_ms, result.p99_ms) == pytest.approx((0.131, 0.539, 2.96))


def test_parse_wrk_output_with_errors():
    result = loadgen.parse_wrk(WRK_ERRORS)
    assert (result.requests, result.errors, result.non_2xx) == (15942, 3188, 3188)
    assert result.duration_s == pytest.approx(1.10)
    assert (result.p50_ms, result.p90_ms, result.p99_ms) == pytest.approx((0.285, 0.797, 1.40))
    # Other units wrk prints: seconds and minutes.
    slow = WRK_ERRORS.replace("1.40ms", "2.50s").replace("in 1.10s", "in 1.50m")
    result = loadgen.parse_wrk(slow)
    assert result.p99_ms == pytest.approx(2500) and result.duration_s == pytest.approx(90)


def test_parse_wrk_rejects_other_text():
    with pytest.raises(ValueError):
        loadgen.parse_wrk("wrk: command failed\n")


@pytest.mark.e2e
@pytest.mark.skipif(not loadgen.have_wrk(), reason="wrk is not installed")
def test_run_wrk_against_the_zero_backend(zero_ports):
    result = loadgen.run_wrk(f"http://127.0.0.1:{zero_ports[0]}/", connections=4,
                             duration_s=1)
    assert result.generator == "wrk" and result.requests > 0 and result.errors == 0
    assert result.non_2xx == 0 and 0 < result.p50_ms <= result.p90_ms <= result.p99_ms
    assert 0.9 < result.duration_s < 1.5
