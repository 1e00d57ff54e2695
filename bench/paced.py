"""A paced load from a few threads, every answer recorded, and the admin's /status
polled beside it (bench/faults.py and bench/mixed.py drive their stacks with it)."""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Protocol

import requests


class Recording(Protocol):
    """Where the answers, (sent, X-Upstream, status, latency_s), and the /status
    snapshots, (time, status), go."""

    answers: list[tuple[float, str, int, float]]
    statuses: list[tuple[float, dict[str, Any]]]


def drive(url: str, admin: str | None, run: Recording, clock: Callable[[], float],
          until: float, rate: float, threads_n: int = 10) -> None:
    """Paced load from `threads_n` threads, and /status every 100 ms (unless `admin`
    is None: nginx has none), until `clock()` reaches `until`."""
    stop = threading.Event()
    lock = threading.Lock()

    def client(number: int) -> None:
        session = requests.Session()
        interval = threads_n / rate
        next_at = time.monotonic() + number * interval / threads_n
        sequence = number
        while not stop.is_set():
            sent = clock()
            try:
                response = session.post(f"{url}/load", json={"n": sequence}, timeout=30,
                                        headers={"X-Request-ID": f"f{sequence}"})
                answer = (sent, response.headers.get("X-Upstream", ""), response.status_code,
                          clock() - sent)
            except requests.RequestException:
                answer = (sent, "", 599, clock() - sent)
            with lock:
                run.answers.append(answer)
            sequence += threads_n
            next_at += interval
            stop.wait(max(0.0, next_at - time.monotonic()))

    def poll() -> None:
        session = requests.Session()
        while not stop.is_set():
            try:
                run.statuses.append((clock(), session.get(f"{admin}/status", timeout=5).json()))
            except requests.RequestException:
                pass
            stop.wait(0.1)

    workers = [threading.Thread(target=client, args=(n,)) for n in range(threads_n)]
    if admin is not None:
        workers.append(threading.Thread(target=poll))
    for worker in workers:
        worker.start()
    while clock() < until:
        time.sleep(0.05)
    stop.set()
    for worker in workers:
        worker.join()
    run.answers.sort()
