"""A row of the settings table: what one setting is, where it goes, what it means."""
from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, Callable

# The Lua scripts (scorer/lua/<name>.lua) whose ARGV carries settings.
SCRIPTS = ("pick", "report")


@dataclass(frozen=True)
class Setting:
    """One row of the settings table."""

    name: str
    default: str
    parse: Callable[[str], Any]
    unit: str
    meaning: str
    script: str = ""  # the scorer/lua script whose ARGV carries it, if any
    private: bool = False  # may carry a password (a URL): kept out of the repr too

    def __post_init__(self) -> None:
        if self.script and self.script not in SCRIPTS:
            raise ValueError(f"{self.name}: unknown script {self.script!r}")

    @property
    def field(self) -> str:
        return self.name.removeprefix("LB_").lower()

    @property
    def type(self) -> Any:
        """The type of the parsed value: what the parser returns."""
        return str if self.parse is str else typing.get_type_hints(self.parse)["return"]

    @property
    def secret(self) -> bool:
        """A secret is never shown, not even in the repr of the settings."""
        return self.unit == "secret" or self.private
