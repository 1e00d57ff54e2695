"""Build and start bench/zero_backend.c, the zero-latency backend of bench/overhead/.

The binary is cached in bench/results/bin/ (git-ignored) under a name carrying a
hash of the source, so editing the C file rebuilds it and nothing else does.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from apps.launch.stack import ROOT, Proc, spawn

SOURCE = Path(__file__).resolve().with_name("zero_backend.c")
CACHE = ROOT / "bench" / "results" / "bin"


def build() -> Path:
    """Compile zero_backend.c (once per version of the source); return the binary's path."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    binary = CACHE / f"zero_backend-{digest}"
    if binary.exists():
        return binary
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("bench/zero_backend.c needs a C compiler, "
                           "but neither `cc` nor `gcc` is on PATH")
    CACHE.mkdir(parents=True, exist_ok=True)
    # Compile to a private name and rename: a concurrent build or run never sees half a file.
    partial = binary.with_name(f"{binary.name}.{os.getpid()}.tmp")
    done = subprocess.run([compiler, "-O2", "-o", str(partial), str(SOURCE)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"{compiler} failed on {SOURCE}:\n{done.stderr}")
    os.replace(partial, binary)
    return binary


def start(ports: list[int], log_dir: Path) -> Proc:
    """Start one zero_backend process serving every port in `ports` (on 127.0.0.1).

    Returns once each port accepts connections; stop it with `Proc.stop()`."""
    if not ports:
        raise ValueError("zero backend needs at least one port")
    argv = [str(build()), *(str(port) for port in ports)]
    return spawn(f"zero-{ports[0]}", argv, {}, log_dir, ports)
