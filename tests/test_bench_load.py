"""The threaded load test (bench/load.py): its maths offline, then one real run."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from bench import load
from bench.load_result import ERROR_KINDS, LoadResult, Outcome
from tests.support import ROOT, assert_shares, start_balancer, start_echo

# The final command line: `python -m bench` with no subcommand runs the load test.
BENCH = [sys.executable, "-m", "bench"]
JSON_KEYS = {"url", "requests", "workers", "wall_s", "successes", "errors", "error_rate",
             "throughput_rps", "latency_ms", "shares", "id_offset"}


# --- bodies and classification ---------------------------------------------------

def test_body_has_the_requested_size_and_carries_the_id():
    body = load.make_body(1234, 64)
    assert len(body) == 64
    assert json.loads(body)["id"] == 1234
    small = load.make_body(5, 0)  # too small to pad: the bare object
    assert json.loads(small) == {"id": 5, "pad": ""}


def test_status_classes():
    assert load.classify(200, True) == "success"
    assert load.classify(201, True) == "success"
    assert load.classify(200, False) == "bad_body"
    assert load.classify(404, True) == "4xx"
    assert load.classify(503, True) == "5xx"
    assert load.classify(302, True) == "other"


def test_exception_kinds():
    import requests
    assert load.classify_exception(requests.ReadTimeout()) == "timeout"
    # ConnectTimeout is also a ConnectionError: it must count once, as a timeout.
    assert load.classify_exception(requests.ConnectTimeout()) == "timeout"
    assert load.classify_exception(requests.ConnectionError()) == "connection"
    assert load.classify_exception(requests.exceptions.ChunkedEncodingError()) == "other"


# --- result maths and report -----------------------------------------------------

def sample_result() -> LoadResult:
    outcomes = (
        [Outcome("success", 200, 0.010, "a:1")] * 6
        + [Outcome("success", 200, 0.020, "b:2")] * 2
        + [Outcome("5xx", 500, 0.100, "a:1"),
           Outcome("bad_body", 200, 0.030, "b:2"),
           Outcome("timeout", None, None, detail="ReadTimeout: slow"),
           Outcome("connection", None, None, detail="ConnectionError: refused")]
    )
    return LoadResult.from_outcomes(outcomes, url="http://lb", workers=4, id_offset=100,
                                    wall_s=2.0, payload=64)


def test_result_counts_every_request_exactly_once():
    result = sample_result()
    assert result.requests == 12
    assert result.successes == 8
    assert result.errors == {"4xx": 0, "5xx": 1, "timeout": 1, "connection": 1,
                             "bad_body": 1, "other": 0}
    assert result.successes + result.error_count == result.requests
    assert result.error_rate == pytest.approx(4 / 12)


def test_throughput_and_latency_cover_answered_requests_only():
    result = sample_result()
    assert result.completed == 10  # the timeout and the refused connection got no answer
    assert result.throughput_rps == pytest.approx(10 / 2.0)
    latency = result.latency_ms()
    # Sorted: 6 x 10, 2 x 20, 30, 100 ms. Ranks ceil(q% x 10): 5, 9, 10.
    assert latency == pytest.approx({"p50": 10.0, "p90": 30.0, "p99": 100.0, "max": 100.0})


def test_shares_count_successes_only():
    result = sample_result()
    assert result.shares == {"a:1": 6, "b:2": 2}
    assert result.share_fractions() == {"a:1": {"count": 6, "fraction": 0.75},
                                        "b:2": {"count": 2, "fraction": 0.25}}


def test_to_dict_has_the_stable_keys_and_is_json():
    document = json.loads(json.dumps(sample_result().to_dict()))
    assert JSON_KEYS <= document.keys()
    assert document["id_offset"] == 100
    assert set(document["latency_ms"]) == {"p50", "p90", "p99", "max"}
    assert set(document["errors"]) == set(ERROR_KINDS)


def test_report_states_what_was_measured():
    text = sample_result().report()
    assert "12 requests from 4 workers" in text
    assert "X-Request-ID 100..111" in text
    assert "2.000 s" in text
    assert "all 10 answered requests" in text
    assert "ReadTimeout: slow" in text
    for kind in ERROR_KINDS:
        assert kind in text
    assert "75.0%" in text and "a:1" in text


def test_nothing_answered():
    result = LoadResult.from_outcomes(
        [Outcome("connection", None, None, detail="refused")] * 3,
        url="http://lb", workers=1, id_offset=0, wall_s=0.1)
    assert result.completed == 0 and result.throughput_rps == 0
    assert result.latency_ms() == {"p50": None, "p90": None, "p99": None, "max": None}
    assert "(no successes)" in result.report()
    json.dumps(result.to_dict())


def test_arguments_and_defaults():
    parser = argparse.ArgumentParser()
    load.add_arguments(parser)
    args = parser.parse_args([])
    assert (args.url, args.requests, args.workers, args.timeout, args.payload,
            args.id_offset, args.method, args.json, args.no_progress) == (
        "http://127.0.0.1:8000", 500, 100, 30.0, 64, 0, "POST", False, False)
    for bad in (["--workers", "0"], ["--requests", "-1"], ["--timeout", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_run_exits_2_when_nothing_answers(capsys):
    from tests.support import free_port
    parser = argparse.ArgumentParser()
    load.add_arguments(parser)
    args = parser.parse_args(["--url", f"http://127.0.0.1:{free_port()}", "--requests", "3",
                              "--workers", "2", "--json", "--no-progress"])
    assert load.run(args) == 2
    document = json.loads(capsys.readouterr().out)
    assert document["errors"]["connection"] == 3 and document["successes"] == 0


# --- end to end ------------------------------------------------------------------

@pytest.mark.e2e
def test_python_m_bench_through_the_balancer(redis_server, tmp_path):
    echoes = []
    try:
        echoes = [start_echo(i, tmp_path, seed=0) for i in range(3)]
        # round_robin: this checks the command's counts, which a latency block on a
        # busy machine (the scorer's business, tested on its own) would skew.
        proc, url, admin = start_balancer([u for _, u in echoes], redis_server, tmp_path,
                                          env={"LB_STRATEGY": "round_robin"})
        try:
            run = subprocess.run(
                [*BENCH, "--url", url, "--requests", "60", "--workers", "10", "--json",
                 "--no-progress"],
                cwd=ROOT, capture_output=True, text=True, timeout=90)
            assert run.returncode == 0, run.stderr
            document = json.loads(run.stdout)
            assert_shares({b: share["count"] for b, share in document["shares"].items()},
                          {u.removeprefix("http://"): 20 for _, u in echoes}, admin)
        finally:
            proc.stop()
        assert "Traceback" not in proc.output()
    finally:
        for echo, _ in echoes:
            echo.stop()
    assert JSON_KEYS <= document.keys()
    assert document["url"] == url
    assert (document["requests"], document["workers"], document["id_offset"]) == (60, 10, 0)
    assert document["successes"] == 60
    assert document["errors"] == {kind: 0 for kind in ERROR_KINDS}
    assert document["error_rate"] == 0
    assert document["wall_s"] > 0 and document["throughput_rps"] > 0
    latency = document["latency_ms"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert all(share["fraction"] == pytest.approx(1 / 3)
               for share in document["shares"].values())


def test_the_status_watch_reports_a_dipped_share_and_a_new_block():
    from bench.watch import Watch

    def status(share_b, blocks_c, blocked_c=False):
        return {"backends": [{"id": "a", "blocks": 0},
                             {"id": "b", "share": share_b, "blocks": 0},
                             {"id": "c", "blocks": blocks_c, "blocked": blocked_c}]}

    even = Watch()
    for _ in range(3):
        even.see(status(1.0, 2))  # two blocks from before the run do not count
    assert even.even and "no block throughout" in even.report()
    dipped = Watch()
    dipped.see(status(1.0, 2))
    dipped.see(status(0.997, 2))
    dipped.see(status(1.0, 2))
    assert not dipped.even and dipped.least_share["b"] == 0.997
    blocked = Watch()
    blocked.see(status(1.0, 2))
    blocked.see(status(1.0, 3, blocked_c=True))
    assert not blocked.even
    assert blocked.to_dict()["new_blocks"] == {"a": 0, "b": 0, "c": 1}
    assert blocked.least_share["c"] == 0.0  # blocked: no share at all
    assert not Watch().even  # nothing seen proves nothing
