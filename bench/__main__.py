"""python -m bench [command] [options]

    (no command)  the threaded benchmark against a running balancer (bench/load.py)
    matrix        seeds x instance counts x strategies, simulated or --live (bench/matrix.py)
    tune          search the scorer's settings on the simulator (bench/tune.py)
    faults        time-varying backends, live, against the health-check targets (bench/faults.py)
    mixed         issue 15's fixed-profile pools live: balancer, with retries, nginx (bench/mixed.py)
    clients       CPU cost per request of requests.Session vs urllib3 (bench/clients.py)
    overhead      the balancer's cost per request against Flask, direct and nginx (bench/overhead/)
    slowclients   a paced probe beside slow, idle and never-reading clients (bench/slowclients.py)

`python -m bench <command> --help` lists each command's options.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {"matrix": "bench.matrix", "tune": "bench.tune", "faults": "bench.faults",
            "mixed": "bench.mixed",
            "clients": "bench.clients",
            "overhead": "bench.overhead", "slowclients": "bench.slowclients"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        name, module = argv[0], importlib.import_module(COMMANDS[argv[0]])
        argv = argv[1:]
    elif argv and argv[0] in ("-h", "--help") and len(argv) == 1:
        print(__doc__)
        return 0
    else:
        name, module = None, importlib.import_module("bench.load")
    parser = argparse.ArgumentParser(
        prog=f"python -m bench {name}" if name else "python -m bench",
        description=(module.__doc__ or "").strip().splitlines()[0])
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
