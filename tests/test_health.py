"""The health checker: one per pool, probes fed to the scorer (real HTTP, fake and real Redis)."""
from __future__ import annotations

import http.server
import threading
import time

import fakeredis
import pytest
import redis

from apps.lb.health import CHECK_HEADER, HealthChecker
from scorer.keys import checker_key
from scorer.pool import Pool
from apps.config import load_settings
from tests.support import free_port, wait_for


class CheckTarget:
    """A tiny HTTP server answering GET /health with a settable status, recording probes."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.seen: list[str] = []
        target = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                target.seen.append(self.headers.get(CHECK_HEADER, ""))
                self.send_response(target.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def targets():
    started = [CheckTarget(), CheckTarget(503), CheckTarget(404)]
    yield started
    for target in started:
        target.close()


def make_pool(client: redis.Redis, urls: list[str], **env: str) -> Pool:
    settings = load_settings(environ={"LB_BACKENDS": ",".join(urls), "LB_POOL": "h",
                                      "LB_CHECK_INTERVAL_S": "0.05", "LB_CHECK_TIMEOUT_S": "0.5",
                                      **env})
    return Pool(settings, redis_factory=lambda: client)


def test_one_checker_per_pool_and_another_takes_over(any_redis, targets):
    urls = [t.url for t in targets]
    first = HealthChecker(make_pool(any_redis, urls).settings, make_pool(any_redis, urls), "A")
    second = HealthChecker(first.settings, make_pool(any_redis, urls), "B")
    assert first.run_once() and not second.run_once()
    assert first.run_once()  # renewed
    assert [t.seen for t in targets] == [["A", "A"]] * 3  # only the holder probed
    any_redis.delete(checker_key("h"))  # the holder died and its lock expired
    assert second.run_once() and not first.run_once()
    assert targets[0].seen == ["A", "A", "B"]


def test_probe_results_reach_the_scorer(any_redis, targets):
    closed = f"http://127.0.0.1:{free_port()}"
    pool = make_pool(any_redis, [t.url for t in targets] + [closed])
    HealthChecker(pool.settings, pool, "A").run_once()
    checks = [b["checks"] for b in pool.status()["backends"]]
    assert [(c["passed"], c["failed"]) for c in checks] == [(1, 0), (0, 1), (0, 1), (0, 1)]
    assert [c["last"] for c in checks] == ["ok", "http_5xx", "http_4xx", "connect"]


def test_failing_checks_alone_block_a_backend(any_redis, targets):
    pool = make_pool(any_redis, [t.url for t in targets])
    checker = HealthChecker(pool.settings, pool, "A")
    for _ in range(5):
        checker.run_once()
    # The 503 and the 404 (a wrong check path fails too): blocked; the 200 stays.
    assert [b["blocked"] for b in pool.status()["backends"]] == [False, True, True]


def test_checks_pause_while_redis_is_away(tmp_path, targets):
    pool = make_pool(redis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0"),
                     [t.url for t in targets], LB_REDIS_RETRY_S="60")
    pool.pick()  # finds Redis unreachable: degraded
    assert pool.store.degraded
    assert not HealthChecker(pool.settings, pool, "A").run_once()
    assert targets[0].seen == []


@pytest.mark.e2e
def test_a_dead_holders_lock_expires_on_a_real_server(real_redis, redis_server, targets):
    urls = [t.url for t in targets]
    pool_a = make_pool(redis.Redis.from_url(redis_server), urls, LB_CHECK_TIMEOUT_S="0.05")
    pool_b = make_pool(redis.Redis.from_url(redis_server), urls, LB_CHECK_TIMEOUT_S="0.05")
    first, second = HealthChecker(pool_a.settings, pool_a, "A"), HealthChecker(
        pool_b.settings, pool_b, "B")
    assert first.run_once() and not second.run_once()
    ttl_ms = real_redis.pttl(checker_key("h"))
    assert 0 < ttl_ms <= first.ttl_s * 1000
    # A stops renewing (it died): within the TTL, B takes over.
    wait_for(second.run_once, timeout=5, what="takeover")
    assert pool_b.checker() == "B"


def test_the_checker_thread_runs_rounds_until_stopped(targets):
    pool = make_pool(fakeredis.FakeRedis(server=fakeredis.FakeServer()), [t.url for t in targets])
    checker = HealthChecker(pool.settings, pool, "A")
    checker.start()
    try:
        wait_for(lambda: len(targets[0].seen) >= 3, timeout=5, what="three rounds")
    finally:
        checker.stop()
    # The round under way may finish; none starts after it (the interval is 50 ms).
    time.sleep(0.1)
    seen = len(targets[0].seen)
    time.sleep(0.3)
    assert len(targets[0].seen) == seen


def test_a_checker_stopped_mid_round_ends_without_a_traceback(targets, caplog):
    pool = make_pool(fakeredis.FakeRedis(server=fakeredis.FakeServer()), [t.url for t in targets])
    checker = HealthChecker(pool.settings, pool, "A")
    hold = pool.hold_checker

    def stopped_while_holding(owner: str, ttl_s: float) -> bool:
        checker.stop()  # Gunicorn's worker_exit, between the lock and the probes,
        checker._probes.shutdown()  # then the interpreter's exit, which refuses new work
        return hold(owner, ttl_s)

    pool.hold_checker = stopped_while_holding
    with caplog.at_level("ERROR", logger="lb.health"):
        checker._loop()  # returns: the stop ends it
    assert "health check round failed" not in caplog.text
