"""Gunicorn settings for the balancer (the test backends' are `apps/echo/gunicorn_conf.py`).

Gunicorn only auto-loads `gunicorn.conf.py`, so always pass `-c gunicorn_conf.py`.
Each setting reads an environment variable with a default; options on the command
line rank above this file.
"""
import os
import shutil
import sys
import tempfile

from apps.launch.listen import check_addresses

_env = os.environ.get

# Address of the balancer's traffic listener. Always an explicit address:
# with PORT set (honcho sets it) and no bind, Gunicorn would listen on 0.0.0.0.
bind = [f"{_env('LB_HOST', '127.0.0.1')}:{_env('LB_PORT', '8000')}"]

# Worker class: apps.lb.edge.EdgeWorker, Gunicorn's gevent worker with client
# deadlines and connection caps. A greenlet per connection, not a thread: a
# slow or idle client costs a little memory instead of one of a few threads
# (with gthread, 40 clients sending a byte every 3 s took the port down), and
# a proxy mostly waits on sockets, which is what gevent is for.
# GUNICORN_WORKER_CLASS overrides it (gthread: the old model).
worker_class = _env("GUNICORN_WORKER_CLASS", "apps.lb.edge.EdgeWorker")

# Processes, each with its own GIL: one per core. On 2 cores, 3 or 4 workers
# gave no more throughput than 2 with zero-latency backends (more processes
# contend for the same two cores and each holds its own pools). Range 1..4 x cores.
workers = int(_env("GUNICORN_WORKERS", "2"))

# Threads per worker, for gthread workers only (GUNICORN_WORKER_CLASS=gthread; EdgeWorker
# has a greenlet per connection instead, capped by LB_MAX_CLIENT_CONNECTIONS).
threads = int(_env("GUNICORN_THREADS", "16"))

# Each worker listens on its own socket (SO_REUSEPORT) and the kernel spreads
# new connections over them. With one shared socket, whichever worker wakes
# first accepts: a burst of keep-alive clients (a load test, a pool of
# upstream proxies) can land all on one worker, which then runs one core flat
# out while the other idles, at half the throughput (docs/performance.md).
# Each worker binds on its own, so on_starting checks first that the address
# is free and stops with one clear line if not.
reuse_port = True

# Seconds an idle client connection is kept open. Behind a balancer, keep the
# backend's keep-alive longer than the balancer's own to avoid reuse races.
keepalive = int(_env("GUNICORN_KEEPALIVE", "5"))

# Seconds a silent worker may live before the master restarts it. On gthread it
# does not end a slow request (the proxy's own read timeout does).
timeout = int(_env("GUNICORN_TIMEOUT", "30"))

# Seconds in-flight requests get to finish on SIGTERM. Under honcho's
# 5-second SIGKILL, so a Ctrl-C always shuts down cleanly.
graceful_timeout = int(_env("GUNICORN_GRACEFUL_TIMEOUT", "4"))

# Request line / header limits (Gunicorn's defaults, made explicit): past them
# Gunicorn itself answers 414 / 431 / 400 before the app runs.
limit_request_line = 4094
limit_request_fields = 100
limit_request_field_size = 8190


def _trusted_proxies() -> str:
    """LB_TRUSTED_PROXIES, if valid (else on_starting stops with its one-line error)."""
    from apps.config import parse_networks
    try:
        return ",".join(str(n) for n in parse_networks(_env("LB_TRUSTED_PROXIES", "")))
    except ValueError:
        return ""


# Peers whose X-Forwarded-Proto may set the request scheme: by default the
# balancer's LB_TRUSTED_PROXIES (none unless set), so that Gunicorn and the
# balancer trust the same proxies; FORWARDED_ALLOW_IPS overrides it.
forwarded_allow_ips = _env("FORWARDED_ALLOW_IPS", None)
if forwarded_allow_ips is None:
    forwarded_allow_ips = _trusted_proxies()

# Gunicorn 25+ opens a control socket at one fixed path per user; four servers
# from one Procfile would fight over it.
control_socket_disable = True

accesslog = _env("GUNICORN_ACCESSLOG") or None
loglevel = _env("GUNICORN_LOGLEVEL", "info")


def on_starting(server):
    """Check the listening addresses and validate the settings once, before anything
    binds; make the runtime dir in which workers leave state for the admin listener."""
    check_addresses(server)
    from apps.lb.addresses import AddressPolicy
    from apps.config import SettingsError, load_settings
    try:
        settings = load_settings()
        AddressPolicy.of(settings).check_settings(settings)
    except SettingsError as exc:
        print(f"lb: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    runtime_dir = tempfile.mkdtemp(prefix="lb-run-")
    os.environ["LB_RUNTIME_DIR"] = runtime_dir
    # prometheus_client's multiprocess mode: set before any worker imports it,
    # empty at every start (a fresh temporary directory).
    os.makedirs(os.path.join(runtime_dir, "metrics"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.path.join(runtime_dir, "metrics")


def on_exit(server):
    runtime_dir = os.environ.get("LB_RUNTIME_DIR")
    if runtime_dir:
        shutil.rmtree(runtime_dir, ignore_errors=True)


def when_ready(server):
    """Start the balancer's admin listener in the master, beside the traffic workers."""
    # With reuse_port the master holds no socket, so Gunicorn's "Listening at" is empty.
    server.log.info("workers listen on %s (a socket each: SO_REUSEPORT)",
                    ", ".join(f"{a[0]}:{a[1]}" if isinstance(a, tuple) else str(a)
                              for a in server.cfg.address))
    from apps.lb.admin import start_admin_server
    from apps.config import load_settings
    settings = load_settings()
    try:
        server.admin_server = start_admin_server(settings, lambda: list(server.WORKERS))
    except OSError as exc:
        print(f"lb: cannot bind admin listener {settings.admin_host}:{settings.admin_port}: "
              f"{exc.strerror}", file=sys.stderr, flush=True)
        sys.exit(2)
    server.log.info("admin listener on http://%s:%s", settings.admin_host, settings.admin_port)


def on_reload(server):
    # A reload (SIGHUP) gives Gunicorn new log handlers: escape those too, and send
    # the admin listener's lines through them.
    from apps.lb.logs import log_through_gunicorn
    log_through_gunicorn()


def child_exit(server, worker):
    from apps.lb.metrics import mark_process_dead
    mark_process_dead(worker.pid)
    # A worker that dies degraded must not look degraded for ever.
    runtime_dir = os.environ.get("LB_RUNTIME_DIR")
    if runtime_dir:
        try:
            os.unlink(os.path.join(runtime_dir, f"degraded-{worker.pid}"))
        except FileNotFoundError:
            pass


def worker_exit(server, worker):
    # Stop the health checker before the interpreter shuts down its executors:
    # a round started after that would fail with a traceback on every exit.
    extensions = getattr(worker.wsgi, "extensions", {})
    checker = extensions.get("lb.health")
    if checker is not None:
        checker.stop()
    # Reports still queued (scorer/traffic.py) go to the pool before the worker goes.
    forwarder = extensions.get("lb.forwarder")
    if forwarder is not None:
        try:
            forwarder.pool.flush_reports()
        except Exception:
            worker.log.exception("could not send the last reports")


def pre_request(worker, req):
    worker.log.debug("%s %s", req.method, req.path)  # what Gunicorn's own hook does
    # The balancer answers 501 to a transfer coding other than chunked without
    # reading the body: close the connection after it, rather than have
    # Gunicorn read the whole body only to throw it away.
    coded = [value for name, value in req.headers if name == "TRANSFER-ENCODING"]
    if coded:
        from apps.lb.body import foreign_codings
        if foreign_codings(",".join(coded)):
            req.force_close()


def post_fork(server, worker):
    # Workers must not hold the master's admin sockets open: not the listener,
    # and not its client connections, which the master's close would then not end.
    admin = getattr(server, "admin_server", None)
    if admin is not None:
        admin.close_inherited()
