"""The admin listener in a real Gunicorn master, crowded by slow clients: /status keeps
answering, the master neither grows threads nor memory past the documented bound, and
workers forked later inherit none of its connections."""
from __future__ import annotations

import os
import signal
import socket

import pytest
import requests

from apps.lb.admin import create_app
from apps.launch.stack import LISTEN
from scorer.pool import Pool
from apps.launch.redis_server import server_command
from apps.config import load_settings
from tests.support import (
    ESTABLISHED, free_port, sockets_of, spawn, start_balancer, start_echo, tcp_sockets,
    wait_for, worker_pids,
)

pytestmark = pytest.mark.e2e

CAP = 256  # LB_ADMIN_MAX_CONNECTIONS's default
BOUND_KIB = CAP * 96  # docs/operating.md, "Admin endpoints": 80 KiB of request data and the rest


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e-admin")


@pytest.fixture(scope="module")
def stack(redis_server, log_dir):
    echo, url = start_echo(0, log_dir)
    proc, _, admin = start_balancer([url], redis_server, log_dir, workers=1, threads=4,
                                    name="proxy-admin")
    yield proc, admin
    proc.stop()
    echo.stop()
    assert "Traceback" not in proc.output()


def status_of(pid: int, field: str) -> int:
    """A number from /proc/<pid>/status (VmRSS in KiB, Threads)."""
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith(f"{field}:"))
    return int(line.split()[1])


def admin_port(admin: str) -> int:
    return int(admin.rsplit(":", 1)[1])


def test_status_answers_while_2000_half_heads_crowd_the_admin_and_the_master_stays_small(stack):
    proc, admin = stack
    master = proc.popen.pid
    for _ in range(3):  # warm: the first answers load what every later one uses
        assert requests.get(f"{admin}/status", timeout=5).status_code == 200
    rss, threads = status_of(master, "VmRSS"), status_of(master, "Threads")
    # Half heads, then the most a connection can hold: a 16 KiB head and a 64 KiB body
    # but for its last byte. Rounds of 100 connections, a poll after each (see
    # tests/test_adminserver.py on why not at once).
    half_head = b"GET /status HTTP/1.1\r\nHost: x\r\nX-"
    stalled_body = (b"PUT /x HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 16200 +
                    b"\r\nContent-Length: 65536\r\n\r\n" + b"b" * 65535)
    held: list[socket.socket] = []
    polls, peak_rss, thread_counts = [], 0, set()
    try:
        for round_ in range(24):
            for _ in range(100):
                held.append(socket.create_connection(("127.0.0.1", admin_port(admin)), timeout=10))
                try:
                    held[-1].sendall(stalled_body if round_ >= 20 else half_head)
                except OSError:
                    pass  # evicted already: at the cap, the oldest go
            # The bound is liveness, not speed: 2 s is ages for a status answer.
            polls.append(requests.get(f"{admin}/status", timeout=2).status_code)
            peak_rss = max(peak_rss, status_of(master, "VmRSS"))
            thread_counts.add(status_of(master, "Threads"))
    finally:
        for sock in held:
            sock.close()
    print(f"master: VmRSS {rss} KiB before, peak {peak_rss} KiB (+{peak_rss - rss} KiB, "
          f"bound {BOUND_KIB} KiB); threads {threads}, during the attack {sorted(thread_counts)}")
    assert len(held) == 2400 and polls == [200] * 24
    assert peak_rss - rss < BOUND_KIB
    assert thread_counts == {threads} and status_of(master, "Threads") == threads


def test_a_worker_forked_later_holds_none_of_the_admin_sockets(stack):
    proc, admin = stack
    master, port = proc.popen.pid, admin_port(admin)
    clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(5)]
    try:
        for sock in clients:
            sock.sendall(b"GET /status HTTP/1.1\r\nHo")

        def held_by(pid: int) -> set[str]:
            return sockets_of(pid) & (tcp_sockets(port, ESTABLISHED) | tcp_sockets(port, LISTEN))

        wait_for(lambda: len(held_by(master)) == 6, what="the master holding 5 connections")
        [old] = worker_pids(master)
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: [p for p in worker_pids(master) if p != old], what="a new worker")
        [new] = [p for p in worker_pids(master) if p != old]
        # Else the master's closing a connection would not end it while the worker lives.
        wait_for(lambda: held_by(new) == set(), what="the new worker closing the admin sockets")
    finally:
        for sock in clients:
            sock.close()


def test_a_handler_thread_answers_after_redis_restarts(tmp_path):
    # The handler threads live on: a Redis connection one kept from an earlier
    # request would be dead now; one checked out per request is checked first.
    port = free_port()
    redis_proc = spawn("redis", server_command(port), {}, tmp_path, [port])
    config = {"REDIS_URL": f"redis://127.0.0.1:{port}/0", "LB_STATE_DIR": str(tmp_path)}
    settings = load_settings(overrides=config)
    client = create_app(config, pool=Pool(settings, degrade=False)).test_client()
    try:
        assert client.get("/backends").status_code == 200
        redis_proc.stop(signal.SIGKILL)
        redis_proc = spawn("redis-again", server_command(port), {}, tmp_path, [port])
        assert client.get("/backends").status_code == 200  # on the same (test) thread
    finally:
        redis_proc.stop()
