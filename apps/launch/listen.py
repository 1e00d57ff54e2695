"""The listening-address check both Gunicorn configurations run at start-up."""
from __future__ import annotations

import socket
import sys


def bind_error(address) -> str | None:
    """Why a TCP address cannot be listened on, or None. Probed without
    SO_REUSEPORT, so a process already listening there is found even if it
    set SO_REUSEPORT itself (a stale worker would otherwise share the traffic)."""
    if not isinstance(address, tuple):
        return None  # a Unix socket: Gunicorn handles it
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no obstacle
        try:
            probe.bind(address[:2])
        except OSError as exc:
            return exc.strerror
    return None


def check_addresses(server) -> None:
    """Stop Gunicorn with one line if any of its addresses is taken (an on_starting hook)."""
    for address in server.cfg.address:
        error = bind_error(address)
        if error:
            print(f"lb: cannot listen on {address[0]}:{address[1]}: {error}", file=sys.stderr,
                  flush=True)
            sys.exit(2)
