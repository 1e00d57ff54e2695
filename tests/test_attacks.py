"""bench/attacks/ and bench/slowclients.py: each attack kind against a small server
in this process that does what a balancer might (answer 408, reset, close at once),
the probe against an echo of its own, and one short run of the benchmark."""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import struct
import subprocess
import sys

import pytest

from bench import attacks, slowclients
from bench.attacks import ProbeResult, holding, slow, start_attack, start_probe, summary, unread
from bench.attacks.holding import backoff
from bench.loadgen import read_response
from tests.support import ROOT, SocketServer, wait_for


@pytest.fixture
def quick(monkeypatch):
    """Attackers that trickle every 10-20 ms, not every 1-2 s."""
    monkeypatch.setattr(slow, "SLOWLORIS_INTERVAL_S", 0.01)
    monkeypatch.setattr(slow, "TRICKLE_INTERVAL_S", 0.02)
    monkeypatch.setattr(holding, "PAUSE_S", 0.05)


class Recorder(SocketServer):
    """Records what each connection sent and from where; `answer(conn, data)` decides
    when to end it (returns True once it has)."""

    def __init__(self) -> None:
        self.peers: list[str] = []
        self.received: list[bytes] = []
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        self.peers.append(conn.getpeername()[0])
        data = b""
        with conn:
            try:
                while chunk := conn.recv(65536):
                    data += chunk
                    if self.answer(conn, data):
                        break
            except OSError:  # the attacker stopped: a reset
                pass
        self.received.append(data)

    def answer(self, conn: socket.socket, data: bytes) -> bool:
        raise NotImplementedError


def reset(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def run_until(kind: str, count: int, server: SocketServer, done, sources=None):
    """Attack `server` with `kind` until `done(tally)`; return the tally."""
    runner, tallies = start_attack(("127.0.0.1", server.port), {kind: count}, 60,
                                   {kind: sources} if sources else None)
    try:
        wait_for(lambda: done(tallies[kind]), timeout=20, what=f"{kind}: {tallies[kind]}")
    finally:
        tally = runner.stop()[kind]
        server.close()
    return tally


def test_slowloris_never_ends_its_head_and_counts_each_408(quick):
    class Deadline(Recorder):
        def answer(self, conn, data):
            if len(data) < 50:
                return False
            conn.sendall(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
            return True

    server = Deadline()
    tally = run_until("slowloris", 2, server, lambda t: t.closed >= 4,
                      sources=["127.0.3.1", "127.0.3.2"])
    assert tally.statuses == {408: tally.closed} and tally.opened > tally.closed - 1
    assert set(server.peers) == {"127.0.3.1", "127.0.3.2"}
    for head in server.received:
        assert head.startswith(b"GET /slowloris HTTP/1.1\r\nHost: lb\r\nX-Slow-0: 0\r\n")
        assert b"\r\n\r\n" not in head


@pytest.mark.parametrize("kind, framing", [
    ("slow_body_small", b"Content-Length: 5000\r\n"),
    ("slow_body_large", b"Content-Length: 5000000\r\n"),
    ("endless_chunked", b"Transfer-Encoding: chunked\r\n"),
])
def test_slow_bodies_send_a_whole_head_then_trickle(quick, kind, framing):
    class Cut(Recorder):
        def answer(self, conn, data):
            body = data.partition(b"\r\n\r\n")[2]
            if len(body) < 10:
                return False
            reset(conn)  # the server gives up on it: the attacker comes back
            return True

    server = Cut()
    tally = run_until(kind, 1, server, lambda t: t.closed >= 2)
    assert tally.opened >= 2 and tally.statuses == {}
    for data in server.received:
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"POST /") and framing in head + b"\r\n"
        assert body.startswith(b"1\r\n[\r\n2\r\n0,\r\n" if kind == "endless_chunked"
                               else b'{"p":"xxxx')


def test_never_read_reads_nothing_yet_sees_the_status_and_the_reset(quick):
    answer = 8_000_000   # more than the kernel's buffers on both sides hold
    written: list[int] = []

    class Big(Recorder):
        def answer(self, conn, data):
            if not data.startswith(b"GET /bytes/%d " % unread.NEVER_READ_BODY) or \
                    b"\r\n\r\n" not in data:
                return False
            conn.settimeout(0.5)
            sent = 0
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % answer)
                while sent < answer:
                    sent += conn.send(b"x" * 65536)
            except OSError:  # timed out, or the attacker stopped
                pass
            written.append(sent)
            reset(conn)
            return True

    server = Big()
    tally = run_until("never_read", 1, server, lambda t: t.closed >= 1 and t.opened >= 2)
    assert written and all(sent < answer for sent in written)
    assert tally.statuses[200] >= 1
    assert server.received[0] == b"GET /bytes/%d HTTP/1.1\r\nHost: lb\r\n\r\n" % \
        unread.NEVER_READ_BODY


def test_idle_sends_nothing_and_comes_back_when_closed(quick):
    class Closer(Recorder):
        def handle(self, conn):
            self.peers.append(conn.getpeername()[0])
            conn.setblocking(False)
            try:
                self.received.append(conn.recv(100))
            except BlockingIOError:
                self.received.append(b"")
            conn.close()

    server = Closer()
    tally = run_until("idle", 3, server, lambda t: t.closed >= 6)
    assert tally.opened >= 6 and set(server.received) == {b""}


def test_backoff_waits_longer_while_connections_die_young():
    assert backoff(0.5, 10.0) == (0.0, holding.PAUSE_S)       # lived: back at once
    assert backoff(0.5, 0.1) == (0.5, 1.0)
    assert backoff(0.5, None) == (0.5, 1.0)                   # never connected
    assert backoff(holding.MAX_PAUSE_S, 0.0) == (holding.MAX_PAUSE_S, holding.MAX_PAUSE_S)


class Echo(SocketServer):
    """PUT answers with its own body (keep-alive unless asked to close); `spoil` alters it."""

    def __init__(self, spoil: bool = False) -> None:
        self.spoil, self.connections = spoil, 0
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        self.connections += 1
        reader = conn.makefile("rb")
        with conn, reader:
            while reader.readline():  # the request line
                headers = {}
                while (line := reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode().partition(":")
                    headers[name.lower()] = value.strip()
                body = reader.read(int(headers.get("content-length", 0)))
                if self.spoil:
                    body = body.replace(b"probe", b"prone")
                close = headers.get("connection") == "close"
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (
                    len(body), b"Connection: close\r\n" if close else b"", body))
                if close:
                    return


@pytest.mark.parametrize("keepalive", [False, True])
def test_probe_sends_at_its_rate_and_checks_each_answer(keepalive):
    server = Echo()
    runner, _ = start_probe(("127.0.0.1", server.port), 50, 0.4, "127.0.4.1",
                            keepalive=keepalive)
    results = runner.result(30)
    server.close()
    assert sorted(r.index for r in results) == list(range(20))
    assert all(r.ok and r.status == 200 and r.error is None for r in results)
    assert summary(results)["lost"] == 0
    if keepalive:
        assert server.connections < len(results)
    else:
        assert server.connections == len(results)


def test_probe_counts_an_altered_body_or_no_answer_as_lost():
    spoiled = Echo(spoil=True)
    runner, _ = start_probe(("127.0.0.1", spoiled.port), 50, 0.1)
    results = runner.result(30)
    spoiled.close()
    assert results and all(r.status == 200 and not r.ok for r in results)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    results = start_probe(("127.0.0.1", port), 50, 0.1)[0].result(30)
    assert results and all(r.status is None and "ConnectionRefused" in r.error
                           for r in results)


def test_summary_counts_and_percentiles():
    results = [ProbeResult(i, i / 10, 200, True, (i + 1) / 1000) for i in range(99)]
    results.append(ProbeResult(99, 9.9, None, False, 5.0, "TimeoutError()"))
    got = summary(results)
    assert (got["sent"], got["ok"], got["lost"]) == (100, 99, 1)
    assert (got["p50_ms"], got["p99_ms"], got["max_ms"]) == (50.0, 99.0, 5000.0)
    assert got["statuses"] == {"200": 99, "None": 1} and got["errors"] == {"TimeoutError": 1}


def test_read_response_returns_the_body_however_it_is_framed():
    async def read(raw: bytes):
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        return await read_response(reader)

    assert asyncio.run(read(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")) == \
        (200, True, b"abc")
    assert asyncio.run(read(b"HTTP/1.1 201 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"2\r\nab\r\n1;x=y\r\nc\r\n0\r\n\r\n")) == (201, True, b"abc")
    assert asyncio.run(read(b"HTTP/1.0 200 OK\r\n\r\nto the end")) == (200, False, b"to the end")


def test_background_hands_back_the_coroutines_error():
    async def fail(stop):
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        attacks.Background(fail).stop()


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    slowclients.add_arguments(parser)
    return parser.parse_args(argv)


def test_mixes_are_each_kind_then_all_scaled_and_overridden():
    mixes = slowclients.mixes_of(parse())
    assert [name for name, _ in mixes] == [*attacks.KINDS, "all"]
    assert mixes[-1][1] == slowclients.COUNTS
    scaled = dict(slowclients.mixes_of(parse("--scale", "0.1", "--count", "idle=50",
                                             "--mixes", "idle,all")))
    assert scaled["idle"] == {"idle": 5} and scaled["all"]["slowloris"] == 20
    with pytest.raises(SystemExit):
        parse("--count", "nosuch=3")
    with pytest.raises(SystemExit):
        slowclients.mixes_of(parse("--mixes", "slowloris,nosuch"))


def test_each_kind_has_its_own_source_addresses():
    sources = slowclients.sources_of(3)
    assert sources["slowloris"] == ["127.0.2.1", "127.0.2.2", "127.0.2.3"]
    flat = [a for addresses in sources.values() for a in addresses]
    assert len(set(flat)) == len(flat) == 3 * len(attacks.KINDS)
    assert slowclients.PROBE_SOURCE not in flat


@pytest.mark.e2e
def test_a_short_run_reports_every_mix_and_saves_it():
    results = ROOT / "bench" / "results"
    before = set(results.glob("slowclients-*.json"))
    done = subprocess.run(
        [sys.executable, "-m", "bench", "slowclients", "--duration", "1", "--baseline", "1",
         "--ramp", "0.2", "--settle", "1", "--scale", "0.02", "--mixes", "slowloris,all",
         "--set", "LB_CHECK_INTERVAL_S=0"],
        cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stdout + done.stderr
    saved = set(results.glob("slowclients-*.json")) - before
    assert len(saved) == 1
    report = json.loads(saved.pop().read_text())
    assert report["worker_class"] and report["settings"] == {"LB_CHECK_INTERVAL_S": "0"}
    assert report["baseline"]["sent"] == 50 and report["baseline"]["lost"] == 0
    assert [m["mix"] for m in report["mixes"]] == ["slowloris", "all"]
    every = report["mixes"][1]
    assert set(every["attack"]) == set(attacks.KINDS)
    assert all(t["opened"] >= 1 for t in every["attack"].values())
    for when in ("before", "during", "after"):
        usage = every["workers"][when]
        assert len(usage) == 2 and all(u["fds"] > 0 and u["rss_kb"] > 0 for u in usage.values())
    for line in ("probe alone:", "p99/alone", "what the balancer did"):
        assert line in done.stdout
