"""The proxy driven through Flask's test client, without Gunicorn: retries, the request's
deadline and in-flight caps, on fakeredis, with fake backends (tests/fakes.py: they
raise what `Upstreams.send` raises) and a clock the test moves, as Flask's tutorial
tests its app: a factory, and fixtures that build it.
"""
from __future__ import annotations

import threading
from typing import Callable

import pytest
from prometheus_client import REGISTRY

from apps.lb.proxy import create_app
from scorer.pool import PROTOCOL, TIMEOUT, Pool
from apps.config import load_settings
from tests.fakes import FakeClock, FakeUpstreams, Reply

BACKENDS = "http://10.20.0.1:80,http://10.20.0.2:80,http://10.20.0.3:80,http://10.20.0.4:80"
BIG = b"x" * 300_000  # streamed: larger than one piece (STREAM_CHUNK)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def upstreams(clock) -> FakeUpstreams:
    return FakeUpstreams(clock)


@pytest.fixture
def make_app(fake_redis, clock, upstreams) -> Callable:
    """Build the proxy on fakeredis, the fake backends and the fake clock; `config`
    adds to the settings (no health checker, no access log)."""
    def make(**config: str):
        config = {"LB_BACKENDS": BACKENDS, "LB_CHECK_INTERVAL_S": "0", "LB_ACCESS_LOG": "off",
                  **config}
        pool = Pool(load_settings(overrides=config), redis_factory=lambda: fake_redis)
        return create_app(config, pool=pool, upstreams=upstreams, clock=clock)
    return make


@pytest.fixture
def client(make_app):
    return make_app().test_client()


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def attempts(backend: str, result: str) -> float:
    return metric("lb_upstream_attempts_total", backend=backend, result=result)


def all_attempts(backend: str) -> float:
    """Attempts on `backend` counted under any result."""
    return sum(sample.value for family in REGISTRY.collect()
               if family.name == "lb_upstream_attempts" for sample in family.samples
               if sample.name.endswith("_total") and sample.labels["backend"] == backend)


def in_flight(app) -> dict[str, int]:
    forwarder = app.extensions["lb.forwarder"]
    return {b.id: forwarder.inflight.count(b) for b in forwarder.pool.backends}


# --- retries --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_refused_connection_is_retried_on_another_backend_whatever_the_method(
        make_app, upstreams, method):
    app = make_app()
    upstreams.replies = [Reply(fault="refused"), Reply(body=b"second")]
    retries = metric("lb_retries_total")
    refused_before = {b: attempts(b, "connect") for b in in_flight(app)}
    answer = app.test_client().open("/x", method=method, data=b"payload")
    assert answer.status_code == 200 and answer.data == b"second"
    first, second = upstreams.sent
    assert first.body is None and second.body == b"payload"  # the body went once, whole
    assert first.backend != second.backend == answer.headers["X-Upstream"]
    assert metric("lb_retries_total") == retries + 1
    assert attempts(first.backend, "connect") == refused_before[first.backend] + 1
    assert set(in_flight(app).values()) == {0}  # every slot given back


def test_a_post_that_reached_a_backend_is_not_sent_again(make_app, upstreams):
    app = make_app()
    upstreams.replies = [Reply(fault="reset")]
    answer = app.test_client().post("/order", data=b"pay once")
    assert answer.status_code == 502
    assert answer.json["kind"] == PROTOCOL and answer.json["attempts"] == 1
    assert [s.body for s in upstreams.sent] == [b"pay once"]
    assert answer.headers["X-Upstream"] == upstreams.sent[0].backend
    assert set(in_flight(app).values()) == {0}


@pytest.mark.parametrize("fault", ["reset", "cut"])
def test_the_same_fault_on_a_get_is_retried_and_logged(client, upstreams, caplog, fault):
    upstreams.replies = [Reply(fault=fault), Reply(body=b"again")]
    with caplog.at_level("INFO", logger="lb.proxy"):
        answer = client.get("/page")
    assert (answer.status_code, answer.data) == (200, b"again")
    first, second = (s.backend for s in upstreams.sent)
    assert first != second
    assert [r.getMessage().split(": ")[0] for r in caplog.records] == [
        f"GET /page -> {first}", f"retrying GET /page on {second} after connection broken"]


def test_a_backend_that_breaks_off_a_streamed_answer_resets_the_client(make_app, upstreams,
                                                                       caplog):
    app = make_app(LB_RESPONSE_BUFFERING="0")
    upstreams.replies = [Reply(body=BIG, fault="cut")]
    answer = app.test_client().get("/big", buffered=False)
    backend = answer.headers["X-Upstream"]
    broken = attempts(backend, PROTOCOL)
    with caplog.at_level("WARNING", logger="lb.proxy"), pytest.raises(ConnectionResetError):
        answer.get_data()
    answer.close()
    assert attempts(backend, PROTOCOL) == broken + 1
    assert caplog.messages[0].startswith(f"upstream {backend} broke off a streamed body: ")
    assert in_flight(app)[backend] == 0


def test_a_retryable_status_is_relayed_when_no_retry_follows(make_app, upstreams):
    upstreams.replies = [Reply(status=503, body=b"busy")]
    answer = make_app(LB_RETRIES="0").test_client().get("/")
    assert (answer.status_code, answer.data) == (503, b"busy")
    assert len(upstreams.sent) == 1


def test_an_attempt_cut_by_a_bug_gives_its_slot_back_and_counts_nothing(make_app, upstreams):
    app = make_app(LB_BACKENDS="http://10.20.0.8:80")
    counted = all_attempts("10.20.0.8:80")
    upstreams.replies = [Reply(fault="bug")]
    answer = app.test_client().get("/")
    assert answer.status_code == 500 and len(upstreams.sent) == 1  # not retried
    assert in_flight(app) == {"10.20.0.8:80": 0}
    assert all_attempts("10.20.0.8:80") == counted


# --- the request's deadline -----------------------------------------------------------


def test_the_deadline_bounds_each_attempts_wait_and_ends_the_retries(make_app, clock,
                                                                     upstreams):
    app = make_app(LB_REQUEST_TIMEOUT="5", LB_READ_TIMEOUT="3", LB_CONNECT_TIMEOUT="1",
                   LB_RETRIES="3")
    upstreams.replies = [Reply(delay=10)] * 4  # every backend far too slow
    started = clock()
    answer = app.test_client().get("/slow")
    assert answer.status_code == 504
    assert answer.json["kind"] == TIMEOUT and answer.json["attempts"] == 2  # not 4
    waits = [(s.timeout.connect_timeout, s.timeout.read_timeout) for s in upstreams.sent]
    assert waits == [(1, 3), (1, 2)]  # the second waits only for what the deadline left
    assert clock() - started == 5
    assert set(in_flight(app).values()) == {0}


def test_latency_is_read_on_the_injected_clock(make_app, upstreams):
    client = make_app(LB_BACKENDS="http://10.20.0.9:80").test_client()
    before = metric("lb_upstream_latency_seconds_sum", backend="10.20.0.9:80")
    upstreams.replies = [Reply(delay=0.25)]
    assert client.get("/").status_code == 200
    assert metric("lb_upstream_latency_seconds_sum", backend="10.20.0.9:80") == before + 0.25


# --- in-flight caps ---------------------------------------------------------------------


def test_a_backend_at_its_in_flight_cap_is_passed_over(make_app, upstreams):
    app = make_app(LB_MAX_INFLIGHT="1")
    forwarder = app.extensions["lb.forwarder"]
    busy, *free = forwarder.pool.backends
    forwarder.inflight.take(busy)  # another request of this worker is under way there
    client = app.test_client()
    for _ in range(6):
        assert client.get("/").headers["X-Upstream"] != busy.id
    assert busy.id not in {s.backend for s in upstreams.sent}
    assert in_flight(app) == {busy.id: 1, **{b.id: 0 for b in free}}


def test_when_every_backend_is_at_its_cap_one_goes_over_it(make_app, upstreams):
    app = make_app(LB_MAX_INFLIGHT="1")
    forwarder = app.extensions["lb.forwarder"]
    for backend in forwarder.pool.backends:
        forwarder.inflight.take(backend)
    assert app.test_client().get("/").status_code == 200  # served, not refused
    assert len(upstreams.sent) == 1
    assert set(in_flight(app).values()) == {1}  # its slot over the cap is given back too


@pytest.mark.parametrize("buffering", ["0", "1"])
def test_a_streamed_answer_holds_its_slot_until_its_body_is_done(make_app, upstreams,
                                                                  buffering):
    app = make_app(LB_RESPONSE_BUFFERING=buffering)
    upstreams.replies = [Reply(body=BIG)]
    ok = {b: attempts(b, "2xx") for b in in_flight(app)}  # a pump may end before get returns
    answer = app.test_client().get("/big", buffered=False)
    backend = answer.headers["X-Upstream"]
    if buffering == "0":  # relayed at the client's pace: the backend is still in use
        assert in_flight(app)[backend] == 1
    assert answer.get_data() == BIG
    answer.close()
    pumps_done()
    assert in_flight(app)[backend] == 0
    assert attempts(backend, "2xx") == ok[backend] + 1


def test_a_client_that_leaves_a_streamed_answer_is_counted_not_reported(make_app, upstreams):
    app = make_app(LB_RESPONSE_BUFFERING="0")
    upstreams.replies = [Reply(body=BIG)]
    answer = app.test_client().get("/big", buffered=False)
    backend = answer.headers["X-Upstream"]
    ok, left = attempts(backend, "2xx"), attempts(backend, "client")
    answer.close()  # before reading a byte
    assert in_flight(app)[backend] == 0
    assert (attempts(backend, "2xx"), attempts(backend, "client")) == (ok, left + 1)


def pumps_done() -> None:
    """Join the pumps of buffered answers (apps/lb/buffered.py): each frees its backend
    once it has read the whole answer, maybe after the client got the last byte."""
    for thread in threading.enumerate():
        if thread.name == "lb-pump":
            thread.join(timeout=10)


def test_the_request_id_goes_to_the_backend_and_back_to_the_client(client, upstreams):
    answer = client.get("/", headers={"X-Request-ID": "abc-1"})
    assert answer.headers["X-Request-ID"] == "abc-1"
    assert upstreams.sent[0].headers["X-Request-ID"] == "abc-1"
