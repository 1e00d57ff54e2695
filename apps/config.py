"""Every setting of the balancer: name, default, unit and meaning, in one table.

Settings are read from the environment once at start-up and validated; a bad
value stops start-up with one line naming the setting (see `SettingsError`).
Defaults live here, not in `.env`, because honcho lets `.env` override the
shell and a user must always be able to override a default.
"""
from __future__ import annotations

import ipaddress
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message is one line."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"invalid setting {name}: {reason}")
        self.name = name


@dataclass(frozen=True)
class Backend:
    """One upstream server, named by its `host:port`."""

    url: str
    scheme: str
    host: str
    port: int

    @property
    def netloc_host(self) -> str:
        """The host as it appears in a URL or Host header: IPv6 literals in brackets."""
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def id(self) -> str:
        return f"{self.netloc_host}:{self.port}"


def quoted(raw: str, limit: int = 100) -> str:
    """`raw` as an error message quotes it: repr'd, and cut to `limit` characters,
    so that a huge input is never echoed back whole."""
    if len(raw) <= limit:
        return repr(raw)
    return f"{raw[:limit]!r}... ({len(raw)} characters)"


# --- parsers: each turns one raw string into a value or raises ValueError ---

# A host name: letters, digits, '.', '-' and '_' (as in container names). IP
# literals are checked by ipaddress; anything else (spaces, braces,
# backslashes...) means a typo or an attempt to smuggle something in.
_HOST_NAME = re.compile(r"[a-z0-9_.-]{1,253}")


def parse_backends(raw: str) -> tuple[Backend, ...]:
    backends = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        try:
            parts = urlsplit(item)
            port = parts.port
        except ValueError:
            raise ValueError(f"{quoted(item)} is not a valid URL") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{quoted(item)} must be an http:// or https:// URL with a host")
        if parts.username or parts.password or parts.query or parts.fragment:
            raise ValueError(f"{quoted(item)} must not carry credentials, a query or a fragment")
        if parts.path not in ("", "/"):
            raise ValueError(f"{quoted(item)} must not have a path")
        if not _HOST_NAME.fullmatch(parts.hostname) and not is_ip(parts.hostname):
            raise ValueError(f"{quoted(item)} has an invalid host name "
                             "(letters, digits, '.', '-', '_', or an IP address)")
        if port == 0:  # urlsplit reads ':0' as 0, which `or` below would turn into 80
            raise ValueError(f"{quoted(item)} has port 0, which is not a TCP port")
        port = port or (443 if parts.scheme == "https" else 80)
        backends.append(Backend(f"{parts.scheme}://{parts.netloc}", parts.scheme,
                                parts.hostname, port))
    if not backends:
        raise ValueError("at least one backend URL is required")
    ids = [b.id for b in backends]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"backend listed twice: {', '.join(duplicates)}")
    return tuple(backends)


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(raw: str) -> tuple[Network, ...]:
    """Comma-separated networks in CIDR notation (`10.0.0.0/8`); a bare address is /32 or /128."""
    networks = []
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        try:
            networks.append(ipaddress.ip_network(part))  # strict, like Gunicorn's own check
        except ValueError as exc:
            # ipaddress's own message repeats the whole input: only its gist is kept.
            why = ": its host bits are set" if "host bits set" in str(exc) else ""
            raise ValueError(f"{quoted(part)} is not a network such as 10.0.0.0/8{why}") \
                from None
    return tuple(networks)


def address_in(ip: str, networks: tuple[Network, ...]) -> bool:
    """Whether `ip` lies in one of `networks`; an IPv4-mapped IPv6 address counts as IPv4."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def parse_seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{quoted(raw)} is not a number of seconds") from None
    if not 0 < value < 86400:
        raise ValueError(f"{quoted(raw)} must be more than 0 and less than a day")
    return value


def number(low: float, high: float = math.inf, *, integer: bool = False,
           low_open: bool = False) -> Callable[[str], float]:
    """A parser for a number in [low, high] (or (low, high] when `low_open`)."""
    kind = "an integer" if integer else "a number"
    bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]" if high < math.inf else \
        f"{'more than' if low_open else 'at least'} {low:g}"

    def parse(raw: str) -> float:
        try:
            value = int(raw) if integer else float(raw)
        except ValueError:
            raise ValueError(f"{quoted(raw)} is not {kind}") from None
        if not (math.isfinite(value) and low <= value <= high) or (low_open and value == low):
            raise ValueError(f"{quoted(raw)} must be {bounds}")
        return value
    return parse


def parse_port(raw: str) -> int:
    if not raw.strip().isdigit() or not 0 < int(raw) < 65536:
        raise ValueError(f"{quoted(raw)} is not a TCP port (1-65535)")
    return int(raw)


_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]?)i?b?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(raw: str) -> int:
    """Parse a byte count: `1048576`, `512k`, `10m`, `1g` (binary units)."""
    match = _SIZE.match(raw)
    if not match:
        raise ValueError(f"{quoted(raw)} is not a size in bytes (e.g. 1048576, 512k, 10m)")
    return int(match[1]) * _SIZE_UNITS[match[2].lower()]


def parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{quoted(raw)} is not a boolean (1/0, true/false, yes/no, on/off)")


def parse_choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in choices:
            raise ValueError(f"{quoted(raw)} is not one of: {', '.join(choices)}")
        return raw
    return parse


def parse_statuses(raw: str) -> frozenset[int]:
    statuses = set()
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        if not part.isdigit() or not 500 <= int(part) <= 599:
            raise ValueError(f"{quoted(part)} is not a 5xx status")
        statuses.add(int(part))
    return frozenset(statuses)


def parse_path(raw: str) -> str:
    if not raw.startswith("/") or any(c.isspace() for c in raw):
        raise ValueError(f"{quoted(raw)} must be a path starting with '/', without spaces")
    return raw


def parse_pool_name(raw: str) -> str:
    # The name sits inside a Redis Cluster hash tag, so braces would break it.
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", raw):
        raise ValueError(f"{quoted(raw)} must be 1-64 letters, digits, '_', '.' or '-'")
    return raw


REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")


def parse_redis_url(raw: str) -> str:
    if urlsplit(raw).scheme not in REDIS_SCHEMES:
        raise ValueError(f"{quoted(raw)} must be a redis://, rediss://, unix://, "
                         "redis+cluster:// or rediss+cluster:// URL")
    return raw


STRATEGIES = ("scored", "round_robin")

DEFAULT_REDIS_PORT = "6390"


@dataclass(frozen=True)
class Setting:
    """One row of the settings table."""

    name: str
    default: str
    parse: Callable[[str], Any]
    unit: str
    meaning: str

    @property
    def field(self) -> str:
        return self.name.removeprefix("LB_").lower()


TABLE: tuple[Setting, ...] = (
    Setting("LB_BACKENDS",
            "http://127.0.0.1:9001,http://127.0.0.1:9002,http://127.0.0.1:9003",
            parse_backends, "URLs",
            "Comma-separated backend base URLs (scheme, host, port; no path). "
            "The default is the Procfile's three echo instances."),
    Setting("LB_BACKEND_NETWORKS", "", parse_networks, "CIDRs",
            "Comma-separated networks backends must be in (`10.0.0.0/8,192.168.1.5`), "
            "checked when a backend is added and on every new connection, where a host "
            "name's addresses outside them are never connected to. Unset: any address."),
    Setting("LB_STRATEGY", "scored", parse_choice(*STRATEGIES), "name",
            "`scored`: round robin that skips blocked backends (the scorer below). "
            "`round_robin`: plain round robin, the baseline; scores are still kept and shown."),
    Setting("LB_HOST", "127.0.0.1", str, "address", "Address the traffic listener binds."),
    Setting("LB_PORT", "8000", parse_port, "port", "Port of the traffic listener."),
    Setting("LB_ADMIN_HOST", "127.0.0.1", str, "address",
            "Address the admin listener binds."),
    Setting("LB_ADMIN_PORT", "8001", parse_port, "port",
            "Port of the admin listener (`/status`, `/ready`)."),
    Setting("LB_ADMIN_TOKEN", "", str, "secret",
            "Bearer token for the admin endpoints that change state (`POST /backends/<id>/reset`). "
            "Unset: those endpoints are off."),
    Setting("LB_ADMIN_HEADER_TIMEOUT", "10", parse_seconds, "s",
            "Time an admin client has to send its whole request head; past it the admin "
            "listener answers 408 and closes (a connection that sent nothing is just closed)."),
    Setting("LB_ADMIN_BODY_TIMEOUT", "10", parse_seconds, "s",
            "Time an admin client has to send its request body once the head is in; past "
            "it, 408."),
    Setting("LB_ADMIN_SEND_TIMEOUT", "10", parse_seconds, "s",
            "An admin answer that the client does not take for this long is dropped; so is "
            "a connection the client leaves open this long after its answer."),
    Setting("LB_ADMIN_MAX_CONNECTIONS", "256", number(1, 65536, integer=True), "connections",
            "Connections the admin listener keeps open at most. At the cap it closes one "
            "done with its answer, else the oldest one still sending its request, to admit "
            "the new one. Bounds the request data it holds to this x 80 KiB (a 16 KiB head "
            "and a 64 KiB body each)."),
    Setting("LB_TLS_CA_FILE", "", str, "path",
            "CA bundle (PEM) trusted for `https://` backends; unset: the system's."),
    Setting("LB_TLS_VERIFY", "1", parse_bool, "bool",
            "Check `https://` backends' certificates and host names. Turning this off "
            "is logged at start-up."),
    # The client side (apps/lb/edge.py): what a slow, idle or crowded client may hold.
    Setting("LB_CLIENT_HEADER_TIMEOUT", "10", parse_seconds, "s",
            "Time a client has to send a whole request head from its first byte; past it the "
            "client gets 408 and the connection closes (a connection that sends nothing is "
            "closed after Gunicorn's keep-alive time instead)."),
    Setting("LB_CLIENT_BODY_TIMEOUT", "10", parse_seconds, "s",
            "Longest pause between two reads of a request body; past it the client gets 408 "
            "and the connection closes."),
    Setting("LB_CLIENT_BODY_MIN_RATE", "1k", parse_size, "bytes/s",
            "Slowest average a request body may arrive at, once LB_CLIENT_BODY_GRACE_S has "
            "passed; slower gets 408, so a trickle of a byte a second is cut off too. 0: no "
            "minimum."),
    Setting("LB_CLIENT_BODY_GRACE_S", "5", number(0), "s",
            "Time a body is given before LB_CLIENT_BODY_MIN_RATE applies."),
    Setting("LB_CLIENT_SEND_TIMEOUT", "10", parse_seconds, "s",
            "Time an answer may wait for the client to read more of it; past it the "
            "connection is dropped."),
    Setting("LB_MAX_CLIENT_CONNECTIONS", "1000", number(1, integer=True), "connections",
            "Client connections one worker holds open. At the cap the one idle longest is "
            "closed to admit a new one (else the one slowest to send its head; else the new "
            "one gets 503)."),
    Setting("LB_MAX_CONNECTIONS_PER_CLIENT", "256", number(0, integer=True), "connections",
            "Connections one client address may hold open per worker, the same way; 0: no "
            "limit. Peers in LB_TRUSTED_PROXIES are exempt."),
    Setting("LB_CONNECT_TIMEOUT", "1.0", parse_seconds, "s",
            "Time allowed to open a connection to a backend; past it the client gets "
            "504 (a refused connection gets 502)."),
    Setting("LB_READ_TIMEOUT", "15", parse_seconds, "s",
            "Time allowed between bytes from a backend once connected; past it the client gets 504."),
    Setting("LB_REQUEST_TIMEOUT", "30", parse_seconds, "s",
            "Deadline for a whole request, retries included; each attempt's timeouts are cut "
            "to what is left. Past it the client gets 504."),
    Setting("LB_MAX_BODY", "10m", parse_size, "bytes",
            "Largest request body accepted (suffixes k, m, g); larger ones get 413."),
    Setting("LB_RETRY_BUFFER", "1m", parse_size, "bytes",
            "Request bodies up to this size are held in memory, larger ones in a temporary "
            "file; either way they can be sent again on a retry. With "
            "LB_REQUEST_BUFFERING=0 larger ones are streamed instead, and retried only "
            "when no connection could be opened."),
    Setting("LB_REQUEST_BUFFERING", "1", parse_bool, "bool",
            "Read the whole request body before picking a backend, as nginx's "
            "`proxy_request_buffering`, so that a slow upload holds no backend (a chunked "
            "upload goes out with a `Content-Length`). 0: bodies over LB_RETRY_BUFFER are "
            "streamed to the backend as they arrive."),
    Setting("LB_RESPONSE_BUFFERING", "1", parse_bool, "bool",
            "Read a backend's answer as fast as the backend sends it, as nginx's "
            "`proxy_buffering`, so that a client reading slowly (or not at all) holds no "
            "backend. 0: large answers are relayed at the client's pace."),
    Setting("LB_RESPONSE_BUFFER", "256k", parse_size, "bytes",
            "Part of an answer the client has not read yet that is held in memory; the rest "
            "goes to a temporary file..."),
    Setting("LB_MAX_RESPONSE_TEMP", "1g", parse_size, "bytes",
            "...of at most this size per answer; past it the backend is read no faster than "
            "the client reads."),
    Setting("LB_RETRIES", "1", number(0, 10, integer=True), "attempts",
            "Extra attempts after a failed one, each on a different backend."),
    Setting("LB_RETRY_NON_IDEMPOTENT", "0", parse_bool, "bool",
            "Also retry POST, PATCH (and other non-idempotent methods) after a timeout, a "
            "broken connection or a retryable status, as nginx's `non_idempotent`. "
            "A refused connection is retried for every method regardless."),
    Setting("LB_RETRY_ON_STATUS", "502,503,504", parse_statuses, "statuses",
            "Backend answers that count as failed attempts worth retrying."),
    Setting("LB_RETRY_BUDGET", "0.2", number(0, 1), "fraction",
            "Retries may add at most this share of recent requests (shared through Redis), "
            "so a failing pool does not get a retry storm..."),
    Setting("LB_RETRY_BUDGET_MIN", "3", number(0), "retries",
            "...plus this many, so that light traffic can still retry."),
    Setting("LB_RETRY_BUDGET_TAU_S", "10", number(0, low_open=True), "s",
            "Time constant of the recent request and retry counts the budget compares."),
    Setting("LB_MAX_INFLIGHT", "64", number(1, integer=True), "requests",
            "Requests one worker process sends to one backend at once (like HAProxy's "
            "`maxconn`): a backend at its cap is passed over like a blocked one, so a "
            "hanging backend cannot collect a worker's requests. When every backend is at "
            "its cap, the request still goes out."),
    Setting("LB_ACCESS_LOG", "-", str, "path",
            "Where the balancer writes one JSON line per request: `-` for standard output, "
            "a file path to append to, or `off`."),
    Setting("LB_PRESERVE_HOST", "0", parse_bool, "bool",
            "Send the client's `Host` header upstream instead of the backend's own."),
    Setting("LB_TRUSTED_PROXIES", "", parse_networks, "CIDRs",
            "Comma-separated networks of proxies in front of the balancer: from them "
            "`X-Forwarded-*`, `X-Real-IP` and `Forwarded` are kept and appended to; from "
            "any other client they are replaced. Also Gunicorn's `FORWARDED_ALLOW_IPS` "
            "unless that is set. Unset: no one is trusted."),
    Setting("LB_POOL", "default", parse_pool_name, "name",
            "Name of the pool's state in Redis (keys `lb:{<pool>}:...`); balancers "
            "with the same name and Redis share one cursor."),
    Setting("LB_STATE_DIR", ".lb-state", str, "path",
            "Where each balancer keeps its last known membership "
            "(`members-<pool>.json`), restored after a restart of Redis and balancer, "
            "unless LB_BACKENDS changed meanwhile."),
    Setting("LB_REDIS_PORT", DEFAULT_REDIS_PORT, parse_port, "port",
            "Port of the bundled Redis server that `honcho start` runs when `REDIS_URL` is unset."),
    Setting("REDIS_URL", "", parse_redis_url, "URL",
            "Redis holding the shared state. Unset: the bundled server, "
            "`redis://127.0.0.1:<LB_REDIS_PORT>/0`. `redis+cluster://host:port` (or "
            "`rediss+cluster://`) selects Redis Cluster, any node as the entry point. A "
            "password goes in the URL: `redis://:password@host:6379/0`, or with an ACL user "
            "`redis://user:password@host:6379/0` (percent-encode `@`, `:` and `/` in it); "
            "`/status` shows it as `***`."),
    Setting("LB_REDIS_RETRY_S", "1", parse_seconds, "s",
            "While Redis is unreachable each worker serves from its own in-process state "
            "and checks Redis again this often."),
    Setting("LB_REDIS_CA_FILE", "", str, "path",
            "CA bundle (PEM) trusted for a `rediss://` Redis; unset: the system's. "
            "Certificates are always checked."),
    Setting("LB_REDIS_CONNECTIONS", "16", number(1, integer=True), "connections",
            "Redis connections each balancer process keeps, shared by all its requests; a "
            "request that finds them all in use waits for one."),
    Setting("LB_REDIS_TIMEOUT", "0.25", parse_seconds, "s",
            "Connect and command timeout for Redis. Scripts are never retried "
            "automatically: a retried script whose reply was lost would run twice."),

    # The scorer (scorer/lua/report.lua and pick.lua). Lower scores are healthier.
    Setting("LB_SCORE_MIN", "-10", number(-1000, 0), "points",
            "Lowest score: the most credit a healthy backend can bank against future penalties."),
    Setting("LB_SCORE_MAX", "60", number(1, 10000), "points", "Highest score."),
    Setting("LB_SCORE_THRESHOLD", "10", number(0, 10000, low_open=True), "points",
            "A score reaching this blocks the backend (score back to 0)."),
    Setting("LB_SCORE_HALF_LIFE_S", "120", number(0, low_open=True), "s",
            "Every score halves toward 0 in this time, with or without traffic."),
    Setting("LB_AVG_TAU_S", "30", number(0, low_open=True), "s",
            "Time constant of the pool's latency average: the mean over successful "
            "requests, each weighted e^(-age/tau), so it follows time, not request count."),
    Setting("LB_LATENCY_TAU_S", "2", number(0, low_open=True), "s",
            "Time constant of each backend's smoothed latency (same kind of mean)."),
    Setting("LB_LATENCY_MIN_SAMPLES", "5", number(0), "requests",
            "A backend's latency is judged only once its smoothed latency rests on this "
            "much (time-decayed) weight of requests."),
    Setting("LB_LATENCY_RATIO", "1.5", number(1), "x",
            "A backend is slower when its smoothed latency, and the request at hand, "
            "exceed this many times the pool average..."),
    Setting("LB_LATENCY_SLACK_MS", "20", number(0), "ms",
            "...and above it by more than this, so noise in a fast pool never counts."),
    Setting("LB_SLOW_POINTS", "10", number(0), "points",
            "Cost per request of being slower: points per 100 % above the pool average."),
    Setting("LB_SLOW_MAX_POINTS", "20", number(0), "points",
            "Cap on the latency cost of one request."),
    Setting("LB_FAST_BONUS", "1", number(0), "points",
            "Earned per request while the smoothed latency is below the pool average."),
    Setting("LB_ERROR_POINTS", "4", number(0), "points",
            "Cost of a failed request: a 5xx, a timeout or a transport error."),
    Setting("LB_ERROR_LATENCY_FACTOR", "4", number(1), "x",
            "A failure enters the backend's latency as at least this many times "
            "max(pool average, slack): a fast error never looks fast."),
    Setting("LB_ERROR_TAU_S", "10", number(0, low_open=True), "s",
            "Time constant of each backend's recent error rate."),
    Setting("LB_ERROR_QUIET", "0.05", number(0, 1), "fraction",
            "A success earns the bonus only while the recent error rate is below this."),
    Setting("LB_SUCCESS_BONUS", "2", number(0), "points",
            "Earned per successful request with no recent errors."),
    Setting("LB_RELATIVE_CREDIT", "1", number(0), "x",
            "A success also earns this x LB_ERROR_POINTS x r/(1-r), r the pool's recent "
            "error rate: a backend failing as often as the pool breaks even, a better one "
            "gains. 0 judges errors in absolute terms only."),
    Setting("LB_BLOCK_TURNS", "40", number(0, integer=True), "turns",
            "Round-robin turns a block lasts when the score just reaches the threshold."),
    Setting("LB_BLOCK_TURNS_PER_POINT", "1", number(0), "turns",
            "Extra turns per point of score above the threshold."),
    Setting("LB_BLOCK_MIN_S", "5", number(0), "s",
            "Shortest time a first block lasts, whatever the traffic: a block ends when "
            "its turns are used up and this time has passed."),
    Setting("LB_BLOCK_MAX_S", "20", number(0), "s",
            "Longest block after escalation; turns escalate by the same capped factor."),
    Setting("LB_REOFFEND_S", "30", number(0), "s",
            "Blocked again within this time after the last block's minimum end: "
            "the new block is twice as long (turns and time), up to LB_BLOCK_MAX_S."),
    # Active health checks (scorer/health.py) and the way back from a block.
    Setting("LB_CHECK_INTERVAL_S", "0.5", number(0), "s",
            "How often the pool's one health checker probes every backend; 0 turns "
            "active checks off (the balancer then learns from traffic alone)."),
    Setting("LB_CHECK_TIMEOUT_S", "0.5", parse_seconds, "s",
            "Time a probe may take; a slower one fails."),
    Setting("LB_CHECK_PATH", "/health", parse_path, "path",
            "Path probed on each backend with GET; a 2xx or 3xx answer passes."),
    Setting("LB_CHECK_RISE", "2", number(1, integer=True), "checks",
            "Passing checks in a row after which a blocked backend gets a trial request; "
            "if it succeeds the block ends at once, even an escalated one."),
    Setting("LB_CHECK_FAIL_POINTS", "4", number(0), "points",
            "Cost of a failed check: checks count against a backend without traffic."),
    Setting("LB_SLOW_START_S", "5", number(0), "s",
            "A backend back from a block ramps its share up linearly over this time; 0: "
            "full share at once."),
    Setting("LB_MAX_BLOCKED_SHARE", "1", number(0, 1), "fraction",
            "At most this share of the pool is blocked at once..."),
    Setting("LB_MIN_UNBLOCKED", "1", number(0, integer=True), "backends",
            "...and at least this many backends stay unblocked (default: all but one may "
            "be blocked). With 0, all may be: then picks go to the lowest score (panic mode)."),
)


@dataclass(frozen=True)
class Settings:
    """The validated settings, one attribute per row of `TABLE`."""

    backends: tuple[Backend, ...]
    backend_networks: tuple[Network, ...]
    strategy: str
    host: str
    port: int
    admin_host: str
    admin_port: int
    admin_header_timeout: float
    admin_body_timeout: float
    admin_send_timeout: float
    admin_max_connections: int
    tls_ca_file: str
    tls_verify: bool
    client_header_timeout: float
    client_body_timeout: float
    client_body_min_rate: int
    client_body_grace_s: float
    client_send_timeout: float
    max_client_connections: int
    max_connections_per_client: int
    connect_timeout: float
    read_timeout: float
    request_timeout: float
    max_body: int
    retry_buffer: int
    request_buffering: bool
    response_buffering: bool
    response_buffer: int
    max_response_temp: int
    retries: int
    retry_non_idempotent: bool
    retry_on_status: frozenset[int]
    retry_budget: float
    retry_budget_min: float
    retry_budget_tau_s: float
    max_inflight: int
    access_log: str
    preserve_host: bool
    trusted_proxies: tuple[Network, ...]
    pool: str
    state_dir: str
    redis_port: int
    redis_url: str
    redis_retry_s: float
    admin_token: str = field(repr=False)  # never printed with the settings
    redis_ca_file: str
    redis_timeout: float
    redis_connections: int
    score_min: float
    score_max: float
    score_threshold: float
    score_half_life_s: float
    avg_tau_s: float
    latency_tau_s: float
    latency_min_samples: float
    latency_ratio: float
    latency_slack_ms: float
    slow_points: float
    slow_max_points: float
    fast_bonus: float
    error_points: float
    error_latency_factor: float
    error_tau_s: float
    error_quiet: float
    success_bonus: float
    block_turns: int
    block_turns_per_point: float
    block_min_s: float
    block_max_s: float
    reoffend_s: float
    check_interval_s: float
    check_timeout_s: float
    check_path: str
    check_rise: int
    check_fail_points: float
    slow_start_s: float
    max_blocked_share: float
    min_unblocked: int
    relative_credit: float

    def backend(self, backend_id: str) -> Backend:
        return next(b for b in self.backends if b.id == backend_id)


def load_settings(environ: Mapping[str, str] | None = None,
                  overrides: Mapping[str, Any] | None = None) -> Settings:
    """Read every setting: defaults, then `environ` (os.environ), then `overrides`."""
    source = dict(os.environ if environ is None else environ)
    source.update({k: str(v) for k, v in (overrides or {}).items()})
    values: dict[str, Any] = {}
    for setting in TABLE:
        raw = source.get(setting.name, setting.default)
        if setting.name == "REDIS_URL" and not raw:
            raw = redis_url_default(source.get("LB_REDIS_PORT", DEFAULT_REDIS_PORT))
        try:
            values[setting.field] = setting.parse(raw)
        except ValueError as exc:
            raise SettingsError(setting.name, str(exc)) from None
    if values["score_min"] >= values["score_threshold"] or \
            values["score_threshold"] > values["score_max"]:
        raise SettingsError("LB_SCORE_THRESHOLD", "must lie above LB_SCORE_MIN and at most "
                                                  "LB_SCORE_MAX")
    if values["block_min_s"] > values["block_max_s"]:
        raise SettingsError("LB_BLOCK_MAX_S", "must be at least LB_BLOCK_MIN_S")
    return Settings(**values)


def redis_url_default(port: str) -> str:
    return f"redis://127.0.0.1:{port}/0"
