"""Which backends this worker sends to: the membership in Redis and its local copy.

The data types (Member, Snapshot, StateFile) are in scorer/members.py; the
rules of a change in scorer/lua/members.lua. This module keeps one worker's
copy in step with Redis and builds from it the keys and arguments that
pick.lua and report.lua take.
"""
from __future__ import annotations

import logging
import secrets
import threading
from typing import Callable, Sequence

from apps.config import Settings
from scorer import members as members_mod
from scorer.keys import backend_key, member_order_key, members_key, pool_key
from scorer.members import DRAINING, Member, Snapshot, StateFile, parse_snapshot
from scorer.store import Store

log = logging.getLogger("lb.pool")


class Membership:
    """One worker's view of the pool's membership, synced with Redis."""

    def __init__(self, settings: Settings, store: Store,
                 state_file: StateFile | None = None) -> None:
        self.settings = settings
        self.store = store
        self.state_file = state_file
        self._config = members_mod.fingerprint(settings.backends)
        self._lock = threading.Lock()
        self._pool_key = pool_key(settings.pool)
        # The keys members.lua takes.
        self.member_keys = [self._pool_key, members_key(settings.pool),
                            member_order_key(settings.pool)]
        # The membership this worker knows: the start-up list (or the one saved
        # on disk) until Redis says otherwise (`synced` False: not asked yet).
        saved = state_file.load() if state_file else None
        self.synced = False
        self._use(saved or Snapshot(0, "", self._config,
                                    tuple(members_mod.from_settings(settings.backends))))

    @property
    def rev(self) -> int:
        return self.snapshot.rev

    def _use(self, snapshot: Snapshot) -> None:
        """Adopt a membership: the keys and per-backend arguments both scripts take."""
        self.snapshot = snapshot
        self.members = list(snapshot.members)
        self.backends = [m.backend for m in self.members]
        self.index = {m.id: i for i, m in enumerate(self.members)}
        # Both scripts take the same keys: the pool's hash, then every backend's.
        self.keys = [self._pool_key,
                     *(backend_key(self.settings.pool, m.id) for m in self.members)]
        weights = [0 if m.state == DRAINING else m.weight for m in self.members]
        self.weights = "" if all(w == 1 for w in weights) else ",".join(map(str, weights))

    def _newest_copy(self) -> Snapshot:
        """This worker's copy, or the state file's if another worker saw a later change."""
        saved = self.state_file.load() if self.state_file else None
        return saved if saved is not None and saved.rev > self.snapshot.rev else self.snapshot

    def sync(self) -> None:
        """Reload the membership from Redis.

        A Redis without one (restarted), or with one older than the newest copy
        this balancer knows, gets that copy: a stale worker, here or on another
        host, cannot bring back a backend removed meanwhile. At start-up, a
        membership that grew from another start-up list is replaced: a new
        LB_BACKENDS wins, runtime changes otherwise persist.
        """
        with self._lock:
            reply = parse_snapshot(self.store.run("members", self.member_keys, ["get"]))
            copy = self._newest_copy()
            if not reply.members or reply.rev < copy.rev:
                reply = self._members("offer", str(copy.rev), secrets.token_hex(4),
                                      copy.config, *members_mod.seed_args(copy.members))
            elif not self.synced and reply.config != self._config:
                log.warning("pool %s grew from another LB_BACKENDS: replacing it with this "
                            "balancer's", self.settings.pool)
                reply = self._members("replace", secrets.token_hex(4), self._config,
                                      *members_mod.seed_args(copy.members))
            self._adopt(reply)

    def _members(self, *args: str) -> Snapshot:
        return parse_snapshot(self.store.run("members", self.member_keys, list(args)))

    def _adopt(self, snapshot: Snapshot) -> None:
        changed = snapshot.version != self.snapshot.version
        self.synced = True
        self._use(snapshot)
        if changed and self.state_file:
            self.state_file.save(snapshot)

    def change(self, decide: Callable[[list[Member]], Sequence[str]]) -> list[Member]:
        """Apply one membership change (admin), decided on the current membership.

        `decide` gets the members and returns the op for members.lua: ('put', id,
        json) or ('remove', id); it may raise to refuse. If another change lands
        between reading and writing, the membership is read again and decided on
        again, so no change is ever judged on a stale list.
        """
        for _ in range(5):
            self.sync()
            op, *args = decide(list(self.members))
            reply = self.store.run("members", self.member_keys,
                                   [op, self.snapshot.version, *args])
            status = int(reply[0])
            if status == -2:
                continue
            if status == -1:
                raise KeyError(args[0])
            if status == -3:
                raise members_mod.LastBackendError("the pool cannot be left empty")
            with self._lock:
                self._adopt(parse_snapshot(reply))
            return self.members
        raise RuntimeError("the membership keeps changing: try again")
