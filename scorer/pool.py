"""The Python face of the shared pool: pick a backend, report an outcome, show status.

The rules live in the Lua scripts under `scorer/lua/`; this module only names
the keys, passes the clock and converts replies. Each upstream attempt costs
at most two Redis round trips: one `pick`, one `report`.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from importlib import resources
from typing import Callable

import redis

from scorer.settings import Backend, Settings

# Outcome kinds of one upstream attempt. "ok" is any HTTP answer below 500:
# a 4xx is the client's fault, not the backend's.
OK, HTTP_5XX, CONNECT, TIMEOUT, PROTOCOL = "ok", "http_5xx", "connect", "timeout", "protocol"
OUTCOMES = (OK, HTTP_5XX, CONNECT, TIMEOUT, PROTOCOL)


@dataclass(frozen=True)
class Outcome:
    """What one upstream attempt produced: an HTTP status or a transport error."""

    backend: Backend
    latency_s: float
    status: int | None = None
    error: str | None = None  # CONNECT, TIMEOUT or PROTOCOL when there is no status

    @property
    def kind(self) -> str:
        if self.status is None:
            return self.error or PROTOCOL
        return HTTP_5XX if self.status >= 500 else OK


def load_lua(name: str) -> str:
    """Return the source of `scorer/lua/<name>.lua`."""
    return resources.files("scorer").joinpath("lua", f"{name}.lua").read_text()


def cursor_key(pool: str) -> str:
    # Every key of a pool shares the hash tag {pool}, so one script can touch
    # them all on Redis Cluster.
    return f"lb:{{{pool}}}:cursor"


def backend_key(pool: str, backend_id: str) -> str:
    return f"lb:{{{pool}}}:b:{backend_id}"


def connect(settings: Settings) -> redis.Redis:
    """Create a Redis client with short timeouts and no automatic retries.

    redis-py retries commands by default; a retried EVALSHA whose reply was
    lost would run a non-idempotent script twice, so failures surface at once.
    """
    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_timeout,
        socket_connect_timeout=settings.redis_timeout,
        retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
        health_check_interval=0,
    )


class Pool:
    """One balancer's view of the shared pool of backends."""

    def __init__(self, settings: Settings,
                 redis_factory: Callable[[], redis.Redis] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.backends = settings.backends
        self.clock = clock
        self._factory = redis_factory or (lambda: connect(settings))
        self._lock = threading.Lock()
        self._client: redis.Redis | None = None
        self._client_pid = 0
        self._cursor_key = cursor_key(settings.pool)
        self._backend_keys = {b.id: backend_key(settings.pool, b.id) for b in self.backends}

    @property
    def redis(self) -> redis.Redis:
        """The Redis client of this process, created on first use.

        Created lazily and again after a fork, so a client is never shared
        between Gunicorn's master and its workers, whatever `preload_app` says.
        """
        if self._client is None or self._client_pid != os.getpid():
            with self._lock:
                if self._client is None or self._client_pid != os.getpid():
                    client = self._factory()
                    self._pick = client.register_script(load_lua("pick"))
                    self._report = client.register_script(load_lua("report"))
                    self._client, self._client_pid = client, os.getpid()
        return self._client

    def pick(self) -> Backend:
        """Advance the shared cursor and return the backend it lands on."""
        client = self.redis
        index = self._pick(keys=[self._cursor_key], args=[len(self.backends)], client=client)
        return self.backends[int(index)]

    def report(self, outcome: Outcome) -> None:
        """Record one attempt's outcome on its backend."""
        client = self.redis
        self._report(
            keys=[self._backend_keys[outcome.backend.id]],
            args=[repr(self.clock()), f"{outcome.latency_s * 1000:.3f}", outcome.kind,
                  outcome.status or 0],
            client=client)

    def ping(self) -> bool:
        """Whether Redis answers now."""
        try:
            return bool(self.redis.ping())
        except redis.RedisError:
            return False

    def backend_states(self) -> dict[str, dict[str, str]]:
        """Each backend's recorded counters, as stored in Redis."""
        pipe = self.redis.pipeline(transaction=False)
        for backend in self.backends:
            pipe.hgetall(self._backend_keys[backend.id])
        replies = pipe.execute()
        return {backend.id: {k.decode(): v.decode() for k, v in reply.items()}
                for backend, reply in zip(self.backends, replies)}
