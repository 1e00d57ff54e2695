"""An offline simulator of the whole system, on a virtual clock (no sleeping).

Real: the pool's Lua scripts (through `scorer.pool.Pool`, on fakeredis or a
real Redis); the balancer's decisions (`apps.lb.policy`: which failure may be
retried, whether another attempt may start, the pick with its in-flight caps
and tried backends, how a probe is judged), called as the proxy and its health
checker call them; the echo backends' fault profiles and per-request draws
(`apps.echo.profiles`, keyed by the request id as the echo app keys them).

Modelled: the health checker (a probe per backend each LB_CHECK_INTERVAL_S);
`clients` closed-loop clients, like the threaded benchmark's workers, or, with a
`rate`, `clients` pacing threads, as bench/paced.py's `drive` (the live `bench
mixed` benchmark's load); the
balancer's connection slots (workers x LB_MAX_CLIENT_CONNECTIONS: beyond them,
the accept queue); one in-flight count for all workers, against the sum of
their caps; each echo instance (bench/scenario.py: a thread pool with a queue,
answering after the drawn latency; an attempt that waits longer than the read
timeout ends as a timeout while the backend still works on it).

Strategies: `round_robin` and `scored` (the balancer's own); `oracle`
(bench/scenario.py), the yardstick for "how close to perfect"; and `fastest`,
everything to the lowest mean latency (issue 15's "everything to the fastest").
Neither of the last two uses the pool.
"""
from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import tempfile
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import fakeredis
import redis

from apps.config import Backend, load_settings
from apps.echo import profiles as simulate
from apps.lb.policy import (
    READ_TIMEOUT, Fault, InFlight, choose_backend, judge_probe, may_retry, may_start,
)
from bench.mixed_report import WARMUP_S
from bench.scenario import (
    Answered, Fastest, Oracle, Scenario, SimBackend, SimResult, probe_answer,
)
from scorer.pool import Outcome, Pool

STRATEGIES = ("round_robin", "scored", "oracle", "fastest")
# The balancer's own: they pick through the pool and report to it.
POOL_STRATEGIES = ("round_robin", "scored")
# The virtual clock starts at a plausible epoch time, as the scripts expect.
EPOCH = 1_800_000_000.0
# Names a real Redis server for the simulations (the matrix and the tuner start
# the bundled one): the same scripts run about 2.5 times faster than on fakeredis.
SIM_REDIS_URL = "LB_SIM_REDIS_URL"


@dataclass
class Request:
    """One client request through its attempts, as the proxy's `forward` keeps it."""

    id: int
    arrived: float
    deadline: float
    tried: list[Backend] = field(default_factory=list)
    # The last failed attempt: its retryable status, or its fault.
    status: int | None = None
    fault: Fault | None = None
    failed: bool = False
    client: int = 0                # the client (a pacing thread) that sent it
    started: list[float] = field(default_factory=list)  # when each attempt in `tried` began


class Simulation:
    """One run of one scenario under one strategy."""

    def __init__(self, scenario: Scenario, strategy: str, env: Mapping[str, str] | None = None,
                 redis_factory: Callable[[], redis.Redis] | None = None) -> None:
        """`env` holds LB_* settings to use instead of the defaults (the tuner's knobs)."""
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}")
        self.scenario, self.strategy = scenario, strategy
        self.uses_pool = strategy in POOL_STRATEGIES
        urls = ",".join(f"http://10.0.0.{i + 1}:80" for i in range(scenario.instances))
        overrides = {"LB_BACKENDS": urls,
                     "LB_STRATEGY": "round_robin" if strategy == "round_robin" else "scored",
                     # Unique, so simulations can share one real Redis server.
                     "LB_POOL": f"sim-{scenario.name}-{strategy}-{uuid.uuid4().hex[:8]}"}
        self.settings = load_settings(environ={}, overrides={**(env or {}), **overrides})
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        server = fakeredis.FakeServer()
        self.pool = Pool(self.settings, clock=lambda: EPOCH + self.now, degrade=False,
                         redis_factory=redis_factory or
                         (lambda: fakeredis.FakeRedis(server=server)))
        self.backends = [SimBackend(b, scenario.profile(i), scenario.threads_of(i))
                         for i, b in enumerate(self.settings.backends)]
        self.by_id = {b.backend.id: b for b in self.backends}
        self.inflight = InFlight(self.settings.max_inflight * scenario.balancer_workers)
        self.oracle = Oracle(self.backends)
        self.fastest = Fastest(self.backends)
        self.balancer_free = scenario.balancer_slots
        self.accept_queue: deque[Callable[[], None]] = deque()
        self.answered: list[Answered] = []
        # Paced: each thread's next slot, `interval` apart (bench/paced.py's `drive`).
        self.interval = scenario.clients / scenario.rate if scenario.rate > 0 else 0.0
        self.next_at: list[float] = []
        self.errors = 0
        self.retries = 0
        self.shares: Counter[str] = Counter()
        self.next_id = 0
        self.check_round = 0

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (when, next(self._seq), action))

    def run(self) -> SimResult:
        self.start_clients()
        if self.strategy == "scored" and self.settings.check_interval_s > 0:
            self.at(self.settings.check_interval_s, self.health_checks)
        while self._events:
            when, _, action = heapq.heappop(self._events)
            self.now = when
            action()
        result = self.result()
        self.pool.forget()  # a shared server must not fill up with finished runs
        return result

    # --- clients and the balancer's threads -----------------------------------------

    def start_clients(self) -> None:
        """A closed loop's clients all send at once; paced, thread k first sends at
        k x interval / threads, as `drive` starts its threads."""
        clients = range(min(self.scenario.clients, self.scenario.requests))
        if not self.interval:
            for client in clients:
                self.client_sends(client)
            return
        self.next_at = [k * self.interval / self.scenario.clients for k in clients]
        for client in clients:
            self.at(self.next_at[client], lambda c=client: self.client_sends(c))

    def client_next(self, client: int) -> None:
        """After its answer, a client sends again: at once in a closed loop; paced,
        at its next slot, or at once if that has passed (so a late thread sends
        back to back until it is on schedule again, as `drive`'s do)."""
        if not self.interval:
            self.client_sends(client)
            return
        if self.next_id >= self.scenario.requests:
            return
        self.next_at[client] += self.interval
        self.at(max(self.now, self.next_at[client]), lambda: self.client_sends(client))

    def client_sends(self, client: int) -> None:
        if self.next_id >= self.scenario.requests:
            return
        request_id = self.scenario.id_offset + self.next_id
        self.next_id += 1
        arrived = self.now
        # As the proxy's, the deadline runs from when a worker takes the request up.
        start = lambda: self.attempt(Request(  # noqa: E731
            request_id, arrived, self.now + self.settings.request_timeout, client=client))
        if self.balancer_free > 0:
            self.balancer_free -= 1
            start()
        else:
            self.accept_queue.append(start)

    def request_done(self, req: Request, backend: Backend | None) -> None:
        self.answered.append(Answered(req.client, req.arrived, self.now,
                                      tuple(zip(req.started, (b.id for b in req.tried)))))
        if req.failed:
            self.errors += 1
        elif backend is not None:
            self.shares[backend.id] += 1
        if self.accept_queue:
            self.accept_queue.popleft()()
        else:
            self.balancer_free += 1
        self.client_next(req.client)

    def health_checks(self) -> None:
        """One probe per backend each interval, answered as the echo app answers
        /health in the backend's phase, judged as apps/lb/health.py judges it."""
        if self.next_id >= self.scenario.requests and not any(
                self.inflight.count(sim.backend) for sim in self.backends):
            return  # the run is over
        for sim in self.backends:
            draw = simulate.draw(sim.profile, f"health:{self.check_round}", self.now)
            latency, status, fault = probe_answer(draw, self.settings.check_timeout_s)
            self.pool.report(judge_probe(sim.backend, latency, status=status,
                                         error=fault.kind if fault else None), check=True)
        self.check_round += 1
        self.at(self.now + self.settings.check_interval_s, self.health_checks)

    # --- one request: attempts and retries, as apps/lb/proxy.py's `forward` ---------

    def choose(self, tried: list[Backend]) -> Backend | None:
        """The next attempt's backend, its in-flight slot taken (the oracle and
        fastest ignore the caps, but count), or None: the pool refused, or every
        backend was tried."""
        if self.uses_pool:
            return choose_backend(self.pool.pick, self.inflight, tried)
        if self.strategy == "oracle":
            backend = self.oracle.choose(self.now, self.inflight, tried)
        else:
            backend = self.fastest.choose(self.now, tried)
        if backend is not None:
            self.inflight.take(backend, over_cap=True)
        return backend

    def may_try_again(self, req: Request) -> bool:
        """After a failed attempt: whether the proxy would start another."""
        return may_retry(self.scenario.method,
                         delivered=req.fault.delivered if req.fault else True,
                         non_idempotent=self.settings.retry_non_idempotent,
                         body_replayable=True) and \
            may_start(len(req.tried), self.settings.retries, req.deadline - self.now)

    def attempt(self, req: Request) -> None:
        backend = self.choose(req.tried)
        if backend is None:  # as the proxy's give_up: the last failure stands, else a 503
            req.failed = req.fault is not None or req.status is None or req.status >= 500
            self.request_done(req, None if req.failed else req.tried[-1])
            return
        if req.tried:
            self.retries += 1
        req.tried.append(backend)
        req.started.append(self.now)
        sim = self.by_id[backend.id]
        # Every instance starts with the run: its phase follows the virtual clock.
        draw = simulate.draw(sim.profile, str(req.id), self.now)
        started = self.now
        finished = False

        def conclude(status: int | None, fault: Fault | None) -> None:
            nonlocal finished
            if finished:
                return
            finished = True
            self.inflight.release(backend)
            if self.uses_pool:
                self.pool.report(Outcome(backend, self.now - started, status=status,
                                         error=fault.kind if fault else None))
            if fault is not None or status in self.settings.retry_on_status:
                req.status, req.fault = status, fault
                if self.may_try_again(req):
                    self.attempt(req)
                    return
            req.failed = fault is not None or status >= 500
            self.request_done(req, backend)

        sim.serve(draw, lambda: self.now, self.at, conclude)
        limit = min(self.settings.read_timeout, req.deadline - started)
        self.at(started + limit, lambda: conclude(None, READ_TIMEOUT))

    def result(self) -> SimResult:
        return SimResult.of(
            self.scenario, self.strategy, self.answered, errors=self.errors,
            retries=self.retries,
            shares={b.backend.id: self.shares[b.backend.id] for b in self.backends},
            status=self.pool.status() if self.uses_pool else None,
            warmup_s=WARMUP_S)


def simulate_cell(scenario: Scenario, strategy: str, env: Mapping[str, str] | None = None,
                  redis_factory: Callable[[], redis.Redis] | None = None) -> SimResult:
    """Run one scenario under one strategy: on the real Redis server that
    SIM_REDIS_URL names if set (faster), else on fakeredis."""
    if redis_factory is None and os.environ.get(SIM_REDIS_URL):
        url = os.environ[SIM_REDIS_URL]
        redis_factory = lambda: redis.Redis.from_url(url)  # noqa: E731
    return Simulation(scenario, strategy, env, redis_factory).run()


@contextlib.contextmanager
def sim_redis(use_fakeredis: bool = False) -> Iterator[None]:
    """Start the bundled Redis for the simulations of this block, unless asked not to."""
    if use_fakeredis or os.environ.get(SIM_REDIS_URL):
        yield
        return
    from apps.launch.stack import start_redis
    proc, url = start_redis(Path(tempfile.mkdtemp(prefix="lb-sim-")))
    os.environ[SIM_REDIS_URL] = url  # inherited by the worker processes
    try:
        yield
    finally:
        del os.environ[SIM_REDIS_URL]
        proc.stop()
