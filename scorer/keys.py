"""The pool's Redis keys, its Lua sources, and the Redis client they run on.

Every key of a pool shares the hash tag {pool}, so one script can touch them
all on Redis Cluster.
"""
from __future__ import annotations

import re
from importlib import resources
from typing import Any

import redis
import redis.cluster

from apps.config import Settings

# A script's header line "-- Prelude: lib.lua" names a file under scorer/lua/
# to run first: Redis scripts cannot import, so shared functions are prepended.
_PRELUDE = re.compile(r"^-- Prelude: (\w+)\.lua\b", re.MULTILINE)


def pool_key(pool: str) -> str:
    return f"lb:{{{pool}}}:pool"


def members_key(pool: str) -> str:
    return f"lb:{{{pool}}}:members"


def member_order_key(pool: str) -> str:
    return f"lb:{{{pool}}}:member_order"


def checker_key(pool: str) -> str:
    return f"lb:{{{pool}}}:checker"


def backend_key(pool: str, backend_id: str) -> str:
    return f"lb:{{{pool}}}:b:{backend_id}"


def lua_file(name: str) -> str:
    """The text of `scorer/lua/<name>.lua` as it is on disk."""
    return resources.files("scorer").joinpath("lua", f"{name}.lua").read_text()


def load_lua(name: str) -> str:
    """The source of script `name` as Redis runs it: its preludes, then the script."""
    source = lua_file(name)
    return "".join(lua_file(prelude) + "\n" for prelude in _PRELUDE.findall(source)) + source


def connect(settings: Settings) -> redis.Redis:
    """Create a Redis client with short timeouts and no automatic retries.

    redis-py retries commands by default; a retried EVALSHA whose reply was
    lost would run a non-idempotent script twice, so failures surface at once.
    A `+cluster` URL gives a cluster client: every key of a pool shares one hash
    tag, so each script runs on the one node that holds its slot.
    """
    scheme, _, rest = settings.redis_url.partition("://")
    options: dict[str, Any] = {"socket_timeout": settings.redis_timeout,
                               "socket_connect_timeout": settings.redis_timeout,
                               "retry": redis.retry.Retry(redis.backoff.NoBackoff(), 0)}
    if scheme.startswith("rediss") and settings.redis_ca_file:
        options["ssl_ca_certs"] = settings.redis_ca_file  # certificates are checked by default
    if scheme.endswith("+cluster"):
        return redis.cluster.RedisCluster.from_url(
            f"{scheme.removesuffix('+cluster')}://{rest}", **options)
    return redis.Redis.from_url(settings.redis_url, health_check_interval=0, **options)
