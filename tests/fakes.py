"""Fake backends for driving the proxy without processes (tests/test_forwarder.py).

They stand in for `Upstreams` and nothing more: the same `send`, the same exceptions
(an UpstreamError of the kind and `delivered` the real one raises for that fault),
a real urllib3 response for an answer (the interface of upstream.Response); a slow one moves a fake clock instead of
sleeping.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Iterator

import urllib3

from apps.lb.upstream import UpstreamError
from apps.lb.policy import BROKEN, CONNECT_REFUSED, READ_TIMEOUT
from apps.config import Backend


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Reply:
    """What a fake backend does with one request: answer `status` and `body` after
    `delay` seconds, or fail as `fault` says ("refused": no connection; "reset": the
    connection broke after the request went; "cut": the body ends before its
    Content-Length, the connection closed; "bug": what no backend causes)."""

    status: int = 200
    body: bytes = b"ok"
    delay: float = 0.0
    fault: str | None = None


@dataclass
class Sent:
    backend: str
    method: str
    headers: dict[str, str]
    body: bytes | None  # None: it never reached the backend
    timeout: urllib3.Timeout


@dataclass
class FakeUpstreams:
    """Answers each request with the next scripted Reply (then plain 200s), as
    `Upstreams.send` would: it raises what the real one raises for that fault."""

    clock: FakeClock
    replies: list[Reply] = field(default_factory=list)
    sent: list[Sent] = field(default_factory=list)

    def send(self, backend: Backend, method: str, target: str, headers: dict[str, str],
             body: bytes | Iterator[bytes] | None,
             timeout: urllib3.Timeout) -> urllib3.BaseHTTPResponse:
        reply = self.replies.pop(0) if self.replies else Reply()
        if reply.fault == "refused":  # as open_connection: nothing was sent
            self.sent.append(Sent(backend.id, method, headers, None, timeout))
            raise UpstreamError(CONNECT_REFUSED, "connection refused or unreachable")
        received = body if isinstance(body, bytes) or body is None else b"".join(body)
        self.sent.append(Sent(backend.id, method, headers, received or b"", timeout))
        if reply.fault == "bug":  # Upstreams.send lets what it does not know pass
            raise RuntimeError("not a backend's fault")
        if reply.fault == "reset":
            raise UpstreamError(BROKEN, "connection broken: ConnectionResetError()")
        if reply.delay > timeout.read_timeout:  # as urllib3: waits that long, then gives up
            self.clock.advance(timeout.read_timeout)
            raise UpstreamError(READ_TIMEOUT, "timed out waiting for an answer")
        self.clock.advance(reply.delay)
        length = len(reply.body) + (1 if reply.fault == "cut" else 0)
        return urllib3.HTTPResponse(io.BytesIO(reply.body), status=reply.status,
                                    headers={"Content-Length": str(length)},
                                    preload_content=False)
