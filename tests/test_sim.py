"""The offline simulator and the matrix's summary maths."""
from __future__ import annotations

import pytest

from bench.matrix_report import (
    SETTLED_BAND, _closed, _geomean, convergence, first_share_per_window, summarize,
)
from bench.mixed_report import WARMUP_S
from bench.scenario import BASE_SERVICE_S, WINDOW_S, Answered, Scenario
from bench.sim import Simulation, simulate_cell
from bench.stats import percentile

SMALL = dict(requests=600, clients=20)


def test_the_same_scenario_gives_the_same_result():
    scenario = Scenario(seed=7, instances=3, **SMALL)
    first = simulate_cell(scenario, "scored").to_dict()
    again = simulate_cell(scenario, "scored").to_dict()
    assert first == again


def test_other_request_ids_give_other_draws():
    a = simulate_cell(Scenario(seed=7, instances=3, **SMALL), "round_robin")
    b = simulate_cell(Scenario(seed=7, instances=3, id_offset=10**6, **SMALL), "round_robin")
    assert a.errors != b.errors or a.p99_ms != b.p99_ms


@pytest.mark.parametrize("strategy", ["round_robin", "scored", "oracle"])
def test_a_healthy_pool_splits_evenly_with_no_errors_and_no_blocks(strategy):
    result = simulate_cell(Scenario(seed=0, instances=3, requests=900, clients=12), strategy)
    assert result.errors == 0 and result.blocks == 0
    assert set(result.shares.values()) == {300}


def test_round_robin_spreads_evenly_across_a_faulty_pool():
    result = simulate_cell(Scenario(seed=0, instances=3, requests=900, clients=3,
                                    faults=((0, 0.5, 0.0),)), "round_robin")
    assert result.requests == 900
    # Failed requests do not count in the shares: only successes do.
    assert result.shares["10.0.0.2:80"] == result.shares["10.0.0.3:80"] == 300
    assert 100 < result.shares["10.0.0.1:80"] < 200


def test_a_failing_instance_gets_a_small_share_under_scored():
    scenario = Scenario(seed=0, instances=3, requests=1200, clients=20, faults=((0, 0.5, 0.0),))
    scored = simulate_cell(scenario, "scored")
    rr = simulate_cell(scenario, "round_robin")
    assert scored.errors < rr.errors / 3
    assert scored.blocks > 0


def test_queueing_makes_piling_onto_one_backend_cost_time():
    # One backend with 2 threads and 200 ms answers: 20 clients queue behind it.
    scenario = Scenario(seed=0, instances=1, requests=200, clients=20, backend_threads=2,
                        faults=((0, 0.0, 200.0),))
    result = simulate_cell(scenario, "round_robin")
    assert result.p50_ms > 1000  # ten requests ahead of each, on average


def test_the_oracle_avoids_a_known_bad_backend():
    scenario = Scenario(seed=0, instances=3, requests=600, clients=10, faults=((1, 0.9, 0.0),))
    oracle = simulate_cell(scenario, "oracle")
    assert oracle.errors == 0 and oracle.shares["10.0.0.2:80"] == 0


def answered(scenario: Scenario, strategy: str = "round_robin",
             env: dict[str, str] | None = None) -> list[Answered]:
    """Every request of one run as its client recorded it, in the order they finished."""
    sim = Simulation(scenario, strategy, env)
    sim.run()
    return sim.answered


def sends_by_client(answers: list[Answered]) -> dict[int, list[Answered]]:
    by: dict[int, list[Answered]] = {}
    for a in sorted(answers, key=lambda a: a.sent):
        by.setdefault(a.client, []).append(a)
    return by


def test_a_paced_healthy_pool_sends_rate_times_duration_on_schedule():
    # 8 threads at 100 requests/s for 5 s: answers take 0.5 ms, so no thread falls
    # behind and the sends are exactly 1/rate apart, thread k first at k/rate.
    answers = answered(Scenario(seed=0, instances=3, requests=500, clients=8, rate=100.0))
    sends = sorted(a.sent for a in answers)
    assert sends == pytest.approx([i / 100 for i in range(500)])
    assert sum(1 for t in sends if t < 5.0) == 500  # 100 requests/s x 5 s
    firsts = {k: mine[0].sent for k, mine in sends_by_client(answers).items()}
    assert firsts == pytest.approx({k: k * (8 / 100) / 8 for k in range(8)})


def test_a_closed_loop_sends_every_client_at_once():
    answers = answered(Scenario(seed=0, instances=3, requests=100, clients=8))
    assert {mine[0].sent for mine in sends_by_client(answers).values()} == {0.0}


def test_a_slow_backend_delays_only_its_own_thread():
    # Round robin over a 0 ms and a 300 ms backend; each of 4 threads has a slot
    # every 200 ms. A thread sends at its slot, or at once when its answer came
    # after it: only a late answer of its own makes a thread late.
    interval = 4 / 20.0
    answers = answered(Scenario(seed=0, instances=2, requests=200, clients=4, rate=20.0,
                                faults=((1, 0.0, 300.0),)))
    late = on_time = 0
    for k, mine in sends_by_client(answers).items():
        slots = [k * interval / 4 + j * interval for j in range(len(mine))]
        for j, (before, this) in enumerate(zip(mine, mine[1:]), 1):
            assert this.sent == pytest.approx(max(before.finished, slots[j]))
            if before.finished > slots[j]:
                late += 1
                # Late after the slow backend, or after being late already.
                assert before.attempts[0][1] == "10.0.0.2:80" or \
                    before.sent > slots[j - 1] + 1e-9
            else:
                on_time += 1
    assert late > 10 and on_time > 50


@pytest.mark.parametrize("rate", [0.0, 50.0])
def test_virtual_s_is_when_the_last_request_finished(rate):
    # The read timeouts' no-op events run until 15 s after the last attempt started:
    # they are not part of the run. Each answer takes BASE_SERVICE_S: closed, 6
    # clients send 50 requests each back to back; paced, the last is sent at 299/50 s.
    scenario = Scenario(seed=0, instances=3, requests=300, clients=6, rate=rate)
    result = simulate_cell(scenario, "round_robin")
    finished = 299 / 50 + BASE_SERVICE_S if rate else 50 * BASE_SERVICE_S
    assert result.virtual_s == pytest.approx(finished)


# Every 500 retried elsewhere (the retry budget would refuse some).
RETRY_500 = {"LB_RETRY_NON_IDEMPOTENT": "1", "LB_RETRY_ON_STATUS": "500", "LB_RETRY_BUDGET": "1"}


def test_shares_of_attempts_from_the_warmup_on():
    # Instance 1 always answers 500 after about 100 ms, retried elsewhere: it has
    # attempts but no successes, and some retries start after the warm-up for
    # requests sent before it (counted: an echo counts what it serves, when).
    scenario = Scenario(seed=0, instances=3, requests=300, clients=4, rate=60.0,
                        faults=((1, 1.0, 100.0),))
    answers = answered(scenario, env=RETRY_500)
    result = simulate_cell(scenario, "round_robin", RETRY_500)
    assert any(a.sent < WARMUP_S <= a.attempts[-1][0] for a in answers)
    attempts = [b for a in answers for started, b in a.attempts if started >= WARMUP_S]
    assert len(attempts) > sum(1 for a in answers if a.sent >= WARMUP_S)  # retries too
    assert result.attempts_after_warmup == {b: attempts.count(b) for b in result.shares}
    assert result.errors == 0
    assert result.shares["10.0.0.2:80"] == 0 < result.attempts_after_warmup["10.0.0.2:80"]


def test_p95_of_the_requests_sent_from_the_warmup_on():
    # The latency rises over the warm-up (2 ms to 100 ms): from it on, the p95 is
    # above the whole run's.
    scenario = Scenario(seed=0, instances=1, requests=300, clients=4, rate=60.0,
                        specs=((0, f"degrading:start=0,period={WARMUP_S},factor=10"),),
                        faults=((0, 0.0, 2.0),))
    answers = answered(scenario)
    result = simulate_cell(scenario, "round_robin")
    settled = sorted(a.latency_s for a in answers if a.sent >= WARMUP_S)
    assert 0 < len(settled) < len(answers)
    assert result.p95_after_warmup_ms == pytest.approx(percentile(settled, 95) * 1000)
    assert result.p95_after_warmup_ms > result.p95_ms


def test_a_run_over_before_the_warmup_has_nothing_after_it():
    result = simulate_cell(Scenario(seed=0, instances=3, **SMALL), "round_robin")
    assert result.p95_after_warmup_ms is None
    assert set(result.attempts_after_warmup.values()) == {0}
    assert result.attempt_windows == [] and result.load_s == 0


def test_the_windows_add_up_to_the_attempts_from_the_warmup_on():
    # As above: retries of instance 1's 500s, some starting after the warm-up for
    # requests sent before it; 60 requests/s for 5 s, so windows from 3 s to 5 s
    # and perhaps a straggler's after.
    scenario = Scenario(seed=0, instances=3, requests=300, clients=4, rate=60.0,
                        faults=((1, 1.0, 100.0),))
    answers = answered(scenario, env=RETRY_500)
    result = simulate_cell(scenario, "round_robin", RETRY_500)
    backends = list(result.shares)
    expected: dict[int, list[int]] = {}
    for a in answers:
        for started, backend in a.attempts:
            if started >= WARMUP_S:
                k = int((started - WARMUP_S) // WINDOW_S)
                expected.setdefault(k, [0] * len(backends))[backends.index(backend)] += 1
    windows = result.attempt_windows
    assert len(windows) == max(expected) + 1 >= 2 and result.load_s == 5.0
    assert windows == [expected.get(k, [0, 0, 0]) for k in range(len(windows))]
    assert [sum(w[i] for w in windows) for i in range(3)] == \
        [result.attempts_after_warmup[b] for b in backends]
    assert sum(windows[0]) > 60  # a second's requests, and retries


def test_fastest_sends_everything_to_the_lowest_mean_latency():
    # Instance 1 is the fastest (5 ms) but has one thread and is offered 400
    # requests/s, more than it serves: fastest ignores its queue, the oracle does not.
    scenario = Scenario(seed=0, instances=3, requests=800, clients=16, rate=400.0,
                        faults=((0, 0.0, 20.0), (1, 0.0, 5.0), (2, 0.0, 10.0)),
                        threads=((1, 1),))
    fastest = simulate_cell(scenario, "fastest")
    assert fastest.shares == {"10.0.0.1:80": 0, "10.0.0.2:80": 800, "10.0.0.3:80": 0}
    assert fastest.blocks == 0 and fastest.retries == 0
    oracle = simulate_cell(scenario, "oracle")
    assert oracle.shares["10.0.0.2:80"] < 700 and oracle.p95_ms < fastest.p95_ms / 2


def test_fastest_retries_on_the_fastest_untried_and_ignores_errors():
    # The fastest (instance 1) always answers 500: fastest still sends every request
    # there first, and each retry to the next fastest, instance 2.
    scenario = Scenario(seed=0, instances=3, requests=200, clients=4, rate=100.0,
                        faults=((0, 0.0, 20.0), (1, 1.0, 5.0), (2, 0.0, 10.0)))
    answers = answered(scenario, "fastest", RETRY_500)
    assert {tuple(b for _, b in a.attempts) for a in answers} == {
        ("10.0.0.2:80", "10.0.0.3:80")}
    result = simulate_cell(scenario, "fastest", RETRY_500)
    assert result.errors == 0 and result.retries == 200


def test_fastest_breaks_ties_by_the_pools_order():
    result = simulate_cell(Scenario(seed=0, instances=3, requests=300, clients=6), "fastest")
    assert list(result.shares.values()) == [300, 0, 0]


def test_convergence_of_a_share_that_settles():
    course = convergence([0.9, 0.2, 0.6, 0.72, 0.70, 0.74])
    assert (course.mean, course.low, course.high) == pytest.approx((0.6433, 0.2, 0.9), abs=1e-4)
    assert course.step == pytest.approx((0.7 + 0.4 + 0.12 + 0.02 + 0.04) / 5)
    assert course.tail_mean == pytest.approx(0.72) and course.settled is True


def test_convergence_of_a_share_that_swings():
    course = convergence([0.3, 0.7] * 3)
    assert course.settled is False and course.step == pytest.approx(0.4)
    assert course.tail_mean == pytest.approx(0.5)


def test_settled_means_the_last_third_within_the_band():
    # 12 windows: the last third is the last 4.
    assert convergence([0.5] * 7 + [0.9] + [0.5] * 4).settled is True
    assert convergence([0.5] * 8 + [0.9] + [0.5] * 3).settled is False
    assert convergence([0.5, 0.6, 0.68]).settled is None  # a one-window third
    assert convergence([0.5, 0.6, 0.6, 0.68]).settled is True  # 4 points off
    assert convergence([0.5, 0.6, 0.6, 0.68], band=0.03).settled is False
    assert SETTLED_BAND == 0.05
    assert convergence([]) is None


def test_the_share_series_takes_the_windows_within_the_load():
    # Windows from the warm-up on: the last ends after the load (a straggler's),
    # the second is empty.
    row = {"attempt_windows": [[1, 3], [0, 0], [2, 0], [1, 0]], "load_s": WARMUP_S + 3}
    assert first_share_per_window(row) == [0.25, 1.0]
    assert first_share_per_window({"shares": {"a": 1}}) == []  # a live row


def row(scenario, strategy, errors, p99, repeat=0):
    return {"scenario": scenario, "strategy": strategy, "errors": errors,
            "error_rate": errors / 100, "p99_ms": p99, "blocks": 0, "repeat": repeat}


def test_summary_gap_closure_and_worse_beyond_noise():
    rows = [row("seed1-n3", "round_robin", 30, 1000), row("seed1-n3", "scored", 12, 900),
            row("seed1-n3", "oracle", 0, 500),
            row("seed2-n3", "round_robin", 10, 800, 0), row("seed2-n3", "round_robin", 10, 820, 1),
            row("seed2-n3", "scored", 10, 1200, 0), row("seed2-n3", "scored", 10, 1180, 1),
            row("seed2-n3", "oracle", 0, 400)]
    summary = summarize(rows)
    assert summary["totals"]["round_robin"]["errors"] == 40
    assert summary["gap_closed"]["errors"] == pytest.approx((40 - 22) / 40)
    worse = summary["scored_worse"]
    assert [(w["scenario"], w["metric"]) for w in worse] == [("seed2-n3", "p99_ms")]
    # On the objective too: same errors, p99 up by about 45 % in both repeats.
    assert [w["scenario"] for w in summary["scored_worse_objective"]] == ["seed2-n3"]


def test_gap_helpers():
    assert _closed(10, 4, 0) == 0.6
    assert _closed(5, 5, 5) is None
    assert _geomean([100, 10000]) == pytest.approx(1000)
