"""The admin listener's HTTP server: one event-loop thread and a few handler threads.

Werkzeug's threaded server gave every connection a thread and no deadline, so
connections that never finished their request head grew the Gunicorn master
without bound. Here one selector thread accepts every connection and reads its
request head and body without blocking, under deadlines, with at most
`max_connections` open: at the cap, one done with its answer, else the oldest
one still sending its request, is closed to admit the new one. Only complete
requests reach the handler threads, which run the WSGI app; the loop sends the
answers, so a client that does not read cannot hold a handler either.

Each answer closes its connection (no keep-alive): the admin is polled, not
loaded. Bodies need a Content-Length (chunked: 411) and at most `max_body`
bytes (413 before any of it is read, also for `Expect: 100-continue`).

Here: the threads, the listener, the cap. A connection's life and deadlines are
apps/lb/adminconnections.py; parsing and writing HTTP, apps/lb/adminhttp.py.
"""
from __future__ import annotations

import logging
import math
import queue
import selectors
import socket
import threading
import time
from collections import Counter
from typing import Callable

from apps.lb.adminconnections import Connection, Connections
from apps.lb.adminhttp import WSGIApp, environ_for, error_bytes, run_app

log = logging.getLogger("lb.admin")

HANDLERS = 4  # the admin's work is a Redis round trip or two: a few threads keep up
# Accepts per loop turn, well under the default cap: a new connection gets turns
# to send its request before a flood of newer ones could make it the oldest.
ACCEPT_BATCH = 32


class AdminServer:
    """Serves a WSGI app on (host, port) until `stop()`; `socket` is the listening socket."""

    def __init__(self, app: WSGIApp, host: str, port: int, *, header_timeout: float,
                 body_timeout: float, send_timeout: float, max_connections: int,
                 max_body: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.app, self.clock, self.max_connections = app, clock, max_connections
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family, backlog=1024)
        self.socket.setblocking(False)
        self.address = self.socket.getsockname()[:2]
        self._wake_in, self._wake_out = socket.socketpair()
        self._wake_in.setblocking(False)
        self._wake_out.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.socket, selectors.EVENT_READ)
        self._selector.register(self._wake_in, selectors.EVENT_READ)
        self._jobs: queue.SimpleQueue[Connection | None] = queue.SimpleQueue()
        self._answers: queue.SimpleQueue[tuple[Connection, bytes]] = queue.SimpleQueue()
        self._conns = Connections(self._selector, clock, header_timeout=header_timeout,
                                  body_timeout=body_timeout, send_timeout=send_timeout,
                                  max_body=max_body, dispatch=self._jobs.put)
        self._stopping = False
        self._threads = [threading.Thread(target=self._loop, name="lb-admin", daemon=True)]
        self._threads += [threading.Thread(target=self._handle, name=f"lb-admin-{i}",
                                           daemon=True) for i in range(HANDLERS)]
        for thread in self._threads:
            thread.start()

    def connections(self) -> Counter[str]:
        """Open connections by state: head, body, busy (in a handler), send, linger."""
        return self._conns.states()

    def wake(self) -> None:
        """Make the loop look at its queues and deadlines now (e.g. after the clock moved)."""
        try:
            self._wake_out.send(b"\0")
        except OSError:
            pass  # full: the loop is due to wake anyway (or stopped)

    def stop(self) -> None:
        """Close the listener and every connection; end the threads."""
        self._stopping = True
        self.wake()
        for thread in self._threads:
            thread.join(5)

    def close_inherited(self) -> None:
        """In a forked child: close the copies of every descriptor the server holds, so
        that the parent's closing a connection really ends it. Nothing is shut down."""
        for conn in self._conns:
            conn.sock.close()
        for sock in (self.socket, self._wake_in, self._wake_out):
            sock.close()
        self._selector.close()

    # --- the event loop: the only thread that touches connections outside BUSY ---

    def _loop(self) -> None:
        next_deadline = math.inf
        while not self._stopping:
            timeout = None if next_deadline == math.inf else max(0, next_deadline - self.clock())
            for key, events in self._selector.select(timeout):
                self._on_event(key, events)
            self._send_answers()
            next_deadline = self._conns.expire()
        for conn in self._conns:
            self._conns.close(conn)
        for _ in range(HANDLERS):
            self._jobs.put(None)
        for sock in (self.socket, self._wake_in, self._wake_out):
            sock.close()
        self._selector.close()

    def _on_event(self, key: selectors.SelectorKey, events: int) -> None:
        if key.fileobj is self.socket:
            self._accept()
        elif key.fileobj is self._wake_in:
            while self._drain(self._wake_in):
                pass
        else:
            self._conns.on_event(key.data, events)

    @staticmethod
    def _drain(sock: socket.socket) -> bytes:
        try:
            return sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return b""

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, peer = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, say: free one, and try next turn
                log.warning("admin listener cannot accept: %s", exc.strerror)
                self._conns.evict_oldest()
                return
            sock.setblocking(False)
            if len(self._conns) >= self.max_connections and not self._conns.evict_oldest():
                sock.close()  # every connection is being answered: the newest waits its turn
                continue
            self._conns.add(sock, peer)

    def _send_answers(self) -> None:
        while True:
            try:
                conn, answer = self._answers.get_nowait()
            except queue.Empty:
                return
            self._conns.resume(conn, answer)

    # --- handler threads: run the app on complete requests ---

    def _handle(self) -> None:
        while (conn := self._jobs.get()) is not None:
            body, conn.data = bytes(conn.data), bytearray()
            try:
                answer = run_app(self.app, environ_for(conn.head, body, self.address, conn.peer))
            except Exception:
                log.exception("admin app failed on %s %s", conn.head.method, conn.head.path)
                answer = error_bytes(500, "internal error in the admin listener")
            self._answers.put((conn, answer))
            self.wake()
