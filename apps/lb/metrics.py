"""Prometheus metrics: counted in the workers, served by the admin listener.

Counters and histograms are counted by the traffic workers, so under Gunicorn
they use prometheus_client's multiprocess mode: PROMETHEUS_MULTIPROC_DIR is
set by gunicorn_conf.py before any worker starts, each worker writes its own
files there, and the admin listener (in the master) adds them up. The pool's
state (scores, blocks, panic picks) lives in Redis and is read at scrape time,
so it is the same whichever balancer host is scraped.
"""
from __future__ import annotations

import os
from typing import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest,
)
from prometheus_client import multiprocess, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY

from scorer.pool import Pool

# Multiprocess values ask for the pid on every increment, to notice a fork; a
# system call each time, several per request. The pid is kept here instead and
# refreshed in a forked child, which is the only time it changes.
_pid = os.getpid()


def _refresh_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_refresh_pid)
if values.ValueClass is not values.MutexValue:  # multiprocess mode (under Gunicorn)
    values.ValueClass = values.MultiProcessValue(process_identifier=lambda: _pid)

ATTEMPTS = Counter("lb_upstream_attempts_total",
                   "Upstream attempts, by backend and result (status class, transport error, "
                   "or client: ended by the client, not reported to the scorer).",
                   ["backend", "result"])
LATENCY = Histogram("lb_upstream_latency_seconds",
                    "Time from sending a request upstream to the response head.", ["backend"],
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                             10, 30))
REQUESTS = Counter("lb_requests_total",
                   "Client requests answered, by the backend that answered (none: the "
                   "balancer) and status class.", ["backend", "code"])
RETRIES = Counter("lb_retries_total", "Retries made on another backend.")
BLOCKS = Counter("lb_blocks_total", "Blocks started by this balancer's reports.", ["backend"])
# livesum: the live workers' counts added up; a dead worker's drop out (child_exit).
INFLIGHT = Gauge("lb_upstream_inflight", "Requests under way to each backend, all workers.",
                 ["backend"], multiprocess_mode="livesum")

# liveall: one value per live worker (label `pid`), read back by the admin's /status.
CLIENT_CONNECTIONS = Gauge("lb_client_connections", "Client connections open, per worker.",
                           multiprocess_mode="liveall")
CLIENT_REQUESTS = Gauge("lb_client_requests", "Client requests being handled, per worker.",
                        multiprocess_mode="liveall")

CONTENT_TYPE = CONTENT_TYPE_LATEST


def client_connections(open_: int, busy: int) -> None:
    """Record a worker's open client connections and requests under way (apps/lb/edge.py)."""
    CLIENT_CONNECTIONS.set(open_)
    CLIENT_REQUESTS.set(busy)


def worker_clients() -> dict[int, dict[str, int]]:
    """Each live worker's open client connections and requests under way, by pid,
    from the multiprocess files (empty outside Gunicorn)."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return {}
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    names = {"lb_client_connections": "connections", "lb_client_requests": "requests"}
    workers: dict[int, dict[str, int]] = {}
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name in names and "pid" in sample.labels:
                workers.setdefault(int(sample.labels["pid"]), {})[names[sample.name]] = \
                    int(sample.value)
    return workers


class PoolCollector:
    """The pool's shared state, read from Redis at scrape time."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        status = self.pool.status()
        for name, key, text in (
                ("lb_panic_picks", "panic_picks", "Picks made while every backend was blocked."),
                ("lb_over_cap_picks", "over_cap_picks",
                 "Picks over a healthy backend's in-flight cap."),
                ("lb_blocks_deferred", "blocks_deferred", "Blocks not made: the cap was full."),
                ("lb_block_swaps", "block_swaps", "Blocks handed from a better to a worse backend."),
                ("lb_retries_denied", "retries_denied", "Retries refused by the retry budget."),
                ("lb_trial_picks", "trial_picks", "Trial requests sent to blocked backends.")):
            counter = CounterMetricFamily(name, text + " Pool-wide, from Redis.")
            counter.add_metric([], status[key])
            yield counter
        gauges = {
            "score": GaugeMetricFamily("lb_backend_score", "Health score (lower is healthier).",
                                       labels=["backend"]),
            "blocked": GaugeMetricFamily("lb_backend_blocked", "1 while blocked.",
                                         labels=["backend"]),
            "latency_ms": GaugeMetricFamily("lb_backend_latency_ms", "Smoothed latency.",
                                            labels=["backend"]),
            "error_rate": GaugeMetricFamily("lb_backend_error_rate", "Recent error rate.",
                                            labels=["backend"]),
        }
        blocks = CounterMetricFamily("lb_backend_blocks", "Blocks so far, pool-wide.",
                                     labels=["backend"])
        for backend in status["backends"]:
            for field, gauge in gauges.items():
                value = backend.get(field)
                gauge.add_metric([backend["id"]], float(value or 0))
            blocks.add_metric([backend["id"]], backend["blocks"])
        yield from gauges.values()
        yield blocks


def render(pool: Pool) -> bytes:
    """The text exposition of every metric: the workers' and the pool's."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:  # one process (tests, or the app outside Gunicorn)
        registry = CollectorRegistry()
        registry.register(_Forward(REGISTRY))
    registry.register(PoolCollector(pool))
    return generate_latest(registry)


class _Forward:
    """Expose another registry's metrics through this one."""

    def __init__(self, source: CollectorRegistry) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        return self.source.collect()


def mark_process_dead(pid: int) -> None:
    """Forget a dead worker's live gauges (gunicorn_conf's child_exit)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)
