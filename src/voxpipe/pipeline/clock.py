"""Clocks: every timestamp and every sleep in voxpipe goes through one.

* :class:`RealClock` reads the event loop's monotonic time.
* :class:`VirtualClock` runs a coroutine on an event loop whose time only moves when every task is waiting on a
  timer: it then jumps straight to the next deadline. A five-minute scripted call runs in a fraction of a second,
  and because nothing depends on wall time, its trace is bit-identical on every run. Work handed to a thread with
  ``loop.run_in_executor`` (``asyncio.to_thread`` included) or wrapped with :func:`wrap_thread_job` holds time
  still until it returns: computation takes no virtual time, as on the loop itself.

Both expose the same three things to the runtime: ``now()``, ``sleep_until()`` and a shared :class:`Metronome`
per frame period, which paces every transport in the process from one timer (see ``pacing.py``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import selectors
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, TypeVarTuple

from voxpipe.pipeline.pacing import Metronome

T = TypeVar("T")
Args = TypeVarTuple("Args")


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
    """Wraps the loop's selector: when nothing is ready, time jumps by the loop's timeout instead of waiting - unless
    a worker thread's job is pending (see :meth:`_wait_for_threads`)."""

    def __init__(self, inner: selectors.BaseSelector, thread_hold_s: float) -> None:
        self._inner = inner
        self.now = 0.0
        self.next_deadline: Any = None  # set by the loop: returns its earliest timer's deadline, or None
        self.thread_hold_s = thread_hold_s
        self._held: dict[object, float] = {}  # each thread job whose result the loop awaits -> real time it began

    def hold(self, job: object) -> None:
        self._held[job] = time.monotonic()

    def release(self, job: object) -> None:
        self._held.pop(job, None)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        # Real I/O (sockets, a worker thread's wake-up) is polled every iteration, as asyncio's own loop does: a
        # task that keeps callbacks ready (a loop of sleep(0)) while it waits for a socket would starve it otherwise.
        ready = self._inner.select(0)
        if timeout is not None and timeout <= 0:
            return ready  # callbacks are ready, so time stands still
        if ready or timeout is None:
            # Real I/O is ready (or there is no timer at all: wait for I/O, e.g. a worker thread finishing).
            return ready or self._inner.select(None)
        if self._held:
            ready = self._wait_for_threads(timeout)
            if ready:
                return ready
        # Jump exactly onto the earliest timer: ``now + timeout`` can land an ulp short and cost a second wake-up.
        deadline = self.next_deadline() if self.next_deadline is not None else None
        self.now = deadline if deadline is not None and deadline > self.now else self.now + timeout
        return []

    def _wait_for_threads(self, timeout: float) -> list[tuple[selectors.SelectorKey, int]]:
        """A thread is computing: wait for its result (its wake-up is I/O on the loop's self-pipe) with time held
        still while any pending job is younger than ``thread_hold_s`` of real time (each job gets its own window, so
        a long job - a whole llama.cpp reply - does not take the hold from the short ones beside it). Once every
        pending job is older, they are stuck or deliberately slow (a tool that sleeps): time then passes at real
        speed until they return - the real time waited counts even when I/O cut the wait short - so the timeouts
        around them fire as they would live, instead of never (held forever) or at once (jumping past them)."""
        held_for = max(self._held.values()) + self.thread_hold_s - time.monotonic()
        if held_for > 0:
            ready = self._inner.select(held_for)
            if ready:
                return ready
        began = time.monotonic()
        ready = self._inner.select(timeout)
        if ready:  # cut short: time moves by the real time waited (a full wait jumps onto the deadline instead)
            self.now += min(time.monotonic() - began, timeout)
        return ready

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

    def __init__(self, thread_hold_s: float) -> None:
        self._virtual = _VirtualSelector(selectors.DefaultSelector(), thread_hold_s)
        super().__init__(self._virtual)
        self._virtual.next_deadline = self._earliest_timer

    def _earliest_timer(self) -> float | None:
        # asyncio's timer heap: an internal, but one every Python since 3.4 has (and looptime relies on too).
        scheduled: list[asyncio.TimerHandle] = getattr(self, "_scheduled")  # noqa: B009
        return scheduled[0].when() if scheduled else None

    def time(self) -> float:
        return self._virtual.now

    def run_in_executor(
        self, executor: concurrent.futures.Executor | None, func: Callable[[*Args], T], *args: *Args
    ) -> asyncio.Future[T]:
        """As asyncio's, and time holds still until the job's result is back on the loop."""
        return self.hold_until_done(super().run_in_executor(executor, func, *args))

    def hold_until_done(self, result: asyncio.Future[T]) -> asyncio.Future[T]:
        """Hold time still until ``result`` (a thread job's, on this loop) is done - or cancelled: nobody waits for
        it any more. Released by a callback the result schedules, so the release and the waiter's wake-up run in
        the same loop iteration, with no chance for time to jump between them."""
        self._virtual.hold(result)
        result.add_done_callback(self._virtual.release)
        return result

    async def shutdown_default_executor(self, *args: Any) -> None:
        """As asyncio's, held like a thread job: from Python 3.13 it waits for the threads with a timeout (300 s),
        which virtual time would otherwise jump past at once."""
        waiting = self.create_future()
        self.hold_until_done(waiting)
        try:
            await super().shutdown_default_executor(*args)
        finally:
            waiting.set_result(None)


def wrap_thread_job(job: concurrent.futures.Future[T]) -> asyncio.Future[T]:
    """``asyncio.wrap_future(job)`` for a job just given to a worker thread with ``executor.submit``: under a
    :class:`VirtualClock` time holds still until its result is back (as ``loop.run_in_executor`` does), so wrap it
    when it is submitted, not later when it is awaited. Cancelling the wrapper cancels the job if it has not started.
    """
    result = asyncio.wrap_future(job)
    loop = asyncio.get_running_loop()
    return loop.hold_until_done(result) if isinstance(loop, _VirtualTimeLoop) else result


class VirtualClock(Clock):
    """Simulated time. Use :meth:`run` (not ``asyncio.run``) to run a coroutine under it.

    Computation takes no virtual time. On the loop that is automatic; a job handed to a worker thread with
    ``loop.run_in_executor`` (``asyncio.to_thread`` included) holds time still until its result is back - so a
    model's answer lands on the same tick however fast the machine, and a sync tool cannot race virtual time to its
    own timeout. A job still running after ``thread_hold_s`` of real time is stuck or deliberately slow: time then
    passes at real speed until it returns, so the timeouts around it still fire.

    A job given with ``executor.submit`` is held when wrapped with :func:`wrap_thread_job` at once (Whisper, Piper
    and llama.cpp do: they keep their thread's own future, to stop a job or wait for it at shutdown). Work on a
    thread of one's own is not waited for.
    """

    def __init__(self, thread_hold_s: float = 2.0) -> None:
        super().__init__()
        if thread_hold_s < 0:
            raise ValueError(f"VirtualClock: thread_hold_s must be >= 0, got {thread_hold_s}")
        self.thread_hold_s = thread_hold_s

    def _loop_origin(self) -> float:
        return 0.0  # a virtual loop's time starts at zero

    def run(self, main: Coroutine[Any, Any, T]) -> T:
        with asyncio.Runner(loop_factory=lambda: _VirtualTimeLoop(self.thread_hold_s)) as runner:
            return runner.run(main)
