"""Issue 15's pools of fixed-profile backends, defined once for the live benchmark
(bench/mixed.py) and the simulator (`python -m bench matrix --suite issue15`).

Each backend is steady (no time variation): a mean latency (the echo's log-normal
draw around it) and an error rate, as ECHO_MEAN_LATENCY_MS and ECHO_ERROR_RATE give
an echo instance, and its threads. The load is the live benchmark's, paced
(bench/paced.py), in both.
"""
from __future__ import annotations

from dataclasses import dataclass

from bench.scenario import Scenario

# The live benchmark's paced load (bench/mixed.py's defaults), which the simulator
# models too: its warm-up (bench/mixed_report.py's WARMUP_S) is a fifth of the run.
RATE = 150.0                       # requests per second
THREADS = 16                       # client threads
DURATION_S = 15.0                  # seconds of load per run


@dataclass(frozen=True)
class Instance:
    latency_ms: float
    error_rate: float = 0.0
    threads: int = 64              # the Procfile's echo threads

    def describe(self) -> str:
        errors = f" {self.error_rate:.0%} 500s" if self.error_rate else ""
        threads = f" {self.threads} threads" if self.threads != 64 else ""
        return f"{self.latency_ms:g} ms{errors}{threads}"

    def echo_env(self) -> dict[str, str]:
        """The echo settings that give an instance this profile."""
        return {"ECHO_MEAN_LATENCY_MS": str(self.latency_ms),
                "ECHO_ERROR_RATE": str(self.error_rate)}


LIVE = {
    "static_mixed": (Instance(5), Instance(300), Instance(5, 0.35)),
    "graded": (Instance(4), Instance(15), Instance(60), Instance(8, 0.25), Instance(8, 0.5)),
    # The yardstick for static_mixed's p95: what the balancer costs with nothing to avoid.
    "healthy3": (Instance(5), Instance(5), Instance(5)),
}
# Simulator only: a fast backend with little capacity beside slower ones, so that
# sending everything to the fastest queues on its 4 threads. Those serve at most
# about 4 / 5.5 ms = 730 requests/s: a paced 150 requests/s never fills them (so
# live it would show nothing), 1000 requests/s does. 64 threads, because 16 could
# not offer 1000 requests/s at the 20 ms backends' latency (16 / 20.5 ms = 780).
SIM_ONLY = {
    "small_fast": (Instance(5, threads=4), Instance(20), Instance(20)),
}
SIM_LOADS = {"small_fast": (1000.0, 64)}  # (rate, threads) instead of RATE, THREADS
SLOW_INSTANCE = 1                  # static_mixed's 300 ms backend


def sim_scenario(name: str, id_offset: int = 0, requests: int | None = None,
                 clients: int | None = None) -> Scenario:
    """The named pool as a simulator scenario (seed 0: only the faults given here),
    paced as live for DURATION_S unless `requests` or `clients` (threads) say otherwise."""
    pool = {**LIVE, **SIM_ONLY}[name]
    rate, threads = SIM_LOADS.get(name, (RATE, THREADS))
    return Scenario(seed=0, instances=len(pool), requests=requests or round(rate * DURATION_S),
                    clients=clients or threads, rate=rate, id_offset=id_offset, label=name,
                    faults=tuple((i, b.error_rate, b.latency_ms) for i, b in enumerate(pool)),
                    threads=tuple((i, b.threads) for i, b in enumerate(pool)))


def sim_names() -> list[str]:
    return [*LIVE, *SIM_ONLY]
