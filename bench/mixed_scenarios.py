"""Issue 15's pools of fixed-profile backends, defined once for the live benchmark
(bench/mixed.py) and the simulator (`python -m bench matrix --suite issue15`).

Each backend is steady (no time variation): a mean latency (the echo's log-normal
draw around it) and an error rate, as ECHO_MEAN_LATENCY_MS and ECHO_ERROR_RATE give
an echo instance, and its threads.
"""
from __future__ import annotations

from dataclasses import dataclass

from bench.scenario import Scenario


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
# sending everything to the fastest queues on its 4 threads. Live, a paced 150
# requests/s never fills 4 threads of 5 ms, so it would show nothing there.
SIM_ONLY = {
    "small_fast": (Instance(5, threads=4), Instance(20), Instance(20)),
}
SLOW_INSTANCE = 1                  # static_mixed's 300 ms backend


def sim_scenario(name: str, requests: int, clients: int, id_offset: int) -> Scenario:
    """The named pool as a simulator scenario (seed 0: only the faults given here)."""
    pool = {**LIVE, **SIM_ONLY}[name]
    return Scenario(seed=0, instances=len(pool), requests=requests, clients=clients,
                    id_offset=id_offset, label=name,
                    faults=tuple((i, b.error_rate, b.latency_ms) for i, b in enumerate(pool)),
                    threads=tuple((i, b.threads) for i, b in enumerate(pool)))


def sim_names() -> list[str]:
    return [*LIVE, *SIM_ONLY]
