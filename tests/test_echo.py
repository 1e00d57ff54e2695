"""The echo backend, through Flask's test client."""
from __future__ import annotations

import io
import json

import pytest

from apps.echo import create_app
from apps.simulate import draw, profile_for


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
    client = make_client(sleeps, SEED=11, ECHO_INSTANCE=2)
    assert client.get("/health").get_json() == {"instance": "echo-2", "state": "steady"}
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
