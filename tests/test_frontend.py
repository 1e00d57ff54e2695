"""The proxy's plain-WSGI edge (apps/lb/frontend.py): the request read from the environ,
the answer handed to the server, and Flask answering what the proxy raises."""
from __future__ import annotations

import json

from werkzeug.test import EnvironBuilder

from apps.lb.errors import register_json_errors
from apps.lb.frontend import Incoming, Outgoing, ProxyFlask, json_answer


def environ(path: str = "/a%2Fb?x=1", method: str = "GET", **kwargs) -> dict:
    return EnvironBuilder(path=path, method=method, **kwargs).get_environ()


def started(answer: Outgoing, method: str = "GET") -> tuple[str, list, list[bytes]]:
    seen = {}

    def start_response(status, headers):
        seen["status"], seen["headers"] = status, headers

    body = list(answer(environ(method=method), start_response))
    return seen["status"], seen["headers"], body


def test_incoming_headers_are_named_as_werkzeug_names_them():
    req = Incoming(environ(headers={"X-Forwarded-For": "1.2.3.4", "Cookie": "a=1"},
                           data=b"{}", content_type="application/json"), started=5.0)
    headers = dict(req.headers)
    assert headers["X-Forwarded-For"] == "1.2.3.4" and headers["Cookie"] == "a=1"
    assert headers["Content-Type"] == "application/json" and headers["Content-Length"] == "2"
    assert req.header("content-type") == "application/json"
    assert req.header("Upgrade") == ""


def test_incoming_target_is_the_raw_uri_else_rebuilt_from_path_and_query():
    env = environ()
    assert Incoming(env, 0).target == env["RAW_URI"]
    del env["RAW_URI"], env["REQUEST_URI"]
    env["PATH_INFO"], env["QUERY_STRING"] = "/a b", "x=1"
    assert Incoming(env, 0).target == "/a%20b?x=1"


def test_a_clients_request_id_is_kept_when_sane_else_a_new_one():
    assert Incoming(environ(headers={"X-Request-ID": "abc-1"}), 0).request_id == "abc-1"
    fresh = Incoming(environ(headers={"X-Request-ID": "bad id\x01"}), 0).request_id
    assert fresh != "bad id\x01" and len(fresh) == 32


def test_an_answer_keeps_the_backends_headers_and_names_its_status_as_werkzeug_did():
    answer = Outgoing(201, [("Content-Length", "2"), ("Set-Cookie", "a=1"),
                            ("Set-Cookie", "b=2")], b"ok", upstream="127.0.0.1:9001")
    status, headers, body = started(answer)
    assert status == "201 CREATED"
    assert headers == [("Content-Length", "2"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"),
                       ("X-Upstream", "127.0.0.1:9001")]
    assert body == [b"ok"]
    assert started(Outgoing(599, [], b""))[0] == "599 UNKNOWN"


def test_no_body_and_no_content_length_where_http_allows_none():
    status, headers, body = started(Outgoing(204, [("Content-Length", "5")], b"hello"))
    assert ("Content-Length", "5") not in headers and body == []
    _, headers, body = started(Outgoing(304, [("Content-Type", "text/plain"),
                                              ("ETag", '"1"')], b"x"))
    assert headers == [("ETag", '"1"')] and body == []
    _, headers, body = started(Outgoing(200, [("Content-Length", "5")], b"hello"), "HEAD")
    assert ("Content-Length", "5") in headers and body == []


def test_a_relayed_body_that_is_not_sent_is_still_closed():
    class Relay:
        closed = False

        def __iter__(self):
            yield b"never"

        def close(self):
            Relay.closed = True

    _, _, body = started(Outgoing(200, [], Relay()), "HEAD")
    assert body == [] and Relay.closed


def test_the_balancers_own_errors_are_json_with_the_upstream_named():
    answer = json_answer(502, "upstream x: broken", source="balancer", upstream="x")
    status, headers, body = started(answer)
    assert status == "502 BAD GATEWAY" and ("X-Upstream", "x") in headers
    assert json.loads(body[0]) == {"error": "upstream x: broken", "status": 502,
                                   "source": "balancer", "upstream": "x"}


def test_what_the_handler_raises_flask_answers_with_a_json_500():
    app = ProxyFlask(__name__)
    register_json_errors(app, source="balancer")

    def broken(environ, start_response):
        raise RuntimeError("a bug")

    app.serve = broken
    answer = app.test_client().get("/x")
    assert answer.status_code == 500
    assert answer.get_json()["status"] == 500 and answer.get_json()["source"] == "balancer"


def test_the_balancers_own_answers_say_how_long_they_are():
    # Without a Content-Length the server would send them chunked (and a client
    # reading up to the close would see chunk sizes around the JSON).
    status, headers, body = started(json_answer(502, "no", upstream="b1"))
    assert status == "502 BAD GATEWAY"
    assert dict(headers)["Content-Length"] == str(len(body[0]))
    assert json.loads(body[0])["upstream"] == "b1" and dict(headers)["X-Upstream"] == "b1"


def test_the_path_for_log_lines_is_decoded_as_werkzeug_decodes_it():
    env = environ(path="/a%0Ab%C2%85c")
    assert Incoming(env, 0).path == "/a\nb\x85c"
    assert Incoming(env, 0).target == "/a%0Ab%C2%85c"
