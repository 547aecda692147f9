"""The metronome: one timer that paces every real-time transport in the process.

A transport that sends or plays a 20 ms frame every 20 ms would, with a task per direction per call, wake the event
loop 100 times a second per call; at a few hundred calls the wake-ups alone eat the core. The metronome wakes
once per *slot* and calls each subscriber's tick handler in turn, so a call costs a coroutine call per tick
instead of a task wake-up. Tick handlers must be quick and must not wait on anything slow.

Subscribers are spread over ``slots`` phases of the period (2 ms apart for 10 slots of 20 ms). Without that, all
calls would tick at the same instant and the last call's frame would wait for every other call's work: lateness
would grow with the number of calls. Independent calls have independent phases anyway. Subscribers that give the
same ``group`` (a call's input and output) share a slot, so they keep ticking together. A lone call is in slot 0,
so its timing does not depend on how many slots there are.

The metronome's task belongs to the metronome: it starts with the first subscriber and is cancelled and awaited
when the last one leaves, so it never outlives the pipelines that use it. Nothing a subscriber does may end that
task, since every call on the clock would stop: a tick's failure (a stray ``CancelledError`` included) unsubscribes
that subscriber and goes to its ``on_error``, whose own failure is logged. A tick never waits on back-pressure
either (:func:`in_tick`): a real-time source cannot be slowed, and waiting would stall every call.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable, Hashable
from typing import TYPE_CHECKING

from voxpipe.pipeline.errors import as_failure

if TYPE_CHECKING:
    from voxpipe.pipeline.clock import Clock

log = logging.getLogger("voxpipe.pacing")

TickHandler = Callable[[float], Awaitable[None]]
ErrorHandler = Callable[[Exception], None]

_tick_loops: weakref.WeakSet[asyncio.Task[None]] = weakref.WeakSet()  # every metronome's task


def in_tick() -> bool:
    """True when the current task is a metronome's tick loop: the code running is a tick handler (or something it
    called), which must not wait on anything slow."""
    task = asyncio.current_task()
    return task is not None and task in _tick_loops


class Subscription:
    """A subscriber's handle: pass it to :meth:`Metronome.unsubscribe`."""

    __slots__ = ("group", "on_error", "on_tick", "slot")

    def __init__(self, on_tick: TickHandler, on_error: ErrorHandler, group: Hashable, slot: int) -> None:
        self.on_tick = on_tick
        self.on_error = on_error
        self.group = group
        self.slot = slot


class Metronome:
    """Ticks every ``period`` seconds of ``clock`` time; slot ``s`` of tick ``k`` is due at
    ``origin + k * period + s * period / slots``."""

    def __init__(self, clock: Clock, period: float, slots: int = 10) -> None:
        if slots < 1:
            raise ValueError(f"a metronome needs at least one slot, got {slots}")
        self.clock = clock
        self.period = period
        self._slots: list[dict[Subscription, None]] = [{} for _ in range(slots)]  # insertion-ordered sets
        self._groups: dict[Hashable, tuple[int, int]] = {}  # group -> (slot, members)
        self._task: asyncio.Task[None] | None = None
        self.origin: float | None = None  # clock time of tick 0, from the first subscription on
        # How late the metronome woke, against each slot's due time: playout jitter as the caller would hear it.
        self.max_lateness = 0.0
        self.late_ticks = 0  # wake-ups more than one period late: a frame's worth of audio would have glitched

    @property
    def subscribers(self) -> int:
        return sum(len(slot) for slot in self._slots)

    def subscribe(self, on_tick: TickHandler, on_error: ErrorHandler, *, group: Hashable = None) -> Subscription:
        """Call ``on_tick(due_time)`` every tick from the next one on; ``on_error`` gets what it raises.

        Subscribers with the same ``group`` share a phase slot; without a group each subscriber is its own.
        """
        key: Hashable = group if group is not None else object()
        slot, members = self._groups.get(key, (-1, 0))
        if slot < 0:
            loads = [len(s) for s in self._slots]
            slot = loads.index(min(loads))  # the least loaded slot, lowest first
        self._groups[key] = (slot, members + 1)
        subscription = Subscription(on_tick, on_error, key, slot)
        self._slots[slot][subscription] = None
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"metronome-{self.period}")
        return subscription

    async def ticking(self, on_tick: TickHandler, on_error: ErrorHandler, *, group: Hashable = None) -> None:
        """Be subscribed for as long as this coroutine runs: run it as a task the pipeline owns, and the
        subscription ends when the pipeline cancels that task."""
        subscription = self.subscribe(on_tick, on_error, group=group)
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            await self.unsubscribe(subscription)

    async def unsubscribe(self, subscription: Subscription) -> None:
        """Stop ticking ``subscription``; the last one out stops the metronome and waits for its task."""
        self._drop(subscription)
        task = self._task
        if not self._groups and task is not None and task is not asyncio.current_task():
            self._task = None
            task.cancel()
            # Its end is awaited, not its outcome: a tick's failure was its own subscriber's, not this one's.
            await asyncio.wait({task})

    def _drop(self, subscription: Subscription) -> None:
        if self._slots[subscription.slot].pop(subscription, False) is not False:
            slot, members = self._groups[subscription.group]
            if members > 1:
                self._groups[subscription.group] = (slot, members - 1)
            else:
                del self._groups[subscription.group]

    async def _run(self) -> None:
        current = asyncio.current_task()
        assert current is not None
        _tick_loops.add(current)
        origin = self.origin = self.clock.now()
        step = self.period / len(self._slots)
        tick = 0
        while self._groups:
            start = origin + tick * self.period  # multiply, never accumulate: no drift
            for index, slot in enumerate(self._slots):
                if not slot:
                    continue
                due = start + index * step
                await self.clock.sleep_until(due)
                lateness = self.clock.now() - due
                if lateness > self.max_lateness:
                    self.max_lateness = lateness
                if lateness > self.period:
                    self.late_ticks += 1
                for subscription in list(slot):
                    try:
                        await subscription.on_tick(due)
                    except (Exception, asyncio.CancelledError) as exc:  # one call's failure must not stall the others
                        self._tick_failed(subscription, as_failure(exc))
            tick += 1

    def _tick_failed(self, subscription: Subscription, failure: Exception) -> None:
        self._drop(subscription)
        try:
            subscription.on_error(failure)
        except Exception:
            log.exception("the error handler of a metronome subscriber failed on: %r", failure)
