"""End to end: real Redis, real echo instances and the balancer under multi-worker Gunicorn."""
from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import socket
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.support import (
    ESTABLISHED, assert_shares, connections_to, free_port, gunicorn, metric_samples,
    sockets_of, spawn, start_balancer, start_echo, tcp_sockets, wait_for, worker_pids,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def echoes(log_dir):
    started = [start_echo(i, log_dir) for i in range(3)]
    yield [url for _, url in started]
    for proc, _ in started:
        proc.stop()


@pytest.fixture(scope="module")
def reflect(log_dir):
    port = free_port()
    proc = spawn("reflect", gunicorn("tests.reflect:create_app()", port, "-w", "1",
                                     "--threads", "16"), {}, log_dir, [port])
    yield f"http://127.0.0.1:{port}"
    proc.stop()


@pytest.fixture(scope="module")
def balancer(echoes, redis_server, log_dir):
    proc, url, admin = start_balancer(echoes, redis_server, log_dir, workers=2, threads=8,
                                      env={"LB_MAX_BODY": "64k"})
    yield url, admin
    assert "Traceback" not in proc.output()
    proc.stop()


@pytest.fixture(scope="module")
def via_reflect(reflect, redis_server, log_dir):
    # A small retry buffer, so that uploads past 16 KiB are spooled to a file.
    proc, url, _ = start_balancer([reflect], redis_server, log_dir, workers=2, threads=4,
                                  name="proxy-reflect",
                                  env={"LB_READ_TIMEOUT": "1", "LB_RETRY_BUFFER": "16k",
                                       "LB_MAX_BODY": "3m"})
    yield url
    proc.stop()


def post_json(session: requests.Session, url: str, body: bytes, **kwargs) -> requests.Response:
    return session.post(url, data=body, headers={"Content-Type": "application/json"},
                        timeout=10, **kwargs)


def test_readme_example_echoes_the_body_and_names_the_upstream(balancer):
    url, _ = balancer
    response = post_json(requests.Session(), f"{url}/any/path", b'{"a":1}')
    assert response.status_code == 200
    assert response.content == b'{"a":1}'
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["X-Upstream"].startswith("127.0.0.1:")


def test_300_concurrent_requests_echo_their_own_body_and_split_exactly(balancer, echoes):
    url, admin = balancer
    before = {b["id"]: b["requests"] for b in requests.get(f"{admin}/status").json()["backends"]}
    local = threading.local()

    def one(i: int) -> tuple[bytes, requests.Response]:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        body = json.dumps({"request": i, "pad": "x" * (i % 50)}).encode()
        return body, post_json(local.session, f"{url}/r/{i}", body)

    with ThreadPoolExecutor(60) as pool:
        results = list(pool.map(one, range(300)))

    assert all(r.status_code == 200 for _, r in results)
    assert all(r.content == body for body, r in results)
    shares = Counter(r.headers["X-Upstream"] for _, r in results)
    assert_shares(shares, {e.removeprefix("http://"): 100 for e in echoes}, admin)
    # The scorer's counters saw the same split.
    after = {b["id"]: b["requests"] for b in requests.get(f"{admin}/status").json()["backends"]}
    assert {k: after[k] - before.get(k, 0) for k in after} == dict(shares)


@pytest.mark.parametrize("body, content_type, status", [
    (b'{"a":1}', "text/plain", 415),
    (b'{"a":', "application/json", 400),
    (b"", "application/json", 400),
])
def test_bad_input_gets_the_backends_4xx_through_the_balancer(balancer, body, content_type, status):
    url, _ = balancer
    response = requests.post(f"{url}/x", data=body, headers={"Content-Type": content_type},
                             timeout=10)
    assert response.status_code == status
    assert response.json()["status"] == status
    assert "X-Upstream" in response.headers  # the backend answered, not the balancer


def test_unknown_method_gets_the_backends_405(balancer):
    url, _ = balancer
    response = requests.request("FOO", f"{url}/x", timeout=10)
    assert response.status_code == 405
    assert response.json()["status"] == 405 and "X-Upstream" in response.headers


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_over_the_limit_gets_the_balancers_413(balancer, chunked):
    url, _ = balancer
    body = b'{"a":"' + b"x" * 70_000 + b'"}'
    data = iter([body[:30_000], body[30_000:]]) if chunked else body
    response = requests.post(f"{url}/x", data=data, timeout=10,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.json()["source"] == "balancer"
    assert "X-Upstream" not in response.headers


def test_a_body_just_under_the_limit_passes_intact(balancer):
    url, _ = balancer
    body = json.dumps({"a": "x" * (64 * 1024 - 20)}).encode()
    assert len(body) <= 64 * 1024
    response = post_json(requests.Session(), f"{url}/x", body)
    assert response.status_code == 200 and response.content == body


def test_a_small_chunked_upload_is_sent_whole_with_a_length(via_reflect):
    body = b"0123456789" * 1000  # under the 16 KiB retry buffer
    response = requests.put(f"{via_reflect}/upload", data=iter([body[:7], body[7:]]), timeout=10)
    seen = response.json()
    assert seen["method"] == "PUT" and seen["body_length"] == len(body)
    assert dict(seen["headers"])["Content-Length"] == str(len(body))
    assert "Transfer-Encoding" not in dict(seen["headers"])


@pytest.mark.parametrize("chunked", [False, True])
def test_large_uploads_pass_intact_with_their_length(via_reflect, chunked):
    body = bytes(range(256)) * 8000  # 2 MB, far past the 16 KiB buffer: spooled
    data = iter(body[i:i + 100_000] for i in range(0, len(body), 100_000)) if chunked else body
    seen = requests.post(f"{via_reflect}/upload", data=data, timeout=30).json()
    assert seen["body_length"] == len(body)
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert dict(seen["headers"]).get("Content-Length") == str(len(body))
    assert "Transfer-Encoding" not in dict(seen["headers"])


def test_a_streamed_upload_past_the_limit_gets_413(via_reflect):
    chunks = iter([b"x" * 1_000_000] * 4)  # 4 MB against a 3 MB limit, no length given
    response = requests.post(f"{via_reflect}/upload", data=chunks, timeout=30)
    assert response.status_code == 413 and response.json()["source"] == "balancer"


def test_path_query_and_headers_are_forwarded(via_reflect, reflect):
    response = requests.get(f"{via_reflect}/a//b/%2F/c?x=1&y=%20z",
                            headers={"X-Custom": "v", "X-Forwarded-For": "198.51.100.1",
                                     "Connection": "keep-alive, X-Drop", "X-Drop": "1"},
                            timeout=10)
    seen = response.json()
    headers = dict(seen["headers"])
    assert seen["target"] == "/a//b/%2F/c?x=1&y=%20z"
    assert headers["X-Custom"] == "v"
    assert "X-Drop" not in headers
    assert headers["X-Forwarded-For"] == "127.0.0.1"  # the client is no trusted proxy
    assert headers["X-Forwarded-Proto"] == "http"
    assert headers["X-Forwarded-Host"] == via_reflect.removeprefix("http://")
    assert headers["Host"] == reflect.removeprefix("http://")
    assert response.headers["X-Upstream"] == reflect.removeprefix("http://")


def test_absolute_form_target_cannot_choose_the_address(via_reflect, reflect):
    port = int(via_reflect.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET http://169.254.169.254/latest?k=v HTTP/1.1\r\n"
                     b"Host: 169.254.169.254\r\nConnection: close\r\n\r\n")
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert f"X-Upstream: {reflect.removeprefix('http://')}".encode() in head
    assert json.loads(body)["target"] == "/latest?k=v"


def test_response_status_headers_and_encoded_bodies_pass_through(via_reflect):
    assert requests.get(f"{via_reflect}/status/418", timeout=10).status_code == 418
    cookies = requests.get(f"{via_reflect}/cookies", timeout=10)
    assert cookies.raw.headers.getlist("Set-Cookie") == ["a=1", "b=2"]
    raw = requests.get(f"{via_reflect}/gzip", timeout=10, stream=True).raw
    assert raw.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(raw.read(decode_content=False)) == b'{"compressed": true}'


def test_large_bodies_stream_through_intact(via_reflect):
    size = 3_000_000
    response = requests.get(f"{via_reflect}/big/{size}", timeout=30)
    assert len(response.content) == size
    assert response.content[:5] == bytes(range(5)) and response.content[-1] == (size - 1) % 251


def test_head_keeps_the_backends_length(via_reflect):
    head = requests.head(f"{via_reflect}/status/200", timeout=10)
    get = requests.get(f"{via_reflect}/status/200", timeout=10)
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["Content-Length"]) == len(get.content) > 0


def test_a_slow_backend_gets_504_and_a_dead_one_502(via_reflect, redis_server, log_dir):
    slow = requests.get(f"{via_reflect}/sleep/3.0", timeout=10)
    assert slow.status_code == 504
    assert slow.json()["source"] == "balancer" and slow.json()["kind"] == "timeout"

    closed = f"http://127.0.0.1:{free_port()}"
    proc, url, _ = start_balancer([closed], redis_server, log_dir, workers=1, name="proxy-dead")
    try:
        dead = requests.post(f"{url}/x", json={"a": 1}, timeout=10)
        assert dead.status_code == 502
        assert dead.json()["kind"] == "connect"
        assert dead.headers["X-Upstream"] == closed.removeprefix("http://")
    finally:
        proc.stop()
    assert "Traceback" not in proc.output()


def test_websocket_upgrade_gets_501(balancer):
    url, _ = balancer
    response = requests.get(f"{url}/ws", timeout=10,
                            headers={"Connection": "Upgrade", "Upgrade": "websocket"})
    assert response.status_code == 501
    assert response.json()["source"] == "balancer"


def test_admin_status_and_ready(balancer, echoes):
    _, admin = balancer
    status = requests.get(f"{admin}/status", timeout=5).json()
    assert status["strategy"] == "scored"
    assert status["redis"]["reachable"] is True
    # Gunicorn forks its workers a moment apart.
    wait_for(lambda: requests.get(f"{admin}/status", timeout=5).json()["workers"] == 2,
             what="both workers")
    assert [b["url"] for b in status["backends"]] == echoes
    ready = requests.get(f"{admin}/ready", timeout=5)
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "degraded": False, "reasons": []}
    assert status["mode"] == "shared" and status["degraded_workers"] == []
    assert requests.get(f"{admin}/nope", timeout=5).status_code == 404


def test_admin_answers_while_every_traffic_thread_is_busy(reflect, redis_server, log_dir):
    proc, url, admin = start_balancer([reflect], redis_server, log_dir, workers=1, threads=2,
                                      name="proxy-saturated", env={"LB_READ_TIMEOUT": "30"})
    try:
        reflect_port = int(reflect.rsplit(":", 1)[1])
        idle = connections_to(reflect_port)  # other balancers' kept-alive connections
        with ThreadPoolExecutor(6) as pool:
            slow = [pool.submit(requests.get, f"{url}/sleep/2.0", timeout=30) for _ in range(6)]
            # Wait until the backend holds both of the worker's threads' requests.
            wait_for(lambda: connections_to(reflect_port) >= idle + 2, what="both threads busy")
            probe = requests.Session()
            status = probe.get(f"{admin}/status", timeout=3)
            assert status.status_code == 200
            assert not all(f.done() for f in slow)
            assert probe.get(f"{admin}/ready", timeout=3).status_code == 200
            assert all(f.result().status_code == 200 for f in slow)
    finally:
        proc.stop()


def test_without_redis_the_balancer_serves_degraded(echoes, log_dir):
    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    proc, url, admin = start_balancer(echoes, unreachable, log_dir, workers=1,
                                      name="proxy-noredis")
    try:
        session = requests.Session()
        responses = [session.post(f"{url}/x", json={"a": i}, timeout=10) for i in range(6)]
        assert [r.json() for r in responses] == [{"a": i} for i in range(6)]
        # One worker, its own round robin: still a rotation.
        assert len({r.headers["X-Upstream"] for r in responses}) == 3
        status = requests.get(f"{admin}/status", timeout=5).json()
        assert status["redis"]["reachable"] is False and status["mode"] == "degraded"
        assert len(status["degraded_workers"]) == 1
        ready = requests.get(f"{admin}/ready", timeout=5)
        assert ready.status_code == 200 and ready.json()["degraded"] is True
    finally:
        proc.stop()
    assert proc.output().count("Redis unreachable") == 1  # the switch is logged once


def test_host_and_forwarded_headers_cannot_choose_the_address(via_reflect, reflect):
    response = requests.get(f"{via_reflect}/meta", timeout=10, headers={
        "Host": "169.254.169.254", "X-Forwarded-For": "10.0.0.1",
        "X-Forwarded-Host": "169.254.169.254", "Forwarded": "for=10.0.0.1;host=evil"})
    assert response.headers["X-Upstream"] == reflect.removeprefix("http://")
    seen = dict(response.json()["headers"])
    assert seen["Host"] == reflect.removeprefix("http://")
    assert seen["X-Forwarded-Host"] == "169.254.169.254"  # its Host: information only
    assert seen["X-Forwarded-For"] == "127.0.0.1"  # the forged ones are replaced
    assert seen["Forwarded"] == "for=127.0.0.1;host=169.254.169.254;proto=http"


def test_one_json_access_line_per_request_and_request_ids_pass_through(reflect, redis_server,
                                                                      log_dir, tmp_path):
    access = tmp_path / "access.log"
    proc, url, _ = start_balancer([reflect], redis_server, log_dir, workers=2, name="proxy-log",
                                  env={"LB_ACCESS_LOG": str(access)})
    try:
        given = requests.get(f"{url}/a?b=1", headers={"X-Request-ID": "req-42"}, timeout=10)
        fresh = requests.post(f"{url}/c", data=b"x" * 10, timeout=10)
        too_big = requests.post(f"{url}/d", data=b"x" * (11 * 1024 * 1024), timeout=30)
    finally:
        proc.stop()
    assert given.headers["X-Request-ID"] == "req-42"
    upstream_id = lambda r: {k.lower(): v for k, v in r.json()["headers"]}["x-request-id"]  # noqa
    assert upstream_id(given) == "req-42"  # passed upstream
    generated = fresh.headers["X-Request-ID"]
    assert len(generated) == 32 and upstream_id(fresh) == generated
    lines = [json.loads(line) for line in access.read_text().splitlines()]
    assert [(l["method"], l["path"], l["status"]) for l in lines] == [
        ("GET", "/a?b=1", 200), ("POST", "/c", 200), ("POST", "/d", 413)]
    first = lines[0]
    assert first["request_id"] == "req-42" and first["attempts"] == 1
    assert first["backend"] == reflect.removeprefix("http://") and first["latency_ms"] > 0
    assert lines[2]["backend"] is None and lines[2]["attempts"] == 0


def test_metrics_add_up_across_workers(echoes, redis_server, log_dir):
    proc, url, admin = start_balancer(echoes, redis_server, log_dir, workers=2, name="proxy-m")
    port = int(url.rsplit(":", 1)[1])
    # 30 kept-alive connections, 3 requests on each: a connection stays with the
    # worker that accepted it, so each worker serves 3 x the connections it holds.
    clients = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(30)]
    try:
        for _ in range(3):
            for n, client in enumerate(clients):
                client.request("POST", f"/m/{n}", body=b'{"a": 1}',
                               headers={"Content-Type": "application/json"})
                response = client.getresponse()
                assert response.status == 200 and response.read() == b'{"a": 1}'
        accepted = tcp_sockets(port, ESTABLISHED)
        held = [len(sockets_of(pid) & accepted) for pid in worker_pids(proc.popen.pid)]
        samples = metric_samples(admin)
        ids = [echo.removeprefix("http://") for echo in echoes]
        attempts = {b: samples[f'lb_upstream_attempts_total{{backend="{b}",result="2xx"}}']
                    for b in ids}
        assert_shares(attempts, {b: 30 for b in ids}, admin)
    finally:
        for client in clients:
            client.close()
        proc.stop()
    # Both workers served some of the 90, and /metrics counts all 90: the sum of
    # both workers' counts (one worker's alone would be 3 x its connections).
    assert len(held) == 2 and sum(held) == 30 and min(held) > 0, held
    assert sum(value for name, value in samples.items()
               if name.startswith("lb_requests_total{")) == 90
    for backend in ids:
        assert samples[f'lb_requests_total{{backend="{backend}",code="2xx"}}'] == 30
        assert samples[f'lb_upstream_latency_seconds_count{{backend="{backend}"}}'] == 30
        assert f'lb_backend_score{{backend="{backend}"}}' in samples
        assert samples[f'lb_backend_blocked{{backend="{backend}"}}'] == 0
    assert samples["lb_panic_picks_total"] == 0
