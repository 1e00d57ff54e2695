"""Fault injection with real processes: kill a backend, stop Redis, hang a backend, SIGTERM."""
from __future__ import annotations

import signal
import socket
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from apps.launch.redis_server import server_command
from tests.support import (
    SocketServer, assert_shares, connections_from, connections_to, fire, free_port, gunicorn,
    spawn, start_balancer, start_echo, wait_for, worker_pids,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def echoes(tmp_path):
    """Three echo instances with a little latency, so requests are in flight."""
    started = [start_echo(i, tmp_path, ECHO_MEAN_LATENCY_MS="20") for i in range(3)]
    yield started
    for proc, _ in started:
        proc.stop()


def while_loading(url: str, total: int, method: str, after: int, action,
                  keepalive: bool = True) -> list:
    """Run a load; once `after` requests have finished, run `action` once."""
    progress: list[int] = []
    with ThreadPoolExecutor(1) as runner:
        load = runner.submit(fire, url, total, 30, method, progress=progress,
                             keepalive=keepalive)
        wait_for(lambda: len(progress) >= after or load.done(), timeout=60, what="load")
        action()
        return load.result()


def assert_all_echoed(results) -> None:
    failures = [r for r in results if r.status != 200 or not r.body_ok]
    assert not failures, failures[:5]


@pytest.mark.parametrize("method, env", [
    ("PUT", {}),
    ("POST", {"LB_RETRY_NON_IDEMPOTENT": "1"}),
])
def test_killing_a_backend_under_load_is_invisible_to_clients(echoes, redis_server, tmp_path,
                                                               method, env):
    victim, victim_url = echoes[0]
    proc, url, admin = start_balancer([u for _, u in echoes], redis_server, tmp_path, env=env)
    try:
        results = while_loading(url, 600, method, after=150,
                                action=lambda: victim.stop(signal.SIGKILL))
        status = requests.get(f"{admin}/status", timeout=5).json()
    finally:
        proc.stop()
    assert_all_echoed(results)
    served = Counter(r.upstream for r in results)
    assert 0 < served[victim_url.removeprefix("http://")] < 200  # it served, then it died
    victim_state = status["backends"][0]
    assert victim_state["outcomes"].get("connect", 0) + victim_state["outcomes"].get(
        "protocol", 0) > 0  # the failed attempts were reported to the scorer
    assert "Traceback" not in proc.output()


@pytest.fixture
def own_redis(tmp_path):
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    procs = []

    def start():
        procs.append(spawn(f"redis-{port}-{len(procs)}", server_command(port), {}, tmp_path,
                           [port]))

    start()
    yield url, procs, start
    for proc in procs:
        proc.stop()


def test_redis_outage_under_load_then_shared_state_again(echoes, own_redis, tmp_path):
    redis_url, redis_procs, start_redis = own_redis
    proc, url, admin = start_balancer([u for _, u in echoes], redis_url, tmp_path)
    status = lambda: requests.get(f"{admin}/status", timeout=5).json()  # noqa: E731
    try:
        # New connections each time, so that both workers meet the outage.
        results = while_loading(url, 600, "POST", after=150, keepalive=False,
                                action=lambda: redis_procs[-1].stop(signal.SIGKILL))
        assert_all_echoed(results)
        wait_for(lambda: len(status()["degraded_workers"]) == 2, what="both workers degraded")
        assert status()["mode"] == "degraded"

        start_redis()  # empty: no keys, no scripts
        wait_for(lambda: status()["mode"] == "shared", what="workers back on Redis")
        results = fire(url, 300, 30, "POST")
        assert_all_echoed(results)
        # One cursor across both workers again: an exact split.
        assert_shares(Counter(r.upstream for r in results),
                      {u.removeprefix("http://"): 100 for _, u in echoes}, admin)
    finally:
        proc.stop()
    assert proc.output().count("Redis unreachable") == 2  # once per worker


def test_a_hanging_redis_does_not_stall_requests(echoes, own_redis, tmp_path):
    redis_url, redis_procs, _ = own_redis
    proc, url, admin = start_balancer([u for _, u in echoes], redis_url, tmp_path,
                                      env={"LB_REDIS_TIMEOUT": "0.2"})
    try:
        assert_all_echoed(fire(url, 30, 5, "POST"))
        redis_procs[0].popen.send_signal(signal.SIGSTOP)
        try:
            results = fire(url, 60, 10, "POST")
        finally:
            redis_procs[0].popen.send_signal(signal.SIGCONT)
        assert_all_echoed(results)
        # Each worker waits for Redis once (0.2 s), then serves from its own state.
        assert max(r.elapsed for r in results) < 5
        wait_for(lambda: requests.get(f"{admin}/status", timeout=5).json()["mode"] == "shared",
                 what="workers back on Redis")
    finally:
        proc.stop()


class HangingServer(SocketServer):
    """Reads each request's first line and never answers: a hung backend.
    `targets` lists the targets it got, one per request (nothing else calls it)."""

    def __init__(self) -> None:
        self.held: list[socket.socket] = []
        self.targets: list[str] = []
        super().__init__(backlog=128)

    def handle(self, conn: socket.socket) -> None:
        self.held.append(conn)
        line = conn.makefile("rb").readline()
        if line:
            self.targets.append(line.split()[1].decode())

    def close(self) -> None:
        super().close()
        for conn in self.held:
            conn.close()


def sample_while(sample, work):
    """Run `work()`, calling `sample()` every 20 ms meanwhile: its result, and the samples."""
    samples: list = []
    done = threading.Event()

    def sampler() -> None:
        while not done.wait(0.02):
            samples.append(sample())

    thread = threading.Thread(target=sampler)
    thread.start()
    try:
        return work(), samples
    finally:
        done.set()
        thread.join()


@pytest.mark.parametrize("method", ["PUT", "POST"])
def test_a_hanging_backend_gets_at_most_its_cap_and_delays_no_one_past_the_timeouts(
        redis_server, tmp_path, method):
    hanging = HangingServer()
    healthy = [start_echo(i, tmp_path) for i in range(2)]
    backends = [hanging.url] + [u for _, u in healthy]
    # 3 backends x a cap of 3 > 8 clients: even if every client lands on one worker,
    # the healthy backends are never all at their cap, so no pick has to go over
    # the hung one's. No health checks: every request the hung backend sees is a
    # client's. Each request on a new connection, so both workers get clients.
    clients, cap = 8, 3
    proc, url, admin = start_balancer(backends, redis_server, tmp_path, workers=2,
                                      env={"LB_READ_TIMEOUT": "1", "LB_REQUEST_TIMEOUT": "5",
                                           "LB_MAX_INFLIGHT": str(cap),
                                           "LB_CHECK_INTERVAL_S": "0"})
    workers = worker_pids(proc.popen.pid)
    try:
        # Uncapped, the hung backend would hold every request of both workers.
        results, held = sample_while(
            lambda: [connections_from(pid, hanging.port) for pid in workers],
            lambda: fire(url, 120, clients, method, keepalive=False))
        status = requests.get(f"{admin}/status", timeout=5).json()
    finally:
        proc.stop()
        hanging.close()
        for p, _ in healthy:
            p.stop()
    hung_id = hanging.url.removeprefix("http://")
    sent_to_hung = {int(target.rsplit("/", 1)[1]) for target in hanging.targets}
    assert sent_to_hung
    answers = {r.index: r for r in results}
    if method == "PUT":  # idempotent: tried again elsewhere, so every client gets its echo
        assert all(r.status == 200 and r.body_ok for r in results), Counter(
            r.status for r in results)
    else:  # a POST delivered to the hung backend is never sent again: its client gets 504
        assert {i for i, r in answers.items() if r.status == 504} == sent_to_hung, Counter(
            r.status for r in results)
        assert all(answers[i].upstream == hung_id for i in sent_to_hung)
        assert all(r.status == 200 and r.body_ok for i, r in answers.items()
                   if i not in sent_to_hung)
    # Every request ends: at the latest one read timeout plus a retry, far under the bound.
    assert max(r.elapsed for r in results) < 5
    state = status["backends"][0]
    assert state["outcomes"].get("timeout", 0) > 0 and state["blocks"] > 0
    # LB_MAX_INFLIGHT in the proxy: each worker reached its cap on the hung backend,
    # which never took every thread of a worker, and no pick had to go over a cap.
    peaks = [max(per_worker) for per_worker in zip(*held)]
    assert peaks == [cap, cap], peaks  # reached by each worker, never passed
    assert status["over_cap_picks"] == 0


def test_sigterm_lets_in_flight_requests_finish(redis_server, tmp_path):
    reflect_port = free_port()
    reflect = spawn("reflect", gunicorn("tests.reflect:create_app()", reflect_port, "-w", "1",
                                        "--threads", "16"), {}, tmp_path, [reflect_port])
    # No health checks: their kept-alive connection would count as one of the six.
    proc, url, _ = start_balancer([f"http://127.0.0.1:{reflect_port}"], redis_server, tmp_path,
                                  workers=2, threads=8, env={"LB_CHECK_INTERVAL_S": "0"})
    try:
        with ThreadPoolExecutor(6) as pool:
            slow = [pool.submit(requests.get, f"{url}/sleep/1.5", timeout=10) for _ in range(6)]
            wait_for(lambda: connections_to(reflect_port) >= 6, timeout=10,
                     what="six requests in flight")
            code = proc.stop(signal.SIGTERM, timeout=5)  # honcho's grace period
            assert [f.result().status_code for f in slow] == [200] * 6
        assert code == 0
    finally:
        proc.stop()
        reflect.stop()


def test_admin_reset_unblocks_a_backend(redis_server, tmp_path):
    failing = start_echo(0, tmp_path, ECHO_ERROR_RATE="1")
    healthy = [start_echo(i, tmp_path) for i in (1, 2)]
    echoes = [failing, *healthy]
    # No health checks: a failed check landing between the reset and the read of
    # /status would add its points back.
    proc, url, admin = start_balancer([u for _, u in echoes], redis_server, tmp_path,
                                      env={"LB_ADMIN_TOKEN": "t0ken", "LB_CHECK_INTERVAL_S": "0"})
    try:
        fire(url, 30, 3, "POST")
        backend_id = failing[1].removeprefix("http://")
        state = lambda: requests.get(f"{admin}/status", timeout=5).json()["backends"][0]  # noqa
        assert state()["blocked"]
        reset = f"{admin}/backends/{backend_id}/reset"
        assert requests.post(reset, timeout=5).status_code == 401
        assert requests.post(reset, headers={"Authorization": "Bearer nope"},
                             timeout=5).status_code == 401
        ok = requests.post(reset, headers={"Authorization": "Bearer t0ken"}, timeout=5)
        assert ok.status_code == 200
        assert not state()["blocked"] and state()["score"] == 0
    finally:
        proc.stop()
        for p, _ in echoes:
            p.stop()
    assert "t0ken" not in proc.output()
