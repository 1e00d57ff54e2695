"""`python -m apps.config`: print the settings table; `--write`: update docs/settings.md."""
from __future__ import annotations

import argparse
import sys

from apps.config.markdown import DOC, markdown_table, with_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m apps.config", description=__doc__)
    parser.add_argument("--write", action="store_true",
                        help=f"replace the generated table in {DOC}")
    args = parser.parse_args(argv)
    if not args.write:
        sys.stdout.write(markdown_table())
        return 0
    DOC.write_text(with_table(DOC.read_text()))
    print(f"updated {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
