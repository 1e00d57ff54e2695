"""End to end: the client side's caps, descriptors, /status and /ready, and shutdown
(apps/lb/edge.py under real Gunicorn). The attack mixes are in test_e2e_slowclients.py."""
from __future__ import annotations

import json
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.support import (
    free_port, gunicorn, spawn, start_balancer, start_echo, wait_for, worker_pids,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def slow_backend(tmp_path_factory):
    """tests/reflect.py: GET /sleep/<s> answers after s seconds."""
    port = free_port()
    proc = spawn("reflect", gunicorn("tests.reflect:create_app()", port, "-w", "1",
                                     "--threads", "64"), {}, tmp_path_factory.mktemp("r"), [port])
    yield f"http://127.0.0.1:{port}"
    proc.stop()


def one_worker(backend: str, redis_server: str, tmp_path, prefix=(), **env: str):
    return start_balancer([backend], redis_server, tmp_path, workers=1, prefix=prefix,
                          env={"LB_CHECK_INTERVAL_S": "0", **env})


def clients_of(admin: str) -> list[dict]:
    """/status's per-worker client load (a worker still starting is not listed yet)."""
    return requests.get(f"{admin}/status", timeout=5).json()["clients"]


def raw_get(port: int, path: str, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return sock


def answer(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_a_full_worker_says_so_in_status_and_ready_and_turns_newcomers_away(
        slow_backend, redis_server, tmp_path):
    proc, url, admin = one_worker(slow_backend, redis_server, tmp_path,
                                  LB_MAX_CLIENT_CONNECTIONS="4",
                                  LB_MAX_CONNECTIONS_PER_CLIENT="0")
    port = int(url.rsplit(":", 1)[1])
    try:
        assert requests.get(f"{admin}/ready", timeout=5).status_code == 200
        held = [raw_get(port, "/sleep/3.0") for _ in range(4)]  # four requests under way
        wait_for(lambda: [c["requests"] for c in clients_of(admin)] == [4],
                 what="four requests under way")
        clients = requests.get(f"{admin}/status", timeout=5).json()["clients"]
        assert [(c["connections"], c["requests"], c["cap"]) for c in clients] == [(4, 4, 4)]
        ready = requests.get(f"{admin}/ready", timeout=5)
        assert ready.status_code == 503 and "LB_MAX_CLIENT_CONNECTIONS" in ready.json()[
            "reasons"][0]
        # Nothing idle to close: a fifth client is told, not left hanging.
        turned = answer(raw_get(port, "/x"))
        assert turned.startswith(b"HTTP/1.1 503") and b"too many connections" in turned
        assert all(answer(s).startswith(b"HTTP/1.1 200") for s in held)
        for sock in held:
            sock.close()
        wait_for(lambda: requests.get(f"{admin}/ready", timeout=5).status_code == 200,
                 what="room again")
    finally:
        proc.stop()


def test_one_address_cannot_take_every_connection(slow_backend, redis_server, tmp_path):
    proc, url, _ = one_worker(slow_backend, redis_server, tmp_path,
                              LB_MAX_CONNECTIONS_PER_CLIENT="2")
    port = int(url.rsplit(":", 1)[1])
    try:
        mine = [raw_get(port, "/sleep/2.0") for _ in range(2)]
        time.sleep(0.3)  # let both be admitted before the third arrives
        assert answer(raw_get(port, "/sleep/0.0")).startswith(b"HTTP/1.1 503")
        # Another address still gets in.
        assert answer(raw_get(port, "/sleep/0.0", source="127.0.0.2")).startswith(b"HTTP/1.1 200")
        assert all(answer(s).startswith(b"HTTP/1.1 200") for s in mine)
    finally:
        proc.stop()


def test_running_out_of_descriptors_never_ends_a_worker(slow_backend, redis_server, tmp_path):
    # A hard limit of 200 descriptors, then 400 connections: accepting must pause and
    # resume, never take the worker down.
    proc, url, _ = one_worker(slow_backend, redis_server, tmp_path,
                              LB_MAX_CONNECTIONS_PER_CLIENT="0",
                              prefix=["prlimit", "--nofile=200:200"])
    port = int(url.rsplit(":", 1)[1])
    (worker,) = worker_pids(proc.popen.pid)
    flood = []
    try:
        for _ in range(400):
            try:
                flood.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            except OSError:
                break
        time.sleep(1)  # the worker meets the limit while these are open
        for sock in flood:
            sock.close()
        wait_for(lambda: requests.get(f"{url}/sleep/0.0", timeout=2).status_code == 200,
                 timeout=20, what="the worker serving again")
        assert worker_pids(proc.popen.pid) == [worker]  # the same worker, never restarted
        assert proc.popen.poll() is None
        assert "out of file descriptors" in proc.output()  # said once a second at most,
        assert "Traceback" not in proc.output()  # not a traceback per attempt
    finally:
        proc.stop()


def test_idle_keepalive_connections_do_not_hold_up_a_shutdown(slow_backend, redis_server,
                                                               tmp_path):
    proc, url, _ = start_balancer([slow_backend], redis_server, tmp_path,
                                  env={"LB_CHECK_INTERVAL_S": "0"})
    sessions = [requests.Session() for _ in range(40)]
    try:
        with ThreadPoolExecutor(8) as pool:  # each session now holds an idle connection
            assert set(pool.map(lambda s: s.get(f"{url}/sleep/0.0", timeout=5).status_code,
                                sessions)) == {200}
        # One request still under way: it finishes, the idle ones close at once.
        with ThreadPoolExecutor(1) as pool:
            late = pool.submit(requests.get, f"{url}/sleep/1.0", timeout=10)
            time.sleep(0.3)
            started = time.monotonic()
            code = proc.stop(signal.SIGTERM, timeout=10)
            took = time.monotonic() - started
            assert late.result().status_code == 200
        assert code == 0
        # Gunicorn checks every second; honcho kills at 5 s. A liveness bound, not a target.
        assert took < 4, took
        assert "Worker graceful timeout" not in proc.output()
    finally:
        proc.stop()
        for session in sessions:
            session.close()


def test_the_status_of_a_live_worker_counts_its_connections(slow_backend, redis_server,
                                                            tmp_path):
    proc, url, admin = one_worker(slow_backend, redis_server, tmp_path)
    try:
        session = requests.Session()
        assert session.get(f"{url}/sleep/0.0", timeout=5).status_code == 200
        (worker,) = worker_pids(proc.popen.pid)
        clients = clients_of(admin)
        assert clients == [{"pid": worker, "connections": 1, "requests": 0, "cap": 1000}]
        session.close()
        wait_for(lambda: [c["connections"] for c in clients_of(admin)] == [0],
                 what="the connection closed")
        assert json.loads(json.dumps(clients))  # plain JSON
        assert os.path.exists(f"/proc/{worker}")
    finally:
        proc.stop()


def test_a_client_that_never_reads_holds_no_backend_and_is_dropped(redis_server, tmp_path):
    # A backend with one thread: while it is held, nobody else gets an answer.
    echo, echo_url = start_echo(0, tmp_path, threads=1, ECHO_MAX_BODY="40000000")
    proc, url, admin = one_worker(echo_url, redis_server, tmp_path,
                                  LB_CLIENT_SEND_TIMEOUT="3")
    port = int(url.rsplit(":", 1)[1])
    connections = lambda: [c["connections"] for c in clients_of(admin)]  # noqa: E731
    try:
        lazy = socket.socket()
        lazy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        lazy.connect(("127.0.0.1", port))
        # 30 MB: far more than the kernel's buffers on both sides hold.
        lazy.sendall(b"GET /bytes/30000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert lazy.recv(12, socket.MSG_PEEK).startswith(b"HTTP/1.1 200")
        # The answer was read from the backend whole: its one thread serves others
        # while the client that asked still has not read it.
        assert requests.post(f"{url}/x", json={"a": 1}, timeout=20).json() == {"a": 1}
        assert connections() == [1]
        # Then the client that never reads is dropped, after LB_CLIENT_SEND_TIMEOUT.
        wait_for(lambda: connections() == [0], timeout=20, what="the lazy client dropped")
        lazy.close()
        assert "Traceback" not in proc.output()
    finally:
        proc.stop()
        echo.stop()
