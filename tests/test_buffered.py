"""Answers read as fast as the backend sends them (apps/lb/buffered.py), on a fake response."""
from __future__ import annotations

import threading

import pytest
from urllib3.exceptions import ProtocolError

from apps.lb.buffered import BufferedBody


class FakeResponse:
    """A backend's answer: `pieces` handed out one by one; `gate` (if set) must be
    released before each; a ProtocolError in the list breaks the body off there."""

    def __init__(self, pieces: list, gate: threading.Semaphore | None = None) -> None:
        self.pieces, self.gate = list(pieces), gate
        self.closed = self.released = self.shut = False
        self.read_all = threading.Event()

    def rest(self):
        for piece in self.pieces:
            if self.gate is not None:
                self.gate.acquire()
            if self.shut:
                raise OSError("shut down")
            if isinstance(piece, Exception):
                raise piece
            yield piece
        self.read_all.set()

    def close(self) -> None:
        self.closed = True

    def release_conn(self) -> None:
        self.released = True

    def shutdown(self) -> None:
        self.shut = True
        if self.gate is not None:
            self.gate.release()


def body(response: FakeResponse, memory: int = 10, disk: int = 1000):
    ends: list = []
    done = threading.Event()

    def on_end(error, complete):
        ends.append((error, complete))
        done.set()

    buffered = BufferedBody(response, (b"first", response.rest()), on_end,
                            memory=memory, disk=disk)
    return buffered, ends, done


def test_the_backend_is_read_to_its_end_before_the_client_reads_a_byte():
    response = FakeResponse([b"a" * 8, b"b" * 30, b"c" * 5])  # past memory: into the file
    buffered, ends, done = body(response)
    assert done.wait(5)  # the backend is done, and free, with the client not reading
    assert ends == [(None, True)] and response.released and not response.closed
    assert b"".join(buffered) == b"first" + b"a" * 8 + b"b" * 30 + b"c" * 5
    assert buffered._file is None  # the temporary file is gone


def test_a_backend_that_breaks_off_resets_the_client_after_what_came():
    response = FakeResponse([b"part", ProtocolError("gone", ConnectionResetError())])
    buffered, ends, done = body(response)
    assert done.wait(5)
    (error, complete), = ends
    assert error.kind == "protocol" and not complete and response.closed
    got = []
    with pytest.raises(ConnectionResetError):
        for piece in buffered:
            got.append(piece)
    assert b"".join(got) == b"firstpart"


def test_a_client_that_leaves_early_stops_the_pump_and_is_not_the_backends_fault():
    gate = threading.Semaphore(0)
    response = FakeResponse([b"x"] * 100, gate)
    buffered, ends, done = body(response)
    buffered.close()  # the client left; the pump waits on the backend
    assert done.wait(5)
    assert ends == [(None, False)] and response.shut and response.closed


def test_past_the_disk_bound_the_pump_waits_for_the_client():
    response = FakeResponse([b"y" * 10] * 20)
    buffered, ends, done = body(response, memory=10, disk=30)
    pieces = iter(buffered)
    assert next(pieces) == b"first"
    assert not done.wait(0.3) and not response.read_all.is_set()  # held back, not read ahead
    rest = b"".join(pieces)
    assert len(rest) == 200 and done.wait(5) and ends == [(None, True)]


def test_an_answer_already_read_whole_is_reported_once_whatever_the_client_does():
    response = FakeResponse([b"z" * 5])
    buffered, ends, done = body(response)
    assert done.wait(5)
    buffered.close()  # the client leaves after the backend was done: nothing more
    assert ends == [(None, True)]
