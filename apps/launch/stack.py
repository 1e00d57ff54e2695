"""Start and stop the real parts: Redis, echo instances and the balancer.

Used by the live benchmark matrix and by the tests. Every process starts in its
own session, on a free port, and is stopped with SIGTERM (then SIGKILL) to its
whole process group, so nothing outlives its user.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import redis

from apps.launch.redis_server import server_command

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_for(predicate, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


# Socket states in /proc/net/tcp.
ESTABLISHED, LISTEN = "01", "0A"


def tcp_sockets(port: int, state: str, remote: bool = False) -> set[str]:
    """Inodes of the TCP sockets whose local (or `remote`) port is `port`, in `state`
    (from /proc/net)."""
    column = 2 if remote else 1
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as rows:
                lines = rows.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == state and int(fields[column].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def listeners(port: int) -> int:
    """Sockets listening on a local TCP port: one per Gunicorn worker (SO_REUSEPORT)."""
    return len(tcp_sockets(port, LISTEN))


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rpartition(")")[2].split()[1])


def worker_pids(master: int) -> list[int]:
    """The pids of a Gunicorn master's workers (its children)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if parent_of(int(entry)) == master:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


@dataclass(frozen=True)
class Usage:
    """What one process holds, from /proc."""

    rss_kb: int
    fds: int
    threads: int


def usage_of(pid: int) -> Usage:
    """A live process's resident memory, open descriptors and threads."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            fields[name] = value.split()
    return Usage(int(fields["VmRSS"][0]), len(os.listdir(f"/proc/{pid}/fd")),
                 int(fields["Threads"][0]))


@dataclass
class Proc:
    """A process started by a test, with its output captured to a file."""

    name: str
    popen: subprocess.Popen
    log: Path
    ports: list[int] = field(default_factory=list)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        return self.popen.returncode


def spawn(name: str, argv: list[str], env: dict[str, str], log_dir: Path,
          ports: list[int] = ()) -> Proc:
    log = log_dir / f"{name}.log"
    full_env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
                "PYTHONUNBUFFERED": "1", **env}
    with open(log, "wb") as out:
        popen = subprocess.Popen(argv, cwd=ROOT, env=full_env, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    proc = Proc(name, popen, log, list(ports))
    try:
        for port in ports:
            wait_for(lambda: port_open(port) or popen.poll() is not None,
                     what=f"{name} on port {port}")
            if popen.poll() is not None:
                raise RuntimeError(f"{name} exited early:\n{proc.output()}")
    except BaseException:
        proc.stop()
        raise
    return proc


def start_redis(log_dir: Path) -> tuple[Proc, str]:
    port = free_port()
    proc = spawn("redis", server_command(port), {}, log_dir, [port])
    url = f"redis://127.0.0.1:{port}/0"
    wait_for(lambda: redis.Redis.from_url(url).ping(), what="redis PING")
    return proc, url


# The test backends' Gunicorn settings (the balancer's are gunicorn_conf.py).
BACKEND_CONF = "apps/echo/gunicorn_conf.py"


def gunicorn(app: str, port: int, *options: str, worker_class: str = "gthread") -> list[str]:
    """A Gunicorn command line for a test backend: threaded, as the Procfile's echoes."""
    return [str(BIN / "gunicorn"), "-c", BACKEND_CONF, "-b", f"127.0.0.1:{port}",
            "-k", worker_class, *options, app]


def start_echo(instance: int, log_dir: Path, seed: int = 0, threads: int = 32,
               **env: str) -> tuple[Proc, str]:
    port = free_port()
    proc = spawn(f"echo{instance}-{port}",
                 gunicorn("apps.echo.app:create_app()", port, "-w", "1", "--threads", str(threads),
                          "--keep-alive", "75"),
                 {"ECHO_INSTANCE": str(instance), "SEED": str(seed), **env}, log_dir, [port])
    return proc, f"http://127.0.0.1:{port}"


def start_balancer(backends: list[str], redis_url: str, log_dir: Path, *,
                   workers: int = 2, threads: int = 8, name: str = "proxy",
                   env: dict[str, str] | None = None,
                   prefix: Sequence[str] = ()) -> tuple[Proc, str, str]:
    """Start the balancer under Gunicorn; return it, its traffic URL and its admin URL.
    `prefix` goes before the command (say `prlimit --nofile=...`, which execs it)."""
    port, admin_port = free_port(), free_port()
    settings = {"LB_BACKENDS": ",".join(backends), "REDIS_URL": redis_url,
                "LB_STATE_DIR": str(log_dir / "lb-state"),
                "LB_PORT": str(port), "LB_ADMIN_PORT": str(admin_port),
                # A pool of its own: a port used again later in a session must
                # not find an earlier stack's cursor, scores or membership in Redis.
                "LB_POOL": f"test-{port}-{uuid.uuid4().hex[:8]}", "GUNICORN_WORKERS": str(workers),
                "GUNICORN_THREADS": str(threads), **(env or {})}
    argv = [*prefix, str(BIN / "gunicorn"), "-c", "gunicorn_conf.py", "apps.lb.proxy:create_app()"]
    proc = spawn(name, argv, settings, log_dir, [port, admin_port])
    try:  # the first worker to listen opens the port; wait for all of them
        wait_for(lambda: listeners(port) >= workers or proc.popen.poll() is not None,
                 what=f"{workers} workers of {name} listening")
    except BaseException:
        proc.stop()
        raise
    return proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
