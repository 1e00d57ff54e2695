"""Seeded, reproducible fault profiles for the echo backends (pure: no I/O, no clock).

A profile is fixed by (seed, instance), or named by a spec such as
`fail_recover:start=5,period=10`. It can change over time: the phase an
instance is in is a function of the time since it started (passed in, so tests
and the simulator use a virtual clock). Every per-request draw is a function of
(seed, instance, request key) and that phase alone, so a run that sends the
same request ids at the same times sees the same behaviour whatever the order
threads run in. SEED=0 means a well-behaved instance: no errors, no latency.

Kinds (the parameters each one uses):
    steady        the base error rate and latency, for ever
    degrading     latency rises steadily from `start` over `period` seconds to
                  `factor` x the base, then stays there
    fail_recover  every request fails from `start` for `period` seconds, then healthy
    flapping      from `start`, alternating windows of `period` seconds:
                  healthy, failing, healthy...
    hang          from `start`, requests are accepted and never answered
    dead          from `start`, the port is closed (the process stays alive)
    reset         from `start`, each connection is dropped mid-request with
                  probability `factor`
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, replace
from statistics import NormalDist

# The prototype's ranges: P(error) in [0, 0.5), mean latency in [0, 500) ms.
MAX_ERROR_RATE = 0.5
MAX_MEAN_LATENCY_MS = 500.0
# Shape of the log-normal latency: sigma 0.6 puts p99 near 2.7x the mean,
# a tail like a real service's, not an on/off sleep.
LATENCY_SIGMA = 0.6
# Cap a single draw so one astronomically unlucky request cannot hang a test.
LATENCY_CAP_FACTOR = 20.0
# A seeded instance changes over time with this probability, each changing
# kind equally likely; the rest stay steady.
SEEDED_CHANGE_RATE = 0.3
KINDS = ("steady", "degrading", "fail_recover", "flapping", "hang", "dead", "reset")
# Spec parameter names, and the Profile field each sets.
SPEC_FIELDS = {"start": "start_s", "period": "period_s", "factor": "factor",
               "error": "error_rate", "latency": "mean_latency_ms"}

_STANDARD_NORMAL = NormalDist()


@dataclass(frozen=True)
class Profile:
    """How one echo instance behaves, and how that changes over time."""

    seed: int
    instance: int
    error_rate: float       # base probability of a simulated 500, in [0, 1]
    mean_latency_ms: float  # base mean added latency
    latency_sigma: float = LATENCY_SIGMA
    kind: str = "steady"
    start_s: float = 0.0    # when the change begins, seconds after the instance starts
    period_s: float = 10.0  # degrading: ramp time; fail_recover: failing time; flapping: window
    factor: float = 1.0     # degrading: latency multiplier at the peak; reset: P(reset)


@dataclass(frozen=True)
class Phase:
    """What an instance is like at one moment."""

    state: str              # healthy, degrading, failing, hanging, dead or resetting
    error_rate: float
    mean_latency_ms: float
    reset_rate: float = 0.0


@dataclass(frozen=True)
class Draw:
    """What one request experiences."""

    latency_s: float
    fail: bool
    hang: bool = False      # accepted, never answered
    reset: bool = False     # connection dropped mid-request
    dead: bool = False      # the port is closed: nothing is accepted


def profile_for(seed: int, instance: int) -> Profile:
    """The fixed profile of `instance` under `seed` (seed 0: no faults)."""
    if seed == 0:
        return Profile(seed, instance, 0.0, 0.0)
    rng = random.Random(f"profile:{seed}:{instance}")  # str seeds hash with SHA-512: stable
    profile = Profile(seed, instance, error_rate=rng.random() * MAX_ERROR_RATE,
                      mean_latency_ms=rng.random() * MAX_MEAN_LATENCY_MS)
    if rng.random() >= SEEDED_CHANGE_RATE:
        return profile
    kind = rng.choice(KINDS[1:])
    factor = {"degrading": rng.uniform(3, 10), "reset": rng.uniform(0.05, 0.3)}.get(kind, 1.0)
    return replace(profile, kind=kind, start_s=rng.uniform(5, 30),
                   period_s=rng.uniform(5, 20), factor=factor)


def parse_spec(spec: str) -> tuple[str, dict[str, float]]:
    """`kind:name=value,...` -> (kind, Profile fields). Raises ValueError."""
    kind, _, raw = spec.strip().partition(":")
    if kind not in KINDS:
        raise ValueError(f"unknown profile kind {kind!r} (one of {', '.join(KINDS)})")
    fields = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        name, _, value = item.partition("=")
        if name not in SPEC_FIELDS:
            raise ValueError(f"unknown profile parameter {name!r} "
                             f"(one of {', '.join(SPEC_FIELDS)})")
        try:
            fields[SPEC_FIELDS[name]] = float(value)
        except ValueError:
            raise ValueError(f"profile parameter {name}={value!r} is not a number") from None
    return kind, fields


def with_spec(profile: Profile, spec: str) -> Profile:
    """`profile` changed by a spec such as `flapping:start=2,period=3`."""
    kind, fields = parse_spec(spec)
    return replace(profile, kind=kind, **fields)


def phase_at(profile: Profile, elapsed: float) -> Phase:
    """The phase `profile` is in `elapsed` seconds after its instance started."""
    base = Phase("healthy", profile.error_rate, profile.mean_latency_ms)
    since = elapsed - profile.start_s
    if profile.kind == "steady" or since < 0:
        return base
    if profile.kind == "degrading":
        ramp = min(1.0, since / profile.period_s) if profile.period_s > 0 else 1.0
        # From zero latency there is nothing to multiply: degrade from 10 ms.
        peak = max(profile.mean_latency_ms, 10.0) * profile.factor
        mean = profile.mean_latency_ms + (peak - profile.mean_latency_ms) * ramp
        return Phase("degrading", profile.error_rate, mean)
    if profile.kind == "fail_recover":
        return Phase("failing", 1.0, profile.mean_latency_ms) if since < profile.period_s \
            else base
    if profile.kind == "flapping":
        window = int(since // profile.period_s) if profile.period_s > 0 else 1
        return Phase("failing", 1.0, profile.mean_latency_ms) if window % 2 else base
    if profile.kind == "hang":
        return Phase("hanging", profile.error_rate, math.inf)
    if profile.kind == "dead":
        return Phase("dead", 1.0, math.inf)
    return Phase("resetting", profile.error_rate, profile.mean_latency_ms,
                 reset_rate=profile.factor)


def _uniforms(profile: Profile, key: str) -> tuple[float, float]:
    """Two independent uniforms in (0, 1) derived from (seed, instance, key)."""
    digest = hashlib.blake2b(f"{profile.seed}:{profile.instance}:{key}".encode(),
                             digest_size=16).digest()
    scale = 2.0 ** 64
    return ((int.from_bytes(digest[:8], "big") + 0.5) / scale,
            (int.from_bytes(digest[8:], "big") + 0.5) / scale)


def draw(profile: Profile, key: str, elapsed: float = 0.0) -> Draw:
    """What the request identified by `key` meets, `elapsed` seconds after start."""
    phase = phase_at(profile, elapsed)
    if phase.state == "dead":
        return Draw(0.0, True, dead=True)
    if phase.state == "hanging":
        return Draw(math.inf, False, hang=True)
    if phase.error_rate == 0 and phase.mean_latency_ms == 0 and phase.reset_rate == 0:
        return Draw(0.0, False)
    u_fail, u_latency = _uniforms(profile, key)
    # A third draw only where resets happen, so the others stay as they always were.
    u_reset = _uniforms(profile, f"reset:{key}")[0] if phase.reset_rate else 1.0
    latency_s = 0.0
    if phase.mean_latency_ms > 0:
        sigma = profile.latency_sigma
        # Choose mu so that the log-normal's mean is the phase's mean.
        mu = math.log(phase.mean_latency_ms / 1000) - sigma * sigma / 2
        latency_s = math.exp(mu + sigma * _STANDARD_NORMAL.inv_cdf(u_latency))
        latency_s = min(latency_s, LATENCY_CAP_FACTOR * phase.mean_latency_ms / 1000)
    return Draw(latency_s, u_fail < phase.error_rate, reset=u_reset < phase.reset_rate)
