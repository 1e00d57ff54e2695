"""The Python face of the shared pool: pick a backend, report an outcome, show status.

The rules live in the Lua scripts under `scorer/lua/`; this module only names
the keys, passes the clock and converts replies. Each upstream attempt costs
at most two Redis round trips: one `pick`, one `report`.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable, Mapping, Sequence

import redis
import redis.cluster

from scorer import members as members_mod
from scorer.members import DRAINING, Member, Snapshot, StateFile, parse_snapshot
from apps.config import Backend, Settings, script_params
from scorer.store import Store

log = logging.getLogger("lb.pool")

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


def pool_key(pool: str) -> str:
    # Every key of a pool shares the hash tag {pool}, so one script can touch
    # them all on Redis Cluster.
    return f"lb:{{{pool}}}:pool"


def members_key(pool: str) -> str:
    return f"lb:{{{pool}}}:members"


def member_order_key(pool: str) -> str:
    return f"lb:{{{pool}}}:member_order"


def checker_key(pool: str) -> str:
    return f"lb:{{{pool}}}:checker"


def backend_key(pool: str, backend_id: str) -> str:
    return f"lb:{{{pool}}}:b:{backend_id}"


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


# What an admin reset clears: score, block and the decayed history behind them.
RESET_FIELDS = ("score", "in_block", "trial", "ramp_at", "ramp_credit", "blocked_turns",
                "block_until", "block_level", "updated_at",
                "lat_sum", "lat_weight", "err_sum", "err_weight")

# The settings report.lua reads, in its ARGV order (ARGV[8] onwards).
REPORT_PARAMS = script_params("report")


class Pool:
    """One balancer's view of the shared pool of backends."""

    def __init__(self, settings: Settings,
                 redis_factory: Callable[[], redis.Redis] | None = None,
                 clock: Callable[[], float] = time.time, *,
                 degrade: bool = True, marker_dir: str | None = None,
                 state_file: StateFile | None = None) -> None:
        self.settings = settings
        self.clock = clock
        self.store = Store(redis_factory or (lambda: connect(settings)),
                           {name: load_lua(name)
                            for name in ("pick", "report", "checker", "members")},
                           degrade=degrade, retry_s=settings.redis_retry_s,
                           marker_dir=marker_dir, connections=settings.redis_connections)
        self.state_file = state_file
        self._config = members_mod.fingerprint(settings.backends)
        self._lock = threading.Lock()
        self._pool_key = pool_key(settings.pool)
        self._members_keys = [self._pool_key, members_key(settings.pool),
                              member_order_key(settings.pool)]
        self._checker_key = checker_key(settings.pool)
        self._scored = "1" if settings.strategy == "scored" else "0"
        self._pick_params = [repr(getattr(settings, name)) for name in script_params("pick")]
        self._params = [repr(getattr(settings, name)) for name in REPORT_PARAMS]
        # The membership this worker knows: the start-up list (or the one saved
        # on disk) until Redis says otherwise (`synced` False: not asked yet).
        saved = state_file.load() if state_file else None
        self.synced = False
        self._use(saved or Snapshot(0, "", self._config,
                                    tuple(members_mod.from_settings(settings.backends))))

    # --- membership ---------------------------------------------------------------

    @property
    def rev(self) -> int:
        return self.snapshot.rev

    def _use(self, snapshot: Snapshot) -> None:
        """Adopt a membership: the keys and per-backend arguments both scripts take."""
        self.snapshot = snapshot
        self.members = list(snapshot.members)
        self.backends = [m.backend for m in self.members]
        self._index = {m.id: i for i, m in enumerate(self.members)}
        # Both scripts take the same keys: the pool's hash, then every backend's.
        self._keys = [self._pool_key,
                      *(backend_key(self.settings.pool, m.id) for m in self.members)]
        weights = [0 if m.state == DRAINING else m.weight for m in self.members]
        self._weights = "" if all(w == 1 for w in weights) else ",".join(map(str, weights))

    def _newest_copy(self) -> Snapshot:
        """This worker's copy, or the state file's if another worker saw a later change."""
        saved = self.state_file.load() if self.state_file else None
        return saved if saved is not None and saved.rev > self.snapshot.rev else self.snapshot

    def sync(self) -> None:
        """Reload the membership from Redis.

        A Redis without one (restarted), or with one older than the newest copy
        this balancer knows, gets that copy: a stale worker, here or on another
        host, cannot bring back a backend removed meanwhile. At start-up, a
        membership that grew from another start-up list is replaced: a new
        LB_BACKENDS wins, runtime changes otherwise persist.
        """
        with self._lock:
            reply = parse_snapshot(self.store.run("members", self._members_keys, ["get"]))
            copy = self._newest_copy()
            if not reply.members or reply.rev < copy.rev:
                reply = self._members("offer", str(copy.rev), secrets.token_hex(4),
                                      copy.config, *members_mod.seed_args(copy.members))
            elif not self.synced and reply.config != self._config:
                log.warning("pool %s grew from another LB_BACKENDS: replacing it with this "
                            "balancer's", self.settings.pool)
                reply = self._members("replace", secrets.token_hex(4), self._config,
                                      *members_mod.seed_args(copy.members))
            self._adopt(reply)

    def _members(self, *args: str) -> Snapshot:
        return parse_snapshot(self.store.run("members", self._members_keys, list(args)))

    def _adopt(self, snapshot: Snapshot) -> None:
        changed = snapshot.version != self.snapshot.version
        self.synced = True
        self._use(snapshot)
        if changed and self.state_file:
            self.state_file.save(snapshot)

    def change(self, decide: Callable[[list[Member]], Sequence[str]]) -> list[Member]:
        """Apply one membership change (admin), decided on the current membership.

        `decide` gets the members and returns the op for members.lua: ('put', id,
        json) or ('remove', id); it may raise to refuse. If another change lands
        between reading and writing, the membership is read again and decided on
        again, so no change is ever judged on a stale list.
        """
        for _ in range(5):
            self.sync()
            op, *args = decide(list(self.members))
            reply = self.store.run("members", self._members_keys,
                                   [op, self.snapshot.version, *args])
            status = int(reply[0])
            if status == -2:
                continue
            if status == -1:
                raise KeyError(args[0])
            if status == -3:
                raise members_mod.LastBackendError("the pool cannot be left empty")
            with self._lock:
                self._adopt(parse_snapshot(reply))
            return self.members
        raise RuntimeError("the membership keeps changing: try again")

    # --- traffic ------------------------------------------------------------------

    @property
    def redis(self) -> redis.Redis:
        return self.store.redis

    def pick(self, flags: str | Callable[[Sequence[Backend]], str] = "",
             retry: bool = False) -> Backend | None:
        """Advance the shared cursor past blocked backends and return the one it lands on.

        `flags` has one character per backend: '.' eligible, 'b' busy (passed over
        like a blocked one), 'x' already tried (never picked); or it is a function
        making them for a list of backends, asked again if the membership changes.
        A retry may be refused (retry budget, or nothing untried left): then None.
        """
        if not self.synced:
            self.sync()
        for _ in range(3):
            backends, version = self.backends, self.snapshot.version
            index, _panic, _rev = self.store.run(
                "pick", self._keys,
                [repr(self.clock()), self._scored, flags(backends) if callable(flags) else flags,
                 "1" if retry else "0", *self._pick_params, self._weights, version])
            if int(index) != -2:
                return None if int(index) < 0 else backends[int(index)]
            self.sync()  # the membership changed (or Redis lost it): reload, ask again
            if not callable(flags):
                flags = ""  # made for the old list
        raise RuntimeError("the membership keeps changing under pick")

    def report(self, outcome: Outcome, check: bool = False) -> tuple[float, int]:
        """Score one attempt's outcome (or a health check's, with `check`); return
        the new score and the turns of a block it started (0 for none). A backend
        removed from the pool meanwhile is not scored."""
        index = self._index.get(outcome.backend.id)
        if index is None:
            return 0.0, 0
        score, turns = self.store.run(
            "report", self._keys,
            [repr(self.clock()), index, f"{outcome.latency_s * 1000:.3f}", outcome.kind,
             outcome.status or 0, self._scored, "1" if check else "0", *self._params])
        return float(score), int(turns)

    def hold_checker(self, owner: str, ttl_s: float) -> bool:
        """Take or renew the pool's health-checker lock; whether `owner` holds it."""
        return bool(self.store.run("checker", [self._checker_key],
                                   [owner, str(int(ttl_s * 1000))]))

    def checker(self) -> str | None:
        """Who holds the health-checker lock now."""
        holder = self.redis.get(self._checker_key)
        return holder.decode() if holder else None

    def reset(self, backend: Backend) -> None:
        """Forget a backend's score, block and recent history (its counters stay)."""
        self.redis.hdel(backend_key(self.settings.pool, backend.id), *RESET_FIELDS)

    def forget(self) -> None:
        """Delete this pool's keys (a finished simulation's)."""
        self.redis.delete(*self._keys, self._checker_key, *self._members_keys[1:])

    def redis_problem(self) -> str | None:
        """None when Redis answers now, else what is wrong with it."""
        return self.store.problem()

    def raw_state(self) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
        """The pool's hash and each backend's hash, as stored in Redis."""
        self.sync()
        pipe = self.redis.pipeline(transaction=False)
        for key in self._keys:
            pipe.hgetall(key)
        pool, *backends = [{k.decode(): v.decode() for k, v in reply.items()}
                           for reply in pipe.execute()]
        return pool, {b.id: state for b, state in zip(self.backends, backends)}

    def status(self) -> dict[str, Any]:
        """The pool as the admin listener shows it (values as of each last report)."""
        pool, backends = self.raw_state()
        return {
            "latency_avg_ms": _ratio(pool, "avg_sum", "avg_weight"),
            "latency_yardstick_ms": _ratio(pool, "all_sum", "all_weight"),
            "error_rate": _ratio(pool, "err_sum", "err_weight"),
            "panic_picks": int(pool.get("panic_picks", 0)),
            "over_cap_picks": int(pool.get("over_cap_picks", 0)),
            "blocks_deferred": int(pool.get("blocks_deferred", 0)),
            "block_swaps": int(pool.get("block_swaps", 0)),
            "retries_denied": int(pool.get("retries_denied", 0)),
            "trial_picks": int(pool.get("trial_picks", 0)),
            "members_rev": self.rev,
            "backends": [{**m.as_dict(), **describe_backend(backends[m.id])}
                         for m in self.members],
        }


def _number(state: Mapping[str, str], field: str) -> float:
    return float(state.get(field) or 0)


def _ratio(state: Mapping[str, str], total: str, weight: str) -> float | None:
    return _number(state, total) / _number(state, weight) if _number(state, weight) else None


def describe_backend(state: Mapping[str, str]) -> dict[str, Any]:
    """One backend's stored state in readable form."""
    turns, block_until = int(_number(state, "blocked_turns")), _number(state, "block_until")
    return {
        # Until the cursor finds the block over (see pick.lua), even past its end.
        "blocked": state.get("in_block") == "1",
        "score": round(_number(state, "score"), 3),
        "latency_ms": _ratio(state, "lat_sum", "lat_weight"),
        "error_rate": _ratio(state, "err_sum", "err_weight"),
        "blocked_turns": turns,
        "block_until": block_until or None,
        "block_level": int(_number(state, "block_level")),
        "blocks": int(_number(state, "blocks")),
        "last_block_at": _number(state, "last_block_at") or None,
        "block_reason": state.get("block_reason"),
        "trial": {"1": "offered", "2": "in flight"}.get(state.get("trial", ""), None),
        "ramp_started_at": _number(state, "ramp_at") or None,
        "checks": {"passed": int(_number(state, "checks_passed")),
                   "failed": int(_number(state, "checks_failed")),
                   "passing_streak": int(_number(state, "check_ok_streak")),
                   "last": state.get("last_check_outcome")},
        "trials": {"passed": int(_number(state, "trials_passed")),
                   "failed": int(_number(state, "trials_failed"))},
        "requests": int(_number(state, "requests")),
        "outcomes": {key.removeprefix("outcome:"): int(value)
                     for key, value in state.items() if key.startswith("outcome:")},
        "last_status": int(_number(state, "last_status")) or None,
        "last_outcome": state.get("last_outcome"),
        "last_latency_ms": _number(state, "last_latency_ms") if "last_latency_ms" in state else None,
        "last_seen": _number(state, "last_seen") or None,
    }
