"""Relaying a backend's answer to the client as it comes, piece by piece.

BodyStream relays at the client's pace; BufferedBody (apps/lb/buffered.py)
reads the backend out first. Either ends once, through an Ending: the
connection is freed and the attempt's end told (complete, broken off by the
backend, or left by the client).
"""
from __future__ import annotations

import errno
from typing import Callable, Iterator

from urllib3.exceptions import HTTPError

from apps.lb.upstream import STREAM_CHUNK, Response, UpstreamError, classify, discard


def start_stream(response: Response) -> tuple[bytes, Iterator[bytes]]:
    """The first piece of a body to be streamed, and the iterator for the rest.

    Reading the first piece before answering means a backend that fails right
    after its head still gets a clean 502/504 and a retry. Raises UpstreamError.
    """
    pieces = response.stream(STREAM_CHUNK, decode_content=False)
    try:
        return next(pieces, b""), pieces
    except HTTPError as exc:
        discard(response)
        raise classify(exc) from exc


class BodyStream:
    """A response body relayed piece by piece.

    `on_end(error, complete)` runs exactly once: (None, True) when the body is
    done; (the UpstreamError, False) when the backend cut it short; (None,
    False) when the WSGI server closed the stream before its end, even if it
    was never iterated: the client left or stopped reading, no fault of the
    backend's.
    """

    def __init__(self, response: Response,
                 start: tuple[bytes, Iterator[bytes]],
                 on_end: Callable[[UpstreamError | None, bool], None]) -> None:
        self._first, self._rest = start
        self._end = Ending(response, on_end)

    def __iter__(self) -> Iterator[bytes]:
        try:
            if self._first:
                yield self._first
            yield from self._rest
        except HTTPError as exc:
            error = classify(exc)
            self._end(error, complete=False)
            # Ending quietly would let Gunicorn close a chunked body as if it were
            # whole; a reset drops the client's connection (Gunicorn logs it at debug).
            raise ConnectionResetError(errno.ECONNRESET, f"upstream broke off: {error}") from exc
        self._end(None, complete=True)

    def close(self) -> None:
        self._end(None, complete=False)


class Ending:
    """Ends the relay of an answer exactly once: frees its connection (dropping what
    is left of a body that did not end whole) and calls `on_end(error, complete)`."""

    def __init__(self, response: Response,
                 on_end: Callable[[UpstreamError | None, bool], None]) -> None:
        self._response, self._on_end = response, on_end
        self._ended = False

    def __call__(self, error: UpstreamError | None, complete: bool) -> None:
        if self._ended:
            return
        self._ended = True
        if not complete:  # leftovers must not reach the next request on this connection
            self._response.close()
        self._response.release_conn()
        self._on_end(error, complete)
