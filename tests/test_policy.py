"""The balancer's decisions (apps/lb/policy.py), and the proxy and simulator following them."""
from __future__ import annotations

import ssl

import pytest
import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError, NewConnectionError, ProtocolError, ReadTimeoutError,
)
from urllib3.util.ssl_match_hostname import CertificateError

from apps.config import load_settings
from apps.lb.addresses import AddressRefused
from apps.lb.policy import (
    BROKEN, CONNECT_REFUSED, CONNECT_TIMEOUT, PICKS_PER_ATTEMPT, READ_TIMEOUT, TLS_HANDSHAKE,
    Fault, InFlight, choose_backend, judge_probe, may_retry, may_start,
)
from apps.lb.upstream import UpstreamError, classify, open_connection
from bench.scenario import Scenario
from bench.sim import Request, Simulation
from scorer.pool import CONNECT, PROTOCOL, TIMEOUT

BACKENDS = load_settings(environ={}).backends


# --- which failed attempt may be retried ---------------------------------------------

@pytest.mark.parametrize("method, delivered, non_idempotent, replayable, expected", [
    # Nothing reached the backend: any method, as long as the body can be sent again.
    ("POST", False, False, True, True),
    ("PATCH", False, False, True, True),
    ("POST", False, False, False, False),
    # It may have reached the backend: idempotent methods only...
    ("GET", True, False, True, True),
    ("PUT", True, False, True, True),
    ("DELETE", True, False, True, True),
    ("head", True, False, True, True),
    ("POST", True, False, True, False),
    ("PATCH", True, False, True, False),
    ("FOO", True, False, True, False),
    # ...unless the operator says repeats are harmless.
    ("POST", True, True, True, True),
    ("PUT", True, False, False, False),
])
def test_may_retry(method, delivered, non_idempotent, replayable, expected):
    assert may_retry(method, delivered=delivered, non_idempotent=non_idempotent,
                     body_replayable=replayable) is expected


# --- what each failure kind means: the table is what the proxy raises ----------------

class FailingConnection:
    """Stands for a urllib3 connection whose connect() fails with `exc`."""

    def __init__(self, exc: BaseException) -> None:
        self.exc, self.timeout = exc, None

    def connect(self) -> None:
        raise self.exc


def refused_by_policy() -> NewConnectionError:
    try:
        raise NewConnectionError(None, "not a backend") from AddressRefused("not a backend")
    except NewConnectionError as exc:
        return exc


@pytest.mark.parametrize("exc, fault", [
    (NewConnectionError(None, "refused"), CONNECT_REFUSED),
    (refused_by_policy(), CONNECT_REFUSED),
    (ConnectTimeoutError(None, "connect timed out"), CONNECT_TIMEOUT),
    (TimeoutError("handshake timed out"), CONNECT_TIMEOUT),
    (ssl.SSLError("bad certificate"), TLS_HANDSHAKE),
    (CertificateError("host name mismatch"), TLS_HANDSHAKE),
    (ConnectionResetError("reset in the handshake"), TLS_HANDSHAKE),
], ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None)
def test_a_failure_to_connect_is_the_policys_fault(exc, fault):
    with pytest.raises(UpstreamError) as raised:
        open_connection(FailingConnection(exc), urllib3.Timeout(connect=1, read=1))
    assert Fault(raised.value.kind, raised.value.delivered) == fault
    assert fault.delivered is False


@pytest.mark.parametrize("exc, fault", [
    (ReadTimeoutError(None, "/", "read timed out"), READ_TIMEOUT),
    (ProtocolError("Connection aborted.", ConnectionResetError()), BROKEN),
    (urllib3.exceptions.DecodeError("bad chunk"), BROKEN),
], ids=["read_timeout", "broken", "other"])
def test_a_failure_on_an_open_connection_is_the_policys_fault(exc, fault):
    error = classify(exc)
    assert Fault(error.kind, error.delivered) == fault
    assert fault.delivered is True


def test_each_fault_keeps_the_scorers_kind():
    assert [f.kind for f in (CONNECT_REFUSED, CONNECT_TIMEOUT, TLS_HANDSHAKE, READ_TIMEOUT,
                             BROKEN)] == [CONNECT, TIMEOUT, CONNECT, TIMEOUT, PROTOCOL]


# --- whether another attempt may start -------------------------------------------------

@pytest.mark.parametrize("attempts, retries, remaining, expected", [
    (0, 0, 5.0, True),     # the first attempt
    (1, 0, 5.0, False),    # LB_RETRIES=0: no second
    (1, 1, 5.0, True),
    (2, 1, 5.0, False),
    (1, 3, 0.0, False),    # the deadline has come
    (1, 3, -0.1, False),
    (0, 1, 0.001, True),
])
def test_may_start(attempts, retries, remaining, expected):
    assert may_start(attempts, retries, remaining) is expected


# --- which backends a pick may take ---------------------------------------------------

def test_in_flight_flags_mark_tried_and_busy_backends():
    backends = BACKENDS
    inflight = InFlight(cap=2)
    assert inflight.flags(backends, []) == ""  # all eligible: nothing to say
    assert inflight.take(backends[1]) and inflight.take(backends[1])
    assert not inflight.take(backends[1])  # at the cap: no slot, nothing counted
    assert inflight.flags(backends, []) == ".b."
    assert inflight.flags(backends, [backends[0]]) == "xb."
    assert inflight.take(backends[1], over_cap=True)  # every candidate was busy
    assert inflight.count(backends[1]) == 3
    inflight.release(backends[1])
    inflight.release(backends[1])
    assert inflight.flags(backends, [backends[2]]) == "..x"


def test_in_flight_counts_are_the_lb_upstream_inflight_gauge():
    from prometheus_client import REGISTRY

    from apps.lb.proxy import create_app
    backend = load_settings(environ={"LB_BACKENDS": "http://10.9.9.9:9"}).backends[0]
    gauge = lambda: REGISTRY.get_sample_value("lb_upstream_inflight",  # noqa: E731
                                              {"backend": backend.id})
    # The proxy's own counts, as create_app builds them (no Redis is reached).
    app = create_app({"LB_BACKENDS": backend.url, "LB_CHECK_INTERVAL_S": "0",
                      "REDIS_URL": "redis://127.0.0.1:1/0"})
    inflight = app.extensions["lb.forwarder"].inflight
    inflight.take(backend)
    inflight.take(backend)
    assert gauge() == 2
    inflight.release(backend)
    inflight.release(backend)
    assert gauge() == 0


class Picker:
    """Stands for the pool's pick: the first backend its flags leave eligible
    (then the first busy one, over its cap), recording what it was asked."""

    def __init__(self, backends, refuse=False, before=None, on_ask=None):
        self.backends, self.refuse, self.before, self.on_ask = backends, refuse, before, on_ask
        self.asked: list[tuple[str, bool]] = []

    def __call__(self, flags, retry=False):
        if self.on_ask:
            self.on_ask()
        made = flags(self.backends)
        self.asked.append((made, retry))
        if self.refuse:
            return None
        made = made or "." * len(self.backends)
        for wanted in ".b":
            if wanted in made:
                picked = self.backends[made.index(wanted)]
                if self.before:
                    self.before(picked)
                return picked
        return None


def test_choose_takes_a_slot_on_the_pick_and_tells_the_pool_what_was_tried():
    inflight = InFlight(cap=1)
    pick = Picker(BACKENDS)
    assert choose_backend(pick, inflight, []) == BACKENDS[0]
    assert inflight.count(BACKENDS[0]) == 1
    assert choose_backend(pick, inflight, [BACKENDS[1]]) == BACKENDS[2]
    assert pick.asked == [("", False), ("bx.", True)]


def test_choose_returns_none_when_the_pool_refuses_and_takes_nothing():
    inflight = InFlight(cap=1)
    assert choose_backend(Picker(BACKENDS, refuse=True), inflight, [BACKENDS[0]]) is None
    assert [inflight.count(b) for b in BACKENDS] == [0, 0, 0]


def test_a_pick_over_every_cap_keeps_its_slot():
    inflight = InFlight(cap=1)
    for backend in BACKENDS:
        inflight.take(backend)
    assert choose_backend(Picker(BACKENDS), inflight, []) == BACKENDS[0]
    assert inflight.count(BACKENDS[0]) == 2


def test_a_slot_lost_to_another_thread_sends_the_pick_elsewhere():
    inflight = InFlight(cap=1)
    raced = []

    def other_thread(picked):
        if not raced:  # between this pick's flags and its take
            raced.append(inflight.take(picked))

    pick = Picker(BACKENDS, before=other_thread)
    assert choose_backend(pick, inflight, []) == BACKENDS[1]
    assert [inflight.count(b) for b in BACKENDS] == [1, 1, 0]
    assert [made for made, _ in pick.asked] == ["", "b.."]


def test_a_pick_that_keeps_losing_the_race_goes_over_the_cap():
    inflight = InFlight(cap=1)
    backend = BACKENDS[0]
    # Another thread's request ends before each pick, and the next one takes the
    # slot between that pick's flags and its take.
    ended = lambda: inflight.count(backend) and inflight.release(backend)  # noqa: E731
    pick = Picker([backend], before=inflight.take, on_ask=ended)
    assert choose_backend(pick, inflight, []) == backend
    assert [made for made, _ in pick.asked] == [""] * PICKS_PER_ATTEMPT  # never seen busy
    assert inflight.count(backend) == 2  # the other thread's, and this one's over the cap


# --- how a health probe is judged -----------------------------------------------------

@pytest.mark.parametrize("status, error, kind", [
    (200, None, "ok"), (204, None, "ok"), (301, None, "ok"), (399, None, "ok"),
    (404, None, "http_4xx"), (429, None, "http_4xx"),
    (500, None, "http_5xx"), (503, None, "http_5xx"),
    (None, CONNECT, CONNECT), (None, TIMEOUT, TIMEOUT), (None, PROTOCOL, PROTOCOL),
])
def test_judge_probe(status, error, kind):
    outcome = judge_probe(BACKENDS[0], 0.25, status=status, error=error)
    assert (outcome.kind, outcome.backend, outcome.latency_s) == (kind, BACKENDS[0], 0.25)
    # A 5xx is scored as the status it was; a 4xx is no status the scorer sees.
    assert outcome.status == (status if status and not 400 <= status < 500 else None)


# --- the simulator decides as the proxy does -------------------------------------------

def simulation(**env):
    return Simulation(Scenario(seed=0, instances=3, method="POST"), "scored",
                      env={"LB_RETRIES": "2", **env})


@pytest.mark.parametrize("fault, status, retried", [
    # The drift fixed: the simulator took a connect timeout (kind TIMEOUT) for a
    # request that reached the backend, and never retried a POST after one.
    (CONNECT_TIMEOUT, None, True),
    (CONNECT_REFUSED, None, True),
    (TLS_HANDSHAKE, None, True),
    (READ_TIMEOUT, None, False),
    (BROKEN, None, False),
    (None, 503, False),  # a retryable status was delivered
])
def test_the_simulator_retries_a_post_as_the_proxy_does(fault, status, retried):
    sim = simulation()
    req = Request(0, 0.0, deadline=30.0, tried=[BACKENDS[0]], status=status, fault=fault)
    assert sim.may_try_again(req) is retried


def test_the_simulator_stops_at_the_deadline_and_at_the_retries():
    sim = simulation()
    assert not sim.may_try_again(Request(0, 0.0, deadline=0.0, tried=[BACKENDS[0]],
                                         fault=CONNECT_REFUSED))
    assert not sim.may_try_again(Request(0, 0.0, deadline=30.0, tried=list(BACKENDS),
                                         fault=CONNECT_REFUSED))


def test_the_simulator_retries_any_failure_of_an_idempotent_method():
    sim = Simulation(Scenario(seed=0, instances=3, method="GET"), "scored")
    assert all(sim.may_try_again(Request(0, 0.0, 30.0, [BACKENDS[0]], fault=fault))
               for fault in (CONNECT_TIMEOUT, READ_TIMEOUT, BROKEN))
