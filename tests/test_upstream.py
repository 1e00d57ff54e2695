"""Header and target rules of the proxy (pure functions)."""
from __future__ import annotations

import pytest

from apps.upstream import (
    client_response_headers, hop_by_hop, request_target, upstream_request_headers,
)
from scorer.settings import load_settings

BACKEND = load_settings(environ={"LB_BACKENDS": "http://10.0.0.5:9001"}).backends[0]


def forward(headers, preserve_host=False, backend=BACKEND):
    return upstream_request_headers(headers, backend=backend, client_addr="192.0.2.7",
                                    scheme="http", preserve_host=preserve_host)


@pytest.mark.parametrize("raw, expected", [
    ("/a/b?x=1&y=%2F", "/a/b?x=1&y=%2F"),
    ("/a//b/../c", "/a//b/../c"),
    ("//evil.example/x", "//evil.example/x"),  # a path, sent to the picked backend anyway
    ("http://evil.example:6379/x?q=1", "/x?q=1"),
    ("https://evil.example", "/"),
])
def test_request_target_keeps_only_path_and_query(raw, expected):
    assert request_target(raw) == expected


def test_hop_by_hop_headers_and_those_named_by_connection_are_dropped():
    out = forward([("Host", "lb.example"), ("Connection", "keep-alive, X-Secret"),
                   ("Keep-Alive", "timeout=5"), ("X-Secret", "1"), ("TE", "trailers"),
                   ("Transfer-Encoding", "chunked"), ("Upgrade", "h2c"),
                   ("Proxy-Authorization", "Basic x"), ("Proxy-Connection", "keep-alive"),
                   ("Trailer", "X"), ("Accept", "*/*"), ("Content-Type", "application/json")])
    assert set(out) == {"Accept", "Content-Type", "Host", "X-Forwarded-For",
                        "X-Forwarded-Proto", "X-Forwarded-Host"}


def test_forwarded_headers_are_appended_or_replaced():
    out = forward([("Host", "lb.example:8000"), ("X-Forwarded-For", "198.51.100.1"),
                   ("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "forged")])
    assert out["X-Forwarded-For"] == "198.51.100.1, 192.0.2.7"
    assert out["X-Forwarded-Proto"] == "http"
    assert out["X-Forwarded-Host"] == "lb.example:8000"
    assert out["Host"] == "10.0.0.5:9001"


def test_host_is_the_backends_unless_preserved():
    assert forward([("Host", "lb.example")], preserve_host=True)["Host"] == "lb.example"
    https = load_settings(environ={"LB_BACKENDS": "https://api.example"}).backends[0]
    assert forward([("Host", "lb.example")], backend=https)["Host"] == "api.example"


def test_response_headers_drop_hop_by_hop_and_keep_repeats():
    out = client_response_headers([
        ("Content-Type", "application/json"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"),
        ("Connection", "close, X-Internal"), ("X-Internal", "1"), ("Transfer-Encoding", "chunked"),
        ("Date", "yesterday"), ("Server", "echo"), ("Content-Encoding", "gzip")])
    assert out == [("Content-Type", "application/json"), ("Set-Cookie", "a=1"),
                   ("Set-Cookie", "b=2"), ("Content-Encoding", "gzip")]


def test_connection_tokens_are_case_insensitive():
    assert "x-a" in hop_by_hop([("connection", "X-A")])


def test_in_flight_flags_mark_tried_and_busy_backends():
    from apps.upstream import InFlight
    backends = load_settings(environ={}).backends
    inflight = InFlight(cap=2)
    assert inflight.flags(backends, []) == ""  # all eligible: nothing to say
    inflight.acquire(backends[1])
    inflight.acquire(backends[1])
    assert inflight.flags(backends, []) == ".b."
    assert inflight.flags(backends, [backends[0]]) == "xb."
    inflight.release(backends[1])
    assert inflight.flags(backends, [backends[2]]) == "..x"


def test_in_flight_counts_are_the_lb_upstream_inflight_gauge():
    from prometheus_client import REGISTRY

    from apps.upstream import InFlight
    backend = load_settings(environ={"LB_BACKENDS": "http://10.9.9.9:9"}).backends[0]
    gauge = lambda: REGISTRY.get_sample_value("lb_upstream_inflight",  # noqa: E731
                                              {"backend": backend.id})
    inflight = InFlight(cap=2)
    inflight.acquire(backend)
    inflight.acquire(backend)
    assert gauge() == 2
    inflight.release(backend)
    inflight.release(backend)
    assert gauge() == 0


def test_ipv6_backends_keep_their_brackets():
    backend = load_settings(environ={"LB_BACKENDS": "http://[::1]:9001,http://[fe80::1]"}).backends
    assert [b.id for b in backend] == ["[::1]:9001", "[fe80::1]:80"]
    assert forward([("Host", "lb")], backend=backend[0])["Host"] == "[::1]:9001"
    assert forward([("Host", "lb")], backend=backend[1])["Host"] == "[fe80::1]"


def test_expect_is_not_forwarded():
    assert "Expect" not in forward([("Host", "lb"), ("Expect", "100-continue")])


def test_a_chunked_answer_loses_its_content_length():
    assert client_response_headers([("Transfer-Encoding", "chunked"), ("Content-Length", "5"),
                                    ("X-A", "1")]) == [("X-A", "1")]
