"""One upstream exchange: a request sent to one backend, and its answer read or started.

`Exchange.__call__` is the whole of an attempt as seen from the upstream side:
it sends, waits for the head within the time left, then reads a small or
retryable body whole, or starts relaying a large one (piece by piece, or
through a buffer with LB_RESPONSE_BUFFERING). It returns one `Answer`, or
raises the one `UpstreamError` (kind, delivered) that stood in the way.

Either way it tells `on_end` exactly once how the attempt ended: at once for
a failure or a body read whole, later for a relayed body (when the backend
has sent its last byte, broken off, or the client has left).
"""
from __future__ import annotations

import time
from http.client import HTTPMessage
from dataclasses import dataclass
from typing import Callable, Iterator

import urllib3
from werkzeug.exceptions import HTTPException

from apps.lb.buffered import BufferedBody
from apps.lb.relay import BodyStream, start_stream
from apps.lb.upstream import STREAM_CHUNK, Response, UpstreamError, Upstreams, read_capped
from scorer.pool import Outcome
from apps.config import Backend, Settings

# How an attempt ended, as `on_end` hears it.
ANSWERED = "answered"  # a status, with its body (if any) relayed whole
FAILED = "failed"      # no usable answer: nothing came, or the body broke before a byte went on
BROKEN = "broken"      # the backend broke off a body already being relayed
CLIENT = "client"      # the client ended it (its body, or leaving early): no fault of the backend's
ABORTED = "aborted"    # cut by something else (a worker timeout, a bug): nothing to record

# on_end(how, backend, outcome, error): the outcome is what the pool is told
# (None for CLIENT and ABORTED); the error is the UpstreamError of FAILED and BROKEN.
OnEnd = Callable[[str, Backend, Outcome | None, UpstreamError | None], None]


def has_no_body(method: str, status: int) -> bool:
    """Answers that never carry a body, whatever their Content-Length says."""
    return method == "HEAD" or status in (204, 304)


@dataclass(slots=True)
class Answer:
    """A backend's answer: `body` is bytes read whole, a relay still to run, or None
    (a retryable answer too large to keep). `retryable`: its status is one of
    LB_RETRY_ON_STATUS."""

    status: int
    headers: HTTPMessage  # repeated headers kept, in order
    body: bytes | BodyStream | BufferedBody | None
    latency: float
    retryable: bool


class Exchange:
    """Makes one upstream exchange per call, on a worker's shared `Upstreams`."""

    def __init__(self, settings: Settings, upstreams: Upstreams,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.upstreams = upstreams
        self.clock = clock
        self._connect_timeout, self._read_timeout = settings.connect_timeout, settings.read_timeout
        self._retry_on = settings.retry_on_status
        self._buffering = settings.response_buffering
        self._memory, self._disk = settings.response_buffer, settings.max_response_temp

    def __call__(self, backend: Backend, method: str, target: str, headers: dict[str, str],
                 body: bytes | Iterator[bytes] | None, remaining: float,
                 on_end: OnEnd) -> Answer:
        """Send the request, waiting at most `remaining` seconds for each step, and
        return its answer. Raises UpstreamError; an HTTPException from the client's
        body (it broke off, stalled or grew too large) passes through."""
        timeout = urllib3.Timeout(connect=min(self._connect_timeout, remaining),
                                  read=min(self._read_timeout, remaining))
        started = self.clock()
        try:
            upstream = self.upstreams.send(backend, method, target, headers, body, timeout)
            latency = self.clock() - started
        except UpstreamError as err:
            on_end(FAILED, backend, Outcome(backend, self.clock() - started, error=err.kind), err)
            raise
        except HTTPException:
            on_end(CLIENT, backend, None, None)
            raise
        except BaseException:
            on_end(ABORTED, backend, None, None)
            raise
        status = upstream.status
        retryable = status in self._retry_on
        try:
            content = self._body(backend, method, upstream, status, retryable, latency,
                                 on_end)
        except UpstreamError as err:
            on_end(FAILED, backend, Outcome(backend, latency, error=err.kind), err)
            raise
        except BaseException:
            on_end(ABORTED, backend, None, None)
            raise
        if not isinstance(content, (BodyStream, BufferedBody)):  # read whole: it ends now
            on_end(ANSWERED, backend, Outcome(backend, latency, status=status), None)
        return Answer(status, upstream.headers, content, latency, retryable)

    def _body(self, backend: Backend, method: str, upstream: Response,
              status: int, retryable: bool, latency: float,
              on_end: OnEnd) -> bytes | BodyStream | BufferedBody | None:
        """The answer's body read whole, or its relay, which ends the attempt itself."""
        length = upstream.headers.get("Content-Length", "")
        if retryable or has_no_body(method, status) or (
                length.isdigit() and int(length) <= STREAM_CHUNK):
            # Small bodies are read whole; a retryable answer is kept (if small)
            # to relay in case no retry follows.
            return read_capped(upstream, STREAM_CHUNK)
        start = start_stream(upstream)  # raises before any relay owns the end
        ended = lambda err, complete: self._relay_ended(  # noqa: E731
            on_end, backend, latency, status, err, complete)
        if self._buffering:  # the backend is free when it is done
            return BufferedBody(upstream, start, ended, memory=self._memory, disk=self._disk)
        return BodyStream(upstream, start, on_end=ended)

    @staticmethod
    def _relay_ended(on_end: OnEnd, backend: Backend, latency: float, status: int,
                     err: UpstreamError | None, complete: bool) -> None:
        if err is not None:
            on_end(BROKEN, backend, Outcome(backend, latency, error=err.kind), err)
        elif complete:
            on_end(ANSWERED, backend, Outcome(backend, latency, status=status), None)
        else:  # the WSGI server closed the body before its end: the client left
            on_end(CLIENT, backend, None, None)
