"""docs/settings.md's table of the LB_* settings, generated from `TABLE`.

The table sits between two marker comments in docs/settings.md; the text around
it is written by hand. `python -m apps.config --write` regenerates it.
"""
from __future__ import annotations

from pathlib import Path

from apps.config.table import TABLE

DOC = Path(__file__).resolve().parents[2] / "docs" / "settings.md"
BEGIN = ("<!-- The settings table is generated from apps/config/table.py: "
         "python -m apps.config --write -->")
END = "<!-- end of the generated settings table -->"

# Rows that open a group of settings, before the setting they name.
GROUPS = {"LB_SCORE_MIN": "| **scorer** | | | how scores and blocks work: see "
                          "[The scorer](scorer.md) |"}


def markdown_table() -> str:
    """The table of every setting, one Markdown row each, in the order of `TABLE`."""
    lines = ["| setting | default | unit | meaning |", "|---|---|---|---|"]
    for row in TABLE:
        if "|" in row.meaning + row.default:
            raise ValueError(f"{row.name}: a '|' would break the Markdown table")
        if row.name in GROUPS:
            lines.append(GROUPS[row.name])
        default = f"`{row.default}`" if row.default else "unset"
        lines.append(f"| `{row.name}` | {default} | {row.unit} | {row.meaning} |")
    return "\n".join(lines) + "\n"


def with_table(doc: str) -> str:
    """`doc` with the text between its two markers replaced by `markdown_table()`."""
    head, begin, rest = doc.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise ValueError(f"the markers of the settings table are missing: {BEGIN} ... {END}")
    # Blank lines around the table, so that Markdown ends the comment's HTML block.
    return f"{head}{BEGIN}\n\n{markdown_table()}\n{END}{tail}"
