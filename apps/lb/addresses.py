"""Which addresses the balancer may connect to: never itself, only LB_BACKEND_NETWORKS.

A backend on the balancer's own traffic or admin port would send each request
through the balancer again; a leaked admin token must not aim the balancer and
its health checker at 169.254.169.254 or an internal Redis. So the rules are
checked twice: when a backend is configured or added (an IP literal is judged
at once; a host name is not resolved then, as it may resolve differently
later), and on every new upstream connection, where the name is resolved and
only its allowed addresses are tried. A refused connection is a `connect`
failure, like a refused port: nothing was sent, so it is retried elsewhere.
"""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from apps.config import Backend, Network, Settings, SettingsError, address_in, is_ip


def is_local(ip: str) -> bool:
    """Whether `ip` reaches this machine: loopback, unspecified, or one of its addresses."""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    if address.is_loopback or address.is_unspecified:
        return True
    # Only an address of this machine can be bound: the cheapest sure test.
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class AddressPolicy:
    """The balancer's own ports (port -> setting name) and the allowed networks (empty: any)."""

    own_ports: dict[int, str]
    networks: tuple[Network, ...] = ()

    @classmethod
    def of(cls, settings: Settings) -> AddressPolicy:
        return cls({settings.port: "LB_PORT", settings.admin_port: "LB_ADMIN_PORT"},
                   settings.backend_networks)

    def refusal(self, ip: str, port: int) -> str | None:
        """Why `ip:port` must not be connected to, or None."""
        if port in self.own_ports and is_local(ip):
            return f"{ip} port {port} is this balancer's own {self.own_ports[port]}"
        if self.networks and not address_in(ip, self.networks):
            return f"{ip} is outside LB_BACKEND_NETWORKS"
        return None

    def check(self, backend: Backend) -> None:
        """Raise ValueError for a backend whose IP literal may not be reached (names pass:
        they are checked on every connection)."""
        reason = self.refusal(backend.host, backend.port) if is_ip(backend.host) else None
        if reason:
            raise ValueError(f"backend {backend.url} refused: {reason}")

    def check_settings(self, settings: Settings) -> None:
        """LB_BACKENDS against the policy, as a one-line SettingsError."""
        for backend in settings.backends:
            try:
                self.check(backend)
            except ValueError as exc:
                raise SettingsError("LB_BACKENDS", str(exc)) from None


class AddressRefused(OSError):
    """No address of a backend's host may be connected to; the message says why.

    Raised as the cause of urllib3's NewConnectionError, so that the attempt
    counts as a refused connection.
    """


def guarded_connections(policy: AddressPolicy) -> dict[str, type]:
    """urllib3 connection classes, by scheme, that connect only where `policy` allows."""
    # urllib3 is imported here rather than at the top: the Gunicorn master (the
    # start-up check, the admin listener) needs only the policy, and every import
    # there delays the workers' start.
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.exceptions import NameResolutionError, NewConnectionError
    from urllib3.util.connection import allowed_gai_family

    class Guarded:
        """Resolve, keep the allowed addresses, connect to those in turn. Only the
        socket goes to the address: `host` stays the name, for TLS SNI and the
        certificate check."""

        def _new_conn(self) -> socket.socket:
            name, port = self._dns_host, self.port  # type: ignore[attr-defined]
            try:
                found = socket.getaddrinfo(name.strip("[]"), port, allowed_gai_family(),
                                           socket.SOCK_STREAM)
            except socket.gaierror as exc:
                raise NameResolutionError(self.host, self, exc) from exc  # type: ignore
            reasons = {ip: policy.refusal(ip, port)
                       for ip in dict.fromkeys(info[4][0] for info in found)}
            allowed = [ip for ip, reason in reasons.items() if reason is None]
            if not allowed:
                why = "; ".join(filter(None, reasons.values()))
                raise NewConnectionError(self, why) from AddressRefused(why)
            error: NewConnectionError | None = None
            for ip in allowed:
                self._dns_host = ip  # what urllib3 connects to; restored before TLS starts
                try:
                    return super()._new_conn()  # type: ignore[misc]
                except NewConnectionError as exc:  # refused: the next address may answer
                    error = exc  # (a timeout is not caught: it ends the attempt)
                finally:
                    self._dns_host = name
            raise error  # type: ignore[misc]

    return {scheme: type(f"Guarded{base.__name__}", (Guarded, base), {})
            for scheme, base in (("http", HTTPConnection), ("https", HTTPSConnection))}
