"""What every attacking connection shares: its Tally, the Writer and Watcher it runs,
reading the first status of an answer, and idling until the server ends it."""
from __future__ import annotations

import asyncio
import socket
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Awaitable, Callable, Sequence

from bench.stats import percentile

Target = tuple[str, int]
Sources = str | Sequence[str] | None


@dataclass
class Tally:
    """What the server did to one kind's connections."""

    kind: str
    count: int
    opened: int = 0          # connections established
    failed: int = 0          # attempts that never connected (refused, timed out, no descriptor)
    closed: int = 0          # connections the server ended (FIN, reset, a failed write)
    statuses: Counter = field(default_factory=Counter)   # first answer's status, per connection
    open_now: int = 0
    peak_open: int = 0
    lived_s: list[float] = field(default_factory=list)    # how long each closed one lasted

    def as_dict(self) -> dict[str, Any]:
        lived = sorted(self.lived_s)
        out = asdict(self)
        out["statuses"] = {str(k): v for k, v in sorted(self.statuses.items())}
        del out["lived_s"]
        out["lived_p50_s"] = round(percentile(lived, 50), 3) if lived else None
        return out


# What a kind writes: a coroutine that returns only when the server ends it.
Writer = Callable[[asyncio.AbstractEventLoop, socket.socket], Awaitable[None]]
# How a kind notices the server's answer and close.
Watcher = Callable[[asyncio.AbstractEventLoop, socket.socket, Tally], Awaitable[None]]


async def forever() -> None:
    """Wait until cancelled: where every writer ends once it has nothing left to send."""
    await asyncio.Event().wait()


def status_of(data: bytes) -> int | None:
    """The status of an answer that starts with `data`, if it is an HTTP answer."""
    if data.startswith(b"HTTP/") and len(data) >= 12 and data[9:12].isdigit():
        return int(data[9:12])
    return None


async def read_until_closed(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                            tally: Tally) -> None:
    """Read (and drop) whatever the server sends, noting the first status, until it closes."""
    start = b""
    try:
        while data := await loop.sock_recv(sock, 65536):
            if start is not None:
                start += data
                if len(start) >= 12:
                    status = status_of(start)
                    if status is not None:
                        tally.statuses[status] += 1
                    start = None
    except OSError:
        pass  # a reset: closed all the same
