"""Settings: parsing, defaults, and one-line errors that name the bad setting."""
from __future__ import annotations

import re
import runpy
import subprocess

import pytest

from apps.config import TABLE, SettingsError, load_settings, parse_size
from tests.support import BIN, ROOT, free_port


def test_defaults_are_valid_and_point_at_the_procfile_echo_instances():
    settings = load_settings(environ={})
    assert [b.id for b in settings.backends] == [
        "127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"]
    assert settings.strategy == "scored"
    assert (settings.port, settings.admin_port) == (8000, 8001)
    assert settings.redis_url == "redis://127.0.0.1:6390/0"


def test_environment_then_overrides_take_precedence():
    settings = load_settings(environ={"LB_PORT": "9000", "LB_READ_TIMEOUT": "2.5"},
                             overrides={"LB_PORT": 9500})
    assert settings.port == 9500
    assert settings.read_timeout == 2.5


def test_bundled_redis_port_moves_the_default_url_but_not_an_explicit_one():
    assert load_settings(environ={"LB_REDIS_PORT": "7000"}).redis_url == "redis://127.0.0.1:7000/0"
    explicit = load_settings(environ={"LB_REDIS_PORT": "7000", "REDIS_URL": "redis://db:6379/2"})
    assert explicit.redis_url == "redis://db:6379/2"


def test_backends_are_parsed_with_default_ports():
    settings = load_settings(environ={"LB_BACKENDS": " http://a:81 ,https://b, http://c/ "})
    assert [(b.scheme, b.host, b.port) for b in settings.backends] == [
        ("http", "a", 81), ("https", "b", 443), ("http", "c", 80)]


@pytest.mark.parametrize("raw, expected", [
    ("1048576", 1048576), ("512k", 512 * 1024), ("10m", 10 * 1024**2),
    ("1G", 1024**3), ("2MiB", 2 * 1024**2),
])
def test_sizes(raw, expected):
    assert parse_size(raw) == expected


@pytest.mark.parametrize("name, value", [
    ("LB_BACKENDS", "htp://127.0.0.1:9001"),
    ("LB_BACKENDS", "http://127.0.0.1:99999"),
    ("LB_BACKENDS", "127.0.0.1:9001"),
    ("LB_BACKENDS", "http://127.0.0.1:9001/api"),
    ("LB_BACKENDS", "http://a:1,http://a:1"),
    ("LB_BACKENDS", " , "),
    ("LB_BACKENDS", "http://127.0.0.1:0"),
    ("LB_BACKENDS", "http://a b:80"),
    ("LB_BACKENDS", "http://{a}:80"),
    ("LB_BACKENDS", "http://a\\b:80"),
    ("LB_BACKEND_NETWORKS", "10.0.0.1/8"),
    ("LB_BACKEND_NETWORKS", "10.0.0.0/33"),
    ("LB_TRUSTED_PROXIES", "proxy.internal"),
    ("LB_STRATEGY", "random"),
    ("LB_CONNECT_TIMEOUT", "fast"),
    ("LB_READ_TIMEOUT", "-1"),
    ("LB_PORT", "http"),
    ("LB_MAX_BODY", "lots"),
    ("LB_PRESERVE_HOST", "maybe"),
    ("LB_POOL", "a{b}"),
    ("REDIS_URL", "http://localhost:6379"),
])
def test_a_bad_value_names_its_setting_in_one_line(name, value):
    with pytest.raises(SettingsError) as caught:
        load_settings(environ={name: value})
    message = str(caught.value)
    assert caught.value.name == name
    assert message.startswith(f"invalid setting {name}: ")
    assert "\n" not in message


@pytest.mark.e2e
@pytest.mark.parametrize("name, value", [
    ("LB_BACKENDS", "htp://x"), ("LB_STRATEGY", "fastest"), ("LB_READ_TIMEOUT", "soon"),
    ("LB_TRUSTED_PROXIES", "proxy.internal"),  # read by gunicorn_conf.py itself, too
])
def test_gunicorn_refuses_to_start_with_a_one_line_error(name, value):
    assert gunicorn_errors({name: value}) == [f"lb: {load_error(name, value)}"]


@pytest.mark.e2e
def test_gunicorn_refuses_a_backend_on_its_own_port():
    port = free_port()
    assert gunicorn_errors({"LB_BACKENDS": f"http://127.0.0.1:{port}"}, port) == [
        f"lb: invalid setting LB_BACKENDS: backend http://127.0.0.1:{port} refused: "
        f"127.0.0.1 port {port} is this balancer's own LB_PORT"]


def gunicorn_errors(env: dict[str, str], port: int = 0) -> list[str]:
    """The `lb: ` lines of a balancer that must refuse to start."""
    env = {"PATH": str(BIN), "LB_PORT": str(port or free_port()),
           "LB_ADMIN_PORT": str(free_port()), **env}
    done = subprocess.run([str(BIN / "gunicorn"), "-c", "gunicorn_conf.py",
                           "apps.lb.proxy:create_app()"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    return [line for line in done.stderr.splitlines() if line.startswith("lb: ")]


@pytest.mark.parametrize("env, networks", [
    ({}, []),
    ({"LB_TRUSTED_PROXIES": "10.0.0.0/8, 192.0.2.7"}, ["10.0.0.0/8", "192.0.2.7/32"]),
    ({"LB_TRUSTED_PROXIES": "10.0.0.0/8", "FORWARDED_ALLOW_IPS": "172.16.0.0/12"},
     ["172.16.0.0/12"]),
    ({"LB_TRUSTED_PROXIES": "10.0.0.0/8", "FORWARDED_ALLOW_IPS": ""}, []),
])
def test_gunicorn_trusts_the_same_proxies_unless_forwarded_allow_ips_says_otherwise(
        monkeypatch, env, networks):
    from gunicorn.config import Config
    for name in ("LB_TRUSTED_PROXIES", "FORWARDED_ALLOW_IPS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = Config()
    config.set("forwarded_allow_ips",  # Gunicorn's own validator: CIDRs are accepted
               runpy.run_path(str(ROOT / "gunicorn_conf.py"))["forwarded_allow_ips"])
    assert [str(n) for n in config.forwarded_allow_networks()] == networks


def test_an_error_quotes_at_most_100_characters_of_a_huge_value():
    huge = "http://" + "a" * 5_000_000
    with pytest.raises(SettingsError) as caught:
        load_settings(environ={"LB_BACKENDS": huge + ":0"})
    message = str(caught.value)
    assert len(message) < 300 and "5000009 characters" in message


def test_backend_hosts_may_be_names_or_ip_literals():
    backends = load_settings(environ={"LB_BACKENDS": "http://api_1.svc-a.internal:81,"
                                      "http://[2001:db8::5]:82,http://10.0.0.5"}).backends
    assert [(b.host, b.port) for b in backends] == [
        ("api_1.svc-a.internal", 81), ("2001:db8::5", 82), ("10.0.0.5", 80)]


def test_network_lists_are_cidrs_and_bare_addresses():
    settings = load_settings(environ={"LB_BACKEND_NETWORKS": "10.0.0.0/8, 192.0.2.7,::1",
                                      "LB_TRUSTED_PROXIES": "2001:db8::/32"})
    assert [str(n) for n in settings.backend_networks] == ["10.0.0.0/8", "192.0.2.7/32",
                                                           "::1/128"]
    assert [str(n) for n in settings.trusted_proxies] == ["2001:db8::/32"]
    assert load_settings(environ={}).backend_networks == ()


def load_error(name: str, value: str) -> str:
    with pytest.raises(SettingsError) as caught:
        load_settings(environ={name: value})
    return str(caught.value)


def test_every_setting_is_documented_in_the_docs_settings_table():
    doc = (ROOT / "docs" / "settings.md").read_text()
    for setting in TABLE:
        assert re.search(rf"^\| `{setting.name}` \|", doc, re.MULTILINE), setting.name
