"""TLS: https:// backends and a rediss:// Redis, certificates checked by default."""
from __future__ import annotations

import pytest
import redis
import requests
import trustme

from scorer.pool import Pool
from apps.config import load_settings
from tests.support import free_port, gunicorn, spawn, start_balancer
from tests.tls_relay import TLSRelay

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A private CA, and a certificate it signed for 127.0.0.1."""
    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {name: str(folder / f"{name}.pem") for name in ("ca", "cert", "key")}
    ca.cert_pem.write_to_path(paths["ca"])
    cert.cert_chain_pems[0].write_to_path(paths["cert"])
    cert.private_key_pem.write_to_path(paths["key"])
    return paths


@pytest.fixture(scope="module")
def https_echo(certs, tmp_path_factory):
    port = free_port()
    proc = spawn("echo-tls", gunicorn("apps.echo.app:create_app()", port, "-w", "1", "--threads", "8",
                                      "--certfile", certs["cert"], "--keyfile", certs["key"]),
                 {}, tmp_path_factory.mktemp("echo-tls"), [port])
    yield f"https://127.0.0.1:{port}"
    proc.stop()


@pytest.mark.parametrize("env, status", [
    ({"LB_TLS_CA_FILE": "<ca>"}, 200),  # trusted: the echo answers
    ({}, 502),                          # checked by default: an unknown CA is refused
    ({"LB_TLS_VERIFY": "0"}, 200),      # unless checks are turned off
])
def test_https_backends_with_certificate_checks(https_echo, certs, redis_server, tmp_path,
                                                env, status):
    env = {k: certs["ca"] if v == "<ca>" else v for k, v in env.items()}
    proc, url, _ = start_balancer([https_echo], redis_server, tmp_path, workers=1,
                                  env={"LB_CHECK_INTERVAL_S": "0", **env})
    try:
        response = requests.post(f"{url}/x", json={"tls": True}, timeout=10)
    finally:
        proc.stop()
    assert response.status_code == status
    if status == 200:
        assert response.json() == {"tls": True}
    else:
        assert "certificate" in response.json()["error"].lower()
        assert response.json()["kind"] == "connect"  # nothing was sent: retried anywhere
    if env.get("LB_TLS_VERIFY") == "0":
        assert "NOT checked" in proc.output()


@pytest.fixture
def rediss(certs, redis_server):
    relay = TLSRelay(int(redis_server.rsplit(":", 1)[1].split("/")[0]), certs["cert"],
                     certs["key"])
    yield f"rediss://127.0.0.1:{relay.port}/0"
    relay.close()


def test_a_rediss_redis_with_a_trusted_ca(rediss, certs):
    settings = load_settings(environ={"REDIS_URL": rediss, "LB_REDIS_CA_FILE": certs["ca"],
                                      "LB_POOL": "tls-trusted"})
    pool = Pool(settings, degrade=False)
    assert pool.redis.connection_pool.connection_class.__name__ == "SSLConnection"
    assert [pool.pick().port for _ in range(3)] == [9001, 9002, 9003]


def test_a_rediss_redis_with_an_unknown_ca_is_refused(rediss):
    pool = Pool(load_settings(environ={"REDIS_URL": rediss, "LB_POOL": "tls-unknown"}),
                degrade=False)
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        pool.pick()
