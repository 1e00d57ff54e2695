"""Helpers for the tests: the process launchers of apps/launch/stack.py, plus a load generator."""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Mapping

from apps.launch.stack import (  # noqa: F401  (re-exported for the tests)
    BIN, ESTABLISHED, ROOT, Proc, free_port, gunicorn, parent_of, port_open, spawn,
    start_balancer, start_echo, start_redis, tcp_sockets, wait_for, worker_pids,
)


class SocketServer:
    """A test server on a free local port: `handle` gets each connection on a
    thread of its own. Subclasses set their state before calling __init__, which
    starts accepting."""

    def __init__(self, backlog: int = 64) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=backlog)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError


def connections_to(port: int) -> int:
    """Established TCP connections whose server side is `port`."""
    return len(tcp_sockets(port, ESTABLISHED))


def sockets_of(pid: int) -> set[str]:
    """Inodes of the sockets a process holds open."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


def connections_from(pid: int, port: int) -> int:
    """Established TCP connections process `pid` holds to a server on `port`."""
    return len(sockets_of(pid) & tcp_sockets(port, ESTABLISHED, remote=True))


def metric_samples(admin: str) -> dict[str, float]:
    """The balancer's GET /metrics as {'name{labels}': value}."""
    import requests
    samples = {}
    for line in requests.get(f"{admin}/metrics", timeout=5).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def assert_shares(shares: Mapping[str, int] | set[str], expected: Mapping[str, int] | set[str],
                  *admins: str) -> None:
    """Assert that the backends served exactly the expected counts (or set of backends).

    Call it while the stack still runs: on failure the message carries each
    balancer's /status (blocks and their reasons, degraded workers), since an
    uneven split on a busy machine is most often a block the logs do not show."""
    if shares == expected:
        return
    import requests
    statuses = []
    for admin in admins:
        try:
            status = requests.get(f"{admin}/status", timeout=5).json()
            statuses.append(f"{admin}/status: {json.dumps(status, indent=1)}")
        except (requests.RequestException, ValueError) as exc:
            statuses.append(f"{admin}/status unavailable: {exc!r}")
    raise AssertionError("\n".join([f"shares {shares} != expected {expected}",
                                    *statuses]))


@dataclass
class Result:
    """One client request's fate, as the client saw it."""

    index: int
    status: int | None       # None when the client got no HTTP answer at all
    body_ok: bool            # the answer echoed the request's own body
    upstream: str | None
    elapsed: float
    error: str | None = None


def fire(url: str, total: int, clients: int, method: str = "PUT",
         done: "threading.Event | None" = None, progress: "list | None" = None,
         timeout: float = 30, keepalive: bool = True) -> list[Result]:
    """Send `total` echo requests from `clients` threads (one session each).

    Without `keepalive` every request opens a new connection, so each Gunicorn
    worker gets a share (a kept-alive connection stays with one worker)."""
    import requests
    from concurrent.futures import ThreadPoolExecutor

    local = threading.local()

    def one(i: int) -> Result:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        body = f'{{"request": {i}}}'.encode()
        started = time.monotonic()
        try:
            headers = {"Content-Type": "application/json"}
            if not keepalive:
                headers["Connection"] = "close"
            response = local.session.request(method, f"{url}/load/{i}", data=body,
                                             timeout=timeout, headers=headers)
            result = Result(i, response.status_code, response.content == body,
                            response.headers.get("X-Upstream"), time.monotonic() - started)
        except requests.RequestException as exc:
            result = Result(i, None, False, None, time.monotonic() - started, repr(exc))
        if progress is not None:
            progress.append(i)
        return result

    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(total)))
    if done is not None:
        done.set()
    return results
