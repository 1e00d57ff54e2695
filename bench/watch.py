"""The admin's /status, polled while a load runs: did any backend get blocked, or
lose part of its share? (`python -m bench --admin URL`.)"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import requests

POLL_S = 0.1


@dataclass
class Watch:
    """What the polls saw: per backend id, its least share and the blocks it had."""

    polls: int = 0
    failed_polls: int = 0
    least_share: dict[str, float] = field(default_factory=dict)
    blocks: dict[str, tuple[int, int]] = field(default_factory=dict)  # (first seen, last)

    def see(self, status: dict[str, Any]) -> None:
        self.polls += 1
        for b in status.get("backends", []):
            share = 0.0 if b.get("blocked") else float(b.get("share", 1.0))
            self.least_share[b["id"]] = min(share, self.least_share.get(b["id"], share))
            first = self.blocks.get(b["id"], (b["blocks"], b["blocks"]))[0]
            self.blocks[b["id"]] = (first, b["blocks"])

    def report(self) -> str:
        """One line per backend, and whether the pool stayed whole and even."""
        lines = [f"/status polled {self.polls} times every {POLL_S:g} s "
                 f"({self.failed_polls} polls failed):"]
        for backend, share in self.least_share.items():
            first, last = self.blocks[backend]
            lines.append(f"  {backend}: least share {share:g}, blocks {last - first} new")
        lines.append("pool: " + ("every backend at share 1 and no block throughout" if self.even
                                 else "NOT even: a share fell below 1 or a block began"))
        return "\n".join(lines)

    @property
    def even(self) -> bool:
        return self.polls > 0 and all(s == 1.0 for s in self.least_share.values()) and \
            all(first == last for first, last in self.blocks.values())

    def to_dict(self) -> dict[str, Any]:
        return {"polls": self.polls, "failed_polls": self.failed_polls, "even": self.even,
                "least_share": self.least_share,
                "new_blocks": {b: last - first for b, (first, last) in self.blocks.items()}}


@contextmanager
def watching(admin: str) -> Iterator[Watch]:
    """Poll `admin`/status every POLL_S from a thread until the block ends (and once more)."""
    watch, stop = Watch(), threading.Event()
    session = requests.Session()

    def poll() -> None:
        try:
            watch.see(session.get(f"{admin}/status", timeout=5).json())
        except (requests.RequestException, ValueError):
            watch.failed_polls += 1

    def loop() -> None:
        while not stop.is_set():
            poll()
            stop.wait(POLL_S)

    thread = threading.Thread(target=loop, daemon=True)
    poll()
    thread.start()
    try:
        yield watch
    finally:
        stop.set()
        thread.join()
        poll()
        session.close()
