"""The traffic listener: a socket per worker (SO_REUSEPORT), and a taken port refused at once."""
from __future__ import annotations

import socket
import subprocess

import pytest

from tests.support import (
    BIN, ESTABLISHED, ROOT, free_port, sockets_of, start_balancer, start_echo, tcp_sockets,
    worker_pids,
)

pytestmark = pytest.mark.e2e


def gunicorn_on(port: int) -> subprocess.CompletedProcess:
    env = {"PATH": str(BIN), "LB_PORT": str(port), "LB_ADMIN_PORT": str(free_port()),
           "REDIS_URL": "redis://127.0.0.1:1/0", "LB_STATE_DIR": "/nonexistent-unused"}
    return subprocess.run([str(BIN / "gunicorn"), "-c", "gunicorn_conf.py",
                           "apps.lb.proxy:create_app()"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("reuse_port", [False, True], ids=["plain", "reuseport"])
def test_a_taken_port_stops_gunicorn_with_one_line(reuse_port):
    # A listener with SO_REUSEPORT of its own (a stale worker, say) would
    # otherwise let every new worker bind beside it and share the traffic.
    with socket.socket() as taken:
        if reuse_port:
            taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = gunicorn_on(port)
    assert done.returncode == 2
    assert f"lb: cannot listen on 127.0.0.1:{port}: Address already in use" in done.stderr
    assert "Booting worker" not in done.stderr


def test_a_burst_of_keepalive_clients_spreads_over_the_workers(redis_server, tmp_path):
    # With one shared socket, whichever worker woke first took the whole burst
    # about a third of the time: one core flat out, the other idle.
    echo, backend = start_echo(1, tmp_path)
    try:
        proc, url, _ = start_balancer([backend], redis_server, tmp_path, workers=2,
                                      name="proxy-spread")
    except BaseException:
        echo.stop()
        raise
    port = int(url.rsplit(":", 1)[1])
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(32)]
    try:
        for client in clients:
            client.sendall(b"GET /spread HTTP/1.1\r\nHost: x\r\n\r\n")
        for client in clients:
            assert client.recv(65536).startswith(b"HTTP/1.1 ")
        accepted = tcp_sockets(port, ESTABLISHED)
        per_worker = sorted(len(sockets_of(pid) & accepted)
                            for pid in worker_pids(proc.popen.pid))
    finally:
        for client in clients:
            client.close()
        proc.stop()
        echo.stop()
    assert sum(per_worker) == 32 and len(per_worker) == 2
    assert per_worker[0] >= 4, per_worker  # binomial(32, 1/2): below 4 once in 10^6 runs
