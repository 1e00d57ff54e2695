"""End to end: what a client may claim (cookies, forwarding headers), where backends may
be (own ports, LB_BACKEND_NETWORKS), and bounds on admin input; real Gunicorn, raw sockets."""
from __future__ import annotations

import json
import socket

import pytest
import requests

from tests.rawbackend import RawBackend
from tests.support import start_balancer, wait_for

pytestmark = pytest.mark.e2e

TOKEN = "e2e-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def balancer(backends, redis_server, tmp_path_factory, **env):
    log_dir = tmp_path_factory.mktemp("addr")
    return start_balancer(backends, redis_server, log_dir, workers=1, threads=4,
                          env={"LB_ADMIN_TOKEN": TOKEN, **env})


@pytest.fixture(scope="module")
def untrusting(raw_backend, redis_server, tmp_path_factory):
    """Trusts no proxy; backends only in 127.0.0.0/8."""
    proc, url, admin = balancer([raw_backend.url], redis_server, tmp_path_factory,
                                LB_BACKEND_NETWORKS="127.0.0.0/8")
    yield proc, url, admin
    proc.stop()


@pytest.fixture(scope="module")
def trusting(raw_backend, redis_server, tmp_path_factory):
    """Trusts the test itself (127.0.0.1) as a proxy in front."""
    proc, url, admin = balancer([raw_backend.url], redis_server, tmp_path_factory,
                                LB_TRUSTED_PROXIES="127.0.0.1")
    yield proc, url, admin
    proc.stop()


def upstream_headers(url: str, lines: list[str]) -> list[tuple[str, str]]:
    """Send a GET with these raw header lines; the headers the raw backend received."""
    host, port = url.removeprefix("http://").split(":")
    request = "".join(f"{line}\r\n" for line in ["GET /h HTTP/1.1", f"Host: lb:{port}",
                                                 *lines, "Connection: close"])
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"{request}\r\n".encode())
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return [tuple(part.strip() for part in line.split(":", 1))
            for line in json.loads(body)["headers"]]


SPOOFED = ["X-Forwarded-For: 198.51.100.1", "X-Real-IP: 198.51.100.1",
           "X-Forwarded-Proto: https", "X-Forwarded-Host: forged.example",
           "X-Forwarded-Port: 443", "Forwarded: for=198.51.100.1;proto=https",
           "X-Forwarded-Ssl: on"]


def test_repeated_cookie_lines_reach_the_backend_as_one_header_joined_by_semicolons(untrusting):
    _, url, _ = untrusting
    headers = upstream_headers(url, ["Cookie: a=1", "Cookie: b=2; c=3"])
    assert [value for name, value in headers if name.lower() == "cookie"] == ["a=1; b=2; c=3"]


def test_a_clients_forwarding_headers_are_replaced_by_the_balancers_view(untrusting):
    _, url, _ = untrusting
    port = url.rsplit(":", 1)[1]
    headers = upstream_headers(url, SPOOFED)
    owned = {name: value for name, value in headers if name.lower() != "x-request-id"}
    assert owned == {"Host": owned["Host"], "X-Forwarded-For": "127.0.0.1",
                     "X-Real-IP": "127.0.0.1", "X-Forwarded-Proto": "http",
                     "X-Forwarded-Host": f"lb:{port}", "X-Forwarded-Port": port,
                     "Forwarded": f'for=127.0.0.1;host="lb:{port}";proto=http'}


def test_a_trusted_proxys_forwarding_headers_are_kept_and_appended_to(trusting):
    _, url, _ = trusting
    port = url.rsplit(":", 1)[1]
    headers = dict(upstream_headers(url, SPOOFED))
    assert headers["X-Forwarded-For"] == "198.51.100.1, 127.0.0.1"
    assert headers["Forwarded"] == (f'for=198.51.100.1;proto=https, '
                                    f'for=127.0.0.1;host="lb:{port}";proto=http')
    assert (headers["X-Real-IP"], headers["X-Forwarded-Proto"], headers["X-Forwarded-Host"],
            headers["X-Forwarded-Port"], headers["X-Forwarded-Ssl"]) == (
        "198.51.100.1", "https", "forged.example", "443", "on")


@pytest.mark.parametrize("url, reason", [
    ("http://169.254.169.254", "outside LB_BACKEND_NETWORKS"),
    ("http://127.0.0.1:<LB_PORT>", "own LB_PORT"),
    ("http://127.0.0.1:<LB_ADMIN_PORT>", "own LB_ADMIN_PORT"),
    ("http://127.0.0.1:0", "port 0"),
])
def test_the_admin_refuses_backends_that_loop_or_leave_the_allowed_networks(untrusting, url,
                                                                             reason):
    _, traffic, admin = untrusting
    url = url.replace("<LB_PORT>", traffic.rsplit(":", 1)[1]).replace(
        "<LB_ADMIN_PORT>", admin.rsplit(":", 1)[1])
    response = requests.post(f"{admin}/backends", json={"url": url}, headers=AUTH, timeout=5)
    assert response.status_code == 400 and reason in response.json()["error"]
    assert len(requests.get(f"{admin}/backends", timeout=5).json()["backends"]) == 1


def test_the_admin_bounds_its_input(untrusting):
    _, _, admin = untrusting
    huge = requests.post(f"{admin}/backends", data=b'{"url": "' + b"a" * 5_000_000 + b'"}',
                         headers={**AUTH, "Content-Type": "application/json"}, timeout=10)
    assert huge.status_code == 413 and len(huge.content) < 500
    deep = requests.post(f"{admin}/backends", data="[" * 30_000 + "]" * 30_000,
                         headers={**AUTH, "Content-Type": "application/json"}, timeout=10)
    assert deep.status_code == 400 and "nested deeper" in deep.json()["error"]
    long_url = requests.post(f"{admin}/backends", json={"url": "http://" + "a" * 60_000},
                             headers=AUTH, timeout=10)
    assert long_url.status_code == 400 and len(long_url.content) < 500


def test_a_name_that_resolves_outside_the_allowed_networks_is_never_connected_to(
        redis_server, tmp_path_factory):
    """`localhost` is 127.0.0.1, outside 10.0.0.0/8: neither traffic nor health checks
    reach it, and the log says why."""
    backend = RawBackend()
    proc, url, admin = balancer([f"http://localhost:{backend.port}"], redis_server,
                                tmp_path_factory, LB_BACKEND_NETWORKS="10.0.0.0/8")
    try:
        for _ in range(3):
            response = requests.get(f"{url}/x", timeout=10)
            assert response.status_code == 502 and response.json()["kind"] == "connect"

        def checks_failed() -> int:
            status = requests.get(f"{admin}/status", timeout=5).json()
            return status["backends"][0]["checks"]["failed"]
        wait_for(lambda: checks_failed() >= 2, what="two failed health checks")
        assert backend.connections == 0
        assert "127.0.0.1 is outside LB_BACKEND_NETWORKS" in proc.output()
    finally:
        proc.stop()
        backend.close()
