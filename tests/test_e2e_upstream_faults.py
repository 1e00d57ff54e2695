"""End to end against a backend that misbehaves at the HTTP level (tests/rawbackend.py)."""
from __future__ import annotations

import json
import re
import socket

import pytest
import requests

from tests.support import metric_samples, start_balancer, start_echo

pytestmark = pytest.mark.e2e

TOKEN = "raw-admin-token"


@pytest.fixture(scope="module")
def via_raw(raw_backend, redis_server, tmp_path_factory):
    """A balancer with the raw backend as its only backend, one worker so its
    in-flight counts are the ones we watch."""
    log_dir = tmp_path_factory.mktemp("raw")
    proc, url, admin = start_balancer([raw_backend.url], redis_server, log_dir, workers=1,
                                      threads=4, env={"LB_MAX_INFLIGHT": "2",
                                                      "LB_READ_TIMEOUT": "2",
                                                      "LB_ADMIN_TOKEN": TOKEN})
    yield proc, url, admin
    proc.stop()


def raw_exchange(url: str, request: bytes) -> bytes:
    """Send raw bytes; return all the balancer answers until it closes the connection."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


def raw_get(url: str, target: str, method: str = "GET") -> bytes:
    return raw_exchange(url, f"{method} {target} HTTP/1.1\r\nHost: x\r\n"
                             "Connection: close\r\n\r\n".encode())


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
    assert names == {"host", "x-request-id", "x-forwarded-for", "x-real-ip", "x-forwarded-proto",
                     "x-forwarded-host", "x-forwarded-port", "forwarded"}  # no User-Agent...


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


def test_a_forged_line_in_the_path_stays_on_its_own_line(via_raw):
    proc, url, _ = via_raw
    # After each kind of line break a fake line; the backend fails, so the
    # balancer logs a warning with the (decoded) path.
    breaks = ["%0a", "%0d", "%0b", "%1e", "%C2%85", "%E2%80%A8"]
    target = "/dieafterhead/" + "".join(f"{b}[CRITICAL]%20forged" for b in breaks)
    assert raw_get(url, target).startswith(b"HTTP/1.1 502")
    # Gunicorn's own warning about a bad request line writes it with repr().
    assert raw_exchange(url, b"GET /a\x0b[CRITICAL] forged\x85 HTTP/1.1\r\nHost: x\r\n\r\n"
                        ).startswith(b"HTTP/1.1 400")
    lines = proc.output().splitlines()  # splits on every break above, as log readers may
    assert not [line for line in lines if line.startswith("[CRITICAL]")]
    escaped = "\\n \\r \\x0b \\x1e \\x85 \\u2028".split()
    logged = "".join(f"{e}[CRITICAL] forged" for e in escaped)
    assert [line for line in lines if f"[WARNING] GET /dieafterhead/{logged} -> " in line]
    # The JSON access log has the raw target, on one line (json.dumps escapes the rest).
    access = [json.loads(line) for line in lines
              if line.startswith("{") and "dieafterhead/%0a" in line]
    assert [entry["path"] for entry in access] == [target]


def test_the_admin_listener_logs_through_the_escaping_handlers(via_raw, raw_backend):
    proc, _, admin = via_raw
    backend = raw_backend.url.removeprefix("http://")
    response = requests.post(f"{admin}/backends/{backend}/reset", timeout=5,
                             headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200
    # In Gunicorn's format, so through Gunicorn's handlers (apps/lb/logs.py), not Python's
    # bare last-resort handler.
    prefix = r"^\[[^]]+\] \[\d+\] \[WARNING\] "
    line = prefix + f"admin reset the score and block of {re.escape(backend)}$"
    assert re.search(line, proc.output(), re.MULTILINE)


def test_the_backends_own_x_upstream_and_request_id_are_dropped(via_raw, raw_backend):
    proc, url, admin = via_raw
    backend = raw_backend.url.removeprefix("http://")
    response = requests.get(f"{url}/ownheaders/one", headers={"X-Request-ID": "client-7"},
                            timeout=10)
    assert response.status_code == 200 and response.content == b"ok"
    assert response.raw.headers.getlist("X-Upstream") == [backend]
    assert response.raw.headers.getlist("X-Request-ID") == ["client-7"]
    access = [json.loads(line) for line in proc.output().splitlines()
              if line.startswith("{") and '"/ownheaders/one"' in line]
    assert [entry["backend"] for entry in access] == [backend]
    metrics = requests.get(f"{admin}/metrics", timeout=5).text
    assert f'lb_requests_total{{backend="{backend}",code="2xx"}}' in metrics
    assert "203.0.113.9" not in metrics


def reached(raw_backend, since: int, method: str, prefix: str) -> list:
    return [r for r in raw_backend.requests[since:] if r[0] == method and r[1].startswith(prefix)]


@pytest.mark.parametrize("coding, status, balancer", [
    ("gzip, chunked", 501, True), ("GZIP, Chunked", 501, True),
    ("identity, chunked", 501, True), ("deflate,chunked", 501, True),
    # Gunicorn refuses these itself: a coding after chunked, no chunked at all,
    # a coding it does not know.
    ("chunked, gzip", 400, False), ("identity", 400, False), ("br, chunked", 501, False),
])
def test_a_transfer_coding_other_than_chunked_is_refused(via_raw, raw_backend, coding, status,
                                                          balancer):
    _, url, _ = via_raw
    since = len(raw_backend.requests)
    # A second request right behind the body: the connection must close unread.
    reply = raw_exchange(url, f"POST /coded HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: {coding}"
                              "\r\n\r\n4\r\nabcd\r\n0\r\n\r\n"
                              "GET /coded-next HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status}".encode()), reply
    assert b"\r\nConnection: close\r\n" in head
    assert reply.count(b"HTTP/1.1 ") == 1  # the pipelined request never ran
    if balancer:
        answer = json.loads(body)
        assert answer["status"] == 501 and answer["source"] == "balancer"
        assert coding.split(",")[0].strip().lower() in answer["error"]
    assert reached(raw_backend, since, "POST", "/coded") == []
    assert reached(raw_backend, since, "GET", "/coded") == []


@pytest.mark.parametrize("target", ["127.0.0.1:6379", "/x", "{backend}"])
def test_connect_is_refused_with_405_and_an_allow_header(via_raw, raw_backend, target):
    _, url, _ = via_raw
    since = len(raw_backend.requests)
    target = target.format(backend=raw_backend.url.removeprefix("http://"))
    head, _, body = raw_get(url, target, method="CONNECT").partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405")
    allow = re.search(rb"\r\nAllow: ([^\r]*)", head).group(1).decode()
    assert {"GET", "POST"} <= {m.strip() for m in allow.split(",")} and "CONNECT" not in allow
    answer = json.loads(body)
    assert answer["source"] == "balancer" and "CONNECT" in answer["error"]
    assert b"X-Upstream" not in head
    assert [r for r in raw_backend.requests[since:] if r[0] == "CONNECT"] == []


def test_gunicorns_own_access_log_is_escaped_too(raw_backend, redis_server, tmp_path):
    proc, url, _ = start_balancer([raw_backend.url], redis_server, tmp_path, workers=1,
                                  env={"GUNICORN_ACCESSLOG": "-", "LB_ACCESS_LOG": "off"})
    try:
        # A header value may carry C1 characters (obs-text) and tabs; Gunicorn logs it raw.
        reply = raw_exchange(url, b"GET /agent HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                  b"User-Agent: ua\x85[CRITICAL] forged\t\"q\r\n\r\n")
    finally:
        proc.stop()
    assert reply.startswith(b"HTTP/1.1 200")
    lines = proc.output().splitlines()
    assert not [line for line in lines if line.startswith("[CRITICAL]")]
    assert [line for line in lines if '"GET /agent HTTP/1.1" 200 ' in line
            and line.endswith('"ua\\x85[CRITICAL] forged\\t\\"q"')]
