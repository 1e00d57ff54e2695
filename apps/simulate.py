"""Seeded, reproducible fault profiles for the echo backends (pure: no I/O, no clock).

A profile is fixed by (seed, instance). Every per-request draw is a function of
(seed, instance, request key) alone, so a run that sends the same request ids
sees the same errors and latencies whatever the order threads run in.
SEED=0 means a well-behaved instance: no errors, no added latency.
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from statistics import NormalDist

# The prototype's ranges: P(error) in [0, 0.5), mean latency in [0, 500) ms.
MAX_ERROR_RATE = 0.5
MAX_MEAN_LATENCY_MS = 500.0
# Shape of the log-normal latency: sigma 0.6 puts p99 near 2.7x the mean,
# a tail like a real service's, not an on/off sleep.
LATENCY_SIGMA = 0.6
# Cap a single draw so one astronomically unlucky request cannot hang a test.
LATENCY_CAP_FACTOR = 20.0

_STANDARD_NORMAL = NormalDist()


@dataclass(frozen=True)
class Profile:
    """How one echo instance misbehaves."""

    seed: int
    instance: int
    error_rate: float       # probability of a simulated 500, in [0, 0.5)
    mean_latency_ms: float  # mean added latency, in [0, 500) ms
    latency_sigma: float = LATENCY_SIGMA
    state: str = "steady"


@dataclass(frozen=True)
class Draw:
    """What one request experiences."""

    latency_s: float
    fail: bool


def profile_for(seed: int, instance: int) -> Profile:
    """The fixed profile of `instance` under `seed` (seed 0: no faults)."""
    if seed == 0:
        return Profile(seed, instance, 0.0, 0.0)
    rng = random.Random(f"profile:{seed}:{instance}")  # str seeds hash with SHA-512: stable
    return Profile(seed, instance,
                   error_rate=rng.random() * MAX_ERROR_RATE,
                   mean_latency_ms=rng.random() * MAX_MEAN_LATENCY_MS)


def _uniforms(profile: Profile, key: str) -> tuple[float, float]:
    """Two independent uniforms in (0, 1) derived from (seed, instance, key)."""
    digest = hashlib.blake2b(f"{profile.seed}:{profile.instance}:{key}".encode(),
                             digest_size=16).digest()
    scale = 2.0 ** 64
    return ((int.from_bytes(digest[:8], "big") + 0.5) / scale,
            (int.from_bytes(digest[8:], "big") + 0.5) / scale)


def draw(profile: Profile, key: str) -> Draw:
    """The latency and failure of the request identified by `key`."""
    if profile.error_rate == 0 and profile.mean_latency_ms == 0:
        return Draw(0.0, False)
    u_fail, u_latency = _uniforms(profile, key)
    latency_s = 0.0
    if profile.mean_latency_ms > 0:
        sigma = profile.latency_sigma
        # Choose mu so that the log-normal's mean is the profile's mean.
        mu = math.log(profile.mean_latency_ms / 1000) - sigma * sigma / 2
        latency_s = math.exp(mu + sigma * _STANDARD_NORMAL.inv_cdf(u_latency))
        latency_s = min(latency_s, LATENCY_CAP_FACTOR * profile.mean_latency_ms / 1000)
    return Draw(latency_s, u_fail < profile.error_rate)
