"""End to end against a backend that misbehaves at the HTTP level (tests/rawbackend.py)."""
from __future__ import annotations

import json
import socket

import pytest
import requests

from tests.rawbackend import RawBackend
from tests.support import metric_samples, start_balancer, start_echo

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def raw_backend():
    backend = RawBackend()
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def via_raw(raw_backend, redis_server, tmp_path_factory):
    """A balancer with the raw backend as its only backend, one worker so its
    in-flight counts are the ones we watch."""
    log_dir = tmp_path_factory.mktemp("raw")
    proc, url, admin = start_balancer([raw_backend.url], redis_server, log_dir, workers=1,
                                      threads=4, env={"LB_MAX_INFLIGHT": "2",
                                                      "LB_READ_TIMEOUT": "2"})
    yield proc, url, admin
    proc.stop()


def raw_get(url: str, target: str, method: str = "GET") -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


def test_the_target_goes_upstream_exactly_as_sent(via_raw):
    _, url, _ = via_raw
    for target in ['/a|b{c}^d`e%zz"f?q=%ZZ&r=|', "//[::1/x", "/caf%C3%A9/%2F?x=1"]:
        reply = raw_get(url, target)
        body = reply.partition(b"\r\n\r\n")[2]
        assert json.loads(body)["target"] == target


def test_options_star_stays_star(via_raw):
    _, url, _ = via_raw
    body = raw_get(url, "*", method="OPTIONS").partition(b"\r\n\r\n")[2]
    assert json.loads(body)["target"] == "*"


def test_no_header_is_added_that_the_client_did_not_send(via_raw):
    _, url, _ = via_raw
    body = raw_get(url, "/headers").partition(b"\r\n\r\n")[2]
    names = {h.split(":")[0].lower() for h in json.loads(body)["headers"]}
    assert "user-agent" not in names and "accept-encoding" not in names
    assert {"host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"} <= names


def over_cap_picks(admin: str) -> int:
    return requests.get(f"{admin}/status", timeout=5).json()["over_cap_picks"]


def slots(raw_backend, admin: str) -> tuple[int, float]:
    """The pool's picks over a backend's in-flight cap so far, and the requests the
    balancer has under way to the raw backend now (its lb_upstream_inflight gauge)."""
    backend = raw_backend.url.removeprefix("http://")
    return over_cap_picks(admin), metric_samples(admin)[
        f'lb_upstream_inflight{{backend="{backend}"}}']


def test_head_answers_of_any_size_free_their_slot(raw_backend, via_raw):
    _, url, admin = via_raw
    over_cap = over_cap_picks(admin)
    for _ in range(6):  # three times the in-flight cap
        assert requests.head(f"{url}/headbig", timeout=5).status_code == 200
    # A leaked slot would leave the backend at its cap, and these picks over it.
    assert requests.get(f"{url}/fine", timeout=5).status_code == 200
    assert slots(raw_backend, admin) == (over_cap, 0)


def test_a_large_streamed_body_passes_and_frees_its_slot(raw_backend, via_raw):
    _, url, admin = via_raw
    over_cap = over_cap_picks(admin)
    for _ in range(4):
        assert len(requests.get(f"{url}/headbig", timeout=5).content) == 200_000
    assert slots(raw_backend, admin) == (over_cap, 0)


def test_a_backend_dying_after_its_head_gets_a_json_502(via_raw):
    _, url, admin = via_raw
    response = requests.get(f"{url}/dieafterhead", timeout=10)
    assert response.status_code == 502
    assert response.json()["source"] == "balancer" and response.json()["kind"] == "protocol"


def test_a_backend_dying_mid_body_drops_the_client_connection(via_raw):
    _, url, _ = via_raw
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.get(f"{url}/diemidbody", timeout=10).content  # noqa: B018
    # The truncated body is never passed off as complete, and the worker lives on.
    assert requests.get(f"{url}/fine", timeout=5).status_code == 200


def test_an_interim_1xx_is_never_relayed_as_the_answer(via_raw):
    _, url, _ = via_raw
    response = requests.get(f"{url}/early", timeout=10)
    assert response.status_code == 502 and "interim" in response.json()["error"]


def test_chunked_framing_wins_over_a_content_length(via_raw):
    _, url, _ = via_raw
    assert requests.get(f"{url}/tecl", timeout=10).content == b"0123456789"


def test_failures_after_the_head_are_reported_and_logged_without_traceback(via_raw):
    proc, url, admin = via_raw
    requests.get(f"{url}/dieafterhead", timeout=10)
    state = requests.get(f"{admin}/status", timeout=5).json()["backends"][0]
    assert state["outcomes"].get("protocol", 0) >= 1
    assert "Traceback" not in proc.output()


def test_a_backend_dying_after_its_head_is_retried_elsewhere(raw_backend, redis_server, tmp_path):
    echo, echo_url = start_echo(0, tmp_path)
    # Only the raw backend's /dieafterhead path fails; a PUT there is retried on the echo.
    proc, url, _ = start_balancer([raw_backend.url, echo_url], redis_server, tmp_path, workers=1)
    try:
        statuses = {requests.put(f"{url}/dieafterhead", json={"a": 1}, timeout=10).status_code
                    for _ in range(4)}
    finally:
        proc.stop()
        echo.stop()
    assert statuses == {200}
