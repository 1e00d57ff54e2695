"""python -m bench <command>

Commands:
    clients   CPU cost per request of requests.Session vs urllib3 (the proxy's upstream client)
"""
from __future__ import annotations

import argparse
import sys

from bench import clients


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    clients.add_arguments(commands.add_parser("clients", help=clients.__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    return {"clients": clients.run}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
