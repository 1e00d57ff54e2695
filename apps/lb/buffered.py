"""A backend's answer read as fast as the backend sends it, whatever the client's pace.

Relayed piece by piece at the client's pace, a large answer holds the backend
(its connection, and on a threaded backend a thread) for as long as the
client takes to read it: a hundred clients that never read can take every
thread of the backends. As nginx's `proxy_buffering` does, a pump (a greenlet
under the gevent worker) reads the answer to its end into a buffer, in memory
up to LB_RESPONSE_BUFFER and beyond that in a temporary file up to
LB_MAX_RESPONSE_TEMP (past it the pump waits for the client), and the backend
is free as soon as it has sent its last byte. The client is fed from the
buffer; one that leaves early stops the pump.
"""
from __future__ import annotations

import errno
import tempfile
import threading
from collections import deque
from typing import IO, Callable, Iterator

from urllib3.exceptions import HTTPError

from apps.lb.body import let_others_run
from apps.lb.relay import Ending
from apps.lb.upstream import STREAM_CHUNK, Response, UpstreamError, classify
from apps.lb.policy import BROKEN


class BufferedBody:
    """An answer's body, pumped from the backend into a buffer and served from it.

    `on_end(error, complete)` runs exactly once, from whichever side ends first:
    (None, True) when the backend sent its whole body, (the UpstreamError, False)
    when the backend cut it short, (None, False) when the client left before the
    backend was done. The client sees the body whole or, if the backend broke
    off, has its connection reset after the part that came.
    """

    def __init__(self, response: Response, start: tuple[bytes, Iterator[bytes]],
                 on_end: Callable[[UpstreamError | None, bool], None], *,
                 memory: int, disk: int) -> None:
        first, self._rest = start
        self._response, self._end = response, Ending(response, on_end)
        self._memory, self._disk = memory, disk
        self._cond = threading.Condition()
        self._chunks: deque[bytes] = deque([first] if first else [])
        self._in_memory = len(first)
        self._file: IO[bytes] | None = None
        self._file_read = self._file_written = 0
        self._done = self._closed = False
        self._error: UpstreamError | None = None
        threading.Thread(target=self._pump, name="lb-pump", daemon=True).start()

    # --- the client's side ------------------------------------------------------------

    def __iter__(self) -> Iterator[bytes]:
        while True:
            with self._cond:
                while not self._has_data() and not self._done:
                    self._cond.wait()
                data = self._take()
                self._cond.notify_all()  # room for the pump
            if not data:
                break
            yield data
        self._drop_file()
        if self._error is not None:
            # Ending quietly would let Gunicorn close a chunked body as if it were
            # whole; a reset drops the client's connection instead.
            raise ConnectionResetError(errno.ECONNRESET, f"upstream broke off: {self._error}")

    def close(self) -> None:
        """The WSGI server is done with the body (read or not): stop the pump."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            pumping = not self._done
        if pumping:  # it may be waiting on the backend: wake it
            shutdown = getattr(self._response, "shutdown", None)
            if shutdown is not None:
                shutdown()
        self._drop_file()

    # --- the backend's side -------------------------------------------------------------

    def _pump(self) -> None:
        error: UpstreamError | None = None
        try:
            for chunk in self._rest:
                with self._cond:
                    while self._spooled() >= self._disk and not self._closed:
                        self._cond.wait()  # the client is that far behind: let it catch up
                    if self._closed:
                        break
                    self._add(chunk)
                    self._cond.notify_all()
                let_others_run()
        except HTTPError as exc:
            error = None if self._closed else classify(exc)
        except Exception as exc:  # a socket shut by close(), or the file's disk full
            error = None if self._closed else UpstreamError(
                BROKEN, f"relaying the answer failed: {type(exc).__name__}: {exc}")
        with self._cond:
            complete = error is None and not self._closed
            self._done, self._error = True, error
            self._cond.notify_all()
        self._end(error, complete)

    # --- the buffer (the caller holds the condition's lock) --------------------------

    def _add(self, chunk: bytes) -> None:
        # Once anything is in the file, later pieces follow it there, to keep order.
        if self._file_written > self._file_read or self._in_memory + len(chunk) > self._memory:
            if self._file is None:
                self._file = tempfile.TemporaryFile(prefix="lb-answer-")
            self._file.seek(self._file_written)
            self._file.write(chunk)
            self._file_written += len(chunk)
        else:
            self._chunks.append(chunk)
            self._in_memory += len(chunk)

    def _take(self) -> bytes:
        if self._chunks:
            data = self._chunks.popleft()
            self._in_memory -= len(data)
            return data
        if self._file_written > self._file_read:
            self._file.seek(self._file_read)
            data = self._file.read(min(STREAM_CHUNK, self._file_written - self._file_read))
            self._file_read += len(data)
            return data
        return b""

    def _has_data(self) -> bool:
        return bool(self._chunks) or self._file_written > self._file_read

    def _spooled(self) -> int:
        return self._file_written - self._file_read

    def _drop_file(self) -> None:
        with self._cond:
            if self._file is not None and (self._done or self._closed):
                self._file.close()
                self._file = None
                self._file_read = self._file_written = 0
