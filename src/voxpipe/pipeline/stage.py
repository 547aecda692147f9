"""Stages: the units a pipeline is made of.

A :class:`Stage` handles each frame in the caller's own call stack: passing a frame through synchronous stages
costs a few coroutine calls, never a queue hop. A stage that does real asynchronous work (provider I/O, model
inference) subclasses :class:`QueuedStage`, which gives it an inbox and a worker task; control frames skip the
inbox, and an interrupt cancels the work in flight.

Every stage keeps the newest ``epoch`` it has seen an :class:`Interrupt` for. It drops interruptible frames of
older epochs on the way in and on the way out, which is what makes a late frame from a cancelled provider call
harmless wherever it shows up.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any

from voxpipe.pipeline.audio import AudioFormat
from voxpipe.pipeline.errors import as_failure
from voxpipe.pipeline.frames import Cancel, ControlFrame, Direction, End, Frame, Interrupt
from voxpipe.pipeline.pacing import in_tick

if TYPE_CHECKING:
    from voxpipe.pipeline.clock import Clock
    from voxpipe.pipeline.pipeline import Pipeline

DOWNSTREAM = Direction.DOWNSTREAM
UPSTREAM = Direction.UPSTREAM


class ErrorPolicy(enum.Enum):
    """What the pipeline does when a stage raises."""

    STOP = "stop"
    """Stop the pipeline; ``Pipeline.run()`` re-raises the exception (the default)."""
    SKIP_FRAME = "skip-frame"
    """Drop the frame that failed, send a non-fatal :class:`ErrorFrame` upstream, carry on."""
    SKIP_TURN = "skip-turn"
    """Like SKIP_FRAME, and also interrupt the current reply, so the turn is abandoned cleanly."""


class Stage:
    """Base class of every stage. Override :meth:`process`; call :meth:`push` to emit.

    Class attributes a subclass may set:

    * ``consumes`` — the audio format the stage needs on its input (checked when the pipeline is built, and per
      frame by stages that call :meth:`AudioFormat.check`);
    * ``produces`` — the audio format the stage emits downstream, if it changes it;
    * ``error_policy`` — see :class:`ErrorPolicy`.
    """

    consumes: AudioFormat | None = None
    produces: AudioFormat | None = None
    error_policy: ErrorPolicy = ErrorPolicy.STOP

    def __init__(self, *, name: str | None = None) -> None:
        self.name = name or type(self).__name__
        self.epoch = 0
        self._next: Stage | None = None
        self._prev: Stage | None = None
        self._pipeline: Pipeline | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    # ------------------------------------------------------------------------------------ wiring

    @property
    def pipeline(self) -> Pipeline:
        if self._pipeline is None:
            raise RuntimeError(f"stage {self.name!r} is not part of a pipeline yet")
        return self._pipeline

    @property
    def clock(self) -> Clock:
        return self.pipeline.clock

    def _attach(self, pipeline: Pipeline, prev: Stage | None, next_: Stage | None) -> None:
        self._pipeline, self._prev, self._next = pipeline, prev, next_

    # --------------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Called by ``Pipeline.run()`` before the first frame; start tasks here with :meth:`spawn`."""

    async def stop(self) -> None:
        """Called by ``Pipeline.run()`` when the pipeline ends, before its tasks are cancelled."""

    # -------------------------------------------------------------------------------- frame flow

    async def process(self, frame: Frame, direction: Direction) -> None:
        """Handle one frame. The default passes it on unchanged."""
        await self.push(frame, direction)

    async def on_interrupt(self, interrupt: Interrupt) -> None:
        """Called when an interrupt of a newer epoch arrives, before it is passed on. Cancel provider work here."""

    async def push(self, frame: Frame, direction: Direction = DOWNSTREAM) -> None:
        """Emit ``frame``; a stale interruptible frame is dropped here, so no stage ever emits one."""
        if frame.interruptible and frame.epoch < self.epoch:
            return
        target = self._next if direction is DOWNSTREAM else self._prev
        if target is None:
            await self.pipeline._edge(frame, direction)
        else:
            await target.receive(frame, direction)

    async def receive(self, frame: Frame, direction: Direction) -> None:
        """Entry point for frames from the neighbours (and the pipeline)."""
        if frame.urgent:
            if isinstance(frame, Interrupt):
                await self._take_interrupt(frame, direction)
                return
            if isinstance(frame, Cancel):
                self.pipeline.cancel()  # abort: run() stops every stage and cancels their work, queued or not
                return
        elif frame.interruptible and frame.epoch < self.epoch:
            return
        try:
            await self.process(frame, direction)
        except (Exception, asyncio.CancelledError) as exc:
            await self.pipeline._stage_failed(self, as_failure(exc), frame.epoch)

    async def _take_interrupt(self, interrupt: Interrupt, direction: Direction) -> None:
        if interrupt.epoch <= self.epoch:
            return  # already seen: it travels both ways from where it was raised
        self.epoch = interrupt.epoch
        try:
            await self.on_interrupt(interrupt)
        except (Exception, asyncio.CancelledError) as exc:
            await self.pipeline._stage_failed(self, as_failure(exc), interrupt.epoch)
        await self.push(interrupt, direction)

    # ------------------------------------------------------------------------------- conveniences

    async def interrupt(self, reason: str = "barge-in") -> Interrupt:
        """Open a new epoch and send the interrupt both ways from this stage."""
        return await self.pipeline.interrupt(self, reason)

    def spawn(self, coro: Coroutine[Any, Any, None], name: str = "", *, epoch: int | None = None) -> asyncio.Task[None]:
        """Start a task owned by the running pipeline; its failure is this stage's failure, on the turn ``epoch``
        if the task does that turn's work (see :meth:`Pipeline.spawn`)."""
        return self.pipeline.spawn(self, coro, name, epoch=epoch)

    def mark(self, name: str, epoch: int, at: float | None = None, **data: Any) -> None:
        """Record a latency-trace mark for the turn ``epoch`` (at ``at``, or now)."""
        self.pipeline.trace.mark(epoch, name, self.clock.now() if at is None else at, **data)

    def count(self, epoch: int, **amounts: float) -> None:
        """Count usage of a metered service (``input_tokens=…``, ``characters=…``) for the turn ``epoch``."""
        self.pipeline.usage.add(self.name, epoch, **amounts)

    def count_for_next_turn(self, **amounts: float) -> None:
        """Count usage that belongs to the next turn to open (a streaming STT's audio: the caller's next words)."""
        self.pipeline.usage.add_for_next_turn(self.name, **amounts)

    async def report(self, problem: str, *, epoch: int | None = None) -> None:
        """Report a problem this stage handled without failing: a non-fatal :class:`ErrorFrame` upstream, and an
        error on the turn ``epoch`` — the turn whose work had the problem, which may have ended (a tool that ran on
        after a barge-in) — or, when not given, on the turn in progress."""
        await self.pipeline.report(self, f"{self.name}: {problem}", epoch=epoch)


class QueuedStage(Stage):
    """A stage whose downstream data frames wait in a bounded inbox for one worker task.

    Control frames and upstream frames are handled at once, in the sender's call stack. On an interrupt the
    inbox loses its stale frames, and if the worker is busy with stale work, the worker task is cancelled (its
    provider call unwinds at its next ``await``) and a fresh worker takes over the inbox. The old worker may still
    run its clean-up; anything it emits is stale and dropped by :meth:`push`.

    A full inbox makes the sender wait (back-pressure), except a metronome tick: a real-time source cannot be
    slowed, and the metronome's wait would stall every call on the clock. The frame is queued beyond
    ``max_queued`` and the stage reports, once until its inbox has room again, that it is behind real time. Once
    the run is over no sender waits: its frame is dropped. Nor does the worker take another frame then: what is
    still queued is never started (the work under way is the stage's ``stop()`` to end).
    """

    max_queued: int = 512

    def __init__(self, *, name: str | None = None, max_queued: int | None = None) -> None:
        super().__init__(name=name)
        if max_queued is not None:
            self.max_queued = max_queued
        self._inbox: deque[Frame] = deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._space: asyncio.Future[None] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._busy_with: Frame | None = None
        self._behind_reported = False  # a tick overfilled the inbox; cleared once it has room again

    @property
    def queued(self) -> int:
        return len(self._inbox)

    async def start(self) -> None:
        await super().start()
        self._start_worker()

    def _start_worker(self) -> None:
        self._worker = self.spawn(self._work(), name=f"{self.name}-worker")

    async def receive(self, frame: Frame, direction: Direction) -> None:
        if frame.urgent or direction is UPSTREAM:
            await super().receive(frame, direction)
            return
        if frame.interruptible and frame.epoch < self.epoch:
            return
        if len(self._inbox) >= self.max_queued:
            if in_tick():
                self._fell_behind()
            elif not await self._wait_for_space():
                return  # the run is over: nobody will take the frame
        self._inbox.append(frame)
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    async def _wait_for_space(self) -> bool:
        """Back-pressure: wait until the worker has taken a frame from the full inbox (before the run, queue: the
        worker starts with it). False when the run is over first: nobody will take the frame."""
        run = self.pipeline._done
        while run is not None and len(self._inbox) >= self.max_queued:
            if run.done():
                return False
            if self._space is None:
                self._space = asyncio.get_running_loop().create_future()
            # Not awaited directly: a waiter cancelled must not cancel the future the other waiters share.
            await asyncio.wait((self._space, run), return_when=asyncio.FIRST_COMPLETED)
        return True

    def _fell_behind(self) -> None:
        if self._behind_reported:
            return
        self._behind_reported = True
        problem = (
            f"behind real time: {len(self._inbox) + 1} frames queued (max_queued={self.max_queued}); the real-time "
            "source does not wait, so the inbox keeps growing until the stage catches up"
        )
        # In its own task: the report travels upstream through stages, and the metronome's tick must not wait.
        self.spawn(self.report(problem), name=f"{self.name}-behind")

    async def _take_interrupt(self, interrupt: Interrupt, direction: Direction) -> None:
        if interrupt.epoch > self.epoch:
            epoch = interrupt.epoch
            kept = [f for f in self._inbox if not (f.interruptible and f.epoch < epoch)]
            if len(kept) != len(self._inbox):
                self._inbox = deque(kept)
                self._release_space()
            busy = self._busy_with
            if busy is not None and busy.interruptible and busy.epoch < epoch and self._worker is not None:
                stale_worker, self._busy_with = self._worker, None
                if stale_worker is asyncio.current_task():
                    # The stale work raised this interrupt itself (a stage after it failed on a frame it pushed):
                    # it carries the interrupt, so it is cancelled only once the interrupt has been passed on.
                    self.pipeline.cancel_once_passed_on(interrupt, stale_worker)
                else:
                    stale_worker.cancel()
                self._start_worker()
        await super()._take_interrupt(interrupt, direction)

    def _release_space(self) -> None:
        if len(self._inbox) < self.max_queued:
            self._behind_reported = False
            space = self._space
            if space is not None:
                self._space = None
                if not space.done():
                    space.set_result(None)

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        while True:
            if self.pipeline.stopping:
                # The run is over: no new work. The stages stop from the output back, and while one in front of
                # this one is still stopping, a frame taken now would meet what this stage's stop() has closed.
                return
            if not self._inbox:
                self._wakeup = loop.create_future()
                await self._wakeup
                continue
            frame = self._inbox.popleft()
            self._release_space()
            if frame.interruptible and frame.epoch < self.epoch:
                continue
            self._busy_with = frame
            try:
                await self.process(frame, DOWNSTREAM)
            except (Exception, asyncio.CancelledError) as exc:
                failure = as_failure(exc)  # re-raises this worker's own cancellation
                # Done with the frame before the failure is handled: a skip-turn interrupt raised from here must
                # not find this worker busy with stale work and cancel it, the task carrying that interrupt.
                if self._worker is me:
                    self._busy_with = None
                await self.pipeline._stage_failed(self, failure, frame.epoch)
            finally:
                if self._worker is me:
                    self._busy_with = None
            if self._worker is not me:
                return  # replaced after an interrupt while finishing; the new worker owns the inbox
            if isinstance(frame, End):
                return


class FunctionStage(Stage):
    """Wraps ``async def fn(frame) -> Frame | Iterable[Frame] | None`` as a stage.

    ``fn`` sees every downstream frame except control frames; what it returns is pushed downstream (``None``
    drops the frame). Upstream and control frames pass through untouched.
    """

    def __init__(
        self,
        fn: Callable[[Frame], Awaitable[Frame | Iterable[Frame] | None]],
        *,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name or getattr(fn, "__name__", "function"))
        self._fn = fn

    async def process(self, frame: Frame, direction: Direction) -> None:
        if direction is UPSTREAM or isinstance(frame, ControlFrame):
            await self.push(frame, direction)
            return
        out = await self._fn(frame)
        if out is None:
            return
        if isinstance(out, Frame):
            await self.push(out)
            return
        for item in out:
            await self.push(item)
