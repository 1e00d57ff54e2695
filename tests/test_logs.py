"""Log lines that client or backend data cannot forge (apps/lb/logs.py)."""
from __future__ import annotations

import io
import os
import logging

import pytest
from gunicorn.glogging import SafeAtoms

from apps.lb.logs import escape, log_through_gunicorn

FORGED = "[CRITICAL] forged"
# Every character str.splitlines() breaks on, plus ESC and DEL.
BREAKS = ["\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


@pytest.fixture
def gunicorn_logs():
    """Gunicorn-like error and access logs writing to strings; the loggers as they were after."""
    names = ("lb", "gunicorn.error", "gunicorn.access")
    saved = {n: (lg.handlers, lg.level, lg.propagate)
             for n, lg in ((n, logging.getLogger(n)) for n in names)}
    streams = {}
    for name in ("gunicorn.error", "gunicorn.access"):
        streams[name] = io.StringIO()
        handler = logging.StreamHandler(streams[name])
        handler.setFormatter(logging.Formatter("[%(process)d] [%(levelname)s] %(message)s"))
        logger = logging.getLogger(name)
        logger.handlers, logger.propagate = [handler], False
        logger.setLevel(logging.INFO)
    logging.getLogger("lb").handlers = []
    log_through_gunicorn()
    yield streams
    for name, (handlers, level, propagate) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers, logger.level, logger.propagate = handlers, level, propagate


@pytest.mark.parametrize("brk", BREAKS + ["\x1b", "\x7f", "\x00", "\x9b"])
def test_every_line_break_and_control_character_is_escaped(brk):
    escaped = escape(f"/x{brk}{FORGED}")
    assert escaped.isprintable() and len(escaped.splitlines()) == 1
    assert escaped.endswith(FORGED)


def test_escaping_is_unambiguous_and_leaves_other_text_alone():
    assert escape("a\\nb") == "a\\\\nb" != escape("a\nb") == "a\\nb"
    assert escape("/café/中文 ~!*'();:@&=+$,?#[]\"") == "/café/中文 ~!*'();:@&=+$,?#[]\""


def test_a_child_loggers_arguments_are_escaped_and_numbers_stay_numbers(gunicorn_logs):
    logging.getLogger("lb.proxy").warning(
        "%s %s -> %s: %s; %d turns at %.1f", "GET", "/x\n" + FORGED + "\u2028" + FORGED,
        "10.0.0.1:80", OSError("bad\rline"), 40, 12.25)
    out = gunicorn_logs["gunicorn.error"].getvalue()
    assert out.splitlines() == [
        f"[{os.getpid()}] [WARNING] GET /x\\n{FORGED}\\u2028{FORGED} -> "
        "10.0.0.1:80: bad\\rline; 40 turns at 12.2"]


def test_a_traceback_keeps_its_lines_and_a_record_is_escaped_once(gunicorn_logs):
    error_log = logging.getLogger("gunicorn.error")
    second = io.StringIO()
    error_log.handlers.append(logging.StreamHandler(second))  # e.g. syslog beside stderr
    log_through_gunicorn()
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("lb.health").exception("round failed for %s", "a\\b\nc")
    first = gunicorn_logs["gunicorn.error"].getvalue()
    assert first.splitlines()[0].endswith("round failed for a\\\\b\\nc")
    assert "Traceback (most recent call last):" in first.splitlines()[1]
    assert second.getvalue().splitlines()[0] == "round failed for a\\\\b\\nc"


def test_gunicorns_access_log_escapes_controls_and_keeps_its_quoting(gunicorn_logs):
    atoms = SafeAtoms({"a": 'agent\x85' + FORGED + '"q', "s": "200", "{x-h}i": "v\tw"})
    logging.getLogger("gunicorn.access").info('"%(a)s" %(s)s %({X-H}i)s %(missing)s', atoms)
    out = gunicorn_logs["gunicorn.access"].getvalue()
    assert out.splitlines() == [f'[{os.getpid()}] [INFO] '
                                f'"agent\\x85{FORGED}\\"q" 200 v\\tw -']


def test_a_single_mapping_argument_still_formats_whole(gunicorn_logs):
    logging.getLogger("lb.admin").warning("admin set %s", {"weight": "1\n2"})
    out = gunicorn_logs["gunicorn.error"].getvalue()
    assert out.splitlines()[0].endswith("admin set {'weight': '1\\\\n2'}")


def test_after_a_reload_the_new_handlers_escape_and_carry_the_lb_lines(gunicorn_logs):
    # Gunicorn's reload (SIGHUP) swaps its handlers; on_reload hooks this up again.
    fresh = io.StringIO()
    handler = logging.StreamHandler(fresh)
    logging.getLogger("gunicorn.error").handlers = [handler]
    log_through_gunicorn()
    logging.getLogger("lb.admin").warning("admin removed backend %s", f"x\n{FORGED}")
    assert fresh.getvalue() == f"admin removed backend x\\n{FORGED}\n"
