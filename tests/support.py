"""Helpers for the tests: the process launchers of bench/stack.py, plus a load generator."""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

from bench.stack import (  # noqa: F401  (re-exported for the tests)
    BIN, ESTABLISHED, ROOT, Proc, free_port, gunicorn, port_open, spawn, start_balancer,
    start_echo, start_redis, tcp_sockets, wait_for,
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
