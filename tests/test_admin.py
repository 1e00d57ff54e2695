"""The admin listener's endpoints, through Flask's test client on fakeredis."""
from __future__ import annotations

import logging

import fakeredis
import pytest

from apps.lb.admin import MAX_BODY, create_app
from apps.lb.admininput import nested_deeper
from apps.lb.adminstatus import redacted
from scorer.pool import Outcome, Pool
from apps.config import load_settings

TOKEN = "s3cret-token"


def make_admin(token: str = TOKEN, workers=lambda: [101, 102]):
    config = {"LB_ADMIN_TOKEN": token, "LB_ERROR_POINTS": "25", "LB_SCORE_THRESHOLD": "20"}
    settings = load_settings(environ={}, overrides=config)
    server = fakeredis.FakeServer()
    pool = Pool(settings, redis_factory=lambda: fakeredis.FakeRedis(server=server))
    return create_app(config, pool=pool, workers=workers).test_client(), pool


def blocked_backend(pool: Pool):
    backend = pool.backends[1]
    pool.report(Outcome(backend, 0.01, status=500))
    assert pool.status()["backends"][1]["blocked"]
    return backend


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Basic {TOKEN}", "Bearer "])
def test_reset_rejects_a_missing_or_wrong_token(authorization):
    client, pool = make_admin()
    backend = blocked_backend(pool)
    headers = {"Authorization": authorization} if authorization else {}
    response = client.post(f"/backends/{backend.id}/reset", headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert TOKEN not in response.get_data(as_text=True)
    assert pool.status()["backends"][1]["blocked"]


def test_reset_with_the_right_token_clears_score_and_block(caplog):
    client, pool = make_admin()
    backend = blocked_backend(pool)
    with caplog.at_level(logging.DEBUG):
        response = client.post(f"/backends/{backend.id}/reset",
                               headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200 and response.get_json() == {"reset": backend.id}
    state = pool.status()["backends"][1]
    assert not state["blocked"] and state["score"] == 0 and state["error_rate"] is None
    assert state["requests"] == 1  # counters stay
    assert TOKEN not in caplog.text


def test_reset_is_off_without_a_token():
    client, pool = make_admin(token="")
    response = client.post(f"/backends/{pool.backends[0].id}/reset",
                           headers={"Authorization": "Bearer "})
    assert response.status_code == 403 and "LB_ADMIN_TOKEN" in response.get_json()["error"]


def test_reset_of_an_unknown_backend_is_404():
    client, _ = make_admin()
    response = client.post("/backends/10.9.9.9:1/reset",
                           headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 404


def test_status_shows_scores_and_never_the_token():
    client, pool = make_admin()
    blocked_backend(pool)
    status = client.get("/status").get_json()
    assert status["workers"] == 2 and status["mode"] == "shared"
    assert status["backends"][1]["block_reason"].startswith("score 25.0 reached 20")
    assert TOKEN not in client.get("/status").get_data(as_text=True)


def test_ready_needs_a_worker():
    client, _ = make_admin(workers=lambda: [])
    assert client.get("/ready").status_code == 503


def test_redis_passwords_are_redacted():
    assert redacted("redis://:pw@host:6379/0") == "redis://:***@host:6379/0"
    assert redacted("redis://user:pw@host/0") == "redis://user:***@host/0"
    assert redacted("redis://host/0") == "redis://host/0"


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def ids(response) -> list[tuple[str, int, str]]:
    return [(b["id"], b["weight"], b["state"]) for b in response.get_json()["backends"]]


def test_membership_can_be_read_without_a_token():
    client, _ = make_admin()
    assert [i for i, _, _ in ids(client.get("/backends"))] == [
        "127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"]


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/backends", {"url": "http://127.0.0.1:9004"}),
    ("DELETE", "/backends/127.0.0.1:9001", None),
    ("POST", "/backends/127.0.0.1:9001/drain", None),
    ("POST", "/backends/127.0.0.1:9001/activate", None),
    ("PUT", "/backends/127.0.0.1:9001/weight", {"weight": 2}),
])
def test_every_membership_change_needs_the_token(method, path, body):
    client, pool = make_admin()
    assert client.open(path, method=method, json=body).status_code == 401
    assert client.open(path, method=method, json=body,
                       headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.open(path, method=method, json=body, headers=AUTH).status_code in (200, 201)


def test_add_drain_weigh_and_remove_backends():
    client, pool = make_admin()
    added = client.post("/backends", json={"url": "http://127.0.0.1:9004", "weight": 2},
                        headers=AUTH)
    assert added.status_code == 201 and ("127.0.0.1:9004", 2, "active") in ids(added)
    assert client.post("/backends", json={"url": "http://127.0.0.1:9004"},
                       headers=AUTH).status_code == 409
    drained = client.post("/backends/127.0.0.1:9001/drain", headers=AUTH)
    assert ("127.0.0.1:9001", 1, "draining") in ids(drained)
    weighed = client.put("/backends/127.0.0.1:9002/weight", json={"weight": 5}, headers=AUTH)
    assert ("127.0.0.1:9002", 5, "active") in ids(weighed)
    removed = client.delete("/backends/127.0.0.1:9003", headers=AUTH)
    assert "127.0.0.1:9003" not in [i for i, _, _ in ids(removed)]
    # The pool's picks follow: 9001 draining, 9002 five times, 9004 twice.
    picks = [pool.pick().id for _ in range(14)]
    assert picks.count("127.0.0.1:9002") == 10 and picks.count("127.0.0.1:9004") == 4
    assert "127.0.0.1:9001" not in picks
    status = client.get("/status").get_json()
    assert [(b["id"], b["state"]) for b in status["backends"]][0] == ("127.0.0.1:9001",
                                                                       "draining")


@pytest.mark.parametrize("method, path, body, status", [
    ("POST", "/backends", {"url": "ftp://x"}, 400),
    ("POST", "/backends", {"weight": 1}, 400),
    ("POST", "/backends", {"url": "http://a:1", "weight": 101}, 400),
    ("PUT", "/backends/127.0.0.1:9001/weight", {"weight": "heavy"}, 400),
    ("DELETE", "/backends/10.0.0.9:1", None, 404),
    ("POST", "/backends/10.0.0.9:1/drain", None, 404),
])
def test_bad_membership_changes_get_a_clear_4xx(method, path, body, status):
    client, _ = make_admin()
    response = client.open(path, method=method, json=body, headers=AUTH)
    assert response.status_code == status and response.is_json


def test_every_endpoint_that_needs_redis_answers_503_while_it_is_away():
    config = {"LB_ADMIN_TOKEN": TOKEN, "REDIS_URL": "redis://127.0.0.1:1/0",
              "LB_REDIS_TIMEOUT": "0.2"}
    client = create_app(config, workers=lambda: [101]).test_client()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    backend = load_settings(environ={}, overrides=config).backends[0].id
    answers = [client.get("/metrics"), client.get("/backends"),
               client.post(f"/backends/{backend}/drain", headers=auth),
               client.post("/backends", json={"url": "http://127.0.0.1:9009"}, headers=auth)]
    for response in answers:
        assert response.status_code == 503, response.get_data(as_text=True)
        assert response.get_json()["error"].startswith("Redis unavailable")
    assert client.get("/status").get_json()["redis"]["reachable"] is False
    # The token is still checked first.
    assert client.post(f"/backends/{backend}/drain").status_code == 401


def test_the_last_backend_that_can_serve_is_never_taken_away():
    client, pool = make_admin()
    answers = [client.delete(f"/backends/127.0.0.1:{port}", headers=AUTH).status_code
               for port in (9001, 9002, 9003)]
    assert answers == [200, 200, 409]
    refused = client.delete("/backends/127.0.0.1:9003", headers=AUTH)
    assert "no backend" in refused.get_json()["error"]
    # Redis, the admin's copy and the traffic all agree: one backend is left.
    assert [b["id"] for b in client.get("/backends").get_json()["backends"]] == ["127.0.0.1:9003"]
    assert {pool.pick().id for _ in range(4)} == {"127.0.0.1:9003"}
    # Nor can it be drained or weighted to nothing while it is the only one.
    assert client.post("/backends/127.0.0.1:9003/drain", headers=AUTH).status_code == 409
    assert client.put("/backends/127.0.0.1:9003/weight", json={"weight": 0},
                      headers=AUTH).status_code == 409
    # With another one serving, it can.
    assert client.post("/backends", json={"url": "http://127.0.0.1:9004"},
                       headers=AUTH).status_code == 201
    assert client.post("/backends/127.0.0.1:9003/drain", headers=AUTH).status_code == 200
    assert client.delete("/backends/127.0.0.1:9003", headers=AUTH).status_code == 200


@pytest.mark.parametrize("url, reason", [
    ("http://127.0.0.1:8000", "own LB_PORT"),
    ("http://[::1]:8001", "own LB_ADMIN_PORT"),
    ("http://127.0.0.1:0", "port 0"),
    ("http://a b:80", "invalid host name"),
    ("http://{a}:80", "invalid host name"),
    ("http://a\\b:80", "invalid host name"),
])
def test_adding_a_backend_that_would_loop_or_is_malformed_is_refused(url, reason):
    client, pool = make_admin()
    response = client.post("/backends", json={"url": url}, headers=AUTH)
    assert response.status_code == 400 and reason in response.get_json()["error"]
    assert len(pool.members) == 3


def test_adding_a_backend_outside_the_allowed_networks_is_refused():
    config = {"LB_ADMIN_TOKEN": TOKEN, "LB_BACKEND_NETWORKS": "127.0.0.0/8"}
    server = fakeredis.FakeServer()
    pool = Pool(load_settings(environ={}, overrides=config),
                redis_factory=lambda: fakeredis.FakeRedis(server=server))
    client = create_app(config, pool=pool, workers=lambda: [1]).test_client()
    refused = client.post("/backends", json={"url": "http://169.254.169.254"}, headers=AUTH)
    assert refused.status_code == 400
    assert "outside LB_BACKEND_NETWORKS" in refused.get_json()["error"]
    assert client.post("/backends", json={"url": "http://127.0.0.5:80"},
                       headers=AUTH).status_code == 201


def test_an_admin_body_over_the_cap_gets_413():
    client, pool = make_admin()
    body = {"url": "http://127.0.0.1:9004", "pad": "x" * MAX_BODY}
    response = client.post("/backends", json=body, headers=AUTH)
    assert response.status_code == 413 and response.is_json
    assert len(pool.members) == 3


@pytest.mark.parametrize("path, method", [("/backends", "POST"),
                                          ("/backends/127.0.0.1:9001/weight", "PUT")])
def test_deeply_nested_json_gets_400_not_500(path, method):
    client, _ = make_admin()
    deep = "[" * 30_000 + "]" * 30_000  # fits the body cap; json.loads alone would recurse
    response = client.open(path, method=method, data=deep, content_type="application/json",
                           headers=AUTH)
    assert response.status_code == 400 and "nested deeper" in response.get_json()["error"]
    assert nested_deeper(b'{"a": [[1]], "s": "[[[[[[[[[[[[[[[[[[[[[[[["}', 3) is False


def test_errors_never_echo_a_long_input_in_full():
    client, _ = make_admin()
    url = "http://" + "a" * 60_000 + ":0"
    response = client.post("/backends", json={"url": url}, headers=AUTH)
    assert response.status_code == 400 and len(response.get_data()) < 500
    missing = client.delete("/backends/" + "b" * 10_000, headers=AUTH)
    assert missing.status_code == 404 and len(missing.get_data()) < 500
