"""Log lines that client or backend data cannot forge.

A path like `/x%0a[CRITICAL] forged` is decoded to a real line break before
the balancer logs it. One filter, on the handlers of Gunicorn's error (and
access) log, which the `lb` loggers share, escapes control characters in the
*arguments* of every record: the format strings are the code's own, numbers
stay numbers (`%d`, `%.1f`), and tracebacks (exc_info) keep their lines. A
logger's own filter would not see records of its children (`lb.proxy`); a
handler's sees them all.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

# C0, DEL and C1 controls, and the Unicode line and paragraph separators: every
# character str.splitlines() breaks on, and the terminal escapes (ESC).
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_CONTROLS.update({0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r", 0x2028: "\\u2028", 0x2029: "\\u2029"})
# Backslash too, so that an escape in the log always means an escaped character.
_ESCAPES = str.maketrans({**_CONTROLS, ord("\\"): "\\\\"})
# Gunicorn's access log already writes `"` as `\"` (without escaping `\`): an
# escaped backslash there would turn its `\"` into `\\"` and end the quote.
_CONTROLS_ONLY = str.maketrans(_CONTROLS)


def escape(text: str) -> str:
    """`text` with control characters and backslashes escaped, Python-style."""
    return text.translate(_ESCAPES)


def _escaped(value: Any, table: dict[int, str] = _ESCAPES) -> Any:
    if isinstance(value, (int, float)):
        return value
    return (value if isinstance(value, str) else str(value)).translate(table)


class _EscapedMapping(Mapping):
    """Gunicorn's access-log atoms, read through the escape (they look keys up lazily)."""

    def __init__(self, atoms: Mapping) -> None:
        self._atoms = atoms

    def __getitem__(self, key: str) -> Any:
        return _escaped(self._atoms[key], _CONTROLS_ONLY)

    def __iter__(self):
        return iter(self._atoms)

    def __len__(self) -> int:
        return len(self._atoms)

    def __str__(self) -> str:  # `"%s" % {...}` formats the whole mapping
        return escape(str(self._atoms))


class EscapeFilter(logging.Filter):
    """Escapes the arguments of every record it sees, once (handlers may share a record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args and not getattr(record, "lb_escaped", False):
            record.lb_escaped = True
            if isinstance(record.args, Mapping):
                record.args = _EscapedMapping(record.args)
            else:
                record.args = tuple(_escaped(arg) for arg in record.args)
        return True


ESCAPE = EscapeFilter()


def log_through_gunicorn() -> None:
    """Send the balancer's log lines where Gunicorn sends its own, at its level, and
    escape every line those handlers write. Safe to call again: each worker does,
    and the master after a reload (SIGHUP), which gives Gunicorn new handlers."""
    gunicorn_log = logging.getLogger("gunicorn.error")
    for name in ("gunicorn.error", "gunicorn.access"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(ESCAPE)  # a no-op when it is there already
    lb_log = logging.getLogger("lb")
    if gunicorn_log.handlers:
        lb_log.handlers = list(gunicorn_log.handlers)
        lb_log.setLevel(gunicorn_log.level)
        lb_log.propagate = False
