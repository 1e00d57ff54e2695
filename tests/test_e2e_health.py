"""End to end: one health checker across balancers and workers, takeover, and recovery."""
from __future__ import annotations

import signal
import threading
import time

import pytest
import requests

from tests.support import parent_of, start_balancer, start_echo, wait_for

pytestmark = pytest.mark.e2e

CHECKS = {"LB_CHECK_INTERVAL_S": "0.2", "LB_POOL": "e2e-health"}


def probes(echo_url: str) -> list[tuple[float, str]]:
    return [tuple(p) for p in requests.get(f"{echo_url}/profile", timeout=5).json()["health_probes"]]


def test_one_checker_for_two_balancers_of_two_workers_and_a_takeover(redis_server, tmp_path):
    echoes = [start_echo(i, tmp_path) for i in range(3)]
    urls = [u for _, u in echoes]
    balancers = [start_balancer(urls, redis_server, tmp_path, workers=2, name=f"lb-{n}",
                                env=CHECKS)[0] for n in "ab"]
    try:
        wait_for(lambda: len(probes(urls[0])) >= 15, what="probes")
        window = [p for p in probes(urls[0]) if p[0] >= probes(urls[0])[-1][0] - 2.0]
        owners = {owner for _, owner in window}
        assert len(owners) == 1, owners  # four workers, two hosts: one checker
        assert len(window) <= 2.0 / 0.2 + 2  # one probe per interval, not four
        holder = owners.pop()
        holder_master = parent_of(int(holder.split(":")[1]))
        victim = next(b for b in balancers if b.popen.pid == holder_master)
        victim.stop(signal.SIGKILL)  # the holder dies without letting go
        killed_at = probes(urls[0])[-1][0]
        wait_for(lambda: probes(urls[0])[-1][1] != holder, timeout=10, what="a takeover")
        after = [p for p in probes(urls[0]) if p[0] > killed_at]
        new_owners = {owner for _, owner in after}
        assert len(new_owners) == 1 and holder not in new_owners
        # The new checker is a worker of the surviving balancer.
        survivor = next(b for b in balancers if b is not victim)
        assert parent_of(int(new_owners.pop().split(":")[1])) == survivor.popen.pid
    finally:
        for proc in balancers:
            proc.stop()
        for proc, _ in echoes:
            proc.stop()


def test_an_instance_that_fails_then_recovers_is_blocked_then_serves_again(redis_server,
                                                                          tmp_path):
    failing = start_echo(0, tmp_path, ECHO_PROFILE="fail_recover:start=5,period=4")
    echoes = [failing, start_echo(1, tmp_path), start_echo(2, tmp_path)]
    proc, url, admin = start_balancer([u for _, u in echoes], redis_server, tmp_path,
                                      env={"LB_CHECK_INTERVAL_S": "0.2"})
    # The failing instance's own clock: it fails from 5 s to 9 s after it started, which
    # leaves the stack (three echoes and a balancer) time to start before it fails.
    started = time.monotonic() - requests.get(f"{failing[1]}/profile", timeout=5).json()[
        "elapsed_s"]
    failing_id = failing[1].removeprefix("http://")
    records: list[tuple[float, str, int]] = []
    stop = threading.Event()

    def client() -> None:
        session = requests.Session()
        while not stop.is_set():
            response = session.post(f"{url}/x", json={"a": 1}, timeout=10)
            records.append((time.monotonic() - started, response.headers["X-Upstream"],
                            response.status_code))
            time.sleep(0.01)

    threads = [threading.Thread(target=client) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        wait_for(lambda: time.monotonic() - started > 15, timeout=40, what="the scenario")
    finally:
        stop.set()
        for t in threads:
            t.join()
        proc.stop()
        for p, _ in echoes:
            p.stop()

    def share(start: float, end: float) -> float:
        window = [r for r in records if start <= r[0] < end]
        return sum(1 for r in window if r[1] == failing_id) / max(1, len(window))

    assert sum(1 for r in records if r[0] < 5) >= 20, records[:3]  # traffic before the fault
    assert share(0, 5) > 0.2            # healthy at first: its share
    assert share(6, 9) < 0.05           # failing: blocked within a second
    assert share(12, 15) > 0.15         # recovered: back in rotation (fair: 1/3)
