"""The balancer's client side: a Gunicorn worker that no slow, idle or crowded client can stall.

    gunicorn -c gunicorn_conf.py -k apps.lb.edge.EdgeWorker "apps.lb.proxy:create_app()"

Gunicorn's threaded worker gives each connection a thread while it parses the
request head and body, with no deadline: 40 clients sending a byte every few
seconds hold every thread. This worker is Gunicorn's gevent worker (a greenlet
per connection, so a waiting client costs memory, not a thread) plus what an
edge proxy adds, as nginx, HAProxy and Envoy do:

- deadlines on the client, per connection (`ClientSocket`): a request head
  must arrive within LB_CLIENT_HEADER_TIMEOUT of its first byte (else 408);
  a body may stall at most LB_CLIENT_BODY_TIMEOUT between reads and must keep
  up LB_CLIENT_BODY_MIN_RATE after a grace (else 408, apps/lb/body.py); an
  answer the client does not read for LB_CLIENT_SEND_TIMEOUT is dropped; a
  keep-alive connection with nothing to say is closed after Gunicorn's
  `keepalive`;
- caps on connections (`ClientConnections`): LB_MAX_CLIENT_CONNECTIONS per
  worker and LB_MAX_CONNECTIONS_PER_CLIENT per client address. At a cap the
  connection idle longest (or else the one slowest to send its head) makes
  room for the new one, so idle and slow connections can never shut new
  clients out;
- the soft limit on open files raised to the hard one, since each connection
  holds a descriptor (and running out of them only delays accepting).
"""
from __future__ import annotations

import contextlib
import errno
import json
import resource
import socket
import time
from collections import Counter
from typing import Any, Callable

import gevent
from gunicorn.workers.base_async import AsyncWorker
from gunicorn.workers.ggevent import GeventWorker

# Phases of a client connection.
IDLE, HEAD, REQUEST = "idle", "head", "request"

# A connection still sending its head after this long is taken for a slow one:
# when no idle connection can make room at a cap, the oldest such one does.
SLOW_HEAD_S = 1.0


def canned(status: int, reason: str, message: str) -> bytes:
    """A complete JSON error answer that closes the connection, written without the app
    (there is no request to give it: the head never arrived, or it is not admitted)."""
    body = json.dumps({"error": message, "status": status, "source": "balancer"}).encode() + b"\n"
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


HEAD_TIMEOUT_ANSWER = canned(408, "Request Timeout", "the request head did not arrive in time")
BUSY_ANSWER = canned(503, "Service Unavailable", "too many connections: try again")


class ClientSocket:
    """A client connection under deadlines, as Gunicorn's parser and response see it.

    Gunicorn reads and writes through this object exactly as through a socket;
    the phase decides how long each read may wait. `cut` ends the connection:
    reads then see the end of the stream, which Gunicorn closes quietly.
    """

    def __init__(self, raw: socket.socket, peer: str, limits: Any,
                 keepalive_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.raw, self.peer, self.limits, self.keepalive_s = raw, peer, limits, keepalive_s
        self.clock = clock
        self.phase = IDLE
        self.since = clock()  # when the current phase began
        self.cut = False
        self.request: Any = None  # Gunicorn's request, while one is being served
        self._head_deadline = 0.0
        self._body_started = 0.0
        self._body_bytes = 0
        self._timeout: float | None = None

    # --- what the worker calls -----------------------------------------------------

    def begin_request(self, request: Any) -> None:
        """The head is in: from now on reads are the body's."""
        self.phase, self.request = REQUEST, request
        self.since = self._body_started = self.clock()
        self._body_bytes = 0

    def end_request(self) -> None:
        self.phase, self.request, self.since = IDLE, None, self.clock()

    def evict(self) -> None:
        """Close it to make room for another: its reader wakes to the end of the stream."""
        self.cut = True
        with contextlib.suppress(OSError):
            self.raw.shutdown(socket.SHUT_RDWR)

    # --- the socket interface Gunicorn uses ---------------------------------------

    def recv(self, size: int) -> bytes:
        if self.cut:
            return b""
        if self.phase == REQUEST:
            return self._recv_body(size)
        if self.phase == IDLE:
            data = self._recv(size, self.keepalive_s)
            if data is None:  # nothing said within the keep-alive time: close quietly
                self.cut = True
                return b""
            if data:
                self.phase, self.since = HEAD, self.clock()
                self._head_deadline = self.since + self.limits.client_header_timeout
            return data
        data = self._recv(size, self._head_deadline - self.clock())
        if data is None:  # a head begun and not finished in time
            self.cut = True
            with contextlib.suppress(OSError):
                self._send(HEAD_TIMEOUT_ANSWER)
            return b""
        return data

    def sendall(self, data: bytes) -> None:
        try:
            self._send(data)
        except TimeoutError:
            self.cut = True
            raise ConnectionResetError(errno.ECONNRESET, "the client stopped reading") from None

    def __getattr__(self, name: str) -> Any:  # fileno, getpeername, close, setsockopt...
        return getattr(self.raw, name)

    # --- inside ----------------------------------------------------------------------

    def _recv_body(self, size: int) -> bytes:
        data = self._recv(size, self.limits.client_body_timeout)
        if data is None:
            self._fail_body("the request body stalled")
        self._body_bytes += len(data)
        elapsed = self.clock() - self._body_started
        rate = self.limits.client_body_min_rate
        if data and elapsed > self.limits.client_body_grace_s and \
                self._body_bytes < rate * elapsed:
            self._fail_body(f"the request body arrived slower than {rate:g} bytes/s")
        return data

    def _fail_body(self, why: str) -> None:
        """The body is too slow: apps/lb/body.py answers 408, and the connection closes."""
        self.cut = True
        if self.request is not None:
            self.request.force_close()
        raise TimeoutError(why)

    def _recv(self, size: int, timeout: float) -> bytes | None:
        """Up to `size` bytes, or None when `timeout` seconds pass first."""
        if timeout <= 0:
            return None
        self._set_timeout(timeout)
        try:
            return self.raw.recv(size)
        except TimeoutError:
            return None
        except OSError:
            if self.cut:  # evicted meanwhile: gevent wakes the reader with EBADF
                return b""
            raise

    def _send(self, data: bytes) -> None:
        self._set_timeout(self.limits.client_send_timeout)
        self.raw.sendall(data)

    def _set_timeout(self, timeout: float) -> None:
        if timeout != self._timeout:
            self.raw.settimeout(timeout)
            self._timeout = timeout


class ClientConnections:
    """The connections one worker holds, against its caps."""

    def __init__(self, cap: int, per_client: int, exempt: Callable[[str], bool],
                 on_change: Callable[[int, int], None] = lambda open_, busy: None) -> None:
        self.cap, self.per_client, self.exempt = cap, per_client, exempt
        self.open: set[ClientSocket] = set()
        self.by_peer: Counter[str] = Counter()
        self.busy = 0
        self.evicted = 0
        self.refused = 0
        self._on_change = on_change

    def admit(self, conn: ClientSocket) -> bool:
        """Take a new connection in, making room if a cap is reached; False: refuse it."""
        if self.per_client and not self.exempt(conn.peer) and \
                self.by_peer[conn.peer] >= self.per_client and \
                not self._make_room([c for c in self.open if c.peer == conn.peer]):
            self.refused += 1
            return False
        if len(self.open) >= self.cap and not self._make_room(self.open):
            self.refused += 1
            return False
        self.open.add(conn)
        self.by_peer[conn.peer] += 1
        self._changed()
        return True

    def release(self, conn: ClientSocket) -> None:
        if conn in self.open:
            self.open.discard(conn)
            self.by_peer[conn.peer] -= 1
            if not self.by_peer[conn.peer]:
                del self.by_peer[conn.peer]
            self._changed()

    def started(self) -> None:
        self.busy += 1
        self._changed()

    def finished(self) -> None:
        self.busy -= 1
        self._changed()

    def close_idle(self) -> None:
        """Close every connection waiting for its next request (shutting down)."""
        for conn in [c for c in self.open if c.phase == IDLE]:
            conn.evict()
            self.release(conn)

    def _make_room(self, among: Any) -> bool:
        """Evict the connection idle longest, or else the slowest head; False if none."""
        now = time.monotonic()
        idle = [c for c in among if c.phase == IDLE]
        slow = [c for c in among if c.phase == HEAD and now - c.since > SLOW_HEAD_S]
        victims = idle or slow
        if not victims:
            return False
        victim = min(victims, key=lambda c: c.since)
        victim.evict()
        self.release(victim)
        self.evicted += 1
        return True

    def _changed(self) -> None:
        self._on_change(len(self.open), self.busy)


class EdgeWorker(GeventWorker):
    """Gunicorn's gevent worker with client deadlines and connection caps (see above)."""

    def load_wsgi(self) -> None:
        # Here, not in init_process: gevent has patched the standard library by now,
        # and what these import (redis, ssl) must see the patched modules.
        from apps.lb import metrics
        from apps.config import address_in, load_settings
        settings = load_settings()
        self.limits = settings
        raise_open_files_limit()
        trusted = settings.trusted_proxies
        self.connections = ClientConnections(
            settings.max_client_connections, settings.max_connections_per_client,
            exempt=lambda peer: bool(trusted) and address_in(peer, trusted),
            on_change=metrics.client_connections)
        metrics.client_connections(0, 0)  # so /status lists this worker from the start
        # Gunicorn's pool only stops accepting when full; the caps are ours, so its
        # pool leaves room above them for the connections being turned away.
        self.worker_connections = settings.max_client_connections + 128
        super().load_wsgi()

    def run(self) -> None:
        quiet_when_out_of_descriptors(gevent.get_hub(), self.log)
        super().run()

    def handle_exit(self, sig: int, frame: Any) -> None:
        """SIGTERM: stop, and close the idle keep-alive connections at once; Gunicorn
        waits for every open connection, and would otherwise wait out its whole
        graceful timeout for them (requests under way still finish)."""
        super().handle_exit(sig, frame)
        gevent.spawn(self.connections.close_idle)

    def timeout_ctx(self) -> contextlib.AbstractContextManager:
        # Gunicorn's gevent worker bounds each head read by `keepalive` and drops the
        # connection silently; ClientSocket keeps the idle and head deadlines apart.
        return contextlib.nullcontext()

    def handle(self, listener: Any, client: socket.socket, addr: Any) -> None:
        client.setblocking(True)
        peer = addr[0] if isinstance(addr, tuple) else str(addr)
        conn = ClientSocket(client, peer, self.limits, float(self.cfg.keepalive))
        if not self.connections.admit(conn):
            with contextlib.suppress(OSError):
                conn.sendall(BUSY_ANSWER)
            client.close()
            return
        try:
            AsyncWorker.handle(self, listener, conn, addr)
        finally:
            self.connections.release(conn)

    def handle_request(self, listener_name: Any, req: Any, sock: ClientSocket,
                       addr: Any) -> bool:
        sock.begin_request(req)
        self.connections.started()
        try:
            return super().handle_request(listener_name, req, sock, addr)
        finally:
            self.connections.finished()
            sock.end_request()
            if not self.alive:  # shutting down: no next request on this connection
                sock.cut = True
            # Let every other connection run before reading this one's next request:
            # a greenlet does not yield while data is at hand, so a few busy keep-alive
            # connections would keep the worker and leave the rest waiting. Measured
            # with wrk (32 connections) on bench/overhead.py's ceiling app: p99 436 ms
            # without this, 163 ms with sleep(0), 19 ms with idle() (gthread: 37 ms).
            gevent.idle()


def quiet_when_out_of_descriptors(hub: Any, log: Any) -> None:
    """One warning a second, not a traceback per try, while accepting fails for want
    of descriptors: gevent's server backs off and tries again by itself."""
    print_exception = hub.print_exception
    last = [0.0]

    def print_or_warn(context: Any, kind: Any, value: Any, tb: Any) -> None:
        if isinstance(value, OSError) and value.errno in (errno.EMFILE, errno.ENFILE):
            if time.monotonic() - last[0] >= 1.0:
                last[0] = time.monotonic()
                log.warning("out of file descriptors: new connections wait (%s)", value)
            return
        print_exception(context, kind, value, tb)

    hub.print_exception = print_or_warn


def raise_open_files_limit() -> None:
    """Soft limit on open files up to the hard one: every client costs a descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
