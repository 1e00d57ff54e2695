"""The hashes' declared layout (scorer/fields.py) against the Lua sources and the status,
and the shared Lua prelude (scorer/lua/lib.lua)."""
from __future__ import annotations

import re
from collections import defaultdict

import fakeredis
import pytest

from apps.config import load_settings
from scorer import fields
from scorer.fields import BACKEND, POOL, RESET_FIELDS, Reading
from scorer.keys import load_lua, lua_file
from scorer.pool import SCRIPTS, Pool
from scorer.status import describe_backend

WRITES = {"HSET", "HINCRBY", "HINCRBYFLOAT", "HDEL"}
READS = {"HMGET", "HGET", "HEXISTS"}
# Commands that name no field of the pool's or a backend's hash.
OTHERS = {"GET", "SET", "PEXPIRE", "DEL", "EXISTS", "HGETALL", "HLEN"}
# How the scripts name the two hashes; members.lua's KEYS[2] and KEYS[3] are keyed by
# backend id, no declared field.
HASHES = {"KEYS[1]": "pool", "pool_key": "pool", "key": "backend", "best_key": "backend",
          "backend_key": "backend", "KEYS[index + 2]": "backend", "KEYS[i]": "backend",
          "KEYS[2]": None, "KEYS[3]": None}
LAYOUTS = {"pool": POOL, "backend": BACKEND}
LITERAL = re.compile(r"'([^']*)'")


def arguments(source: str, start: int) -> list[str]:
    """The top-level, comma-separated arguments of the call whose '(' is at `start`."""
    args, depth, quote, current, i = [], 0, None, "", start + 1
    while True:
        char = source[i]
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif source.startswith("--", i):
            i = source.index("\n", i)
            continue
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            if depth == 0:
                return [*args, current.strip()]
            depth -= 1
        elif char == "," and depth == 0:
            args, current = [*args, current.strip()], ""
            i += 1
            continue
        current += char
        i += 1


def field_names(expression: str) -> set[str]:
    """The field names an argument can be: its literals; 'p:' .. x is the prefix 'p:'."""
    prefix = re.fullmatch(r"'([^']*)'\s*\.\..*", expression, re.DOTALL)
    return {prefix[1]} if prefix else set(LITERAL.findall(expression))


def accesses(source: str) -> set[tuple[str, str, str]]:
    """(hash, 'write' or 'read', field) for every literal field a Lua source touches."""
    found = set()
    for match in re.finditer(r"redis\.call\(", source):
        command, *rest = arguments(source, match.end() - 1)
        command = LITERAL.fullmatch(command)[1]
        assert command in WRITES | READS | OTHERS, f"unknown command {command}"
        if command in OTHERS:
            continue
        assert rest[0] in HASHES, f"unknown key {rest[0]!r} in {source[match.start():][:80]}"
        if HASHES[rest[0]] is None:
            continue
        names = rest[1::2] if command == "HSET" else rest[1:2] if command.startswith(
            "HINCRBY") else rest[1:]
        access = "write" if command in WRITES else "read"
        found |= {(HASHES[rest[0]], access, name) for arg in names for name in field_names(arg)}
    # pick.lua's take(index, counter) counts `counter` in the pool's hash.
    for match in re.finditer(r"\btake\(", source):
        call = arguments(source, match.end() - 1)
        if len(call) == 2 and not call[1].isidentifier():
            found |= {("pool", "write", name) for name in field_names(call[1])}
    return found


def declared(layout: dict, name: str) -> fields.Field | None:
    if name in layout:
        return layout[name]
    return next((f for f in layout.values() if f.prefix and name.startswith(f.name)), None)


@pytest.fixture(scope="module")
def seen() -> dict:
    """(hash, field) -> {'write': scripts, 'read': scripts}, from the sources as loaded."""
    out: dict = defaultdict(lambda: {"write": set(), "read": set()})
    for script in SCRIPTS:
        for hash_, access, name in accesses(load_lua(script)):
            field = declared(LAYOUTS[hash_], name)
            assert field is not None, f"{script}.lua: {name!r} of the {hash_} hash is undeclared"
            out[hash_, field.name][access].add(script)
    return out


def test_the_parser_finds_literal_fields_in_nested_and_multi_line_calls():
    source = ("redis.call('HSET', key, 'a', math.max(num(x), 2), -- a, b\n 'b',\n"
              " redis.call('HINCRBY', pool_key, 'c:' .. kind, 1))\n"
              "redis.call('HMGET', KEYS[i], 'd', 'e')\n"
              "redis.call('HINCRBY', key, ok and 'f' or 'g', 1)\ntake(best, 'h')")
    assert accesses(source) == {
        ("backend", "write", "a"), ("backend", "write", "b"), ("pool", "write", "c:"),
        ("backend", "read", "d"), ("backend", "read", "e"), ("backend", "write", "f"),
        ("backend", "write", "g"), ("pool", "write", "h")}


@pytest.mark.parametrize("hash_", ["pool", "backend"])
def test_each_field_is_written_and_read_by_the_scripts_its_declaration_names(seen, hash_):
    for field in LAYOUTS[hash_].values():
        lua_readers = {r for r in field.readers if r != "status"}
        assert seen[hash_, field.name]["write"] == set(field.writers), field.name
        assert seen[hash_, field.name]["read"] == lua_readers, field.name


def reads(monkeypatch) -> dict:
    """The fields Reading is asked for, per layout."""
    asked: dict = defaultdict(set)
    declared_ = Reading._declared

    def record(self, name):
        asked[id(self._layout)].add(name)
        return declared_(self, name)

    monkeypatch.setattr(Reading, "_declared", record)
    return asked


def test_the_status_reads_exactly_the_fields_declared_read_by_status(monkeypatch):
    asked = reads(monkeypatch)
    settings = load_settings(environ={"LB_BACKENDS": "http://127.0.0.1:9001", "LB_POOL": "f"})
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    Pool(settings, redis_factory=lambda: client).status()
    for layout in (POOL, BACKEND):
        assert asked[id(layout)] == {n for n, f in layout.items() if "status" in f.readers}


def test_an_undeclared_field_is_refused():
    with pytest.raises(KeyError, match="not declared"):
        Reading({"scroe": "1"}, BACKEND).number("scroe")
    assert describe_backend({"outcome:ok": "3", "score": "2.5"})["outcomes"] == {"ok": 3}


def test_a_reset_clears_the_score_the_block_and_the_history_behind_them():
    assert set(RESET_FIELDS) == {
        "score", "in_block", "trial", "ramp_at", "credit", "share",
        "blocked_turns", "block_until", "block_level", "updated_at", "lat_sum", "lat_weight",
        "log_lat_sum", "log_sq_sum", "log_weight", "err_sum", "err_weight"}


def test_the_prelude_goes_first_into_the_scripts_that_name_it_and_each_uses_it():
    lib = lua_file("lib")
    functions = re.findall(r"^local function (\w+)", lib, re.MULTILINE)
    assert functions == ["end_block"]
    for script in SCRIPTS:
        source = lua_file(script)
        if "-- Prelude: lib.lua" in source:
            assert load_lua(script) == lib + "\n" + source
            assert all(re.search(rf"\b{name}\(", source) for name in functions), script
        else:
            assert load_lua(script) == source
    assert {s for s in SCRIPTS if load_lua(s) != lua_file(s)} == {"pick", "report"}
