"""The address policy: own ports and LB_BACKEND_NETWORKS, when configured and when connecting.

The connection tests open real sockets to a server thread in the test
(tests/rawbackend.py) and count what reached it.
"""
from __future__ import annotations

import socket

import pytest
import trustme
import urllib3

from apps.lb.addresses import AddressPolicy, is_local
from apps.lb.health import HealthChecker
from apps.lb.upstream import UpstreamError, Upstreams
from scorer.pool import CONNECT
from apps.config import SettingsError, load_settings
from tests.rawbackend import RawBackend
from tests.tls_relay import TLSRelay

TIMEOUT = urllib3.Timeout(connect=2, read=2)


def settings_for(backends: str, **env: str):
    return load_settings(environ={"LB_BACKENDS": backends, "LB_PORT": "8000",
                                  "LB_ADMIN_PORT": "8001", **env})


def refusal(backend: str, **env: str) -> str:
    settings = settings_for(backend, **env)
    with pytest.raises(SettingsError) as caught:
        AddressPolicy.of(settings).check_settings(settings)
    assert "\n" not in str(caught.value) and caught.value.name == "LB_BACKENDS"
    return str(caught.value)


def own_address() -> str:
    """An address of this machine that is not loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: only a route is chosen
        except OSError:  # no route at all
            return "127.0.0.1"
        return probe.getsockname()[0]


@pytest.mark.parametrize("backend, setting", [
    ("http://127.0.0.1:8000", "LB_PORT"),
    ("http://127.0.0.2:8001", "LB_ADMIN_PORT"),  # all of 127/8 is loopback
    ("http://0.0.0.0:8000", "LB_PORT"),
    ("http://[::1]:8001", "LB_ADMIN_PORT"),
    ("http://[::ffff:127.0.0.1]:8000", "LB_PORT"),
    ("http://[::]:8000", "LB_PORT"),
])
def test_a_backend_on_the_balancers_own_port_is_refused_at_start_up(backend, setting):
    assert f"own {setting}" in refusal(backend)


def test_any_address_of_this_machine_counts_as_its_own():
    address = own_address()
    assert is_local(address) and is_local("127.0.0.1") and not is_local("203.0.113.9")
    assert is_local(f"::ffff:{address}")  # IPv4-mapped: the same address
    if address != "127.0.0.1":
        assert "own LB_PORT" in refusal(f"http://{address}:8000")


def test_other_ports_and_other_hosts_pass():
    settings = settings_for("http://127.0.0.1:8002,http://203.0.113.9:8000,http://api:8000")
    AddressPolicy.of(settings).check_settings(settings)  # a name is judged when connecting


def test_backends_outside_the_allowed_networks_are_refused():
    networks = {"LB_BACKEND_NETWORKS": "10.0.0.0/8,127.0.0.1"}
    assert "169.254.169.254 is outside LB_BACKEND_NETWORKS" in refusal(
        "http://10.1.1.1:80,http://169.254.169.254:80", **networks)
    settings = settings_for("http://10.1.1.1:80,http://127.0.0.1:9001,http://[::ffff:10.0.0.9]",
                            **networks)
    AddressPolicy.of(settings).check_settings(settings)


@pytest.fixture
def backend():
    server = RawBackend()
    yield server
    server.close()


def send(upstreams: Upstreams, settings) -> urllib3.BaseHTTPResponse:
    return upstreams.send(settings.backends[0], "GET", "/x", {"Host": "x"}, None, TIMEOUT)


def test_a_name_that_resolves_outside_the_allowed_networks_is_never_connected_to(backend):
    settings = settings_for(f"http://localhost:{backend.port}", LB_BACKEND_NETWORKS="10.0.0.0/8")
    with pytest.raises(UpstreamError) as caught:
        send(Upstreams(settings, maxsize=1), settings)
    assert caught.value.kind == CONNECT and not caught.value.delivered  # retried elsewhere
    assert "outside LB_BACKEND_NETWORKS" in str(caught.value)
    assert "127.0.0.1" in str(caught.value)
    assert backend.connections == 0


def test_a_name_inside_the_allowed_networks_is_connected_to(backend):
    settings = settings_for(f"http://localhost:{backend.port}",
                            LB_BACKEND_NETWORKS="127.0.0.0/8,::1")
    assert send(Upstreams(settings, maxsize=1), settings).status == 200
    assert backend.connections == 1


def test_only_allowed_addresses_of_a_name_are_tried_in_turn(backend, monkeypatch):
    real = socket.getaddrinfo

    def resolve(host, *args):  # multi.test: one address outside, one refusing, one answering
        if host != "multi.test":
            return real(host, *args)
        return [info for ip in ("10.9.9.9", "127.0.0.2", "127.0.0.1") for info in real(ip, *args)]
    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    settings = settings_for(f"http://multi.test:{backend.port}", LB_BACKEND_NETWORKS="127.0.0.0/8")
    assert send(Upstreams(settings, maxsize=1), settings).status == 200
    assert backend.connections == 1


def test_a_name_that_resolves_to_the_balancers_own_port_is_refused_when_connecting(backend):
    settings = load_settings(environ={"LB_BACKENDS": f"http://localhost:{backend.port}",
                                      "LB_PORT": str(backend.port)})
    with pytest.raises(UpstreamError) as caught:
        send(Upstreams(settings, maxsize=1), settings)
    assert caught.value.kind == CONNECT and "own LB_PORT" in str(caught.value)
    assert backend.connections == 0


def test_the_health_checker_obeys_the_policy_too(backend):
    settings = settings_for(f"http://localhost:{backend.port}", LB_BACKEND_NETWORKS="10.0.0.0/8")
    checker = HealthChecker(settings, pool=None, owner="test")
    outcome = checker.probe(settings.backends[0])
    checker.stop()
    assert outcome.kind == CONNECT and backend.connections == 0


def test_tls_still_checks_the_certificate_against_the_host_name(backend, tmp_path):
    """The socket goes to 127.0.0.1, but SNI and the certificate check use `localhost`:
    the certificate names only `localhost`, so checking against the address would fail."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    paths = {name: str(tmp_path / f"{name}.pem") for name in ("ca", "cert", "key")}
    ca.cert_pem.write_to_path(paths["ca"])
    cert.cert_chain_pems[0].write_to_path(paths["cert"])
    cert.private_key_pem.write_to_path(paths["key"])
    relay = TLSRelay(backend.port, paths["cert"], paths["key"])
    try:
        settings = settings_for(f"https://localhost:{relay.port}", LB_TLS_CA_FILE=paths["ca"],
                                LB_BACKEND_NETWORKS="127.0.0.0/8,::1")
        assert send(Upstreams(settings, maxsize=1), settings).status == 200
    finally:
        relay.close()
