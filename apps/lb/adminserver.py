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
"""
from __future__ import annotations

import http
import io
import logging
import math
import queue
import re
import selectors
import socket
import struct
import sys
import threading
import time
from collections import Counter
from contextlib import suppress
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any, Callable
from urllib.parse import unquote_to_bytes

from apps.lb.errors import json_error

log = logging.getLogger("lb.admin")

MAX_HEAD = 16 * 1024  # request line and headers; nginx's large_client_header_buffers is 32k
HANDLERS = 4  # the admin's work is a Redis round trip or two: a few threads keep up
# Accepts per loop turn, well under the default cap: a new connection gets turns
# to send its request before a flood of newer ones could make it the oldest.
ACCEPT_BATCH = 32
READ_CHUNK = 64 * 1024
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

# A connection's life: its head, its body, in a handler, its answer being sent,
# then lingering (reading and dropping what the client still sends) until the
# client closes, so that closing on unread data cannot reset the connection
# before the client has read its answer.
HEAD, BODY, BUSY, SEND, LINGER = "head", "body", "busy", "send", "linger"
EVICTABLE = (HEAD, BODY)

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VERSION = re.compile(rb"HTTP/1\.[01]")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
WSGIApp = Callable[[dict, Callable], Any]


class Refusal(Exception):
    """A request the server answers itself, with a JSON error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Head:
    """A parsed request head."""

    method: str
    path: str   # raw, still percent-encoded
    query: str
    version: str
    headers: list[tuple[str, str]]
    length: int
    expects_continue: bool


def parse_head(raw: bytes, max_body: int) -> Head:
    """Parse a request head (without its blank line); raise Refusal for what cannot be served."""
    line, *lines = raw.split(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or _CONTROL.search(line):
        raise Refusal(400, "malformed request line")
    method, target, version = parts
    if not _VERSION.fullmatch(version):
        raise Refusal(505 if version.startswith(b"HTTP/") else 400,
                      "only HTTP/1.0 and HTTP/1.1 are served")
    if target.startswith((b"http://", b"https://")):  # absolute form: its path only
        target = b"/" + (target.split(b"/", 3)[3:] or [b""])[0]
    if not target.startswith(b"/"):
        raise Refusal(400, "the request target must be a path such as /status")
    path, _, query = target.partition(b"#")[0].partition(b"?")
    headers = []
    for header in lines:
        name, colon, value = header.partition(b":")
        if not colon or not _TOKEN.fullmatch(name) or _CONTROL.search(value):
            raise Refusal(400, "malformed header line")
        headers.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
    named = {}
    for name, value in headers:
        named.setdefault(name.lower(), []).append(value)
    if version == b"HTTP/1.1" and len(named.get("host", ())) != 1:
        raise Refusal(400, "an HTTP/1.1 request needs exactly one Host header")
    if "transfer-encoding" in named:
        raise Refusal(411, "send the request body with a Content-Length (chunked is not taken)")
    lengths = {v.strip() for value in named.get("content-length", ()) for v in value.split(",")}
    if len(lengths) > 1 or not all(v.isdigit() and v.isascii() for v in lengths):
        raise Refusal(400, "invalid Content-Length")
    length = int(lengths.pop()) if lengths else 0
    if length > max_body:
        raise Refusal(413, f"request body larger than {max_body} bytes")
    expect = [v.strip().lower() for v in named.get("expect", ())]
    if any(v != "100-continue" for v in expect):
        raise Refusal(417, "only Expect: 100-continue is understood")
    return Head(method.decode("latin-1"), path.decode("latin-1"), query.decode("latin-1"),
                version.decode("latin-1"), headers, length,
                bool(expect) and version == b"HTTP/1.1")


def environ_for(head: Head, body: bytes, server: tuple, peer: tuple) -> dict[str, Any]:
    """The WSGI environ of one request (PEP 3333)."""
    environ: dict[str, Any] = {
        "REQUEST_METHOD": head.method, "SCRIPT_NAME": "",
        "PATH_INFO": unquote_to_bytes(head.path).decode("latin-1"),
        "QUERY_STRING": head.query, "RAW_URI": head.path + ("?" + head.query if head.query else ""),
        "SERVER_NAME": str(server[0]), "SERVER_PORT": str(server[1]),
        "SERVER_PROTOCOL": head.version,
        "REMOTE_ADDR": str(peer[0]), "REMOTE_PORT": str(peer[1]),
        "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    for name, value in head.headers:
        if "_" in name:
            continue  # X_Forwarded could pass for X-Forwarded below: dropped, as Gunicorn does
        key = name.upper().replace("-", "_")
        if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            key = "HTTP_" + key
        if key in environ:
            environ[key] += ("; " if key == "HTTP_COOKIE" else ",") + value
        else:
            environ[key] = value
    if "CONTENT_LENGTH" in environ:
        environ["CONTENT_LENGTH"] = str(head.length)
    return environ


def response_bytes(status: str, headers: list[tuple[str, str]], body: bytes,
                   head_only: bool = False) -> bytes:
    """A whole HTTP/1.1 response that closes its connection."""
    names = {name.lower() for name, _ in headers}
    lines = [f"HTTP/1.1 {status}"]
    lines += [f"{name}: {value}" for name, value in headers
              if name.lower() not in ("connection", "keep-alive", "transfer-encoding")]
    if "content-length" not in names:
        lines.append(f"Content-Length: {len(body)}")
    if "date" not in names:
        lines.append(f"Date: {formatdate(usegmt=True)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body)


def error_bytes(status: int, message: str) -> bytes:
    """A JSON error answer, the same as the admin app's own (apps/lb/errors.py)."""
    response = json_error(status, message, source="admin")
    return response_bytes(f"{status} {http.HTTPStatus(status).phrase}",
                          [("Content-Type", response.content_type)],
                          response.get_data())


def run_app(app: WSGIApp, environ: dict[str, Any]) -> bytes:
    """Call a WSGI app and return its whole answer, ready to send."""
    started: list = []
    chunks: list[bytes] = []

    def start_response(status: str, headers: list, exc_info: Any = None) -> Callable:
        if exc_info and started:
            raise exc_info[1].with_traceback(exc_info[2])
        started[:] = [status, headers]
        return chunks.append

    result = app(environ, start_response)
    try:
        chunks.extend(result)
    finally:
        if hasattr(result, "close"):
            result.close()
    status, headers = started
    return response_bytes(status, headers, b"".join(chunks),
                          environ["REQUEST_METHOD"] == "HEAD")


@dataclass(eq=False)
class Connection:
    """One client connection and where it is in its life."""

    sock: socket.socket
    peer: tuple
    deadline: float
    state: str = HEAD
    data: bytearray = field(default_factory=bytearray)
    head: Head | None = None
    out: memoryview = memoryview(b"")


class AdminServer:
    """Serves a WSGI app on (host, port) until `stop()`; `socket` is the listening socket."""

    def __init__(self, app: WSGIApp, host: str, port: int, *, header_timeout: float,
                 body_timeout: float, send_timeout: float, max_connections: int,
                 max_body: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.app, self.clock, self.max_body = app, clock, max_body
        self.header_timeout, self.body_timeout = header_timeout, body_timeout
        self.send_timeout, self.max_connections = send_timeout, max_connections
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
        self._conns: dict[Connection, None] = {}  # in accept order: the oldest first
        self._jobs: queue.SimpleQueue[Connection | None] = queue.SimpleQueue()
        self._answers: queue.SimpleQueue[tuple[Connection, bytes]] = queue.SimpleQueue()
        self._stopping = False
        self._threads = [threading.Thread(target=self._loop, name="lb-admin", daemon=True)]
        self._threads += [threading.Thread(target=self._handle, name=f"lb-admin-{i}",
                                           daemon=True) for i in range(HANDLERS)]
        for thread in self._threads:
            thread.start()

    def connections(self) -> Counter[str]:
        """Open connections by state: head, body, busy (in a handler), send, linger."""
        return Counter(conn.state for conn in list(self._conns))

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
        for conn in list(self._conns):
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
            next_deadline = self._expire()
        for conn in list(self._conns):
            self._close(conn)
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
        elif key.data in self._conns:  # not closed earlier in this turn
            self._guarded(key.data, self._send if events & selectors.EVENT_WRITE else self._read)

    def _guarded(self, conn: Connection, action: Callable[..., None], *args: Any) -> None:
        """Run `action` on `conn`: a bug must cost that connection, never the listener."""
        try:
            action(conn, *args)
        except Exception:
            log.exception("admin listener: unexpected error; closing the connection")
            self._close(conn)

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
                self._evict_oldest()
                return
            sock.setblocking(False)
            if len(self._conns) >= self.max_connections and not self._evict_oldest():
                sock.close()  # every connection is being answered: the newest waits its turn
                continue
            conn = Connection(sock, peer, self.clock() + self.header_timeout)
            self._conns[conn] = None
            self._selector.register(sock, selectors.EVENT_READ, conn)
            # Under a flood, a request is often in by the time it is accepted:
            # reading it at once takes it out of reach of eviction.
            self._guarded(conn, self._read)

    def _evict_oldest(self) -> bool:
        oldest = next((c for c in self._conns if c.state == LINGER), None) or \
            next((c for c in self._conns if c.state in EVICTABLE), None)
        if oldest is not None:
            self._close(oldest)
        return oldest is not None

    def _read(self, conn: Connection) -> None:
        wanted = (MAX_HEAD + 1 - len(conn.data) if conn.state == HEAD else
                  conn.head.length - len(conn.data) if conn.state == BODY else READ_CHUNK)
        try:
            chunk = conn.sock.recv(min(wanted, READ_CHUNK))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:  # the client is gone, or done after its answer
            self._close(conn)
        elif conn.state != LINGER:
            conn.data += chunk
            if conn.state == HEAD:
                self._read_head(conn)
            if conn.state == BODY and len(conn.data) >= conn.head.length:
                self._dispatch(conn)

    def _read_head(self, conn: Connection) -> None:
        end = conn.data.find(b"\r\n\r\n")
        if end < 0 and len(conn.data) <= MAX_HEAD:
            return
        if end < 0 or end + 4 > MAX_HEAD:
            message = f"request head larger than {MAX_HEAD} bytes"
            return self._answer(conn, error_bytes(431, message))
        try:
            conn.head = parse_head(bytes(conn.data[:end]), self.max_body)
        except Refusal as refusal:
            return self._answer(conn, error_bytes(refusal.status, refusal.message))
        conn.data = conn.data[end + 4:]  # a copy: the head's bytes are freed
        conn.state, conn.deadline = BODY, self.clock() + self.body_timeout
        if conn.head.expects_continue and len(conn.data) < conn.head.length:
            try:  # nothing was sent yet: 25 bytes fit in the socket's buffer
                conn.sock.send(CONTINUE)
            except OSError:
                self._close(conn)

    def _dispatch(self, conn: Connection) -> None:
        conn.state, conn.deadline = BUSY, math.inf
        self._selector.unregister(conn.sock)
        self._jobs.put(conn)

    def _send_answers(self) -> None:
        while True:
            try:
                conn, answer = self._answers.get_nowait()
            except queue.Empty:
                return
            if conn in self._conns:
                self._guarded(conn, self._resume, answer)

    def _resume(self, conn: Connection, answer: bytes) -> None:
        self._selector.register(conn.sock, selectors.EVENT_READ, conn)
        self._answer(conn, answer)

    def _answer(self, conn: Connection, answer: bytes) -> None:
        conn.state, conn.out, conn.data = SEND, memoryview(answer), bytearray()
        conn.deadline = self.clock() + self.send_timeout
        self._send(conn)

    def _send(self, conn: Connection) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            return self._close(conn)
        if sent:
            conn.out, conn.deadline = conn.out[sent:], self.clock() + self.send_timeout
        if conn.out:
            self._selector.modify(conn.sock, selectors.EVENT_WRITE, conn)
            return
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return self._close(conn)
        conn.state = LINGER
        self._selector.modify(conn.sock, selectors.EVENT_READ, conn)

    def _expire(self) -> float:
        """Act on every passed deadline; return the next one."""
        now, next_deadline = self.clock(), math.inf
        for conn in list(self._conns):
            if conn.deadline <= now:
                self._guarded(conn, self._expired)
            if conn in self._conns:
                next_deadline = min(next_deadline, conn.deadline)
        return next_deadline

    def _expired(self, conn: Connection) -> None:
        if conn.state == HEAD and conn.data:
            self._answer(conn, error_bytes(
                408, f"request head not complete within {self.header_timeout:g} s"))
        elif conn.state == BODY:
            self._answer(conn, error_bytes(
                408, f"request body not complete within {self.body_timeout:g} s"))
        else:  # silent since it connected, not reading its answer, or lingering
            if conn.state == SEND:  # reset: the kernel would go on sending what is queued
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self._close(conn)

    def _close(self, conn: Connection) -> None:
        if conn not in self._conns:
            return
        del self._conns[conn]
        with suppress(KeyError, ValueError):  # not watched while in a handler
            self._selector.unregister(conn.sock)
        conn.sock.close()

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
