"""Where the pool's scripts run: Redis, or an in-process stand-in while Redis is away.

The balancer must keep serving when Redis is unreachable or slow. Rather than a
second copy of the rules in Python, the same Lua scripts then run on an
in-process fakeredis server (with lupa): each worker keeps its own cursor and
scores until Redis answers again. A background thread checks Redis every
`retry_s` seconds, so no request waits on a dead Redis more than once.

Scripts are run with EVALSHA on a connection lent from a small, bounded set
per process (LB_REDIS_CONNECTIONS), not through redis-py's `Script` and
connection pool, whose pool checkout, pid checks and retry wrapper showed up
in the proxy's profile (README, "Performance"). On Redis Cluster the cluster
client routes each call.
"""
from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import fakeredis
import redis
import redis.cluster
from redis.commands.core import Script
from redis.exceptions import NoScriptError

log = logging.getLogger("lb.store")

# One script call: the script's name, its KEYS and its ARGV.
Call = tuple[str, Sequence[str], Sequence[Any]]

# Written to check that Redis accepts writes again after an outage.
PROBE_KEY = "lb:probe"

# Every store, so that a forked child drops the clients it inherited (a
# socket shared by two processes mixes their replies).
_STORES: "weakref.WeakSet[Store]" = weakref.WeakSet()


class _Lender:
    """At most `size` connections to Redis, each lent to one caller at a time.

    Not a connection per thread: under the gevent worker (apps/lb/edge.py) a thread
    is a greenlet, one per client connection, so that would mean thousands of
    connections. A caller that finds every connection lent waits for one: each
    is lent for one command, bounded by the socket timeout, and a busy worker
    is not a Redis outage.
    """

    def __init__(self, pool: redis.ConnectionPool, size: int) -> None:
        self._pool = pool
        self._idle: list[redis.Connection] = []
        self._slots = threading.BoundedSemaphore(size)

    @contextlib.contextmanager
    def lend(self) -> Iterator[redis.Connection]:
        self._slots.acquire()
        try:
            conn = self._take()
            try:
                yield conn
            finally:
                self._idle.append(conn)  # a disconnected one reconnects on its next use
        finally:
            self._slots.release()

    def _take(self) -> redis.Connection:
        if not self._idle:
            return self._pool.make_connection()
        conn = self._idle.pop()
        # A restarted Redis has closed the connections it had: one would fail the
        # call, and a failed script call is never retried. An idle connection has
        # nothing to read, so anything readable (the end) means it is gone. One
        # read attempt with no wait: a few microseconds.
        try:
            stale = readable_now(getattr(conn, "_sock", None))
        except (ValueError, OSError):
            stale = True
        if stale:
            conn.disconnect()
        return conn

    def close(self) -> None:
        """Disconnect the idle connections (those lent now disconnect on error)."""
        for conn in self._idle:
            conn.disconnect()


try:  # the standard library's poll even where gevent has patched `select`
    from gevent.monkey import get_original
    _poll = get_original("select", "poll")
except ImportError:  # pragma: no cover - gevent is a pinned requirement
    _poll = select.poll


def readable_now(sock: Any) -> bool:
    """Whether an idle socket has anything to read now (its end included), asked without
    waiting: an idle connection that is readable has been closed or holds junk.

    The standard library's poll, not the event loop's: redis-py's `can_read` goes
    through gevent's patched poll, which set up and tore down watchers on the hub and
    cost 9 % of a worker's Python time under load (docs/performance.md).
    """
    if sock is None:
        return False
    if hasattr(sock, "pending") and sock.pending():  # TLS: bytes decrypted but unread
        return True
    poller = _poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


class Store:
    """Runs named Lua scripts on Redis, falling back to in-process state when allowed."""

    def __init__(self, factory: Callable[[], redis.Redis], scripts: dict[str, str], *,
                 degrade: bool = True, retry_s: float = 1.0,
                 marker_dir: str | None = None, connections: int = 16) -> None:
        self._factory = factory
        self._sources = scripts
        self._degrade = degrade
        self._retry_s = retry_s
        self._marker_dir = marker_dir
        self._lock = threading.Lock()
        self._client: redis.Redis | None = None
        self._scripts: dict[str, Script] = {}
        self._local: redis.Redis | None = None
        self._size = connections
        self._lender: _Lender | None = None
        self.degraded = False
        _STORES.add(self)

    def _after_fork(self) -> None:
        self._client, self._lender, self._local, self.degraded = None, None, None, False

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
                    if not isinstance(client, redis.cluster.RedisCluster):
                        self._lender = _Lender(client.connection_pool, self._size)
                    self._client = client
                    self._local, self.degraded = None, False
        return self._client

    def run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run script `name` on Redis, or on the in-process state while degraded."""
        reply = self.run_many([(name, keys, args)])[0]
        if isinstance(reply, redis.ResponseError):
            raise reply
        return reply

    def run_many(self, calls: Sequence[Call]) -> list[Any]:
        """Run several scripts in order, each atomic on its own, in one round trip
        (pipelined on one connection; one by one on Redis Cluster, whose client routes
        each call). Each reply is returned in its place, a script's own error as the
        `redis.ResponseError` it raised, so that one failed call costs the others nothing.
        """
        client = self.redis
        if not self.degraded:
            try:
                if isinstance(client, redis.cluster.RedisCluster):
                    return [_replied(lambda c=call: self._scripts[c[0]](
                        keys=c[1], args=c[2], client=client)) for call in calls]
                with self._lender.lend() as conn:
                    return self._evalsha_on(conn, calls)
            except redis.RedisError as exc:
                if not self._degrade:
                    raise
                self._enter_degraded(exc)
        local = self._local_client()
        return [_replied(lambda c=call: self._scripts[c[0]](keys=c[1], args=c[2], client=local))
                for call in calls]

    def _evalsha_on(self, conn: redis.Connection, calls: Sequence[Call]) -> list[Any]:
        """EVALSHA each call on `conn`, all sent before any reply is read; a script
        Redis lacks (restarted or flushed) is loaded and its calls sent again, in order
        (a NOSCRIPT reply means the call did not run)."""
        try:
            replies = self._send_and_read(conn, calls)
            missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if missing:
                for name in dict.fromkeys(calls[i][0] for i in missing):
                    conn.send_command("SCRIPT", "LOAD", self._scripts[name].script)
                    conn.read_response()
                again = self._send_and_read(conn, [calls[i] for i in missing])
                for i, reply in zip(missing, again):
                    replies[i] = reply
            return replies
        except BaseException:
            conn.disconnect()  # a reply may still be on its way: never read it as the next one
            raise

    def _send_and_read(self, conn: redis.Connection, calls: Sequence[Call]) -> list[Any]:
        conn.send_packed_command(conn.pack_commands(
            [("EVALSHA", self._scripts[name].sha, len(keys), *keys, *args)
             for name, keys, args in calls]))
        replies: list[Any] = []
        for _ in calls:
            try:
                replies.append(conn.read_response())
            except redis.ResponseError as exc:  # the script's own error: the connection is fine
                replies.append(exc)
        return replies

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
                    self._lender.close()
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


def _replied(call: Callable[[], Any]) -> Any:
    """The call's reply, or the script error it raised (see Store.run_many)."""
    try:
        return call()
    except redis.ResponseError as exc:
        return exc


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
