"""The admin's membership changes: add, remove, drain, activate, weigh and reset backends.

Each change is one versioned `Pool.change` (scorer/membership.py); every route
here but the listing needs the bearer token, checked before the body is read.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable, Sequence

from flask import Flask, Response, abort, jsonify, request

from apps.config import Settings, quoted
from apps.lb.addresses import AddressPolicy
from apps.lb.admininput import check_token, json_body
from scorer.members import (
    ACTIVE, DRAINING, LastBackendError, Member, check_still_serving, check_weight, new_member,
    with_change,
)
from scorer.pool import Pool

log = logging.getLogger("lb.admin")

Reply = tuple[Response, int]


def known(members: Sequence[Member], backend_id: str) -> Member:
    """The member `backend_id`, or 404."""
    member = next((m for m in members if m.id == backend_id), None)
    if member is None:
        abort(404, f"no backend {quoted(backend_id)} in this pool")
    return member


class Membership:
    """The views of the membership; each change is one decision on the members as they are."""

    def __init__(self, pool: Pool, addresses: AddressPolicy) -> None:
        self.pool, self.addresses = pool, addresses

    def list_backends(self) -> Reply:
        self.pool.sync()
        return self._reply()

    def add_backend(self) -> Reply:
        data = json_body()
        if not isinstance(data, dict) or not isinstance(data.get("url"), str):
            abort(400, 'expected JSON {"url": "http://host:port", "weight": 1}')
        try:
            member = new_member(data["url"], data.get("weight", 1))
            self.addresses.check(member.backend)
        except ValueError as exc:
            abort(400, str(exc))

        def decide(members: list[Member]) -> Sequence[str]:
            if any(m.id == member.id for m in members):
                abort(409, f"backend {member.id} is already in the pool")
            return "put", member.id, member.to_json()

        self._apply(decide)
        log.warning("admin added backend %s (weight %d)", member.id, member.weight)
        return self._reply(201)

    def remove_backend(self, backend_id: str) -> Reply:
        def decide(members: list[Member]) -> Sequence[str]:
            known(members, backend_id)
            check_still_serving(members, [m for m in members if m.id != backend_id])
            return "remove", backend_id

        self._apply(decide)
        log.warning("admin removed backend %s", backend_id)
        return self._reply()

    def drain(self, backend_id: str) -> Reply:
        return self._set(backend_id, state=DRAINING)

    def activate(self, backend_id: str) -> Reply:
        return self._set(backend_id, state=ACTIVE)

    def weight(self, backend_id: str) -> Reply:
        data = json_body()
        try:
            value = check_weight(data.get("weight") if isinstance(data, dict) else None)
        except ValueError as exc:
            abort(400, str(exc))
        return self._set(backend_id, weight=value)

    def reset(self, backend_id: str) -> Response:
        self.pool.sync()
        self.pool.reset(known(self.pool.members, backend_id).backend)
        log.warning("admin reset the score and block of %s", backend_id)
        return jsonify(reset=backend_id)

    def _set(self, backend_id: str, **change: Any) -> Reply:
        def decide(members: list[Member]) -> Sequence[str]:
            member = dataclasses.replace(known(members, backend_id), **change)
            check_still_serving(members, with_change(members, member))
            return "put", member.id, member.to_json()

        self._apply(decide)
        log.warning("admin set backend %s: %s", backend_id, change)
        return self._reply()

    def _apply(self, decide: Callable[[list[Member]], Sequence[str]]) -> None:
        """Make one membership change; 409 if it would leave nothing to serve."""
        try:
            self.pool.change(decide)
        except LastBackendError as exc:
            abort(409, str(exc))

    def _reply(self, status: int = 200) -> Reply:
        return jsonify(members_rev=self.pool.rev,
                       backends=[m.as_dict() for m in self.pool.members]), status


def register_membership(app: Flask, settings: Settings, pool: Pool) -> None:
    """GET and POST /backends; DELETE /backends/<id>; POST .../drain, .../activate,
    .../reset; PUT .../weight."""
    views = Membership(pool, AddressPolicy.of(settings))

    def changing(view: Callable[..., Any]) -> Callable[..., Any]:
        """The view, run once the token checks out (503 from Redis if it is away)."""
        @functools.wraps(view)
        def checked(**args: str) -> Any:
            denied = check_token(settings.admin_token, request.headers.get("Authorization", ""))
            return denied or view(**args)
        return checked

    app.add_url_rule("/backends", view_func=views.list_backends, methods=["GET"])
    app.add_url_rule("/backends", view_func=changing(views.add_backend), methods=["POST"])
    app.add_url_rule("/backends/<backend_id>", view_func=changing(views.remove_backend),
                     methods=["DELETE"])
    for action in ("drain", "activate", "reset"):
        app.add_url_rule(f"/backends/<backend_id>/{action}",
                         view_func=changing(getattr(views, action)), methods=["POST"])
    app.add_url_rule("/backends/<backend_id>/weight", view_func=changing(views.weight),
                     methods=["PUT"])
