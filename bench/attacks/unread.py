"""The never-reading client: asks for a large answer and reads not one byte of it.

It learns the status by peeking (MSG_PEEK), which reads nothing, and sees a
close only as a reset or a FIN, by polling the socket's TCP state."""
from __future__ import annotations

import asyncio
import socket

from bench.attacks.connection import Tally, forever, status_of

NEVER_READ_BODY = 4_000_000
# The kernel doubles it; the least it allows is about 2 KB.
NEVER_READ_RCVBUF = 4096
TCP_ESTABLISHED = 1


async def never_read(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """A GET of NEVER_READ_BODY bytes (the echo backend's /bytes/<n>), then nothing."""
    # The size is read at each connection, so a caller may set NEVER_READ_BODY.
    await loop.sock_sendall(
        sock, f"GET /bytes/{NEVER_READ_BODY} HTTP/1.1\r\nHost: lb\r\n\r\n".encode())
    await forever()


async def watch_unread(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                       tally: Tally) -> None:
    """Read nothing; peek at the answer's status, and poll the TCP state for a close."""
    seen = False
    while True:
        if not seen:
            try:
                status = status_of(sock.recv(12, socket.MSG_PEEK | socket.MSG_DONTWAIT))
            except (BlockingIOError, InterruptedError):
                status = None
            except OSError:
                return
            if status is not None:
                tally.statuses[status] += 1
                seen = True
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
        if state != TCP_ESTABLISHED:
            return
        await asyncio.sleep(0.25)
