"""The admin listener's open connections, each taken through its life under deadlines.

A connection's life: its head, its body, in a handler, its answer being sent,
then lingering (reading and dropping what the client still sends) until the
client closes, so that closing on unread data cannot reset the connection
before the client has read its answer. A head must be whole within
`header_timeout` of the connection, a body within `body_timeout` of its head
(else 408); an answer not read for `send_timeout` is dropped.
"""
from __future__ import annotations

import logging
import math
import selectors
import socket
import struct
from collections import Counter
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from apps.lb.adminhttp import CONTINUE, Head, Refusal, error_bytes, parse_head

log = logging.getLogger("lb.admin")

MAX_HEAD = 16 * 1024  # request line and headers; nginx's large_client_header_buffers is 32k
READ_CHUNK = 64 * 1024

HEAD, BODY, BUSY, SEND, LINGER = "head", "body", "busy", "send", "linger"
EVICTABLE = (HEAD, BODY)


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


class Connections:
    """The open connections, in accept order (the oldest first).

    Only the event loop calls it; a connection in a handler (BUSY) is not
    watched by the selector until `resume` gives it its answer.
    """

    def __init__(self, selector: selectors.BaseSelector, clock: Callable[[], float], *,
                 header_timeout: float, body_timeout: float, send_timeout: float,
                 max_body: int, dispatch: Callable[[Connection], None]) -> None:
        self.selector, self.clock = selector, clock
        self.max_body, self.dispatch = max_body, dispatch
        self.header_timeout, self.body_timeout = header_timeout, body_timeout
        self.send_timeout = send_timeout
        self._open: dict[Connection, None] = {}

    def __len__(self) -> int:
        return len(self._open)

    def __iter__(self) -> Iterator[Connection]:
        return iter(list(self._open))

    def states(self) -> Counter[str]:
        """Open connections by state (safe from any thread)."""
        return Counter(conn.state for conn in list(self._open))

    def add(self, sock: socket.socket, peer: tuple) -> None:
        """Watch a newly accepted connection, and read what it has sent already."""
        conn = Connection(sock, peer, self.clock() + self.header_timeout)
        self._open[conn] = None
        self.selector.register(sock, selectors.EVENT_READ, conn)
        # Under a flood, a request is often in by the time it is accepted:
        # reading it at once takes it out of reach of eviction.
        self._guarded(conn, self._read)

    def on_event(self, conn: Connection, events: int) -> None:
        """The selector says `conn` can be read or written."""
        if conn in self._open:  # not closed earlier in this turn
            self._guarded(conn, self._send if events & selectors.EVENT_WRITE else self._read)

    def resume(self, conn: Connection, answer: bytes) -> None:
        """A handler is done with `conn`: send its answer."""
        if conn in self._open:
            self._guarded(conn, self._resume, answer)

    def evict_oldest(self) -> bool:
        """Close the oldest lingering connection, else the oldest still sending its
        request; False if every one is being answered."""
        oldest = next((c for c in self._open if c.state == LINGER), None) or \
            next((c for c in self._open if c.state in EVICTABLE), None)
        if oldest is not None:
            self.close(oldest)
        return oldest is not None

    def expire(self) -> float:
        """Act on every passed deadline; return the next one."""
        now, next_deadline = self.clock(), math.inf
        for conn in list(self._open):
            if conn.deadline <= now:
                self._guarded(conn, self._expired)
            if conn in self._open:
                next_deadline = min(next_deadline, conn.deadline)
        return next_deadline

    def close(self, conn: Connection) -> None:
        if conn not in self._open:
            return
        del self._open[conn]
        with suppress(KeyError, ValueError):  # not watched while in a handler
            self.selector.unregister(conn.sock)
        conn.sock.close()

    def _guarded(self, conn: Connection, action: Callable[..., None], *args: Any) -> None:
        """Run `action` on `conn`: a bug must cost that connection, never the listener."""
        try:
            action(conn, *args)
        except Exception:
            log.exception("admin listener: unexpected error; closing the connection")
            self.close(conn)

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
            self.close(conn)
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
                self.close(conn)

    def _dispatch(self, conn: Connection) -> None:
        conn.state, conn.deadline = BUSY, math.inf
        self.selector.unregister(conn.sock)
        self.dispatch(conn)

    def _resume(self, conn: Connection, answer: bytes) -> None:
        self.selector.register(conn.sock, selectors.EVENT_READ, conn)
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
            return self.close(conn)
        if sent:
            conn.out, conn.deadline = conn.out[sent:], self.clock() + self.send_timeout
        if conn.out:
            self.selector.modify(conn.sock, selectors.EVENT_WRITE, conn)
            return
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return self.close(conn)
        conn.state = LINGER
        self.selector.modify(conn.sock, selectors.EVENT_READ, conn)

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
            self.close(conn)
