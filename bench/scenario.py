"""What the simulator (bench/sim.py) runs and what it yields: a scenario, the echo
instances it models, the oracle's and "everything to the fastest"'s choices, and
the result of one run."""
from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

from apps.config import Backend
from apps.echo import profiles as simulate
from apps.lb.policy import BROKEN, CONNECT_REFUSED, READ_TIMEOUT, Fault, InFlight
from bench.stats import percentile

# Time a backend spends on a request on top of its drawn latency (an echo's CPU).
BASE_SERVICE_S = 0.0005
# The oracle's price of an error, in seconds of latency: an error is worth
# avoiding at the cost of up to this much extra waiting.
ORACLE_ERROR_COST_S = 1.0
# Attempts are also counted per window of this much virtual time from the warm-up
# on, to see whether the shares settle (issue 15's convergence).
WINDOW_S = 1.0


@dataclass(frozen=True)
class Scenario:
    """One cell of the matrix, before choosing a strategy."""

    seed: int
    instances: int
    requests: int = 5000
    clients: int = 100             # the benchmark's workers, or pacing threads (`rate`)
    # Requests per second, paced as bench/paced.py's `drive` paces them from `clients`
    # threads (the live benchmark's load); 0: a closed loop, each client sending again
    # as soon as it has its answer.
    rate: float = 0.0
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
    # Instances with other than backend_threads threads: (instance, threads), so a
    # fast backend can have little capacity (bench/mixed_scenarios.py's small_fast).
    threads: tuple[tuple[int, int], ...] = ()
    label: str = ""                # a named scenario's name; else seed<N>-n<M>

    @property
    def name(self) -> str:
        return self.label or f"seed{self.seed}-n{self.instances}"

    @property
    def load_s(self) -> float:
        """How long a paced load lasts on schedule (requests / rate); 0 in a closed loop."""
        return self.requests / self.rate if self.rate > 0 else 0.0

    def threads_of(self, instance: int) -> int:
        return dict(self.threads).get(instance, self.backend_threads)

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


@dataclass(frozen=True)
class Answered:
    """One finished request as its client recorded it: the client (a pacing thread's
    number), when it was sent and answered, and each attempt: (when it started, the
    backend's id)."""

    client: int
    sent: float
    finished: float
    attempts: tuple[tuple[float, str], ...]

    @property
    def latency_s(self) -> float:
        return self.finished - self.sent


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
    p95_ms: float  # issue 15's targets are p95s (bench/mixed_report.py)
    p99_ms: float
    max_ms: float
    virtual_s: float               # when the last request finished
    retries: int
    blocks: int
    panic_picks: int
    over_cap_picks: int
    shares: dict[str, int] = field(default_factory=dict)  # successes, the whole run
    # As bench/mixed_report.py judges a live run, from its warm-up on: the p95 of the
    # requests sent since (None: none was), and each backend's count of the attempts
    # started since, retries included.
    p95_after_warmup_ms: float | None = None
    attempts_after_warmup: dict[str, int] = field(default_factory=dict)
    # The same attempts by when they started: window k holds each backend's count (in
    # the order of `shares`) of those started in [k, k + 1) x WINDOW_S after the
    # warm-up, up to the last attempt's. `load_s` is the scenario's: the windows that
    # end by it are the ones with the whole paced load in them, as in the live
    # benchmark's 15 s.
    attempt_windows: list[list[int]] = field(default_factory=list)
    load_s: float = 0.0

    @classmethod
    def of(cls, s: Scenario, strategy: str, answered: Sequence[Answered], *, errors: int,
           retries: int, shares: dict[str, int], status: Mapping[str, Any] | None,
           warmup_s: float) -> SimResult:
        """A run's result from its answered requests and what it counted; `status` is
        the pool's (None for the oracle and fastest, which use no pool)."""
        ordered = sorted(a.latency_s for a in answered)
        settled = sorted(a.latency_s for a in answered if a.sent >= warmup_s)
        after = [(started, backend) for a in answered for started, backend in a.attempts
                 if started >= warmup_s]
        attempts = Counter(backend for _, backend in after)
        return cls(
            scenario=s.name, strategy=strategy, seed=s.seed, instances=s.instances,
            id_offset=s.id_offset, requests=s.requests, errors=errors,
            error_rate=errors / s.requests,
            p50_ms=percentile(ordered, 50) * 1000, p90_ms=percentile(ordered, 90) * 1000,
            p95_ms=percentile(ordered, 95) * 1000,
            p99_ms=percentile(ordered, 99) * 1000, max_ms=ordered[-1] * 1000,
            virtual_s=max(a.finished for a in answered), retries=retries,
            blocks=sum(b["blocks"] for b in status["backends"]) if status else 0,
            panic_picks=status["panic_picks"] if status else 0,
            over_cap_picks=status["over_cap_picks"] if status else 0, shares=shares,
            p95_after_warmup_ms=percentile(settled, 95) * 1000 if settled else None,
            attempts_after_warmup={b: attempts[b] for b in shares},
            attempt_windows=_windows(after, list(shares), warmup_s), load_s=s.load_s)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _windows(attempts: Sequence[tuple[float, str]], backends: Sequence[str],
             warmup_s: float) -> list[list[int]]:
    """Each backend's count of `attempts` (start, backend; all from `warmup_s` on)
    per WINDOW_S from `warmup_s` to the last of them."""
    index = {b: i for i, b in enumerate(backends)}
    slots = [(int((started - warmup_s) // WINDOW_S), backend) for started, backend in attempts]
    windows = [[0] * len(backends) for _ in range(1 + max((k for k, _ in slots), default=-1))]
    for k, backend in slots:
        windows[k][index[backend]] += 1
    return windows


def dead_fault(draw: simulate.Draw) -> Fault | None:
    """What the balancer meets at once on connecting: a closed port refuses."""
    return CONNECT_REFUSED if draw.dead else None


def answer_of(draw: simulate.Draw, health: bool = False) -> tuple[int | None, Fault | None]:
    """What the balancer gets once an answered draw's latency has passed: a status,
    or the fault a dropped connection is (a failure is a 503 on /health, as the
    echo app answers it)."""
    if draw.reset:
        return None, BROKEN
    if draw.fail:
        return (503 if health else 500), None
    return 200, None


def probe_answer(draw: simulate.Draw, timeout_s: float
                 ) -> tuple[float, int | None, Fault | None]:
    """A health probe's latency, status and fault, given its draw."""
    fault = dead_fault(draw)
    if fault is not None:
        return 0.0, None, fault
    if draw.hang or draw.latency_s > timeout_s:
        return timeout_s, None, READ_TIMEOUT
    return (draw.latency_s, *answer_of(draw, health=True))


class SimBackend:
    """An echo instance: a fixed profile and a pool of threads with a FIFO queue."""

    def __init__(self, backend: Backend, profile: simulate.Profile, threads: int) -> None:
        self.backend = backend
        self.profile = profile
        self.threads = threads
        self.free = threads
        self.queue: deque[Callable[[], None]] = deque()

    def expected_cost(self, now: float, inflight: int) -> float:
        """The oracle's price of sending one more request here now."""
        phase = simulate.phase_at(self.profile, now)
        if phase.state in ("dead", "hanging"):
            return math.inf
        mean_s = phase.mean_latency_ms / 1000 + BASE_SERVICE_S
        waiting = max(0, inflight + 1 - self.threads)
        failure = max(phase.error_rate, phase.reset_rate)
        return failure * ORACLE_ERROR_COST_S + mean_s + waiting * mean_s / self.threads

    def serve(self, draw: simulate.Draw, clock: Callable[[], float],
              at: Callable[[float, Callable[[], None]], None],
              conclude: Callable[[int | None, Fault | None], None]) -> None:
        """The backend's side of one attempt, on the simulation's clock and event
        queue (`at`): refused at once, or served by one of its threads when one is
        free, answering after the drawn latency (a hung thread never answers)."""
        fault = dead_fault(draw)
        if fault is not None:
            at(clock(), lambda: conclude(None, fault))
            return

        def run() -> None:
            if draw.hang:  # the thread is taken for good; the read timeout ends the attempt
                return

            def answer() -> None:
                if self.queue:  # the thread goes straight to the next queued request
                    self.queue.popleft()()
                else:
                    self.free += 1
                conclude(*answer_of(draw))
            at(clock() + draw.latency_s + BASE_SERVICE_S, answer)

        if self.free > 0:
            self.free -= 1
            run()
        else:
            self.queue.append(run)


class Oracle:
    """Knows every profile: sends each request to the backend with the lowest
    expected cost given its error probability, its mean latency and the queue
    it would join. The yardstick for "how close to perfect"."""

    def __init__(self, backends: Sequence[SimBackend]) -> None:
        self.backends = backends
        self.rotation = 0

    def choose(self, now: float, inflight: InFlight, tried: Sequence[Backend]) -> Backend | None:
        tried_ids = {b.id for b in tried}
        best, best_cost = None, math.inf
        n = len(self.backends)
        # Knowing every phase, the oracle never picks a dead or hung backend
        # while another will do; with none left it picks one anyway.
        for step in range(n):  # rotating the start breaks ties fairly
            sim = self.backends[(self.rotation + step) % n]
            if sim.backend.id in tried_ids:
                continue
            cost = sim.expected_cost(now, inflight.count(sim.backend))
            if cost < best_cost - 1e-12:
                best, best_cost = sim, cost
        self.rotation += 1
        if best is None:
            untried = [b for b in self.backends if b.backend.id not in tried_ids]
            best = untried[0] if untried else None
        return best.backend if best else None


class Fastest:
    """Knows every profile, as the oracle does, but looks at nothing else: sends
    every request to the backend whose mean latency is lowest now (its phase's:
    a dead or hung one's is infinite), ignoring its queue and its errors; a
    retry goes to the fastest one not yet tried. Ties go to the first in the
    pool's order, so "everything" is one backend. Issue 15's yardstick for what
    following latency alone costs when the fastest has little capacity."""

    def __init__(self, backends: Sequence[SimBackend]) -> None:
        self.backends = backends

    def choose(self, now: float, tried: Sequence[Backend]) -> Backend | None:
        tried_ids = {b.id for b in tried}
        untried = [sim for sim in self.backends if sim.backend.id not in tried_ids]
        if not untried:
            return None
        # min() keeps the first of equal ones: ties go to the pool's order.
        return min(untried, key=lambda sim: simulate.phase_at(sim.profile, now)
                   .mean_latency_ms).backend
