"""Helpers shared by the pool's tests: a pool on a given client and clock, and
shorthands for its picks, reports and membership changes."""
from __future__ import annotations

import redis

from apps.config import load_settings, parse_backends
from scorer.members import Member
from scorer.pool import Outcome, Pool

BACKENDS = "http://127.0.0.1:9001,http://127.0.0.1:9002,http://127.0.0.1:9003"
# Settings that isolate one rule at a time: no latency judgement, no score fading,
# errors judged in absolute terms.
ERRORS_ONLY = {"LB_LATENCY_MIN_SAMPLES": "1e9", "LB_SCORE_HALF_LIFE_S": "1e9",
               "LB_RELATIVE_CREDIT": "0"}


class Clock:
    """A fake clock the tests move by hand."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# The scorer's weights these tests are written against, fixed here so that the
# tests check the rules, not whatever `python -m bench tune` last chose.
RULES = {"LB_SCORE_THRESHOLD": "20", "LB_SCORE_HALF_LIFE_S": "30", "LB_LATENCY_TAU_S": "5",
         "LB_LATENCY_RATIO": "1.5", "LB_LATENCY_SLACK_MS": "20", "LB_SLOW_POINTS": "5",
         "LB_SLOW_MAX_POINTS": "5", "LB_FAST_BONUS": "0.5", "LB_ERROR_POINTS": "8",
         "LB_ERROR_QUIET": "0.02", "LB_SUCCESS_BONUS": "1", "LB_BLOCK_TURNS": "10",
         "LB_BLOCK_MIN_S": "2", "LB_BLOCK_MAX_S": "60", "LB_SLOW_START_S": "0"}


def make_pool(client: redis.Redis, clock=lambda: 1000.0, backends: str = BACKENDS,
              pool: str = "t", **env: str) -> Pool:
    settings = load_settings(environ={**RULES, "LB_BACKENDS": backends, "LB_POOL": pool, **env})
    return Pool(settings, redis_factory=lambda: client, clock=clock)


def report(pool: Pool, index: int, latency_ms: float = 10.0, status: int | None = 200,
           error: str | None = None) -> tuple[float, int]:
    return pool.report(Outcome(pool.backends[index], latency_ms / 1000, status, error))


def state(pool: Pool, index: int) -> dict:
    return pool.status()["backends"][index]


def ports(pool: Pool, picks: int) -> list[int]:
    return [pool.pick().port for _ in range(picks)]


def member_json(url: str, weight: int = 1, state: str = "active") -> str:
    return Member(parse_backends(url)[0], weight, state).to_json()


def put(pool: Pool, url: str, weight: int = 1, state: str = "active") -> None:
    backend_id = url.removeprefix("http://")
    pool.change(lambda members: ("put", backend_id, member_json(url, weight, state)))


def remove(pool: Pool, backend_id: str) -> None:
    pool.change(lambda members: ("remove", backend_id))
