"""The metronome: one timer that paces every real-time transport in the process.

A transport that sends or plays a 20 ms frame every 20 ms would, with a task per direction per call, wake the event
loop 100 times a second per call; at a few hundred calls the wake-ups alone eat the core. The metronome wakes
once per period and calls each subscriber's tick handler in turn, so a call costs a coroutine call per tick
instead of a task wake-up. Tick handlers must be quick and must not wait on anything slow.

The metronome's task belongs to the metronome: it starts with the first subscriber and is cancelled and awaited
when the last one leaves, so it never outlives the pipelines that use it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from voxpipe.pipeline.clock import Clock

TickHandler = Callable[[float], Awaitable[None]]
ErrorHandler = Callable[[BaseException], None]


class Subscription:
    """A subscriber's handle: pass it to :meth:`Metronome.unsubscribe`."""

    __slots__ = ("on_error", "on_tick")

    def __init__(self, on_tick: TickHandler, on_error: ErrorHandler) -> None:
        self.on_tick = on_tick
        self.on_error = on_error


class Metronome:
    """Ticks every ``period`` seconds of ``clock`` time; tick ``k`` is due at ``origin + k * period``."""

    def __init__(self, clock: Clock, period: float) -> None:
        self.clock = clock
        self.period = period
        self._subscribers: dict[Subscription, None] = {}  # insertion-ordered set
        self._task: asyncio.Task[None] | None = None

    def subscribe(self, on_tick: TickHandler, on_error: ErrorHandler) -> Subscription:
        """Call ``on_tick(due_time)`` every tick from the next one on; ``on_error`` gets what it raises."""
        subscription = Subscription(on_tick, on_error)
        self._subscribers[subscription] = None
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"metronome-{self.period}")
        return subscription

    async def unsubscribe(self, subscription: Subscription) -> None:
        """Stop ticking ``subscription``; the last one out stops the metronome and waits for its task."""
        self._subscribers.pop(subscription, None)
        task = self._task
        if not self._subscribers and task is not None and task is not asyncio.current_task():
            self._task = None
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise

    async def _run(self) -> None:
        origin = self.clock.now()
        tick = 0
        while self._subscribers:
            due = origin + tick * self.period  # multiply, never accumulate: no drift
            await self.clock.sleep_until(due)
            for subscription in list(self._subscribers):
                try:
                    await subscription.on_tick(due)
                except Exception as exc:  # one call's failure must not stall the others
                    self._subscribers.pop(subscription, None)
                    subscription.on_error(exc)
            tick += 1
