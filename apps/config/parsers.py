"""The value types of the settings: each parser turns one raw string into a value
or raises ValueError with a one-line reason that quotes the input (`quoted`)."""
from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit


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
    # The Settings field's type is read from the parser's return annotation.
    parse.__annotations__["return"] = int if integer else float
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
