"""End to end: request buffering, and attempts that end because of the client.

A slow upload holds no backend and never makes one look slow; a client that
breaks off its upload or leaves a streamed answer is never the backend's
fault: nothing is reported, so the backend's counters in /status do not move.
A backend that breaks off is still blamed.
"""
from __future__ import annotations

import hashlib
import os
import socket
import time

import pytest
import requests

from tests.rawbackend import ScriptedBackend
from tests.support import (
    free_port, gunicorn, metric_samples, spawn, start_balancer, wait_for, worker_pids,
)

pytestmark = pytest.mark.e2e

BUFFER = 16 * 1024  # LB_RETRY_BUFFER: larger bodies are spooled (or streamed)


@pytest.fixture(scope="module")
def reflect(tmp_path_factory):
    port = free_port()
    proc = spawn("reflect", gunicorn("tests.reflect:create_app()", port, "-w", "1",
                                     "--threads", "8"), {}, tmp_path_factory.mktemp("reflect"),
                 [port])
    yield f"http://127.0.0.1:{port}"
    proc.stop()


@pytest.fixture(scope="module")
def buffered(raw_backend, redis_server, tmp_path_factory):
    """The default, LB_REQUEST_BUFFERING=1, in front of the raw backend; its temporary
    files go to a directory of its own (TMPDIR), to be counted."""
    log_dir = tmp_path_factory.mktemp("buffered")
    spool_dir = log_dir / "tmp"
    spool_dir.mkdir()
    proc, url, admin = start_balancer(
        [raw_backend.url], redis_server, log_dir, workers=1, threads=4, name="proxy-buffered",
        env={"LB_RETRY_BUFFER": str(BUFFER), "LB_MAX_BODY": "256k",
             "LB_CHECK_INTERVAL_S": "0", "TMPDIR": str(spool_dir)})
    yield proc, url, admin, spool_dir
    assert "Traceback" not in proc.output()
    proc.stop()


@pytest.fixture(scope="module")
def streaming(reflect, redis_server, tmp_path_factory):
    """LB_REQUEST_BUFFERING=0 in front of the reflect app (which reads chunked uploads)."""
    proc, url, admin = start_balancer(
        [reflect], redis_server, tmp_path_factory.mktemp("streaming"), workers=1, threads=4,
        name="proxy-streaming",
        env={"LB_REQUEST_BUFFERING": "0", "LB_RETRY_BUFFER": str(BUFFER),
             "LB_CHECK_INTERVAL_S": "0"})
    yield url, admin
    assert "Traceback" not in proc.output()
    proc.stop()


def backend_state(admin: str) -> dict:
    """The one backend's counters as /status shows them."""
    [state] = requests.get(f"{admin}/status", timeout=5).json()["backends"]
    return state


def counters(admin: str) -> tuple:
    state = backend_state(admin)
    return state["requests"], state["outcomes"], state["blocked"], state["score"]


def attempts(admin: str, backend: str, result: str) -> float:
    return metric_samples(admin).get(
        f'lb_upstream_attempts_total{{backend="{backend.removeprefix("http://")}",'
        f'result="{result}"}}', 0)


def inflight(admin: str, backend: str) -> float:
    return metric_samples(admin).get(
        f'lb_upstream_inflight{{backend="{backend.removeprefix("http://")}"}}', 0)


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    return data.partition(b"\r\n\r\n")[0]


def assert_not_blamed(admin: str, backend: str, before: tuple, client_ended: float) -> None:
    """Once the attempt is over, the client's abandonment is counted in the metrics
    and the backend's scorer counters are unchanged (no report, so no block)."""
    wait_for(lambda: inflight(admin, backend) == 0 and (
        attempts(admin, backend, "client") > client_ended or counters(admin) != before),
        what="the attempt to end")
    assert counters(admin) == before
    assert attempts(admin, backend, "client") == client_ended + 1


def test_a_client_that_leaves_a_streamed_answer_is_not_the_backends_fault(buffered, raw_backend):
    _, url, admin, _ = buffered
    before, client_ended = counters(admin), attempts(admin, raw_backend.url, "client")
    with connect(url) as sock:  # reads the head of an answer that never ends, then leaves
        sock.sendall(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_head(sock).startswith(b"HTTP/1.1 200")
    assert_not_blamed(admin, raw_backend.url, before, client_ended)


def test_a_backend_that_breaks_off_mid_body_is_still_blamed(buffered, raw_backend):
    _, url, admin, _ = buffered
    requests_before, outcomes, _, _ = counters(admin)
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.get(f"{url}/diemidbody", timeout=10).content  # noqa: B018
    wait_for(lambda: backend_state(admin)["requests"] == requests_before + 1,
             what="the failure reported")
    assert backend_state(admin)["outcomes"]["protocol"] == outcomes.get("protocol", 0) + 1


def test_a_client_whose_streamed_upload_breaks_off_is_not_the_backends_fault(streaming,
                                                                              reflect):
    url, admin = streaming
    before, client_ended = counters(admin), attempts(admin, reflect, "client")
    piece = b"u" * 10_000
    with connect(url) as sock:  # 40 KB of chunks, past the buffer, and no last chunk
        sock.sendall(b"PUT /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + b"%x\r\n%s\r\n" % (len(piece), piece) * 4)
    assert_not_blamed(admin, reflect, before, client_ended)


def test_a_streamed_chunked_upload_goes_out_chunked_and_intact(streaming):
    url, _ = streaming
    body = bytes(range(256)) * 2000  # 512 KB, far past the buffer
    seen = requests.put(f"{url}/upload", timeout=30,
                        data=iter(body[i:i + 100_000] for i in range(0, len(body), 100_000)))
    assert seen.json()["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert dict(seen.json()["headers"]).get("Transfer-Encoding") == "chunked"


def test_a_spooled_chunked_upload_reaches_the_backend_whole_with_its_length(buffered, raw_backend):
    _, url, _, _ = buffered
    body = bytes(range(256)) * 800  # 200 KB: spooled to a temporary file
    raw_backend.seen.clear()
    response = requests.put(f"{url}/spooled", timeout=30,
                            data=iter(body[i:i + 30_000] for i in range(0, len(body), 30_000)))
    assert response.status_code == 200
    [seen] = raw_backend.seen
    assert seen.body == body
    assert f"Content-Length: {len(body)}" in seen.headers
    assert not any(h.lower().startswith("transfer-encoding") for h in seen.headers)


def test_a_slow_upload_never_makes_the_backend_look_slow(buffered, raw_backend):
    """The upload takes seconds; the backend answers at once. The latency clock
    starts once the body is in hand, so the backend's latency stays small."""
    _, url, admin, _ = buffered
    body = b"s" * (4 * BUFFER)
    pieces = [body[i:i + BUFFER // 2] for i in range(0, len(body), BUFFER // 2)]
    with connect(url) as sock:
        sock.sendall(b"PUT /slow HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
        started = time.monotonic()
        for piece in pieces:  # a slow client: 8 pieces, 0.4 s apart
            sock.sendall(piece)
            time.sleep(0.4)
        assert read_head(sock).startswith(b"HTTP/1.1 200")
    upload_ms = (time.monotonic() - started) * 1000
    state = backend_state(admin)
    assert upload_ms > 3000
    # Streamed (LB_REQUEST_BUFFERING=0), the last 2.4 s of the upload would count.
    assert state["last_latency_ms"] < 1000 and state["latency_ms"] < 1000, state


def spool_files(proc, spool_dir) -> int:
    """Deleted files in `spool_dir` the balancer's workers hold open: its request
    bodies (and Gunicorn's heartbeat file, there from the start)."""
    count = 0
    for pid in worker_pids(proc.popen.pid):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            count += target.startswith(str(spool_dir)) and target.endswith("(deleted)")
    return count


def test_the_temporary_file_is_gone_on_every_path(buffered):
    proc, url, _, spool_dir = buffered
    baseline = spool_files(proc, spool_dir)
    body = b"t" * (4 * BUFFER)
    # A client that leaves halfway through: its body is in a temporary file meanwhile.
    with connect(url) as sock:
        sock.sendall(b"PUT /gone HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body[:2 * BUFFER]))
        wait_for(lambda: spool_files(proc, spool_dir) == baseline + 1, what="a body spooled")
    wait_for(lambda: spool_files(proc, spool_dir) == baseline, what="the client's file gone")
    assert requests.put(f"{url}/ok", data=body, timeout=10).status_code == 200
    assert requests.put(f"{url}/dieafterhead", data=body, timeout=10).status_code == 502
    too_large = iter([body] * 5)  # 320 KB, no length given, against LB_MAX_BODY=256k
    assert requests.put(f"{url}/big", data=too_large, timeout=10).status_code == 413
    assert spool_files(proc, spool_dir) == baseline


def test_a_large_body_is_retried_now_that_it_is_buffered(redis_server, tmp_path):
    failing, fine = ScriptedBackend(503), ScriptedBackend(200)
    # A fresh pool's cursor starts at the first backend: the failing one.
    proc, url, _ = start_balancer([failing.url, fine.url], redis_server, tmp_path, workers=1,
                                  env={"LB_RETRY_BUFFER": str(BUFFER),
                                       "LB_CHECK_INTERVAL_S": "0"})
    try:
        body = b"r" * (8 * BUFFER)
        response = requests.put(f"{url}/retry", data=body, timeout=10)
        assert response.status_code == 200
        assert [seen.body for seen in failing.requests + fine.requests] == [body, body]
    finally:
        proc.stop()
        failing.close()
        fine.close()
