"""The servers a run compares: the Flask ceiling, nginx, the balancer's rows, the backends."""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable

from flask import Flask

from bench import zero
from bench.overhead.measuring import Row
from apps.launch.stack import (
    ROOT, Proc, free_port, gunicorn, listeners, spawn, start_balancer, wait_for,
)


def create_ceiling_app() -> Flask:
    """A Flask app that answers every path at once: the ceiling for a Flask proxy."""
    app = Flask(__name__)

    @app.route("/", defaults={"path": ""}, methods=["GET", "POST"])
    @app.route("/<path:path>", methods=["GET", "POST"])
    def answer(path: str):
        return b'{"ok":true}', 200, {"Content-Type": "application/json"}

    return app


def _gunicorn_conf() -> ModuleType:
    """The balancer's gunicorn_conf.py, as it reads this environment."""
    sys.path.insert(0, str(ROOT))
    import gunicorn_conf
    return gunicorn_conf


def balancer_worker_class() -> str:
    """The worker class gunicorn_conf.py gives the balancer (environment included)."""
    return _gunicorn_conf().worker_class


def balancer_keepalive() -> int:
    """The keep-alive seconds gunicorn_conf.py gives the balancer's clients."""
    return _gunicorn_conf().keepalive


def gunicorn_shape() -> tuple[int, int]:
    """Workers and threads as gunicorn_conf.py sets them (environment included)."""
    conf = _gunicorn_conf()
    return conf.workers, conf.threads


def nginx_conf(ports: list[int], workers: int, run_dir: Path, port: int, access_log: bool,
               location_extra: str = "") -> str:
    """nginx.conf for a round-robin proxy on `port` over `ports`, with keep-alive to
    them; `location_extra` adds directives to its location (bench/mixed.py's retries)."""
    servers = "\n".join(f"        server 127.0.0.1:{p};" for p in ports)
    log = f"access_log {run_dir}/nginx-access.log;" if access_log else "access_log off;"
    extra = "".join(f"\n            {line}" for line in location_extra.splitlines() if line)
    return f"""
worker_processes {workers};
daemon off;
pid {run_dir}/nginx.pid;
error_log {run_dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    {log}
    client_body_temp_path {run_dir}/nginx-body;
    proxy_temp_path {run_dir}/nginx-proxy;
    fastcgi_temp_path {run_dir}/nginx-fastcgi;
    uwsgi_temp_path {run_dir}/nginx-uwsgi;
    scgi_temp_path {run_dir}/nginx-scgi;
    keepalive_requests 1000000;
    upstream backends {{
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";{extra}
        }}
    }}
}}
"""


def start_nginx(ports: list[int], workers: int, run_dir: Path, access_log: bool,
                location_extra: str = "") -> tuple[Proc, str]:
    """nginx as a round-robin proxy over `ports` (see nginx_conf)."""
    port = free_port()
    conf = run_dir / "nginx.conf"
    conf.write_text(nginx_conf(ports, workers, run_dir, port, access_log, location_extra))
    proc = spawn("nginx", ["nginx", "-p", str(run_dir), "-c", str(conf),
                           "-e", str(run_dir / "nginx-error.log")], {}, run_dir, [port])
    return proc, f"http://127.0.0.1:{port}/"


def start_rows(args: argparse.Namespace, run_dir: Path, redis_url: str,
               workers: int, threads: int,
               keep: Callable[[Proc], None]) -> tuple[list[Row], list[str]]:
    """Start every server the run compares, and the backends; `keep` registers each
    process for stopping. Returns the rows and the backends' URLs."""
    wanted = set(filter(None, args.only.split(","))) or None
    ports = [free_port() for _ in range(max(args.backends, args.wide))]
    backends = zero.start(ports, run_dir)
    keep(backends)
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    rows: list[Row] = []

    def want(name: str) -> bool:
        return wanted is None or name in wanted

    if want("ceiling"):
        port = free_port()
        # The balancer's own worker class, so that the ceiling is a like-for-like one.
        # The balancer's Gunicorn settings, without its hooks (no admin listener).
        proc = spawn("ceiling", gunicorn("bench.overhead.servers:create_ceiling_app()", port,
                                         "-w", str(workers), "--threads", str(threads),
                                         "--keep-alive", str(balancer_keepalive()),
                                         "--reuse-port", worker_class=balancer_worker_class()),
                     {}, run_dir, [port])
        keep(proc)
        wait_for(lambda: listeners(port) >= workers, what="every ceiling worker listening")
        rows.append(Row("ceiling", f"http://127.0.0.1:{port}/", [proc]))
    if want("direct"):
        rows.append(Row("direct", f"{urls[0]}/", [backends]))
    balancers = [("round_robin", "round_robin", args.backends),
                 ("scored", "scored", args.backends),
                 ("scored-wide", "scored", args.wide)]
    for name, strategy, count in balancers:
        if not want(name) or count <= 0:
            continue
        env = {"LB_STRATEGY": strategy,
               "LB_ACCESS_LOG": str(run_dir / f"{name}-access.log") if args.access_log else "off"}
        proc, url, _admin = start_balancer(urls[:count], redis_url, run_dir, workers=workers,
                                           threads=threads, name=name, env=env)
        keep(proc)
        rows.append(Row(name, f"{url}/", [proc], uses_redis=True))
    if want("nginx") and not args.no_nginx and shutil.which("nginx"):
        proc, url = start_nginx(ports[:args.backends], workers, run_dir, args.access_log)
        keep(proc)
        rows.append(Row("nginx", url, [proc]))
    return rows, urls
