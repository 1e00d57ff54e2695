"""Degraded mode: when Redis goes away the same scripts run in-process, then Redis again."""
from __future__ import annotations

import json
import logging
import os
import signal
import threading

import pytest
import redis

from apps.lb.admin import create_app
from scorer.keys import connect, pool_key
from scorer.pool import Outcome, Pool
from apps.launch.redis_server import server_command
from apps.config import load_settings
from tests.support import free_port, spawn, wait_for


@pytest.fixture
def own_redis(tmp_path):
    """A real Redis this test may stop and start again on the same port."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"

    def start():
        proc = spawn(f"redis-{port}", server_command(port), {}, tmp_path, [port])
        wait_for(lambda: redis.Redis.from_url(url).ping(), what="redis")
        return proc

    procs = [start()]
    yield url, procs, start
    for proc in procs:
        proc.stop()


@pytest.mark.e2e
def test_picks_go_on_while_redis_is_down_and_return_to_it(own_redis, tmp_path, caplog):
    url, procs, start = own_redis
    settings = load_settings(environ={"REDIS_URL": url, "LB_POOL": "s",
                                      "LB_REDIS_RETRY_S": "0.1"})
    pool = Pool(settings, marker_dir=str(tmp_path))
    assert [pool.pick().port for _ in range(2)] == [9001, 9002]
    procs.pop().stop(signal.SIGKILL)

    with caplog.at_level(logging.WARNING, logger="lb.store"):
        picks = [pool.pick().port for _ in range(4)]
        pool.report(Outcome(pool.backends[0], 0.01, status=200))
    # This process's own round robin: it starts afresh, and still rotates.
    assert picks == [9001, 9002, 9003, 9001]
    assert pool.store.degraded
    assert sum("unreachable" in r.message for r in caplog.records) == 1  # logged once
    assert list(tmp_path.glob("degraded-*"))

    procs.append(start())  # a restarted Redis: no keys, no scripts
    wait_for(lambda: not pool.store.degraded, what="back to Redis")
    assert not list(tmp_path.glob("degraded-*"))
    assert pool.pick().port == 9001  # the pool is rebuilt from configuration
    assert redis.Redis.from_url(url).hget(pool_key("s"), "cursor") == b"0"


@pytest.mark.e2e
def test_a_hanging_redis_costs_one_short_timeout(own_redis):
    url, procs, _ = own_redis
    settings = load_settings(environ={"REDIS_URL": url, "LB_REDIS_RETRY_S": "0.1",
                                      "LB_REDIS_TIMEOUT": "0.2"})
    waits = []  # each Redis reply that never came: (thread, how long it was waited for)

    class Counted(redis.Connection):
        def read_response(self, *args, **kwargs):
            try:
                return super().read_response(*args, **kwargs)
            except redis.TimeoutError:
                waits.append((threading.current_thread(), self.socket_timeout))
                raise

    def counted_client() -> redis.Redis:
        client = connect(settings)
        client.connection_pool.connection_class = Counted
        return client

    pool = Pool(settings, redis_factory=counted_client)
    pool.pick()
    procs[0].popen.send_signal(signal.SIGSTOP)
    try:
        assert all(pool.pick() is not None for _ in range(20))
        assert pool.store.degraded
    finally:
        procs[0].popen.send_signal(signal.SIGCONT)
    # Twenty picks waited once, for LB_REDIS_TIMEOUT; the rest were served at once
    # from this process's own state. (The background check's own waits do not count.)
    here = threading.current_thread()
    assert [timeout for thread, timeout in waits if thread is here] == [0.2]
    wait_for(lambda: not pool.store.degraded, what="back to Redis")


@pytest.mark.e2e
def test_without_degrading_redis_errors_surface(own_redis):
    url, procs, _ = own_redis
    pool = Pool(load_settings(environ={"REDIS_URL": url}), degrade=False)
    procs.pop().stop(signal.SIGKILL)
    with pytest.raises(redis.RedisError):
        pool.pick()


def test_a_flushed_script_cache_is_loaded_again_without_degrading(any_redis):
    # A Redis restarted with its data (or SCRIPT FLUSH) has the keys but not the scripts.
    pool = Pool(load_settings(environ={"LB_POOL": "flush"}), redis_factory=lambda: any_redis)
    assert pool.pick().port == 9001
    any_redis.script_flush()
    assert [pool.pick().port for _ in range(2)] == [9002, 9003]
    assert not pool.store.degraded


@pytest.mark.e2e
def test_a_forked_child_does_not_share_its_parents_connection(real_redis):
    pool = Pool(load_settings(environ={"LB_POOL": "fork"}), redis_factory=lambda: real_redis)
    assert pool.pick().port == 9001
    child = os.fork()
    if child == 0:  # the child: a fresh connection of its own, then two picks
        ok = pool.store._lender is None and \
            [pool.pick().port for _ in range(2)] == [9002, 9003]
        os._exit(0 if ok else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert pool.pick().port == 9001  # the parent's connection still reads its own replies


@pytest.mark.e2e
def test_short_lived_threads_give_their_connections_back(real_redis):
    # The admin listener answers each request on a new thread.
    pool = Pool(load_settings(environ={"LB_POOL": "threads"}), redis_factory=lambda: real_redis)
    pool.pick()
    before = len(real_redis.client_list())
    for _ in range(30):
        thread = threading.Thread(target=pool.pick)
        thread.start()
        thread.join()
    assert len(real_redis.client_list()) <= before + 1


@pytest.mark.e2e
def test_a_redis_that_wants_a_password_says_so(tmp_path, caplog):
    port = free_port()
    proc = spawn(f"redis-auth-{port}", server_command(port, "--requirepass", "pw0rd"), {},
                 tmp_path, [port])
    try:
        wrong = load_settings(environ={"REDIS_URL": f"redis://:nope@127.0.0.1:{port}/0",
                                       "LB_REDIS_RETRY_S": "60"})
        for settings in (wrong, load_settings(environ={"REDIS_URL": f"redis://127.0.0.1:{port}/0",
                                                       "LB_REDIS_RETRY_S": "60"})):
            pool = Pool(settings)
            assert "authentication failed" in pool.redis_problem()
            with caplog.at_level(logging.WARNING, logger="lb.store"):
                assert pool.pick() is not None  # served from its own state meanwhile
            assert "Redis authentication failed" in caplog.text
            assert "unreachable" not in caplog.text
            caplog.clear()
        admin = create_app({"REDIS_URL": f"redis://:nope@127.0.0.1:{port}/0"},
                           workers=lambda: [1]).test_client()
        ready = admin.get("/ready").get_json()
        assert ready["degraded"] and "authentication failed" in ready["reasons"][0]
        status = admin.get("/status").get_json()
        assert "authentication failed" in status["redis"]["problem"]
        assert "nope" not in json.dumps(status)  # the password is redacted
        right = Pool(load_settings(environ={"REDIS_URL": f"redis://:pw0rd@127.0.0.1:{port}/0"}))
        assert right.redis_problem() is None and right.pick() is not None
        assert not right.store.degraded
    finally:
        proc.stop()


@pytest.mark.e2e
def test_many_threads_share_a_few_connections(real_redis):
    # Under the gevent worker every client connection is a thread of its own.
    import threading

    pool = Pool(load_settings(environ={"LB_POOL": "lend", "LB_REDIS_CONNECTIONS": "3"}),
                redis_factory=lambda: real_redis)
    pool.pick()
    before = len(real_redis.client_list())
    start = threading.Barrier(40)

    def picks() -> None:
        start.wait()
        for _ in range(5):
            pool.pick()

    threads = [threading.Thread(target=picks) for _ in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(real_redis.client_list()) <= before + 2  # three at most, one made already
    assert not pool.store.degraded
    assert int(real_redis.hget(pool_key("lend"), "cursor")) == (1 + 40 * 5 - 1) % 3


@pytest.mark.e2e
def test_a_connection_closed_by_a_restarted_redis_is_not_lent_again(own_redis):
    url, procs, start = own_redis
    # The admin listener does not degrade: a dead connection would cost it a 503.
    pool = Pool(load_settings(environ={"REDIS_URL": url, "LB_POOL": "stale"}), degrade=False)
    assert pool.pick().port == 9001
    procs.pop().stop(signal.SIGKILL)
    procs.append(start())  # empty, and the lent connection's socket is closed
    assert pool.pick().port == 9001  # a fresh connection; the pool is seeded again
