"""HTTP/1.1 on asyncio streams, as the load generator and the attackers speak it:
a request's bytes, and one response read whole."""
from __future__ import annotations

import asyncio
from typing import Mapping


class Closed(Exception):
    """The server closed a kept-alive connection before answering (an idle close)."""


async def read_response(reader: asyncio.StreamReader,
                        head_only: bool = False) -> tuple[int, bool, bytes]:
    """Read one whole response; return its status, whether the connection stays open,
    and its body."""
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise Closed from None
            raise
        status = int(head[9:12])
        if status >= 200 or status == 101:
            break        # 1xx other than 101 are interim: the real answer follows
    lower, http10 = head.lower(), head.startswith(b"HTTP/1.0")
    at = lower.find(b"\r\nconnection:")
    if at >= 0:
        value = lower[at:lower.index(b"\r\n", at + 2)]
        keep = b"close" not in value and (b"keep-alive" in value or not http10)
    else:
        keep = not http10
    if head_only or status in (204, 304):
        return status, keep, b""
    at = lower.find(b"\r\ncontent-length:")
    body = b""
    if at >= 0:
        length = int(lower[at + 17:lower.index(b"\r\n", at + 17)])
        if length:
            body = await reader.readexactly(length)
    elif b"chunked" in lower and b"\r\ntransfer-encoding:" in lower:
        chunks = []
        while size := int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16):
            chunks.append((await reader.readexactly(size + 2))[:-2])   # the chunk, no CRLF
        while await reader.readuntil(b"\r\n") != b"\r\n":
            pass                                    # trailers
        body = b"".join(chunks)
    else:
        body = await reader.read()                  # delimited by the close
        keep = False
    return status, keep, body


def request_bytes(method: str, host: str, port: int, target: str, body: bytes,
                  headers: Mapping[str, str] | None = None) -> bytes:
    """One HTTP/1.1 request, ready to write: a Content-Length when there is a body."""
    head = f"{method} {target} HTTP/1.1\r\nHost: {host}:{port}\r\n"
    if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
        head += f"Content-Length: {len(body)}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    return head.encode("latin-1") + b"\r\n" + body
