"""The client's request body: read whole before a backend is picked, or streamed.

A body up to `buffer` bytes is held in memory. A larger one (or a chunked
upload that outgrows the buffer) is read on into a temporary file, as nginx's
`proxy_request_buffering` does, so that a slow upload holds no backend and a
retry can send it again; with buffering off it is streamed to the backend in
bounded memory instead: what was read so far, then the rest as it arrives.
Either way the total is capped at `limit` (413 past it), with or without a
Content-Length.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from typing import IO, Any, Iterator, Mapping

from werkzeug.exceptions import BadRequest, RequestEntityTooLarge, RequestTimeout

CHUNK = 64 * 1024
# Pieces a body is spooled in: larger reads cost Gunicorn's reader fewer copies.
SPOOL_CHUNK = 1024 * 1024


def let_others_run() -> None:
    """Yield to the worker's other requests: a greenlet copying a large body never
    waits while data is at hand, so without this it would keep the worker to itself
    (under gthread this only lets another thread take the GIL)."""
    time.sleep(0)


def foreign_codings(transfer_encoding: str) -> list[str]:
    """The request's transfer codings other than chunked, lower-cased.

    Gunicorn takes the chunked framing off and passes, say, `gzip, chunked`
    on, leaving the gzip bytes to the app; sent upstream as a plain body
    they would lose all sign of their coding, so such requests get 501
    (RFC 9112 6.1).
    """
    codings = (c.strip(" \t").lower() for c in transfer_encoding.split(","))
    return [c for c in codings if c and c != "chunked"]


class ClientGone(BadRequest):
    """The client stopped sending its body (disconnect or broken framing)."""

    description = "the request body ended early or could not be read"


class BodyTooSlow(RequestTimeout):
    """The client's body stalled or trickled past the balancer's deadline (408)."""

    description = "the request body arrived too slowly"


@dataclass
class RequestBody:
    """A request body: whole (`complete`) in memory or in a temporary file
    (`spool`), or as a prefix plus the unread rest (`stream`)."""

    prefix: bytes
    complete: bool
    length: int | None  # the declared Content-Length (or spooled size), None for chunked
    stream: IO[bytes] | None = None
    limit: int = 0
    started: bool = False  # streaming began: the body cannot be sent again
    spool: IO[bytes] | None = None

    @classmethod
    def read(cls, environ: Mapping[str, Any], limit: int, buffer: int,
             buffering: bool = True) -> RequestBody:
        """Read the body (up to `buffer` bytes of it unless `buffering`); raise 413
        when it is over `limit`. The caller must `close` it."""
        stream = environ["wsgi.input"]
        raw_length = environ.get("CONTENT_LENGTH")
        length = int(raw_length) if raw_length else None  # Gunicorn has checked it
        if length is not None and length > limit:
            raise RequestEntityTooLarge()
        if length is None and not environ.get("wsgi.input_terminated"):
            return cls(b"", True, None)  # no length and no chunked framing: no body
        want = length if length is not None and length <= buffer else min(buffer + 1, limit + 1)
        prefix = _read(stream, want)
        if length is not None:
            if length <= buffer:
                if len(prefix) < length:
                    raise ClientGone()
                return cls(prefix, True, length)
        elif len(prefix) > limit:
            raise RequestEntityTooLarge()
        elif len(prefix) <= buffer:
            return cls(prefix, True, None)
        rest = cls(prefix, False, length, stream, limit)
        return rest.spooled() if buffering else rest

    def spooled(self) -> RequestBody:
        """This body read to its end into a temporary file, which has no name on
        disk (so it is gone with the process whatever happens) and is closed here
        if the body breaks off or outgrows the limit."""
        spool = tempfile.TemporaryFile()
        try:
            for chunk in self._stream(SPOOL_CHUNK):  # checks the limit and the declared length
                spool.write(chunk)
                let_others_run()
        except BaseException:
            spool.close()
            raise
        return RequestBody(b"", True, spool.tell(), spool=spool)

    def close(self) -> None:
        """Delete the temporary file, if any."""
        if self.spool is not None:
            self.spool.close()

    @property
    def replayable(self) -> bool:
        """Whether the whole body can still be sent (again)."""
        return self.complete or not self.started

    def content_length(self) -> int | None:
        """The Content-Length to send upstream; None means none (no body, or chunked).
        A spooled chunked upload has one: its size."""
        if self.complete and self.spool is None:
            return len(self.prefix) if self.prefix or self.length is not None else None
        return self.length

    def upstream(self) -> bytes | Iterator[bytes] | None:
        """What to hand urllib3: the bytes, an iterator over the temporary file from
        its start (each call), or one that streams the rest once."""
        if self.spool is not None:
            return self._replay()
        if self.complete:
            return self.prefix or None
        return self._stream()

    def _replay(self) -> Iterator[bytes]:
        self.spool.seek(0)
        while chunk := self.spool.read(CHUNK):
            yield chunk
            let_others_run()

    def _stream(self, piece: int = CHUNK) -> Iterator[bytes]:
        self.started = True
        total = len(self.prefix)
        if self.prefix:
            yield self.prefix
        while True:
            want = piece if self.length is None else min(piece, self.length - total)
            if want <= 0:
                return
            chunk = _read(self.stream, want)
            if not chunk:
                if self.length is not None:
                    raise ClientGone()
                return
            total += len(chunk)
            if total > self.limit:
                raise RequestEntityTooLarge()
            yield chunk


def _read(stream: IO[bytes], size: int) -> bytes:
    """Read up to `size` bytes; a client read error becomes ClientGone, a read
    past the client's deadline (TimeoutError) BodyTooSlow.

    Not OSErrors on purpose: urllib3 would take an OSError raised while
    sending the body for the backend's failure.
    """
    chunks, got = [], 0
    try:
        while got < size:
            chunk = stream.read(min(SPOOL_CHUNK, size - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    except TimeoutError as exc:
        raise BodyTooSlow() from exc
    except Exception as exc:
        raise ClientGone() from exc
    return b"".join(chunks)
