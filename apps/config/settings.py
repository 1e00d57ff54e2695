"""The validated settings: a frozen `Settings` built from `TABLE`, one field per row.

Settings are read from the environment once at start-up and validated; a bad
value stops start-up with one line naming the setting (see `SettingsError`).
Defaults live in the table, not in `.env`, because honcho lets `.env` override
the shell and a user must always be able to override a default.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from apps.config.parsers import Backend
from apps.config.row import SCRIPTS
from apps.config.table import DEFAULT_REDIS_PORT, TABLE


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message is one line."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"invalid setting {name}: {reason}")
        self.name = name


def _backend(self: Any, backend_id: str) -> Backend:
    """The configured backend named `backend_id` (`host:port`)."""
    return next(b for b in self.backends if b.id == backend_id)


# Keyword-only, so that no caller depends on the order of the rows.
Settings = dataclasses.make_dataclass(
    "Settings",
    [(row.field, row.type, dataclasses.field(repr=not row.secret)) for row in TABLE],
    namespace={"backend": _backend,
               "__doc__": "The validated settings, one attribute per row of `TABLE`."},
    frozen=True, kw_only=True)
Settings.__module__ = __name__


def script_params(script: str) -> tuple[str, ...]:
    """The `Settings` fields `scorer/lua/<script>.lua` takes, in its ARGV order."""
    if script not in SCRIPTS:
        raise ValueError(f"no script {script!r} takes settings")
    return tuple(row.field for row in TABLE if row.script == script)


def load_settings(environ: Mapping[str, str] | None = None,
                  overrides: Mapping[str, Any] | None = None) -> Settings:
    """Read every setting: defaults, then `environ` (os.environ), then `overrides`."""
    source = dict(os.environ if environ is None else environ)
    source.update({k: str(v) for k, v in (overrides or {}).items()})
    values: dict[str, Any] = {}
    for setting in TABLE:
        raw = source.get(setting.name, setting.default)
        if setting.name == "REDIS_URL" and not raw:
            raw = redis_url_default(source.get("LB_REDIS_PORT", DEFAULT_REDIS_PORT))
        try:
            values[setting.field] = setting.parse(raw)
        except ValueError as exc:
            raise SettingsError(setting.name, str(exc)) from None
    if values["score_min"] >= values["score_threshold"] or \
            values["score_threshold"] > values["score_max"]:
        raise SettingsError("LB_SCORE_THRESHOLD", "must lie above LB_SCORE_MIN and at most "
                                                  "LB_SCORE_MAX")
    if values["block_min_s"] > values["block_max_s"]:
        raise SettingsError("LB_BLOCK_MAX_S", "must be at least LB_BLOCK_MIN_S")
    return Settings(**values)


def redis_url_default(port: str) -> str:
    return f"redis://127.0.0.1:{port}/0"
