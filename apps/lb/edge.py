"""The balancer's client side: a Gunicorn worker that no slow, idle or crowded client can stall.

    gunicorn -c gunicorn_conf.py -k apps.lb.edge.EdgeWorker "apps.lb.proxy:create_app()"

Gunicorn's threaded worker gives each connection a thread while it parses the
request head and body, with no deadline: 40 clients sending a byte every few
seconds hold every thread. This worker is Gunicorn's gevent worker (a greenlet
per connection, so a waiting client costs memory, not a thread) plus what an
edge proxy adds, as nginx, HAProxy and Envoy do:

- deadlines on the client, per connection (`ClientSocket`,
  apps/lb/clientsocket.py): for the next request, its head, its body, and
  the client reading its answer;
- caps on connections (`ClientConnections`, apps/lb/clientcaps.py):
  LB_MAX_CLIENT_CONNECTIONS per worker and LB_MAX_CONNECTIONS_PER_CLIENT per
  client address, where idle and slow connections make room for new ones;
- the soft limit on open files raised to the hard one, since each connection
  holds a descriptor (and running out of them only delays accepting).
"""
from __future__ import annotations

import contextlib
import errno
import resource
import socket
import time
from typing import Any

import gevent
from gunicorn.workers.base_async import AsyncWorker
from gunicorn.workers.ggevent import GeventWorker

from apps.lb.clientcaps import BUSY_ANSWER, ClientConnections
from apps.lb.clientsocket import ClientSocket


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
            # with wrk (32 connections) on bench/overhead/'s ceiling app: p99 436 ms
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
