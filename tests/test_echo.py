"""The echo backend, through Flask's test client."""
from __future__ import annotations

import io
import json

import pytest

from apps.echo.app import HANG_S, create_app
from apps.echo.profiles import draw, profile_for


@pytest.fixture
def sleeps() -> list[float]:
    return []


def make_client(sleeps: list[float], **config):
    app = create_app({"SEED": 0, "ECHO_INSTANCE": 0, "sleep": sleeps.append, **config})
    return app.test_client()


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH"])
@pytest.mark.parametrize("path", ["/", "/any/path", "/health"])
def test_echoes_the_exact_json_bytes(sleeps, method, path):
    body = b'{"b": [1, 2.50, "\\u00e9"],   "a":{}}'
    response = make_client(sleeps).open(path, method=method, data=body,
                                        content_type="application/json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.get_data() == body


def test_json_with_a_suffix_type_is_accepted(sleeps):
    response = make_client(sleeps).post("/", data=b"[1]", content_type="application/problem+json")
    assert response.status_code == 200


@pytest.mark.parametrize("body, content_type, status, words", [
    (b'{"a":1}', "text/plain", 415, "Content-Type"),
    (b'{"a":1}', None, 415, "Content-Type"),
    (b'{"a":', "application/json", 400, "malformed JSON"),
    (b"\xff\xfe{", "application/json", 400, "malformed JSON"),
    (b"", "application/json", 400, "empty body"),
])
def test_bad_input_gets_a_json_4xx(sleeps, body, content_type, status, words):
    response = make_client(sleeps).post("/x", data=body, content_type=content_type)
    assert response.status_code == status
    assert response.mimetype == "application/json"
    assert words in response.get_json()["error"]


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_over_the_limit_gets_413(sleeps, chunked):
    body = b"1" * 250  # a valid JSON number, even when cut short
    client = make_client(sleeps, ECHO_MAX_BODY=100)
    if chunked:
        response = client.post("/", input_stream=io.BytesIO(body), content_type="application/json",
                               environ_overrides={"wsgi.input_terminated": True})
    else:
        response = client.post("/", data=body, content_type="application/json")
    assert response.status_code == 413
    assert response.get_json()["status"] == 413


@pytest.mark.parametrize("method", ["GET", "DELETE", "FOO"])
def test_other_methods_get_405_with_allow(sleeps, method):
    response = make_client(sleeps).open("/x", method=method)
    assert response.status_code == 405
    assert response.mimetype == "application/json"
    assert {"POST", "PUT", "PATCH"} <= set(response.headers["Allow"].split(", "))


def test_health_and_profile(sleeps):
    assert make_client(sleeps, ECHO_INSTANCE=2).get("/health").get_json() == {
        "instance": "echo-2", "state": "healthy"}
    client = make_client(sleeps, SEED=11, ECHO_INSTANCE=2)
    profile = client.get("/profile").get_json()
    assert (profile["id"], profile["instance"]) == ("echo-2", 2)
    assert profile["error_rate"] == profile_for(11, 2).error_rate
    assert profile["mean_latency_ms"] == profile_for(11, 2).mean_latency_ms


def test_the_seed_decides_each_request_by_its_id(sleeps):
    client = make_client(sleeps, SEED=5, ECHO_INSTANCE=1)
    profile = profile_for(5, 1)
    ids = [str(i) for i in range(60)]
    statuses = [client.post("/", data=b"{}", content_type="application/json",
                            headers={"X-Request-ID": i}).status_code for i in ids]
    expected = [draw(profile, i) for i in ids]
    assert statuses == [500 if d.fail else 200 for d in expected]
    assert sleeps == [d.latency_s for d in expected if d.latency_s]
    assert 500 in statuses and 200 in statuses  # this seed exercises both branches
    # The same ids again, in another order, behave the same.
    again = make_client([], SEED=5, ECHO_INSTANCE=1)
    assert [again.post("/", data=b"{}", content_type="application/json",
                       headers={"X-Request-ID": i}).status_code for i in reversed(ids)] \
        == statuses[::-1]


def test_a_simulated_failure_is_a_json_500(sleeps):
    client = make_client(sleeps, SEED=5, ECHO_INSTANCE=1)
    failing = next(str(i) for i in range(1000) if draw(profile_for(5, 1), str(i)).fail)
    response = client.post("/", data=b"{}", content_type="application/json",
                           headers={"X-Request-ID": failing})
    assert response.status_code == 500
    assert json.loads(response.get_data())["error"] == "simulated failure"


def test_the_profile_is_printed_at_start_up(capsys, sleeps):
    make_client(sleeps, SEED=9, ECHO_INSTANCE=1)
    out = capsys.readouterr().out
    assert out.startswith("echo-1: profile ") and '"seed": 9' in out


def test_a_known_fault_overrides_the_seeded_profile(sleeps):
    client = make_client(sleeps, SEED=0, ECHO_ERROR_RATE="1", ECHO_MEAN_LATENCY_MS="250")
    assert client.get("/profile").get_json()["error_rate"] == 1.0
    response = client.post("/", data=b"{}", content_type="application/json")
    assert response.status_code == 500 and len(sleeps) == 1 and sleeps[0] > 0


def test_profile_counts_the_requests_served_not_health_checks(sleeps):
    client = make_client(sleeps, ECHO_ERROR_RATE="1")
    client.get("/health")
    for _ in range(3):  # failed ones reached the instance too: a balancer's attempts
        client.post("/x", data=b"{}", content_type="application/json")
    assert client.get("/profile").get_json()["served"] == 3


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def post(client, **headers):
    return client.post("/", data=b"{}", content_type="application/json", headers=headers)


def test_fail_then_recover_follows_the_clock(sleeps):
    clock = FakeClock()
    client = make_client(sleeps, clock=clock, ECHO_PROFILE="fail_recover:start=5,period=10")
    assert post(client).status_code == 200 and client.get("/health").status_code == 200
    clock.now = 6
    assert post(client).status_code == 500
    health = client.get("/health")
    assert health.status_code == 503 and health.get_json()["state"] == "failing"
    clock.now = 15.5
    assert post(client).status_code == 200
    assert client.get("/health").get_json()["state"] == "healthy"


def test_a_degrading_instance_answers_ever_more_slowly(sleeps):
    clock = FakeClock()
    client = make_client(sleeps, clock=clock,
                         ECHO_PROFILE="degrading:start=0,period=10,factor=5,latency=100")
    means = []
    for t in (0, 5, 10, 20):
        clock.now = t
        sleeps.clear()
        for i in range(200):
            post(client, **{"X-Request-ID": f"{t}-{i}"})
        means.append(sum(sleeps) / 200)
    assert means[0] < means[1] < means[2]
    assert means[2] == pytest.approx(0.5, rel=0.15) and means[3] == pytest.approx(0.5, rel=0.15)
    # The health check is slow too.
    sleeps.clear()
    client.get("/health")
    assert sleeps and sleeps[0] > 0.05


@pytest.mark.parametrize("spec", ["hang:start=0", "reset:start=0,factor=1", "dead:start=0"])
def test_hung_reset_and_dead_instances_never_answer(sleeps, spec):
    client = make_client(sleeps, ECHO_PROFILE=spec)
    with pytest.raises(ConnectionResetError):
        post(client)
    assert (HANG_S in sleeps) == spec.startswith("hang")


def test_a_dead_instance_closes_its_port_on_time():
    import selectors
    import socket

    from apps.echo.app import close_listeners

    class Listener:  # as Gunicorn's: a wrapper with .sock, registered itself
        def __init__(self) -> None:
            self.sock = socket.create_server(("127.0.0.1", 0))

        def fileno(self) -> int:
            return self.sock.fileno()

    class Worker:
        def __init__(self) -> None:
            self.sockets = [Listener()]
            self.poller = selectors.DefaultSelector()
            self.poller.register(self.sockets[0], selectors.EVENT_READ)

    worker = Worker()
    listener = worker.sockets[0]
    port = listener.sock.getsockname()[1]
    close_listeners(worker)
    assert worker.sockets == [] and not worker.poller.get_map()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
    listener.sock.close()


def test_profiles_from_a_scenario_file(tmp_path, sleeps):
    scenario = tmp_path / "scenario.json"
    scenario.write_text(json.dumps({"1": "flapping:start=0,period=2"}))
    client = make_client(sleeps, ECHO_INSTANCE=1, ECHO_SCENARIO=str(scenario))
    assert client.get("/profile").get_json()["kind"] == "flapping"
    other = make_client(sleeps, ECHO_INSTANCE=0, ECHO_SCENARIO=str(scenario))
    assert other.get("/profile").get_json()["kind"] == "steady"


def test_a_bad_profile_stops_start_up_with_one_line(sleeps):
    with pytest.raises(SystemExit) as caught:
        make_client(sleeps, ECHO_PROFILE="melting:start=1")
    assert str(caught.value).startswith("echo: invalid setting ECHO_PROFILE: unknown profile kind")
