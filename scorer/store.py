"""Where the pool's scripts run: Redis, or an in-process stand-in while Redis is away.

The balancer must keep serving when Redis is unreachable or slow. Rather than a
second copy of the rules in Python, the same Lua scripts then run on an
in-process fakeredis server (with lupa): each worker keeps its own cursor and
scores until Redis answers again. A background thread checks Redis every
`retry_s` seconds, so no request waits on a dead Redis more than once.

Scripts are run with EVALSHA on a connection each thread keeps for itself,
not through redis-py's `Script` and connection pool, whose pool checkout, pid
checks and retry wrapper showed up in the proxy's profile (README,
"Performance"). On Redis Cluster the cluster client routes each call.
"""
from __future__ import annotations

import logging
import os
import threading
import weakref
from pathlib import Path
from typing import Any, Callable, Sequence

import fakeredis
import redis
import redis.cluster
from redis.commands.core import Script
from redis.exceptions import NoScriptError

log = logging.getLogger("lb.store")

# Written to check that Redis accepts writes again after an outage.
PROBE_KEY = "lb:probe"

# Every store, so that a forked child drops the clients it inherited (a
# socket shared by two processes mixes their replies).
_STORES: "weakref.WeakSet[Store]" = weakref.WeakSet()


class _Lease:
    """A connection one thread keeps from a client's pool, given back when the
    thread ends (its thread-local values are dropped then): short-lived threads,
    such as the admin listener's, must not leave a connection each behind."""

    def __init__(self, pool: redis.ConnectionPool, generation: int) -> None:
        self.pool, self.generation = pool, generation
        self.conn = pool.get_connection()

    def __del__(self) -> None:
        try:
            self.pool.release(self.conn)
        except Exception:  # at interpreter exit the pool may be half gone
            pass


class Store:
    """Runs named Lua scripts on Redis, falling back to in-process state when allowed."""

    def __init__(self, factory: Callable[[], redis.Redis], scripts: dict[str, str], *,
                 degrade: bool = True, retry_s: float = 1.0,
                 marker_dir: str | None = None) -> None:
        self._factory = factory
        self._sources = scripts
        self._degrade = degrade
        self._retry_s = retry_s
        self._marker_dir = marker_dir
        self._lock = threading.Lock()
        self._client: redis.Redis | None = None
        self._scripts: dict[str, Script] = {}
        self._local: redis.Redis | None = None
        self._threads = threading.local()  # each thread's _Lease
        self._generation = 0  # bumped when Redis comes back: older connections are dropped
        self.degraded = False
        _STORES.add(self)

    def _after_fork(self) -> None:
        self._client, self._threads, self._local, self.degraded = None, threading.local(), None, False

    @property
    def redis(self) -> redis.Redis:
        """This process's Redis client, created on first use.

        Created lazily and again after a fork, so a client is never shared
        between Gunicorn's master and its workers, whatever `preload_app` says.
        """
        if self._client is None:
            with self._lock:
                if self._client is None:
                    client = self._factory()
                    self._scripts = {name: client.register_script(source)
                                     for name, source in self._sources.items()}
                    self._client = client
                    self._local, self.degraded = None, False
        return self._client

    def run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run script `name` on Redis, or on the in-process state while degraded."""
        client = self.redis
        script = self._scripts[name]
        if not self.degraded:
            try:
                if isinstance(client, redis.cluster.RedisCluster):
                    return script(keys=keys, args=args, client=client)
                return self._evalsha(client, script, keys, args)
            except redis.RedisError as exc:
                if not self._degrade:
                    raise
                self._enter_degraded(exc)
        return script(keys=keys, args=args, client=self._local_client())

    def _evalsha(self, client: redis.Redis, script: Script, keys: Sequence[str],
                 args: Sequence[Any]) -> Any:
        """EVALSHA on this thread's own connection; the script is loaded if Redis lacks it."""
        lease = getattr(self._threads, "lease", None)
        if lease is None or lease.generation != self._generation:
            if lease is not None:
                lease.conn.disconnect()  # opened before an outage: may be dead
            lease = self._threads.lease = _Lease(client.connection_pool, self._generation)
        conn = lease.conn
        try:
            try:
                conn.send_command("EVALSHA", script.sha, len(keys), *keys, *args)
                return conn.read_response()
            except NoScriptError:  # a restarted or flushed Redis
                conn.send_command("SCRIPT", "LOAD", script.script)
                conn.read_response()
                conn.send_command("EVALSHA", script.sha, len(keys), *keys, *args)
                return conn.read_response()
        except redis.ResponseError:
            raise  # the script's own error: the connection is fine
        except BaseException:
            conn.disconnect()  # a reply may still be on its way: never read it as the next one
            raise

    def release_thread(self) -> None:
        """Give this thread's connection back to the pool, which checks it before
        handing it out again: for long-lived threads that serve a request now and
        then (the admin listener's), whose kept connection may find Redis restarted."""
        self._threads.__dict__.pop("lease", None)  # _Lease.__del__ gives it back

    def problem(self) -> str | None:
        """None when Redis answers now, else what is wrong, in words (see `describe`)."""
        try:
            self.redis.ping()
        except redis.RedisError as exc:
            return describe(exc)
        return None

    def _local_client(self) -> redis.Redis:
        if self._local is None:
            # A fresh server per process: its scripts and keys are this worker's own.
            self._local = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        return self._local

    def _enter_degraded(self, exc: Exception) -> None:
        with self._lock:
            if self.degraded:
                return
            self.degraded = True
        log.warning("Redis %s: serving from this process's own state until it is back",
                    describe(exc))
        self._mark(True)
        threading.Thread(target=self._wait_for_redis, name="lb-redis-check",
                         daemon=True).start()

    def _wait_for_redis(self) -> None:
        stop = threading.Event()
        while not stop.wait(self._retry_s):
            if self._writable():
                # Connections opened before an outage may be dead: start afresh.
                if isinstance(self.redis, redis.cluster.RedisCluster):
                    self.redis.disconnect_connection_pools()
                else:
                    self.redis.connection_pool.disconnect()
                self._generation += 1
                log.warning("Redis is back: shared state again")
                self._mark(False)
                # The next outage starts from scratch, not from this one's leftovers.
                self._local = None
                self.degraded = False
                return

    def _writable(self) -> bool:
        """Whether Redis takes a write now: a read-only replica or a full Redis
        answers PING but fails every script, so PING alone would flap."""
        try:
            return bool(self.redis.set(PROBE_KEY, os.getpid(), px=10_000))
        except redis.RedisError:
            return False

    def _mark(self, degraded: bool) -> None:
        """Leave a marker file while degraded, so the admin listener can show it."""
        if not self._marker_dir:
            return
        marker = Path(self._marker_dir) / f"degraded-{os.getpid()}"
        try:
            if degraded:
                marker.write_text("")
            else:
                marker.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot update %s: %s", marker, exc)


def describe(exc: BaseException) -> str:
    """A Redis failure in words an operator can act on: a wrong password is not an outage."""
    if isinstance(exc, redis.AuthenticationError):
        return f"authentication failed: check the user and password in REDIS_URL ({exc})"
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return f"refused a command: the REDIS_URL user lacks a permission ({exc})"
    return f"unreachable ({exc})"


def _drop_inherited_clients() -> None:
    for store in list(_STORES):
        store._after_fork()


os.register_at_fork(after_in_child=_drop_inherited_clients)
