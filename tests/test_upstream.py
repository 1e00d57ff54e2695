"""Header and target rules of the proxy (pure functions), and how a streamed answer ends."""
from __future__ import annotations

import io

import pytest
import urllib3

from apps.lb.forwarded import Hop, hop_of
from apps.lb.headers import (
    client_response_headers, cookie_header, hop_by_hop, request_target, upstream_request_headers,
)
from apps.lb.relay import BodyStream, start_stream
from apps.config import load_settings, parse_networks

BACKEND = load_settings(environ={"LB_BACKENDS": "http://10.0.0.5:9001"}).backends[0]


def forward(headers, preserve_host=False, backend=BACKEND, trusted=False, peer="192.0.2.7"):
    return upstream_request_headers(headers, backend=backend,
                                    hop=Hop(peer, "http", "8000", trusted),
                                    preserve_host=preserve_host)


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
    assert set(out) == {"Accept", "Content-Type", "Host", "X-Forwarded-For", "X-Real-IP",
                        "X-Forwarded-Proto", "X-Forwarded-Host", "X-Forwarded-Port", "Forwarded"}


SPOOFED = [("Host", "lb.example:8000"), ("X-Forwarded-For", "198.51.100.1"),
           ("X-Real-IP", "198.51.100.1"), ("X-Forwarded-Proto", "https"),
           ("X-Forwarded-Host", "forged"), ("X-Forwarded-Port", "443"),
           ("Forwarded", "for=198.51.100.1;proto=https"), ("X-Forwarded-Ssl", "on"),
           ("X-Forwarded-Protocol", "https"), ("X-Forwarded-Scheme", "https")]


def test_an_untrusted_clients_forwarding_headers_are_replaced_by_this_hops_view():
    out = forward(SPOOFED)
    assert {k: v for k, v in out.items() if k != "Host"} == {
        "X-Forwarded-For": "192.0.2.7", "X-Real-IP": "192.0.2.7", "X-Forwarded-Proto": "http",
        "X-Forwarded-Host": "lb.example:8000", "X-Forwarded-Port": "8000",
        "Forwarded": 'for=192.0.2.7;host="lb.example:8000";proto=http'}
    assert out["Host"] == "10.0.0.5:9001"


def test_a_trusted_proxys_forwarding_headers_are_kept_and_appended_to():
    out = forward(SPOOFED, trusted=True)
    assert out["X-Forwarded-For"] == "198.51.100.1, 192.0.2.7"
    assert out["Forwarded"] == ('for=198.51.100.1;proto=https, '
                                'for=192.0.2.7;host="lb.example:8000";proto=http')
    assert (out["X-Real-IP"], out["X-Forwarded-Proto"], out["X-Forwarded-Host"],
            out["X-Forwarded-Port"]) == ("198.51.100.1", "https", "forged", "443")
    assert out["X-Forwarded-Ssl"] == "on" and out["X-Forwarded-Scheme"] == "https"
    # A trusted proxy that sent none of them gets this hop's view.
    assert forward([("Host", "lb")], trusted=True)["X-Forwarded-For"] == "192.0.2.7"


def test_forwarded_quotes_ipv6_and_odd_hosts():
    out = forward([("Host", 'a"b')], peer="2001:db8::7")
    assert out["Forwarded"] == 'for="[2001:db8::7]";host="a\\"b";proto=http'
    assert forward([], peer="")["Forwarded"] == "for=unknown;proto=http"


def test_trust_is_decided_by_the_peer_address_alone():
    trusted = parse_networks("10.0.0.0/8,2001:db8::/32")
    environ = {"REMOTE_ADDR": "10.1.2.3", "SERVER_PORT": "8000"}
    assert hop_of(environ, trusted) == Hop("10.1.2.3", "http", "8000", True)
    assert hop_of({**environ, "REMOTE_ADDR": "::ffff:10.1.2.3"}, trusted).trusted
    assert not hop_of({**environ, "REMOTE_ADDR": "192.0.2.7"}, trusted).trusted
    assert not hop_of(environ, ()).trusted


@pytest.mark.parametrize("joined, expected", [
    ("a=1,b=2", "a=1; b=2"),              # two Cookie lines, as Gunicorn joins them
    ("a=1; c=3,b=2", "a=1; c=3; b=2"),
    ("a=1, b=2", "a=1; b=2"),
    ("a=1; b=2", "a=1; b=2"),             # one line: unchanged
    ('p={"x":1,"y":2}', 'p={"x":1,"y":2}'),  # a (non-conforming) comma in a value stays
    ("list=1,2,3", "list=1,2,3"),
])
def test_repeated_cookie_lines_are_joined_with_semicolons(joined, expected):
    assert cookie_header(joined) == expected
    assert forward([("Host", "lb"), ("Cookie", joined)])["Cookie"] == expected


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


def test_the_balancers_own_response_headers_are_dropped_from_the_backends():
    backends = [("X-Upstream", "203.0.113.9:80"), ("x-request-id", "b-1"), ("X-Upstream-Id", "k")]
    assert client_response_headers(backends) == [("X-Upstream-Id", "k")]


def test_a_slot_taken_by_another_thread_between_flags_and_pick_sends_the_pick_elsewhere():
    import fakeredis

    from apps.lb.policy import InFlight
    from apps.lb.proxy import Forwarder
    from apps.lb.upstream import Upstreams
    from scorer.pool import Pool
    settings = load_settings(environ={"LB_BACKENDS": "http://10.9.9.1:80,http://10.9.9.2:80",
                                      "LB_MAX_INFLIGHT": "1", "LB_CHECK_INTERVAL_S": "0"})
    pool = Pool(settings, redis_factory=lambda: fakeredis.FakeRedis(server=fakeredis.FakeServer()))
    inflight = InFlight(settings.max_inflight)
    forwarder = Forwarder(settings, pool, Upstreams(settings, maxsize=1), inflight)
    pick, raced = pool.pick, []

    def racing_pick(flags, retry=False):
        picked = pick(flags, retry)
        if not raced:  # another thread, between this one's flags and its take
            raced.append(inflight.take(picked))
        return picked

    pool.pick = racing_pick
    first, second = pool.backends
    assert forwarder.choose([]) == second  # first was lost to the other thread: picked again
    assert inflight.count(first) == inflight.count(second) == 1  # nobody over the cap
    # Every backend at its cap now: the pick goes over a cap on purpose, and keeps its slot.
    assert forwarder.choose([]) in (first, second)
    assert inflight.count(first) + inflight.count(second) == 3


def body_stream(size: int, ends: list) -> BodyStream:
    """A streamed answer of `size` bytes, as urllib3 hands it over; `ends` records on_end."""
    response = urllib3.HTTPResponse(io.BytesIO(b"b" * size), status=200,
                                    headers={"Content-Length": str(size)},
                                    preload_content=False)
    return BodyStream(response, start_stream(response),
                      on_end=lambda err, complete: ends.append((err, complete)))


def test_a_streamed_answer_read_to_its_end_is_complete():
    ends: list = []
    assert len(b"".join(body_stream(200_000, ends))) == 200_000
    assert ends == [(None, True)]


@pytest.mark.parametrize("pieces", [0, 1])
def test_a_streamed_answer_closed_before_its_end_is_the_clients_doing(pieces):
    """The WSGI server closes the stream early when the client left or stopped reading:
    no error, and not complete, so that the backend is not reported for it."""
    ends: list = []
    stream = body_stream(200_000, ends)
    chunks = iter(stream)
    for _ in range(pieces):
        next(chunks)
    stream.close()
    stream.close()
    assert ends == [(None, False)]
