"""An offline simulator of the whole system, on a virtual clock (no sleeping).

What is real: the pool's Lua scripts (run through `scorer.pool.Pool` on
fakeredis or a real Redis), the retry rules (`apps.lb.retry`) and the echo
backends' fault profiles and per-request draws (`apps.echo.profiles`, keyed by the
request id exactly as the echo app keys them).

What is modelled: the pool's health checker (a probe per backend each
LB_CHECK_INTERVAL_S, judged by the backend's phase); `clients` closed-loop clients (each sends its next request
as soon as the last one ends, like the threaded benchmark's workers); the
balancer's connection slots (Gunicorn workers x LB_MAX_CLIENT_CONNECTIONS under
apps/lb/edge.py's EdgeWorker: requests beyond them wait in the accept queue); its
per-backend in-flight cap; and each backend's thread
pool (`backend_threads`: requests beyond it queue, so piling all traffic on one
backend costs waiting). A backend's answer takes the drawn latency; an attempt
that waits longer than the read timeout ends as a timeout while the backend
still works on it.

Strategies: `round_robin` and `scored` (the balancer's own), and `oracle`,
which knows every profile and sends each request to the backend with the
lowest expected cost given current load: the yardstick for "how close to
perfect".
"""
from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import os
import uuid
from collections import Counter, deque
from dataclasses import asdict, dataclass, field, replace
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import fakeredis
import redis

from apps.echo import profiles as simulate
from apps.lb.retry import may_retry
from scorer.pool import CONNECT, PROTOCOL, TIMEOUT, Outcome, Pool
from apps.config import Backend, load_settings

STRATEGIES = ("round_robin", "scored", "oracle")
# The virtual clock starts at a plausible epoch time, as the scripts expect.
EPOCH = 1_800_000_000.0
# Time a backend spends on a request on top of its drawn latency (an echo's CPU).
BASE_SERVICE_S = 0.0005
# The oracle's price of an error, in seconds of latency: an error is worth
# avoiding at the cost of up to this much extra waiting.
ORACLE_ERROR_COST_S = 1.0
# Names a real Redis server for the simulations (the matrix and the tuner start
# the bundled one): the same scripts run about 2.5 times faster than on fakeredis.
SIM_REDIS_URL = "LB_SIM_REDIS_URL"


@dataclass(frozen=True)
class Scenario:
    """One cell of the matrix, before choosing a strategy."""

    seed: int
    instances: int
    requests: int = 5000
    clients: int = 100             # the benchmark's workers
    balancer_slots: int = 2000     # requests served at once: workers x LB_MAX_CLIENT_CONNECTIONS
    balancer_workers: int = 2      # the in-flight cap is per worker
    backend_threads: int = 64      # each echo instance's threads (the Procfile's)
    id_offset: int = 0
    method: str = "POST"
    # Known faults instead of the seeded profile: (instance, error_rate, mean_latency_ms),
    # as ECHO_ERROR_RATE and ECHO_MEAN_LATENCY_MS give an echo instance.
    faults: tuple[tuple[int, float, float], ...] = ()
    # Named time-varying profiles instead of the seeded ones: (instance, spec), as
    # ECHO_PROFILE gives an echo instance, e.g. (0, "dead:start=2").
    specs: tuple[tuple[int, str], ...] = ()

    @property
    def name(self) -> str:
        return f"seed{self.seed}-n{self.instances}"

    def profile(self, instance: int) -> simulate.Profile:
        profile = simulate.profile_for(self.seed, instance)
        for index, spec in self.specs:
            if index == instance:
                profile = simulate.with_spec(profile, spec)
        for index, error_rate, mean_latency_ms in self.faults:
            if index == instance:
                profile = replace(profile, error_rate=error_rate,
                                  mean_latency_ms=mean_latency_ms)
        return profile


@dataclass
class SimResult:
    """What the clients saw, and what the pool did."""

    scenario: str
    strategy: str
    seed: int
    instances: int
    id_offset: int
    requests: int
    errors: int
    error_rate: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    virtual_s: float
    retries: int
    blocks: int
    panic_picks: int
    over_cap_picks: int
    shares: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in [0, 100])."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


class SimBackend:
    """An echo instance: a fixed profile and a pool of threads with a FIFO queue."""

    def __init__(self, backend: Backend, profile: simulate.Profile, threads: int) -> None:
        self.backend = backend
        self.profile = profile
        self.free = threads
        self.queue: deque[Callable[[], None]] = deque()

    def expected_cost(self, now: float, inflight: int, threads: int) -> float:
        """The oracle's price of sending one more request here now."""
        phase = simulate.phase_at(self.profile, now)
        if phase.state in ("dead", "hanging"):
            return math.inf
        mean_s = phase.mean_latency_ms / 1000 + BASE_SERVICE_S
        waiting = max(0, inflight + 1 - threads)
        failure = max(phase.error_rate, phase.reset_rate)
        return failure * ORACLE_ERROR_COST_S + mean_s + waiting * mean_s / threads


class Simulation:
    """One run of one scenario under one strategy."""

    def __init__(self, scenario: Scenario, strategy: str, env: Mapping[str, str] | None = None,
                 redis_factory: Callable[[], redis.Redis] | None = None) -> None:
        """`env` holds LB_* settings to use instead of the defaults (the tuner's knobs)."""
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}")
        self.scenario = scenario
        self.strategy = strategy
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
        self.backends = [SimBackend(b, scenario.profile(i), scenario.backend_threads)
                         for i, b in enumerate(self.settings.backends)]
        self.by_id = {b.backend.id: b for b in self.backends}
        self.cap = self.settings.max_inflight * scenario.balancer_workers
        self.inflight: Counter[str] = Counter()
        self.balancer_free = scenario.balancer_slots
        self.accept_queue: deque[Callable[[], None]] = deque()
        self.latencies: list[float] = []
        self.errors = 0
        self.retries = 0
        self.shares: Counter[str] = Counter()
        self.next_id = 0
        self.oracle_rotation = 0
        self.check_round = 0

    # --- the event loop ----------------------------------------------------------

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (when, next(self._seq), action))

    def run(self) -> SimResult:
        for _ in range(min(self.scenario.clients, self.scenario.requests)):
            self.client_sends()
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

    def client_sends(self) -> None:
        if self.next_id >= self.scenario.requests:
            return
        request_id = self.scenario.id_offset + self.next_id
        self.next_id += 1
        arrived = self.now
        start = lambda: self.handle(request_id, arrived)  # noqa: E731
        if self.balancer_free > 0:
            self.balancer_free -= 1
            start()
        else:
            self.accept_queue.append(start)

    def request_done(self, arrived: float, failed: bool, backend: Backend | None) -> None:
        self.latencies.append(self.now - arrived)
        if failed:
            self.errors += 1
        elif backend is not None:
            self.shares[backend.id] += 1
        if self.accept_queue:
            self.accept_queue.popleft()()
        else:
            self.balancer_free += 1
        self.client_sends()

    def health_checks(self) -> None:
        """The pool's health checker: one probe per backend each interval, judged as
        the echo app judges /health in the backend's current phase."""
        if self.next_id >= self.scenario.requests and not any(self.inflight.values()):
            return  # the run is over
        timeout = self.settings.check_timeout_s
        for sim in self.backends:
            key = f"health:{self.check_round}"
            draw = simulate.draw(sim.profile, key, self.now)
            if draw.dead:
                outcome = Outcome(sim.backend, 0.0, error=CONNECT)
            elif draw.hang or draw.latency_s > timeout:
                outcome = Outcome(sim.backend, timeout, error=TIMEOUT)
            elif draw.reset:
                outcome = Outcome(sim.backend, draw.latency_s, error=PROTOCOL)
            else:
                outcome = Outcome(sim.backend, draw.latency_s, status=503 if draw.fail else 200)
            self.pool.report(outcome, check=True)
        self.check_round += 1
        self.at(self.now + self.settings.check_interval_s, self.health_checks)

    # --- one request: attempts and retries ----------------------------------------

    def handle(self, request_id: int, arrived: float) -> None:
        deadline = self.now + self.settings.request_timeout
        self.attempt(request_id, arrived, deadline, tried=[])

    def attempt(self, request_id: int, arrived: float, deadline: float,
                tried: list[Backend]) -> None:
        backend = self.choose(tried)
        if backend is None:  # a retry refused: the last failure stands
            self.request_done(arrived, True, None)
            return
        if tried:
            self.retries += 1
        tried = [*tried, backend]
        sim = self.by_id[backend.id]
        # Every instance starts with the run: its phase follows the virtual clock.
        draw = simulate.draw(sim.profile, str(request_id), self.now)
        limit = min(self.settings.read_timeout, deadline - self.now)
        started = self.now
        self.inflight[backend.id] += 1
        finished = False

        def conclude(status: int | None, error: str | None) -> None:
            nonlocal finished
            if finished:
                return
            finished = True
            self.inflight[backend.id] -= 1
            latency = self.now - started
            if self.strategy != "oracle":
                self.pool.report(Outcome(backend, latency, status=status, error=error))
            failed = error is not None or status in self.settings.retry_on_status
            if failed and len(tried) <= self.settings.retries and self.now < deadline and \
                    may_retry(self.scenario.method, delivered=error != CONNECT,
                              non_idempotent=self.settings.retry_non_idempotent,
                              body_replayable=True):
                self.attempt(request_id, arrived, deadline, tried)
                return
            self.request_done(arrived, error is not None or status >= 500, backend)

        def serve() -> None:
            if draw.hang:  # the thread is taken for good; the timeout below ends the attempt
                return

            def answer() -> None:
                if sim.queue:  # the thread goes straight to the next queued request
                    sim.queue.popleft()()
                else:
                    sim.free += 1
                if draw.reset:
                    conclude(None, PROTOCOL)
                else:
                    conclude(500 if draw.fail else 200, None)
            self.at(self.now + draw.latency_s + BASE_SERVICE_S, answer)

        if draw.dead:  # a closed port refuses at once
            self.at(self.now, lambda: conclude(None, CONNECT))
        elif sim.free > 0:
            sim.free -= 1
            serve()
        else:
            sim.queue.append(serve)
        self.at(started + limit, lambda: conclude(None, TIMEOUT))

    def choose(self, tried: list[Backend]) -> Backend | None:
        if self.strategy == "oracle":
            return self.oracle_choice(tried)
        tried_ids = {b.id for b in tried}
        flags = "".join("x" if b.id in tried_ids else
                        "b" if self.inflight[b.id] >= self.cap else "."
                        for b in self.settings.backends)
        return self.pool.pick("" if set(flags) <= {"."} else flags, retry=bool(tried))

    def oracle_choice(self, tried: list[Backend]) -> Backend | None:
        """The backend with the lowest expected cost for this request, given its
        error probability, its mean latency and the queue it would join."""
        tried_ids = {b.id for b in tried}
        best, best_cost = None, math.inf
        n = len(self.backends)
        # Knowing every phase, the oracle never picks a dead or hung backend
        # while another will do; with none left it picks one anyway.
        for step in range(n):  # rotating the start breaks ties fairly
            sim = self.backends[(self.oracle_rotation + step) % n]
            if sim.backend.id in tried_ids:
                continue
            cost = sim.expected_cost(self.now, self.inflight[sim.backend.id],
                                     self.scenario.backend_threads)
            if cost < best_cost - 1e-12:
                best, best_cost = sim, cost
        self.oracle_rotation += 1
        if best is None:
            untried = [b for b in self.backends if b.backend.id not in tried_ids]
            best = untried[0] if untried else None
        return best.backend if best else None

    def result(self) -> SimResult:
        ordered = sorted(self.latencies)
        if self.strategy == "oracle":
            blocks = panic = over_cap = 0
        else:
            status = self.pool.status()
            blocks = sum(b["blocks"] for b in status["backends"])
            panic, over_cap = status["panic_picks"], status["over_cap_picks"]
        s = self.scenario
        return SimResult(
            scenario=s.name, strategy=self.strategy, seed=s.seed, instances=s.instances,
            id_offset=s.id_offset, requests=s.requests, errors=self.errors,
            error_rate=self.errors / s.requests,
            p50_ms=percentile(ordered, 50) * 1000, p90_ms=percentile(ordered, 90) * 1000,
            p99_ms=percentile(ordered, 99) * 1000, max_ms=ordered[-1] * 1000,
            virtual_s=self.now, retries=self.retries, blocks=blocks, panic_picks=panic,
            over_cap_picks=over_cap,
            shares={b.backend.id: self.shares[b.backend.id] for b in self.backends})


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
