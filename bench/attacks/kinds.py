"""Every attack kind by name: what it writes, how it watches, its receive buffer."""
from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

from bench.attacks import slow, unread
from bench.attacks.connection import Watcher, Writer, forever, read_until_closed


async def idle(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Connects and sends nothing."""
    await forever()


@dataclass(frozen=True)
class Kind:
    write: Writer
    watch: Watcher = read_until_closed
    rcvbuf: int | None = None


KINDS: dict[str, Kind] = {
    "slowloris": Kind(slow.slowloris),
    "slow_body_small": Kind(slow.slow_body(slow.SMALL_BODY)),
    "slow_body_large": Kind(slow.slow_body(slow.LARGE_BODY)),
    "endless_chunked": Kind(slow.endless_chunked),
    "never_read": Kind(unread.never_read, unread.watch_unread, unread.NEVER_READ_RCVBUF),
    "idle": Kind(idle),
}
