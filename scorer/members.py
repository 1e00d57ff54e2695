"""The pool's membership: which backends, their weights, and which are draining.

Membership lives in Redis (scorer/lua/members.lua), so a change made through
the admin listener reaches every worker and every balancer host at once. Each
worker keeps its last known copy, used while Redis is away and to seed a Redis
that lost its keys; and writes it to a file, so that a restart of both Redis
and the balancer restores the last membership instead of the start-up list,
as long as the start-up list (LB_BACKENDS) has not changed meanwhile.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from apps.config import Backend, Settings, parse_backends

log = logging.getLogger("lb.members")

ACTIVE, DRAINING = "active", "draining"
MAX_WEIGHT = 100


@dataclass(frozen=True)
class Member:
    """A backend in the pool, with its weight and state."""

    backend: Backend
    weight: int = 1
    state: str = ACTIVE
    order: int = 0  # its place in the rotation, the same for every worker

    @property
    def id(self) -> str:
        return self.backend.id

    def to_json(self) -> str:
        return json.dumps({"url": self.backend.url, "weight": self.weight,
                           "state": self.state}, sort_keys=True)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "url": self.backend.url, "weight": self.weight,
                "state": self.state}


def from_settings(backends: Sequence[Backend]) -> list[Member]:
    return [Member(b, order=i) for i, b in enumerate(backends)]


def new_member(url: str, weight: int = 1) -> Member:
    """A member from an admin request; ValueError when the URL or weight is bad."""
    (backend,) = parse_backends(url)
    return Member(backend, check_weight(weight))


def check_weight(weight: Any) -> int:
    if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= MAX_WEIGHT:
        raise ValueError(f"weight must be an integer from 0 to {MAX_WEIGHT}")
    return weight


def fingerprint(backends: Sequence[Backend]) -> str:
    """The start-up list, as members.lua records where a membership came from."""
    return ",".join(b.url for b in backends)


@dataclass(frozen=True)
class Snapshot:
    """A membership as members.lua returns it, or as a worker keeps its copy."""

    rev: int
    epoch: str
    config: str  # the start-up list it grew from (see `fingerprint`)
    members: tuple[Member, ...]

    @property
    def version(self) -> str:
        """What pick.lua and members.lua compare: the revision and who seeded it."""
        return f"{self.rev}:{self.epoch}"


def parse_snapshot(reply: Sequence[Any]) -> Snapshot:
    """members.lua's reply -> a Snapshot, members in rotation order."""
    rev, epoch, config, rest = int(reply[0]), _text(reply[1]), _text(reply[2]), list(reply[3:])
    members = []
    for raw_id, raw_json, order in zip(rest[0::3], rest[1::3], rest[2::3]):
        members.append(_member(json.loads(_text(raw_json)), int(order)))
    return Snapshot(rev, epoch, config, tuple(sorted(members, key=lambda m: m.order)))


def _member(data: Mapping[str, Any], order: int) -> Member:
    (backend,) = parse_backends(data["url"])
    return Member(backend, int(data.get("weight", 1)), data.get("state", ACTIVE), order)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def seed_args(members: Sequence[Member]) -> list[str]:
    return [part for m in members for part in (m.id, m.to_json())]


def with_change(members: Sequence[Member], changed: Member) -> list[Member]:
    return [replace(changed, order=m.order) if m.id == changed.id else m for m in members]


class LastBackendError(ValueError):
    """A change that would leave the pool with no backend to send requests to."""


def serving(member: Member) -> bool:
    """Whether picks may land on it: active, with a weight above 0."""
    return member.state == ACTIVE and member.weight > 0


def check_still_serving(before: Sequence[Member], after: Sequence[Member]) -> None:
    """Refuse a change that takes away the last backend able to serve.

    A pool in which nothing serves answers every request with 503, and an empty
    one could not even be told apart from a Redis that lost its keys.
    """
    if not after or (any(map(serving, before)) and not any(map(serving, after))):
        raise LastBackendError("that would leave no backend to send requests to: add or "
                               "activate another one first")


class StateFile:
    """The membership on disk, tied to the start-up list it grew from.

    Every worker of a balancer and its admin listener share the file, so after a
    Redis restart a worker that missed the last change still offers the newest copy.
    """

    def __init__(self, path: str | os.PathLike, configured: Sequence[Backend]) -> None:
        self.path = Path(path)
        self.configured = [b.url for b in configured]

    def load(self) -> Snapshot | None:
        """The saved membership, if there is one and the start-up list is unchanged."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring %s: %s", self.path, exc)
            return None
        if data.get("configured") != self.configured:
            log.warning("LB_BACKENDS changed since %s was saved: starting from LB_BACKENDS",
                        self.path)
            return None
        try:
            members = tuple(sorted((_member(m, int(m["order"])) for m in data["members"]),
                                   key=lambda m: m.order))
            return Snapshot(int(data.get("rev", 0)), str(data.get("epoch", "")),
                            ",".join(self.configured), members)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("ignoring %s: %s", self.path, exc)
            return None

    def save(self, snapshot: Snapshot) -> None:
        """Write atomically: workers and hosts may write at the same moment. An older
        copy never replaces a newer one (a slow worker must not undo a change)."""
        payload = {"configured": self.configured, "rev": snapshot.rev, "epoch": snapshot.epoch,
                   "members": [{**m.as_dict(), "order": m.order} for m in snapshot.members]}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # read, compare and write as one step
                saved = self.load()
                if saved is not None and saved.rev > snapshot.rev:
                    return
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".members-")
                with os.fdopen(fd, "w") as handle:
                    json.dump(payload, handle, indent=1)
                os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("cannot save the membership to %s: %s", self.path, exc)


def state_file_for(settings: Settings) -> StateFile:
    """The pool's state file under LB_STATE_DIR, shared by workers and admin listener."""
    return StateFile(Path(settings.state_dir) / f"members-{settings.pool}.json",
                     settings.backends)
