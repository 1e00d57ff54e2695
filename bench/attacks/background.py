"""Running an attack and the probe beside each other: each on a thread of its own."""
from __future__ import annotations

import asyncio
import threading
from typing import Any, Awaitable, Callable, Mapping

from bench.attacks.connection import Sources, Tally, Target
from bench.attacks.holding import hold, raise_fd_limit
from bench.attacks.probing import ProbeResult, probe


class Background:
    """A coroutine on a thread of its own, with its own event loop, that can be stopped.

    `make(stop)` builds the coroutine; `stop` is an asyncio.Event it must honour."""

    def __init__(self, make: Callable[[asyncio.Event], Awaitable[Any]]) -> None:
        self._make = make
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        async def main() -> Any:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            self._ready.set()
            return await self._make(self._stop)
        try:
            self._value = asyncio.run(main())
        except BaseException as exc:  # handed to whoever asks for the result
            self._error = exc
        finally:
            self._ready.set()

    def stop(self, timeout: float = 30.0) -> Any:
        """Ask the coroutine to stop; return its result (or raise its exception)."""
        try:
            self._loop.call_soon_threadsafe(self._stop.set)
        except RuntimeError:  # the loop is closed: the coroutine is over already
            pass
        return self.result(timeout)

    def result(self, timeout: float | None = None) -> Any:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("the background coroutine did not end")
        if self._error is not None:
            raise self._error
        return self._value


def start_attack(target: Target, counts: Mapping[str, int], duration: float,
                 sources: Mapping[str, Sources] | None = None) -> tuple[Background,
                                                                       dict[str, Tally]]:
    """`hold` on a thread: returns it (stop() gives the tallies) and the live tallies."""
    raise_fd_limit()
    tallies = {kind: Tally(kind, count) for kind, count in counts.items()}
    runner = Background(lambda stop: hold(target, counts, duration, sources, stop=stop,
                                          tallies=tallies))
    return runner, tallies


def start_probe(target: Target, rate: float, duration: float, source: str | None = None,
                **options: Any) -> tuple[Background, list[ProbeResult]]:
    """`probe` on a thread: returns it (stop() gives the results) and the live results."""
    results: list[ProbeResult] = []
    runner = Background(lambda stop: probe(target, rate, duration, source, stop=stop,
                                           results=results, **options))
    return runner, results
