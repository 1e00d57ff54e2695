"""The promises of docs/operating.md and docs/scorer.md about deadlines, retries,
degraded mode, trials and checks, each tested through a real balancer under Gunicorn.

The backends are small servers in this process (tests/rawbackend.py
ScriptedBackend, and the failing TLS servers below), so that a test can set
what each one does and count what reached it. A fresh pool's cursor starts at
the first backend, which some tests use to know the order of attempts.
"""
from __future__ import annotations

import os
import signal
import socket
import ssl
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import trustme

from tests.rawbackend import ScriptedBackend
from tests.support import SocketServer, free_port, start_balancer, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def closing():
    """Registers the test's in-process servers, to close them at its end."""
    servers = []

    def keep(server):
        servers.append(server)
        return server

    yield keep
    for server in servers:
        server.close()


@pytest.fixture
def balancer(redis_server, tmp_path):
    """start(backends, **env): a balancer (2 workers, no health checks unless asked for)."""
    procs = []

    def start(backends, workers=2, redis_url=redis_server, **env):
        started = start_balancer([b.url for b in backends], redis_url, tmp_path,
                                 workers=workers, name=f"proxy{len(procs)}",
                                 env={"LB_CHECK_INTERVAL_S": "0", **env})
        procs.append(started[0])
        return started

    yield start
    for proc in procs:
        proc.stop()


def send(url: str, total: int, method: str = "GET", clients: int = 3) -> list[requests.Response]:
    """`total` requests to /r/<i> with the body `body <i>`, each on a new connection,
    so that both workers serve."""
    def one(i: int) -> requests.Response:
        return requests.request(method, f"{url}/r/{i}", data=f"body {i}".encode(),
                                headers={"Connection": "close"}, timeout=15)

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, range(total)))


def backend_states(admin: str) -> list[dict]:
    return requests.get(f"{admin}/status", timeout=5).json()["backends"]


def answer_of(backend: ScriptedBackend, status: int) -> dict:
    """The body `backend` answers with `status`: the client must get it unchanged."""
    return {"backend": backend.port, "status": status}


def upstream_id(server: SocketServer) -> str:
    return f"127.0.0.1:{server.port}"


# --- 1. the request deadline -------------------------------------------------------


def test_the_retry_gets_only_what_is_left_of_the_deadline(balancer, closing):
    hung = closing(ScriptedBackend(delay=None))
    # Answers within LB_READ_TIMEOUT, but later than what the deadline leaves it.
    late = closing(ScriptedBackend(delay=1.0))
    _, url, _ = balancer([hung, late], LB_READ_TIMEOUT="1.5", LB_REQUEST_TIMEOUT="2")
    response = requests.get(f"{url}/x", timeout=10)
    # The first attempt took its full read timeout (1.5 s); the retry had 0.5 s.
    assert response.status_code == 504, response.text
    assert response.headers["X-Upstream"] == upstream_id(late)
    assert response.json()["kind"] == "timeout" and response.json()["attempts"] == 2
    assert len(hung.requests) == len(late.requests) == 1


class FullBacklog:
    """A listening socket whose accept queue is full: a connect to it never completes
    (the kernel drops the SYNs), as with an overloaded backend."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        # Backlog 0 still queues one connection: this one, never accepted.
        self.filler = socket.create_connection(("127.0.0.1", self.port), timeout=2)

    def close(self) -> None:
        self.filler.close()
        self.sock.close()


def test_a_connect_that_never_completes_is_cut_at_the_deadline_and_answers_504(balancer,
                                                                               closing):
    full = closing(FullBacklog())
    _, url, _ = balancer([full], LB_CONNECT_TIMEOUT="60", LB_REQUEST_TIMEOUT="1")
    # The client waits 15 s: far less than LB_CONNECT_TIMEOUT, so only the deadline
    # can have ended the connect.
    response = requests.get(f"{url}/x", timeout=15)
    assert response.status_code == 504, response.text
    assert response.json()["kind"] == "timeout"
    assert "connecting" in response.json()["error"]


# --- 2. retries ----------------------------------------------------------------------


def test_retries_follow_the_answer_and_the_method(balancer, closing):
    backends = [closing(ScriptedBackend(status)) for status in (502, 503, 504, 503)]
    _, url, _ = balancer(backends, LB_RETRIES="2", LB_READ_TIMEOUT="0.5",
                         # Neither blocks nor the budget may stop a retry here.
                         LB_STRATEGY="round_robin", LB_RETRY_BUDGET="1")

    def hits() -> list[int]:
        counts = [len(b.requests) for b in backends]
        for b in backends:
            b.seen.clear()
        return counts

    # 502, 503 and 504 are retried, each time on another backend, LB_RETRIES times:
    # three attempts, and the fourth backend is never asked. The last answer is
    # relayed as the backend sent it.
    response = requests.get(f"{url}/a", timeout=10)
    assert hits() == [1, 1, 1, 0]
    assert response.status_code == 504
    assert response.json() == answer_of(backends[2], 504)
    assert response.headers["X-Upstream"] == upstream_id(backends[2])

    # A 500 is relayed at once (the cursor is at the fourth backend now).
    for b in backends:
        b.status = 500
    response = requests.get(f"{url}/b", timeout=10)
    assert hits() == [0, 0, 0, 1]
    assert response.status_code == 500 and response.json() == answer_of(backends[3], 500)

    # A POST that reached a backend is never sent again: not after a 503...
    for b in backends:
        b.status = 503
    response = requests.post(f"{url}/c", data=b"once", timeout=10)
    assert [(r.method, r.target, r.body)
            for r in backends[0].requests] == [("POST", "/c", b"once")]
    assert hits() == [1, 0, 0, 0]
    assert response.status_code == 503 and response.json() == answer_of(backends[0], 503)

    # ...nor after a timeout, while a PUT is (idempotent: the same rules, by method).
    for b in backends:
        b.delay = None
    response = requests.post(f"{url}/d", data=b"once", timeout=10)
    assert hits() == [0, 1, 0, 0]
    assert response.status_code == 504 and response.json()["source"] == "balancer"
    response = requests.put(f"{url}/e", data=b"again", timeout=10)
    assert hits() == [1, 0, 1, 1]
    assert response.status_code == 504 and response.json()["attempts"] == 3


# --- 3. degraded mode ----------------------------------------------------------------


def test_without_redis_each_worker_still_blocks_a_failing_backend(balancer, closing):
    bad = closing(ScriptedBackend(500))
    good = [closing(ScriptedBackend()) for _ in range(2)]
    proc, url, admin = balancer([bad, *good], redis_url=f"redis://127.0.0.1:{free_port()}/0")
    total = 150
    statuses = Counter(r.status_code for r in send(url, total))
    status = requests.get(f"{admin}/status", timeout=5).json()
    assert status["mode"] == "degraded" and len(status["degraded_workers"]) == 2
    # Round robin alone would send it a third of the requests (50). Each worker
    # blocks it after its third 500 (12 points), give or take the requests
    # already under way.
    assert len(bad.requests) <= 15
    assert statuses == {500: len(bad.requests), 200: total - len(bad.requests)}
    assert proc.output().count("Redis unreachable") == 2


# --- 4. the retry budget -------------------------------------------------------------


def test_the_retry_budget_holds_back_a_retry_storm(balancer, closing):
    backends = [closing(ScriptedBackend(503)) for _ in range(3)]
    # No blocks (round robin): the budget alone limits retries. A long time
    # constant keeps the counts from fading during the test, so the bound is exact.
    _, url, admin = balancer(backends, LB_RETRIES="2", LB_STRATEGY="round_robin",
                             LB_RETRY_BUDGET_TAU_S="10000")
    total = 50
    responses = send(url, total)
    assert {r.status_code for r in responses} == {503}
    attempts = Counter(r.target for b in backends for r in b.requests)
    retries = sum(attempts.values()) - total
    # Without the budget every request would make its two retries (100 in all).
    # With it, retries stay within 20 % of the requests plus 3, across both workers.
    assert 3 <= retries <= 0.2 * total + 3
    # Each request that did not make both retries was refused one by the budget.
    denied = requests.get(f"{admin}/status", timeout=5).json()["retries_denied"]
    assert denied == sum(1 for n in attempts.values() if n < 3)


# --- 5. trials -----------------------------------------------------------------------


def worker_pids(master: int) -> list[int]:
    with open(f"/proc/{master}/task/{master}/children") as children:
        return [int(pid) for pid in children.read().split()]


def test_a_trial_that_never_answered_is_offered_again(balancer, closing):
    # Passes its health checks, but never answers a request.
    hung = closing(ScriptedBackend(delay=None))
    good = closing(ScriptedBackend())
    proc, url, admin = balancer(
        [hung, good], workers=1, LB_CHECK_INTERVAL_S="0.2", LB_READ_TIMEOUT="1.5",
        LB_REQUEST_TIMEOUT="2.5",
        # One failure blocks, and only a trial can end the block.
        LB_ERROR_POINTS="10", LB_BLOCK_TURNS="100000")
    state = lambda: backend_states(admin)[0]  # noqa: E731
    get = lambda: requests.get(f"{url}/x", timeout=10).status_code == 200  # noqa: E731

    # The first request times out there (and is retried): blocked.
    assert get() and state()["blocked"]
    # Its checks pass: a trial, which hangs too, times out and is reported failed.
    wait_for(lambda: get() and state()["trials"]["failed"] == 1, what="a failed trial")
    assert len(hung.requests) == 2 and state()["trial"] != "in flight"

    # Checks pass again: a second trial. Its worker dies before it answers, so it is
    # never reported; once it is older than LB_REQUEST_TIMEOUT, a third goes out.
    stop = threading.Event()

    def keep_asking() -> None:
        while not stop.wait(0.05):
            try:
                requests.get(f"{url}/x", timeout=10)
            except requests.RequestException:  # the request the killed worker held
                pass

    asker = threading.Thread(target=keep_asking, daemon=True)
    asker.start()
    try:
        wait_for(lambda: len(hung.requests) == 3, what="a second trial")
        [worker] = worker_pids(proc.popen.pid)
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: len(hung.requests) == 4, timeout=30, what="a third trial")
    finally:
        stop.set()
        asker.join()
    status = requests.get(f"{admin}/status", timeout=5).json()
    assert status["trial_picks"] == 3
    assert status["backends"][0]["trials"] == {"passed": 0, "failed": 2}  # the lost one: neither


# --- 6. connections that cannot be opened --------------------------------------------


class FailingHandshake(SocketServer):
    """An https:// backend whose TLS handshake fails: `untrusted` shows a certificate
    from a CA the balancer does not trust, `reset` closes on the ClientHello (with
    data unread, so the balancer sees a reset), `silent` never answers it."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.closed = threading.Event()
        if how == "untrusted":
            self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            trustme.CA().issue_cert("127.0.0.1").configure_cert(self.context)
        super().__init__()
        self.url = f"https://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.closed.set()
        super().close()

    def handle(self, conn: socket.socket) -> None:
        with conn:
            if self.how == "untrusted":
                try:
                    self.context.wrap_socket(conn, server_side=True).close()
                except ssl.SSLError:  # the balancer refused the certificate
                    pass
            elif self.how == "reset":
                conn.recv(1)
            else:
                self.closed.wait()


def test_a_connection_that_cannot_be_opened_is_retried_whatever_the_method(balancer,
                                                                           closing):
    failing = {"untrusted": "connect", "reset": "connect", "silent": "timeout"}
    servers = [closing(FailingHandshake(how)) for how in failing] + [closing(FullBacklog())]
    good = closing(ScriptedBackend())
    # Round robin: every POST meets the four failing backends before the good one.
    _, url, admin = balancer([*servers, good], LB_CONNECT_TIMEOUT="0.3", LB_RETRIES="4",
                             LB_STRATEGY="round_robin", LB_RETRY_BUDGET_MIN="100")
    total = 3
    responses = send(url, total, "POST", clients=1)
    assert [r.status_code for r in responses] == [200] * total, responses[0].text
    # Nothing reached the failing backends, so the POSTs went on, each delivered once.
    assert sorted((r.method, r.target, r.body) for r in good.requests) == [
        ("POST", f"/r/{i}", f"body {i}".encode()) for i in range(total)]
    outcomes = [b["outcomes"] for b in backend_states(admin)[:4]]
    assert outcomes == [{kind: total} for kind in [*failing.values(), "timeout"]]


# --- 7. health checks ----------------------------------------------------------------


def test_a_health_check_answered_with_a_redirect_passes(balancer, closing):
    moved, found, missing = (closing(ScriptedBackend(health=code)) for code in (301, 302, 404))
    _, _, admin = balancer([moved, found, missing], LB_CHECK_INTERVAL_S="0.1")

    def checked() -> bool:
        states = backend_states(admin)
        return states[2]["blocked"] and all(
            s["checks"]["passed"] + s["checks"]["failed"] >= 5 for s in states[:2])

    wait_for(checked, what="checks of every backend, and the 404 one blocked")
    for state in backend_states(admin)[:2]:
        assert not state["blocked"] and state["checks"]["failed"] == 0, state
        assert state["checks"]["last"] == "ok"
