"""Clocks: every timestamp and every sleep in voxpipe goes through one.

* :class:`RealClock` reads the event loop's monotonic time.
* :class:`VirtualClock` runs a coroutine on an event loop whose time only moves when every task is waiting on a
  timer: it then jumps straight to the next deadline. A five-minute scripted call runs in a fraction of a second,
  and because nothing depends on wall time, its trace is bit-identical on every run.

Both expose the same three things to the runtime: ``now()``, ``sleep_until()`` and a shared :class:`Metronome`
per frame period, which paces every transport in the process from one timer (see ``pacing.py``).
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

from voxpipe.pipeline.pacing import Metronome

T = TypeVar("T")


class Clock:
    """Base clock: time is the running event loop's ``time()`` minus the clock's origin."""

    def __init__(self) -> None:
        self._origin: float | None = None
        self._metronomes: dict[float, Metronome] = {}

    def _loop_origin(self) -> float:
        if self._origin is None:
            self._origin = asyncio.get_running_loop().time()
        return self._origin

    @property
    def origin(self) -> float | None:
        """The event loop's time at which this clock read zero (None before it was first read)."""
        return self._origin

    def now(self) -> float:
        """Seconds since the clock was first read."""
        return asyncio.get_running_loop().time() - self._loop_origin()

    async def sleep(self, delay: float) -> None:
        await asyncio.sleep(max(0.0, delay))

    async def sleep_until(self, when: float) -> None:
        await asyncio.sleep(max(0.0, when - self.now()))

    def metronome(self, period: float = 0.02) -> Metronome:
        """The metronome shared by every transport on this clock that uses ``period``."""
        metronome = self._metronomes.get(period)
        if metronome is None:
            metronome = self._metronomes[period] = Metronome(self, period)
        return metronome


class RealClock(Clock):
    """Wall-clock time (the loop's monotonic clock)."""


_shared_real_clock = RealClock()


def default_clock() -> RealClock:
    """The process-wide real clock that pipelines use unless given one: sharing it means sharing its metronome,
    so a process running many calls paces all of them from one timer."""
    return _shared_real_clock


class _VirtualSelector(selectors.BaseSelector):
    """Wraps the loop's selector: when nothing is ready, time jumps by the loop's timeout instead of waiting."""

    def __init__(self, inner: selectors.BaseSelector) -> None:
        self._inner = inner
        self.now = 0.0
        self.next_deadline: Any = None  # set by the loop: returns its earliest timer's deadline, or None

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is not None and timeout <= 0:
            # Callbacks are ready, so time stands still. Real I/O (sockets, a worker thread's wake-up) is picked up
            # at the next iteration that would advance time: skipping the poll here saves a syscall per tick.
            return []
        ready = self._inner.select(0)
        if ready or timeout is None:
            # Real I/O is ready (or there is no timer at all: wait for I/O, e.g. a worker thread finishing).
            return ready or self._inner.select(None)
        # Jump exactly onto the earliest timer: ``now + timeout`` can land an ulp short and cost a second wake-up.
        deadline = self.next_deadline() if self.next_deadline is not None else None
        self.now = deadline if deadline is not None and deadline > self.now else self.now + timeout
        return []

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._inner.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.modify(fileobj, events, data)

    def close(self) -> None:
        self._inner.close()

    def get_key(self, fileobj: Any) -> selectors.SelectorKey:
        return self._inner.get_key(fileobj)

    def get_map(self) -> Any:
        return self._inner.get_map()


class _VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose ``time()`` is virtual and advances only when the loop would otherwise sleep."""

    def __init__(self) -> None:
        self._virtual = _VirtualSelector(selectors.DefaultSelector())
        super().__init__(self._virtual)
        self._virtual.next_deadline = self._earliest_timer

    def _earliest_timer(self) -> float | None:
        # asyncio's timer heap: an internal, but one every Python since 3.4 has (and looptime relies on too).
        scheduled: list[asyncio.TimerHandle] = getattr(self, "_scheduled")  # noqa: B009
        return scheduled[0].when() if scheduled else None

    def time(self) -> float:
        return self._virtual.now


class VirtualClock(Clock):
    """Simulated time. Use :meth:`run` (not ``asyncio.run``) to run a coroutine under it.

    Only work that lives on the event loop is simulated: a thread or process doing real computation still takes
    real time, and the virtual clock does not wait for it unless nothing else is scheduled. Scripted providers are
    pure event-loop code, so scripted calls are exact and reproducible.
    """

    def _loop_origin(self) -> float:
        return 0.0  # a virtual loop's time starts at zero

    def run(self, main: Coroutine[Any, Any, T]) -> T:
        with asyncio.Runner(loop_factory=_VirtualTimeLoop) as runner:
            return runner.run(main)
