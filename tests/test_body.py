"""The request body: held whole when small, spooled to a temporary file (or streamed,
with buffering off) when large, capped either way."""
from __future__ import annotations

import io
import tempfile

import pytest
from werkzeug.exceptions import RequestEntityTooLarge

from apps.lb.body import BodyTooSlow, ClientGone, RequestBody, foreign_codings


def environ(data: bytes, *, length: int | None = None, chunked: bool = False,
            stream: io.RawIOBase | None = None) -> dict:
    env = {"wsgi.input": stream or io.BytesIO(data), "wsgi.input_terminated": chunked}
    if length is not None:
        env["CONTENT_LENGTH"] = str(length)
    return env


def sent(body: RequestBody) -> bytes:
    out = body.upstream()
    return out if isinstance(out, bytes) or out is None else b"".join(out)


def test_no_body():
    body = RequestBody.read(environ(b""), limit=100, buffer=10)
    assert body.complete and body.upstream() is None and body.content_length() is None


@pytest.mark.parametrize("chunked", [False, True])
def test_a_small_body_is_held_whole_and_can_be_sent_again(chunked):
    data = b'{"a": 1}'
    body = RequestBody.read(environ(data, length=None if chunked else len(data), chunked=chunked),
                            limit=100, buffer=10)
    assert body.complete and body.replayable
    assert body.upstream() == data and body.upstream() == data
    assert body.content_length() == len(data)


def test_a_large_body_with_a_length_is_streamed_once():
    data = bytes(range(256)) * 1000
    body = RequestBody.read(environ(data, length=len(data)), limit=10**6, buffer=1000,
                            buffering=False)
    assert not body.complete and body.replayable and body.content_length() == len(data)
    assert sent(body) == data
    assert not body.replayable


def test_a_large_chunked_body_is_streamed_without_a_length():
    data = b"x" * 300_000
    body = RequestBody.read(environ(data, chunked=True), limit=10**6, buffer=1000,
                            buffering=False)
    assert body.content_length() is None  # urllib3 sends it chunked
    assert sent(body) == data


def test_a_declared_length_over_the_limit_is_refused_before_reading():
    stream = io.BytesIO(b"never read")
    with pytest.raises(RequestEntityTooLarge):
        RequestBody.read(environ(b"", length=101, stream=stream), limit=100, buffer=10)
    assert stream.tell() == 0


def test_a_small_chunked_body_over_the_limit_is_refused():
    with pytest.raises(RequestEntityTooLarge):
        RequestBody.read(environ(b"x" * 101, chunked=True), limit=100, buffer=1000)


def test_a_streamed_chunked_body_over_the_limit_is_refused_mid_stream():
    body = RequestBody.read(environ(b"x" * 5000, chunked=True), limit=4000, buffer=1000,
                            buffering=False)
    with pytest.raises(RequestEntityTooLarge):
        sent(body)


@pytest.mark.parametrize("buffer, buffering", [(1000, True), (10, True), (10, False)])
def test_a_body_shorter_than_its_length_means_the_client_left(buffer, buffering):
    with pytest.raises(ClientGone):
        sent(RequestBody.read(environ(b"x" * 50, length=100), limit=1000, buffer=buffer,
                              buffering=buffering))


@pytest.fixture
def spools(monkeypatch) -> list:
    """Every temporary file the body code opens."""
    made = []
    real = tempfile.TemporaryFile

    def recorded(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(tempfile, "TemporaryFile", recorded)
    return made


@pytest.mark.parametrize("chunked", [False, True])
def test_a_large_body_is_spooled_whole_and_can_be_sent_again(spools, chunked):
    data = bytes(range(256)) * 1000
    stream = io.BytesIO(data)
    body = RequestBody.read(environ(data, length=None if chunked else len(data),
                                    chunked=chunked, stream=stream), limit=10**6, buffer=1000)
    assert stream.tell() == len(data)  # read to its end before any backend is picked
    assert body.complete and body.replayable
    # A chunked upload goes out with its exact length, as nginx sends it.
    assert body.content_length() == len(data)
    assert sent(body) == data and sent(body) == data
    assert len(spools) == 1 and not spools[0].closed
    body.close()
    assert spools[0].closed


def test_a_small_body_needs_no_temporary_file(spools):
    body = RequestBody.read(environ(b"x" * 1000, length=1000), limit=10**6, buffer=1000)
    body.close()
    assert body.upstream() == b"x" * 1000 and spools == []


class Timing(io.RawIOBase):
    """An input stream whose reads time out after `good` bytes, as a client deadline does."""

    def __init__(self, good: int) -> None:
        self.left = good

    def read(self, size=-1):
        if self.left <= 0:
            raise TimeoutError("timed out")
        size = min(size, self.left)
        self.left -= size
        return b"x" * size


@pytest.mark.parametrize("failure, stream", [
    (ClientGone, io.BytesIO(b"x" * 5000)),  # shorter than its length
    (RequestEntityTooLarge, io.BytesIO(b"x" * 20_000)),  # chunked, past the limit
    (BodyTooSlow, Timing(good=5000)),
])
def test_a_body_that_fails_while_spooled_leaves_no_file_open(spools, failure, stream):
    length = None if failure is RequestEntityTooLarge else 10_000
    with pytest.raises(failure):
        RequestBody.read(environ(b"", length=length, chunked=length is None, stream=stream),
                         limit=10_000, buffer=1000)
    assert len(spools) == 1 and spools[0].closed


@pytest.mark.parametrize("buffer, buffering", [(100, True), (10, True), (10, False)])
def test_a_body_read_that_times_out_is_a_408_not_a_400(buffer, buffering):
    with pytest.raises(BodyTooSlow) as caught:
        sent(RequestBody.read(environ(b"", length=50, stream=Timing(good=20)), limit=100,
                              buffer=buffer, buffering=buffering))
    assert caught.value.code == 408 and "too slowly" in caught.value.description
    assert not isinstance(caught.value, OSError)  # urllib3 would blame the backend


class Broken(io.RawIOBase):
    def read(self, size=-1):
        raise OSError("connection reset by peer")


def test_a_read_error_is_the_clients_not_the_backends():
    with pytest.raises(ClientGone) as caught:
        RequestBody.read(environ(b"", length=10, stream=Broken()), limit=100, buffer=100)
    assert not isinstance(caught.value, OSError)  # urllib3 would blame the backend


@pytest.mark.parametrize("value, foreign", [
    ("chunked", []), ("Chunked", []), ("gzip, chunked", ["gzip"]),
    ("GZIP,\tChunked", ["gzip"]), ("identity , chunked", ["identity"]), ("", []),
])
def test_transfer_codings_other_than_chunked_are_found(value, foreign):
    assert foreign_codings(value) == foreign
