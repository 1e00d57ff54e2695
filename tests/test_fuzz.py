"""Property-based fuzzing: odd methods, paths, headers, bodies and broken encodings.

The echo app is fuzzed through Flask's test client; the balancer through raw
sockets against real Gunicorn processes, so Gunicorn's own parser is in the way
too. Neither may ever answer 500, and no balancer worker may die. And the
balancer is no open proxy: whatever target, Host or X-Forwarded-* a request
names, it reaches the one configured backend or is refused.
"""
from __future__ import annotations

import json
import socket
import string
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apps.echo.app import create_app as create_echo
from tests.rawbackend import RawBackend
from tests.support import SocketServer, start_balancer, start_echo

TOKEN = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
methods = st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS",
                           "TRACE", "CONNECT"]) | st.text(TOKEN, min_size=1, max_size=12)
path_chars = string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@/%?#[]"
paths = st.text(path_chars, max_size=60).map(lambda p: "/" + p) | st.just("*")
header_names = st.text(TOKEN, min_size=1, max_size=20)
header_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF,
                                      blacklist_characters="\x7f"), max_size=60)
json_bodies = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=10).map(lambda v: json.dumps(v).encode())
bodies = json_bodies | st.binary(max_size=3000) | st.text().map(lambda t: t.encode("utf-16"))
content_types = st.sampled_from(["application/json", "application/json; charset=utf-8",
                                 "application/vnd.api+json", "text/plain", "", "*/*",
                                 "multipart/form-data; boundary=x", "application/json;;;"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=methods, path=paths, body=bodies, content_type=content_types,
       headers=st.lists(st.tuples(header_names, header_values), max_size=5))
def test_the_echo_app_never_answers_500(method, path, body, content_type, headers):
    client = create_echo({"SEED": 0, "sleep": lambda s: None}).test_client()
    response = client.open(path if path != "*" else "/", method=method, data=body,
                           headers=[*headers, ("Content-Type", content_type)])
    assert response.status_code < 500
    if response.status_code == 200 and method in ("POST", "PUT", "PATCH"):
        assert response.get_data() == body
    elif response.status_code >= 400:
        assert response.is_json


@pytest.fixture(scope="module")
def balancer(redis_server, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("fuzz")
    echoes = [start_echo(i, log_dir) for i in range(2)]
    proc, url, _ = start_balancer([u for _, u in echoes], redis_server, log_dir, workers=2,
                                  threads=4, env={"LB_MAX_BODY": "2k"})
    yield proc, int(url.rsplit(":", 1)[1])
    proc.stop()
    for p, _ in echoes:
        p.stop()


def raw_exchange(port: int, request: bytes) -> bytes:
    """Send raw bytes, return everything the server sends back before closing."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may refuse mid-request; what it answered still counts
        reply = b""
        try:
            while chunk := sock.recv(65536):
                reply += chunk
        except ConnectionResetError:
            pass
    return reply


def status_of(reply: bytes) -> int | None:
    if not reply.startswith(b"HTTP/1."):
        return None
    return int(reply.split(b" ", 2)[1])


def encode_request(method: str, path: str, headers, body: bytes, chunked: bool) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: fuzz.example", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        payload = b"".join(b"%x\r\n%s\r\n" % (len(part), part)
                           for part in (body[:100], body[100:]) if part) + b"0\r\n\r\n"
    else:
        lines.append(f"Content-Length: {len(body)}")
        payload = body
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + payload


@pytest.mark.e2e
@settings(max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(method=methods, path=paths, body=bodies, content_type=content_types, chunked=st.booleans(),
       headers=st.lists(st.tuples(header_names, header_values), max_size=5))
def test_the_balancer_never_answers_500(balancer, method, path, body, content_type, chunked,
                                        headers):
    _, port = balancer
    request = encode_request(method, path, [*headers, ("Content-Type", content_type)],
                             body, chunked)
    status = status_of(raw_exchange(port, request))
    # 501 is a fair answer (an Upgrade, or a Transfer-Encoding Gunicorn does not
    # support); 500, or a 502-504 from healthy echo backends, would be a bug.
    assert status is None or status < 500 or status == 501, status


@pytest.mark.e2e
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(garbage=st.binary(min_size=1, max_size=400))
def test_garbage_never_gets_a_500(balancer, garbage):
    _, port = balancer
    status = status_of(raw_exchange(port, garbage + b"\r\n\r\n"))
    assert status is None or status != 500


@pytest.mark.e2e
def test_no_balancer_worker_died_while_fuzzed(balancer):
    proc, _ = balancer
    log = proc.output()
    assert log.count("Booting worker") == 2, log[-3000:]
    assert "Traceback" not in log and "WORKER TIMEOUT" not in log


class Decoy(SocketServer):
    """A listener no request may ever reach: it counts the connections it gets."""

    def __init__(self) -> None:
        self.connections = 0
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        self.connections += 1  # before the close, which whoever connected waits for
        conn.close()


@pytest.fixture(scope="module")
def guarded(redis_server, tmp_path_factory):
    """A balancer whose one backend records every request, beside decoy listeners."""
    log_dir = tmp_path_factory.mktemp("guarded")
    backend, decoys = RawBackend(), [Decoy() for _ in range(3)]
    # No health checks: every request the backend records is a client's.
    proc, url, admin = start_balancer([backend.url], redis_server, log_dir, workers=2, threads=4,
                                      name="proxy-guarded", env={"LB_CHECK_INTERVAL_S": "0"})
    yield int(url.rsplit(":", 1)[1]), backend, decoys, admin
    proc.stop()
    for server in (backend, *decoys):
        server.close()
    assert "Traceback" not in proc.output()


# Headers that proxies read to decide, or to report, where a request goes.
FORWARDING = ["X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "X-Forwarded-Port",
              "X-Forwarded-Server", "X-Forwarded-Prefix", "Forwarded", "X-Real-IP",
              "X-Original-URL", "X-Rewrite-URL", "X-Host"]


def elsewhere(decoys, admin: str):
    """Addresses a request could try to reach: the decoys, the admin listener, others."""
    ports = [d.port for d in decoys] + [int(admin.rsplit(":", 1)[1])]
    local = st.sampled_from([f"{host}:{port}" for port in ports
                             for host in ("127.0.0.1", "localhost", "[::1]", "0.0.0.0")])
    return local | st.sampled_from(["169.254.169.254", "10.0.0.1:6379", "example.com"]) | st.text(
        string.ascii_lowercase + string.digits + ".-:[]", min_size=1, max_size=20)


def targets(authority):
    path = st.text(path_chars, max_size=30).map(lambda p: "/" + p)
    scheme = st.sampled_from(["http", "https", "HTTP", "ws", "ftp"])
    return (st.builds("{}://{}{}".format, scheme, authority, path | st.just(""))
            | st.builds("//{}{}".format, authority, path)
            | authority | path | st.just("*"))


@pytest.mark.e2e
@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_request_reaches_the_one_backend_or_is_refused(guarded, data):
    port, backend, decoys, admin = guarded
    authority = elsewhere(decoys, admin)
    method = data.draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS",
                                        "PATCH", "CONNECT"]), "method")
    target = data.draw(targets(authority), "target")
    host = data.draw(st.none() | authority | header_values, "host")
    forwarding = data.draw(st.lists(st.tuples(st.sampled_from(FORWARDING),
                                              authority | header_values), max_size=4), "headers")
    mark = uuid.uuid4().hex
    lines = [f"{method} {target} HTTP/1.1", *([f"Host: {host}"] if host is not None else []),
             *(f"{name}: {value}" for name, value in forwarding),
             f"X-Fuzz-Mark: {mark}", "Content-Length: 0", "Connection: close"]
    before, reached = len(backend.requests), [d.connections for d in decoys]
    reply = raw_exchange(port, "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n")
    status, seen = status_of(reply), backend.requests[before:]
    assert [d.connections for d in decoys] == reached, "a decoy was reached"
    if method == "CONNECT":  # never a tunnel, nor forwarded: 405, or Gunicorn's 400
        assert status in (400, 405), reply[:300]
    if status is not None and 400 <= status < 500:
        # Gunicorn's or the app's own refusal: a relayed answer would name its upstream.
        assert seen == [] and b"\r\nX-Upstream:" not in reply.partition(b"\r\n\r\n")[0]
    else:
        assert status == 200, reply[:300]
        assert len(seen) == 1 and f"X-Fuzz-Mark: {mark}" in seen[0][2]
        assert f"X-Upstream: {backend.url.removeprefix('http://')}\r\n".encode() in reply
