"""The README's way to run the stack: `honcho start` from the Procfile, and Ctrl-C."""
from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections import Counter
from pathlib import Path

import pytest
import redis
import requests

from tests.support import (
    BIN, ROOT, assert_shares, free_port, port_open, start_echo, wait_for,
)

pytestmark = pytest.mark.e2e


def processes_with(marker: str) -> list[int]:
    """PIDs of live processes whose environment carries `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                status = (entry / "status").read_text()
                if "\nState:\tZ" not in status:
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


class Honcho:
    """`honcho start [types]` in the checkout, with its own ports and a marker."""

    def __init__(self, tmp_path: Path, *types: str, **env: str) -> None:
        self.marker = f"LB_TEST_MARKER={uuid.uuid4()}"
        self.port, self.admin_port = free_port(), free_port()
        self.log = tmp_path / "honcho.log"
        full_env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}",
                    "LB_TEST_MARKER": self.marker.split("=", 1)[1],
                    "LB_PORT": str(self.port), "LB_ADMIN_PORT": str(self.admin_port),
                    "LB_REDIS_PORT": str(free_port()), "LB_STATE_DIR": str(tmp_path / "state"),
                    **env}
        with open(self.log, "wb") as out:
            # Own session, as a terminal's foreground job would be; SIGINT is Ctrl-C.
            self.popen = subprocess.Popen([str(BIN / "honcho"), "start", *types], cwd=ROOT,
                                          env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        # The admin port opens in the master, the traffic port once a worker listens.
        wait_for(lambda: (port_open(self.admin_port) and port_open(self.port))
                 or self.popen.poll() is not None,
                 timeout=30, what="the balancer's admin and traffic ports")
        assert self.popen.poll() is None, self.output()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def ctrl_c(self) -> int:
        """Interrupt honcho as a terminal would; it exits 130 (128 + SIGINT) once all stopped."""
        self.popen.send_signal(signal.SIGINT)
        try:
            return self.popen.wait(15)
        finally:
            if self.popen.poll() is None:
                os.killpg(self.popen.pid, signal.SIGKILL)

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def test_honcho_start_runs_the_stack_and_ctrl_c_stops_everything(tmp_path):
    echo_ports = [free_port() for _ in range(3)]
    backends = ",".join(f"http://127.0.0.1:{p}" for p in echo_ports)
    stack = Honcho(tmp_path, LB_BACKENDS=backends,
                   ECHO_PROFILE_3="fail_recover:start=1000,period=1",  # later than the test
                   **{f"ECHO_PORT_{i + 1}": str(p) for i, p in enumerate(echo_ports)})
    try:
        # Workers boot after the admin port opens; Gunicorn queues connections until then.
        session = requests.Session()
        responses = [session.post(stack.url("/any/path"), data=b'{"a":1}', timeout=10,
                                  headers={"Content-Type": "application/json"})
                     for _ in range(6)]
        assert [r.content for r in responses] == [b'{"a":1}'] * 6
        upstreams = [r.headers["X-Upstream"] for r in responses]
        assert_shares(Counter(upstreams), {f"127.0.0.1:{p}": 2 for p in echo_ports},
                      f"http://127.0.0.1:{stack.admin_port}")
        assert upstreams[:3] == upstreams[3:]  # a strict rotation
        # The Procfile hands each instance its own profile.
        profiles = [requests.get(f"http://127.0.0.1:{p}/profile", timeout=5).json()["kind"]
                    for p in echo_ports]
        assert profiles == ["steady", "steady", "fail_recover"]
        status_url = f"http://127.0.0.1:{stack.admin_port}/status"
        assert requests.get(status_url, timeout=5).json()["redis"]["reachable"]
        # Gunicorn forks its workers a moment apart; the second may still be on its way.
        wait_for(lambda: requests.get(status_url, timeout=5).json()["workers"] == 2,
                 what="both workers")
        assert len(processes_with(stack.marker)) >= 10  # honcho, shells, masters, workers
    finally:
        code = stack.ctrl_c()
    output = stack.output()
    assert code == 130, output
    assert "Traceback" not in output
    assert "SIGKILL" not in output  # everything stopped within honcho's grace period
    wait_for(lambda: not processes_with(stack.marker), timeout=5, what="no processes left")
    assert not any(port_open(p) for p in [stack.port, stack.admin_port, *echo_ports])


def test_balancer_and_redis_alone_in_front_of_other_backends(tmp_path):
    echo, echo_url = start_echo(0, tmp_path)
    try:
        stack = Honcho(tmp_path, "redis", "proxy", LB_BACKENDS=echo_url)
        try:
            response = requests.put(stack.url("/x"), json={"b": 2}, timeout=10)
            assert response.json() == {"b": 2}
            assert response.headers["X-Upstream"] == echo_url.removeprefix("http://")
        finally:
            assert stack.ctrl_c() == 130
        assert "redis.1 | redis: starting" in stack.output()
        wait_for(lambda: not processes_with(stack.marker), timeout=5, what="no processes left")
    finally:
        echo.stop()


def test_an_outside_redis_named_by_redis_url_is_used_instead(tmp_path, redis_server):
    echo, echo_url = start_echo(0, tmp_path)
    try:
        stack = Honcho(tmp_path, "redis", "proxy", LB_BACKENDS=echo_url,
                       REDIS_URL=redis_server, LB_POOL="outside")
        try:
            assert requests.put(stack.url("/x"), json={"c": 3}, timeout=10).json() == {"c": 3}
            assert redis.Redis.from_url(redis_server).exists("lb:{outside}:pool")
        finally:
            assert stack.ctrl_c() == 130
        assert "REDIS_URL is set" in stack.output()
        assert "redis: starting" not in stack.output()
    finally:
        echo.stop()
