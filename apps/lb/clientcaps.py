"""The connections one worker holds, against LB_MAX_CLIENT_CONNECTIONS and
LB_MAX_CONNECTIONS_PER_CLIENT.

At a cap the connection idle longest (or else the one slowest to send its head)
makes room for the new one, so idle and slow connections can never shut new
clients out; when none can, the new one gets BUSY_ANSWER.
"""
from __future__ import annotations

import time
from collections import Counter
from typing import Any, Callable

from apps.lb.clientsocket import HEAD, IDLE, ClientSocket, canned

# A connection still sending its head after this long is taken for a slow one:
# when no idle connection can make room at a cap, the oldest such one does.
SLOW_HEAD_S = 1.0

BUSY_ANSWER = canned(503, "Service Unavailable", "too many connections: try again")


class ClientConnections:
    """The connections one worker holds, against its caps."""

    def __init__(self, cap: int, per_client: int, exempt: Callable[[str], bool],
                 on_change: Callable[[int, int], None] = lambda open_, busy: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cap, self.per_client, self.exempt = cap, per_client, exempt
        self.clock = clock
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
        now = self.clock()
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
