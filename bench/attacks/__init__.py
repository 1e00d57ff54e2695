"""Slow, idle and never-reading clients, thousands from one process, and a paced probe.

Each attack kind is a coroutine `kind(target, count, duration, source=None)`
that holds `count` connections to `target` (host, port) for `duration`
seconds, all on one asyncio loop (a socket and a few tasks per connection):

    slowloris        a request head, one byte every 2 s, never finished
    slow_body_small  a complete head with Content-Length 5,000, then one body byte a second
    slow_body_large  the same with Content-Length 5,000,000
    endless_chunked  a chunked upload: a small chunk every second, never the last one
    never_read       a GET of a 4 MB answer (the echo backend's /bytes/<n>), with a
                     small SO_RCVBUF, and not one byte of the answer read
    idle             connects and sends nothing

A connection the server closes is opened again (after a pause that doubles
while connections die young), so the count stays up. Each kind's Tally counts
what the server did: connections opened and failed, closed by the server, and
the status of the first answer on each (a 408 or 503 says which defence
acted). never_read learns the status by peeking (MSG_PEEK), which reads
nothing, and sees a close only as a reset or a FIN: a server that closes
gracefully with its answer still unsent never gets its FIN through the
client's closed window, so such closes are not counted.

`source` binds the connections to local addresses (all of 127.0.0.0/8 is
local): a string, or a list that connections take in turn, so that a server
can tell attacker and probe apart, and per-address caps see many clients.

`probe` is the victim: a paced client (open loop, e.g. 50 requests/s), each
request a PUT of a small JSON body that must come back unchanged, on a new
connection unless `keepalive`; it records the status and latency of each.
`Background` runs either on a thread of its own, to run beside the other.

The parts: connection.py (the Tally, reading a status), slow.py, unread.py and
kinds.py (the kinds by family), holding.py (keeping the connections up),
probing.py, background.py. Each setting lives in its module and is read at each
connection, so set it there (slow.TRICKLE_INTERVAL_S, unread.NEVER_READ_BODY,
holding.PAUSE_S).
"""
from __future__ import annotations

from bench.attacks.background import Background, start_attack, start_probe
from bench.attacks.connection import Sources, Tally, Target
from bench.attacks.holding import (
    addresses, attack, endless_chunked, hold, idle, never_read, raise_fd_limit, slow_body_large,
    slow_body_small, slowloris,
)
from bench.attacks.kinds import KINDS, Kind
from bench.attacks.probing import ProbeResult, probe, summary

__all__ = ["Background", "KINDS", "Kind", "ProbeResult", "Sources", "Tally", "Target",
           "addresses", "attack", "endless_chunked", "hold", "idle", "never_read", "probe",
           "raise_fd_limit", "slow_body_large", "slow_body_small", "slowloris", "start_attack",
           "start_probe", "summary"]
