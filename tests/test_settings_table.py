"""A setting is declared once: `Settings`, the scripts' ARGV and docs/settings.md follow
from the rows of `TABLE` (apps/config/table.py)."""
from __future__ import annotations

import dataclasses
import re
import typing

import pytest

from apps.config import SCRIPTS, TABLE, Setting, Settings, load_settings, script_params
from apps.config import __main__ as config_main
from apps.config.markdown import BEGIN, DOC, END, markdown_table, with_table
from scorer.pool import load_lua

# What scorer/pool.py sends around the settings in each script's ARGV.
ARGV_AROUND = {
    "report": (["now", "index", "latency_ms", "outcome", "status", "may_block", "is_check"], []),
    "pick": (["now", "honour_blocks", "flags", "is_retry"], ["weights", "known_version"]),
}


def test_settings_has_one_field_per_row_in_the_order_of_the_table():
    assert [f.name for f in dataclasses.fields(Settings)] == [row.field for row in TABLE]


@pytest.mark.parametrize("row", TABLE, ids=lambda row: row.name)
def test_each_default_parses_to_the_type_its_field_declares(row):
    value = getattr(load_settings(environ={}), row.field)
    kind = typing.get_origin(row.type) or row.type
    assert isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if kind in (tuple, frozenset):
        item = typing.get_args(row.type)[0]
        assert all(isinstance(v, typing.get_args(item) or item) for v in value)


def test_settings_are_frozen_keep_the_token_out_of_the_repr_and_find_a_backend():
    settings = load_settings(environ={"LB_ADMIN_TOKEN": "s3cret-token"})
    assert settings.admin_token == "s3cret-token"
    assert "s3cret-token" not in repr(settings) and "admin_token" not in repr(settings)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.port = 1
    assert settings.backend("127.0.0.1:9002") is settings.backends[1]


def test_a_password_in_redis_url_stays_out_of_the_repr():
    settings = load_settings(environ={"REDIS_URL": "redis://:pa55word@redis.internal:6379/0"})
    assert settings.redis_url == "redis://:pa55word@redis.internal:6379/0"
    assert "pa55word" not in repr(settings)


def argv_of(script: str) -> tuple[list[str], dict[str, int]]:
    """The names in a script's ARGV header, in order, and the ARGV index each local reads."""
    source = load_lua(script)
    header = [(int(n), name) for n, name in
              re.findall(r"^-- ARGV\[(\d+)\]\s+(\w+)", source, re.MULTILINE)]
    assert [n for n, _ in header] == list(range(1, len(header) + 1)), f"{script}.lua header"
    locals_ = re.findall(r"^local (\w+) = (?:tonumber\()?ARGV\[(\d+)\]", source, re.MULTILINE)
    return [name for _, name in header], {name: int(n) for name, n in locals_}


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_scripts_argv_carries_its_settings_in_the_order_of_their_rows(script):
    before, after = ARGV_AROUND[script]
    params = script_params(script)
    header, locals_ = argv_of(script)
    assert header == [*before, *params, *after], (
        f"scorer/lua/{script}.lua's ARGV header must list {', '.join(params)} "
        f"as ARGV[{len(before) + 1}..{len(before) + len(params)}], the order of their rows")
    for n, name in enumerate(params, start=len(before) + 1):
        assert locals_.get(name) == n, (
            f"scorer/lua/{script}.lua needs `local {name} = tonumber(ARGV[{n}])`, "
            f"after the local of ARGV[{n - 1}]")


def test_every_argv_setting_names_a_row_and_every_script_row_is_read():
    fields = {row.field for row in TABLE}
    for script in SCRIPTS:
        header, _ = argv_of(script)
        read = [name for name in header if name in fields]
        assert read == list(script_params(script)), script
    assert {row.script for row in TABLE} == {"", *SCRIPTS}


def test_a_row_names_only_a_script_that_takes_settings():
    with pytest.raises(ValueError, match="unknown script 'pik'"):
        Setting("LB_X", "1", str, "x", "meaning", script="pik")
    with pytest.raises(ValueError, match="no script 'members'"):
        script_params("members")


def test_docs_settings_md_shows_the_table_as_generated():
    doc = DOC.read_text()
    assert doc == with_table(doc), (
        "docs/settings.md's table is not apps/config/table.py's: "
        "run `python -m apps.config --write`")


def test_the_generated_table_has_one_row_per_setting_with_its_default():
    rows = re.findall(r"^\| `(\w+)` \| (.*?) \| (.*?) \|", markdown_table(), re.MULTILINE)
    assert [(name, default, unit) for name, default, unit in rows] == [
        (r.name, f"`{r.default}`" if r.default else "unset", r.unit) for r in TABLE]


def test_the_command_prints_the_table_and_writes_it_between_the_markers(
        tmp_path, monkeypatch, capsys):
    assert config_main.main([]) == 0
    assert capsys.readouterr().out == markdown_table()
    doc = tmp_path / "settings.md"
    doc.write_text(f"# Settings\n\n{BEGIN}\n| stale |\n{END}\n\nby hand\n")
    monkeypatch.setattr(config_main, "DOC", doc)
    assert config_main.main(["--write"]) == 0
    assert doc.read_text() == f"# Settings\n\n{BEGIN}\n\n{markdown_table()}\n{END}\n\nby hand\n"


def test_a_doc_without_the_markers_is_refused():
    with pytest.raises(ValueError, match="markers of the settings table are missing"):
        with_table("# Settings\n")
