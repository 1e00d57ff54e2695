"""Shared fixtures (a real Redis server per session, fakeredis per test), the
hypothesis profile, and the check that only `e2e` tests start processes."""
from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from typing import Iterator

import fakeredis
import pytest
import redis
from hypothesis import settings as hypothesis_settings

from tests.pools import Clock
from tests.rawbackend import RawBackend
from tests.support import start_redis

# Fuzzing is reproducible by default: the same examples on every run and in CI
# (seeded from each test's own code). `--hypothesis-profile=random` draws new
# ones each run; hypothesis prints the seed of any failure to replay it with
# `--hypothesis-seed=<seed>`.
hypothesis_settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
hypothesis_settings.register_profile("random", derandomize=False)
hypothesis_settings.load_profile("ci")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server (the bundled binary) on a free port, for the whole session."""
    proc, url = start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    proc.stop()


@pytest.fixture
def real_redis(redis_server) -> redis.Redis:
    client = redis.Redis.from_url(redis_server)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def fake_redis() -> redis.Redis:
    # A fresh server per test: a script that leaked a global would break later ones.
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())


@pytest.fixture
def clock() -> Clock:
    """A fake clock the test moves by hand (tests/pools.py); tests/test_forwarder.py
    has one of its own."""
    return Clock()


@pytest.fixture(scope="module")
def raw_backend() -> Iterator[RawBackend]:
    """A backend on a raw socket, in this process (tests/rawbackend.py): one per module."""
    backend = RawBackend()
    yield backend
    backend.close()


@pytest.fixture(params=["fakeredis", pytest.param("real", marks=pytest.mark.e2e)])
def any_redis(request) -> redis.Redis:
    """Each Lua test runs twice: on fakeredis and on the real server (an e2e run)."""
    return request.getfixturevalue("fake_redis" if request.param == "fakeredis" else "real_redis")


# --- only tests marked e2e may start a process ---------------------------------

# Every way the tests (and the libraries they call) start a process.
_STARTERS = [(subprocess.Popen, "_execute_child"), (os, "fork"), (os, "forkpty"),
             (os, "posix_spawn"), (os, "posix_spawnp"), (os, "system")]


@contextmanager
def no_processes(test: str) -> Iterator[None]:
    """Make every process start fail `test`, so that `-m "not e2e"` starts none."""
    def refuse(*args, **kwargs):
        # pytest.fail raises a BaseException: no `except Exception` can hide it.
        pytest.fail(f"{test} starts a process but is not marked e2e", pytrace=False)

    saved = [(owner, name, getattr(owner, name)) for owner, name in _STARTERS
             if hasattr(owner, name)]
    for owner, name, _ in saved:
        setattr(owner, name, refuse)
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def _guarded(item: pytest.Item):
    if item.get_closest_marker("e2e") is not None:
        return (yield)
    # Setup covers the fixtures too, session-scoped ones such as redis_server.
    with no_processes(item.nodeid):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    return (yield from _guarded(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    return (yield from _guarded(item))


def pytest_report_header(config: pytest.Config) -> str:
    profile = hypothesis_settings.get_current_profile_name()
    return (f"hypothesis profile {profile!r}, derandomize={hypothesis_settings().derandomize} "
            "(--hypothesis-profile=random for new examples each run)")
