"""Shared fixtures: a real Redis server per session, fakeredis per test."""
from __future__ import annotations

import fakeredis
import pytest
import redis

from tests.support import start_redis


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


@pytest.fixture(params=["fakeredis", "real"])
def any_redis(request) -> redis.Redis:
    """Each Lua test runs twice: on fakeredis and on the real server."""
    return request.getfixturevalue("fake_redis" if request.param == "fakeredis" else "real_redis")
