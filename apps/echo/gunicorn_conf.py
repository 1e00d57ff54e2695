"""Gunicorn settings for the test backends: the Procfile's echo instances and the tests' and
benchmarks' backends (`apps.launch.stack.gunicorn`). The balancer's are `gunicorn_conf.py`.

    gunicorn -c apps/echo/gunicorn_conf.py -b 127.0.0.1:9001 "apps.echo.app:create_app()"

Each setting reads an environment variable with a default; options on the command line
(`-b`, `-w`, `--threads`) rank above this file.
"""
import os

from apps.launch.listen import check_addresses

_env = os.environ.get

# One process with many threads: the threaded model the echo app and its fault
# profiles (shared counters, a `dead` profile closing the port) were written for.
worker_class = "gthread"
workers = 1
threads = int(_env("ECHO_THREADS", "64"))

# Longer than the balancer's idle upstream connections live, so that the
# backend never closes one the balancer is about to reuse.
keepalive = 75
timeout = int(_env("GUNICORN_TIMEOUT", "30"))
graceful_timeout = int(_env("GUNICORN_GRACEFUL_TIMEOUT", "4"))  # under honcho's 5 s SIGKILL

# Gunicorn 25+ opens a control socket at one fixed path per user; several servers
# from one Procfile would fight over it.
control_socket_disable = True
# Trust no peer's X-Forwarded-Proto unless told to (Gunicorn's default trusts
# 127.0.0.1, the balancer): the echo answers what it was sent, as it always did.
forwarded_allow_ips = _env("FORWARDED_ALLOW_IPS", "")
accesslog = _env("GUNICORN_ACCESSLOG") or None
loglevel = _env("GUNICORN_LOGLEVEL", "info")


def on_starting(server):
    check_addresses(server)


def post_worker_init(worker):
    # The echo app's `dead` profile needs the worker, to close its port later.
    hook = getattr(worker.wsgi, "extensions", {}).get("echo.on_worker_init")
    if hook:
        hook(worker)
