"""The pipeline: links stages, owns every task they start, and keeps the turn epoch.

``run()`` starts the stages under one ``asyncio.TaskGroup``, sends :class:`Start` through, and returns when an
:class:`End` has drained out of the last stage, when :meth:`cancel` is called (or a :class:`Cancel` frame reaches a
stage), or when a stage fails under the STOP policy (then it re-raises that stage's exception). In every case every
task the stages started has finished before ``run()`` returns.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any

from voxpipe.pipeline.clock import Clock, default_clock
from voxpipe.pipeline.errors import PipelineBuildError, as_failure, being_cancelled
from voxpipe.pipeline.frames import Direction, End, ErrorFrame, Frame, Interrupt, Start
from voxpipe.pipeline.heap import HEAP
from voxpipe.pipeline.stage import DOWNSTREAM, UPSTREAM, ErrorPolicy, FunctionStage, Stage
from voxpipe.pipeline.trace import Tracer
from voxpipe.pipeline.usage import UsageMeter

log = logging.getLogger("voxpipe.pipeline")

StageLike = Stage | Callable[[Frame], Awaitable[Frame | Iterable[Frame] | None]]


def _as_stage(item: StageLike, index: int) -> Stage:
    if isinstance(item, Stage):
        return item
    if callable(item):
        return FunctionStage(item)
    raise PipelineBuildError(f"pipeline item #{index} ({item!r}) is neither a Stage nor an async function")


class Pipeline:
    """A chain of stages. Build it once; ``await pipeline.run()`` runs it."""

    def __init__(
        self,
        stages: Sequence[StageLike],
        *,
        clock: Clock | None = None,
        tracer: Tracer | None = None,
        name: str = "pipeline",
        freeze_heap: bool = True,
    ) -> None:
        self.name = name
        self.freeze_heap = freeze_heap  # see heap.py: the GC walks only what calls make while this one runs
        self.clock: Clock = clock or default_clock()
        self.trace = tracer or Tracer()
        self.stages: tuple[Stage, ...] = tuple(_as_stage(s, i) for i, s in enumerate(stages))
        self.epoch = 0
        self.errors: list[ErrorFrame] = []
        self.usage = UsageMeter(self.trace)
        self._validate()
        for i, stage in enumerate(self.stages):
            prev = self.stages[i - 1] if i > 0 else None
            next_ = self.stages[i + 1] if i + 1 < len(self.stages) else None
            stage._attach(self, prev, next_)
        self._group: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._done: asyncio.Future[str] | None = None  # the outcome; done once the run is over and stopping
        self._tearing_down = False  # the stages are stopped and the run's tasks cancelled
        # Workers that carry an interrupt they must not be cancelled under: cancelled once it has been passed on.
        self._cancel_once_passed_on: dict[Interrupt, list[asyncio.Task[None]]] = {}
        self._failure: BaseException | None = None
        self.outcome: str | None = None

    # -------------------------------------------------------------------------------- building

    def _validate(self) -> None:
        if not self.stages:
            raise PipelineBuildError(f"pipeline {self.name!r} has no stages: nothing is linked")
        seen: dict[int, int] = {}
        names: dict[str, int] = {}
        for i, stage in enumerate(self.stages):
            if id(stage) in seen:
                raise PipelineBuildError(
                    f"stage {stage.name!r} appears twice in pipeline {self.name!r} (positions {seen[id(stage)]} "
                    f"and {i}); a stage instance can be linked once — create a second instance"
                )
            seen[id(stage)] = i
            if stage.name in names:
                raise PipelineBuildError(
                    f"two stages are named {stage.name!r} (positions {names[stage.name]} and {i}); "
                    "give each a unique name=..."
                )
            names[stage.name] = i
            if stage._pipeline is not None:
                raise PipelineBuildError(f"stage {stage.name!r} already belongs to pipeline {stage.pipeline.name!r}")
        produced_by: Stage | None = None
        for stage in self.stages:
            needs = stage.consumes
            if needs is not None and produced_by is not None and produced_by.produces != needs:
                raise PipelineBuildError(
                    f"stage {stage.name!r} expects {needs} audio but stage {produced_by.name!r} before it "
                    f"produces {produced_by.produces}; put a Resample({needs.sample_rate}, "
                    f"{needs.channels}) stage between them"
                )
            if stage.produces is not None:
                produced_by = stage

    # --------------------------------------------------------------------------------- running

    async def run(self) -> str:
        """Run until drained, cancelled or failed. Returns ``"ended"`` or ``"cancelled"``; re-raises a failure."""
        if self._done is not None:
            raise RuntimeError(f"pipeline {self.name!r} is already running or has run; build a new one")
        self._done = asyncio.get_running_loop().create_future()
        self.clock.now()  # pins a real clock's origin to the start of the first run
        holding = False
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                try:
                    # Consumers before producers: the input starts delivering audio only once every stage after it
                    # is ready (a model still loading would otherwise make the first turn's audio queue up).
                    for stage in reversed(self.stages):
                        await stage.start()
                    if self.freeze_heap:
                        HEAP.hold()  # models and SDKs are loaded now: the long-lived heap is in place
                        holding = True
                    await self.stages[0].receive(Start(epoch=self.epoch), DOWNSTREAM)
                    self.outcome = await self._done
                finally:
                    try:
                        await self._shutdown()
                    finally:
                        if holding:
                            HEAP.release()  # also when the shutdown is cancelled: the heap is never left frozen
        except BaseExceptionGroup as group_error:
            # A task escaped its guard (a bug) — surface the first real error, not the group.
            raise group_error.exceptions[0] from group_error
        finally:
            self._group = None
            if self._tasks:  # spawned during teardown, outside the group: cancelled before they started
                await asyncio.wait(set(self._tasks))
            self.usage.close()
            self.trace.close()
        if self._failure is not None:
            raise self._failure
        return self.outcome or "ended"

    @property
    def stopping(self) -> bool:
        """The run is over (ended, cancelled or failed): its stages are stopping or stopped."""
        return self._done is not None and self._done.done()

    async def _shutdown(self) -> None:
        # The run is over however it ended (run() itself cancelled too): a sender waiting on back-pressure is released.
        self._finish("cancelled")
        cancelled: asyncio.CancelledError | None = None
        for stage in reversed(self.stages):
            try:
                await stage.stop()
            except asyncio.CancelledError as exc:
                if being_cancelled():  # run() was cancelled: the other stages are still stopped, then it propagates
                    cancelled = exc
                else:
                    self._stop_failed(stage, as_failure(exc))
            except Exception as exc:  # keep stopping the others; report the first failure
                self._stop_failed(stage, exc)
        self._tearing_down = True
        for task in list(self._tasks):
            task.cancel()
        if cancelled is not None:
            raise cancelled

    def _stop_failed(self, stage: Stage, exc: Exception) -> None:
        log.error("stage %r failed to stop", stage.name, exc_info=exc)
        if self._failure is None:
            self._failure = exc

    async def end(self) -> None:
        """Drain: send :class:`End` in at the head; ``run()`` returns once it comes out of the tail."""
        await self.stages[0].receive(End(epoch=self.epoch), DOWNSTREAM)

    def cancel(self, reason: str = "cancelled") -> None:
        """Abort now: ``run()`` stops every stage and returns ``"cancelled"``."""
        self._finish(reason)

    def _finish(self, outcome: str) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(outcome)

    # ------------------------------------------------------------------------- tasks and errors

    def spawn(
        self, stage: Stage, coro: Coroutine[Any, Any, None], name: str = "", *, epoch: int | None = None
    ) -> asyncio.Task[None]:
        """Start a task owned by this run; an exception in it is ``stage``'s failure, on the turn ``epoch`` when
        the task does one turn's work (a reply's receiver), else on the turn in progress when it fails.

        Once teardown has begun (the stages stopped, the run's tasks cancelled) a new task — say, one a cancelled
        task's clean-up starts to send a provider its cancel — is cancelled at once: its coroutine never runs.
        Nothing would be left to cancel it, and ``run()`` would wait for it, forever if it never ended."""
        name = name or f"{stage.name}-task"
        if self._group is None:
            coro.close()
            raise RuntimeError(
                f"stage {stage.name!r} tried to start a task while pipeline {self.name!r} is not running"
            )
        if self._tearing_down:
            task = asyncio.get_running_loop().create_task(coro, name=name)  # not in the group: it may be exiting
            task.cancel()
        else:
            task = self._group.create_task(self._guard(stage, coro, epoch), name=name)
            # Cancelled before its first step, the guard never awaits ``coro``: closed here, it is not left for
            # the garbage collector to warn "never awaited" about (closing one that ran does nothing).
            task.add_done_callback(lambda _: coro.close())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _guard(self, stage: Stage, coro: Coroutine[Any, Any, None], epoch: int | None) -> None:
        try:
            await coro
        except (Exception, asyncio.CancelledError) as exc:
            await self._stage_failed(stage, as_failure(exc), epoch)

    def fail_later(self, stage: Stage, exc: Exception, *, epoch: int | None = None) -> None:
        """``stage`` failed outside the run's own tasks (in a tick of the metronome every call shares), at work of
        the turn ``epoch`` if it says (else the turn in progress): its error policy is applied in a task of this
        run. Once the run is over the failure is only recorded, as :meth:`_stage_failed` would, since no task may
        start then."""
        if self.stopping:
            self._failed_while_stopping(stage, exc, epoch)
        else:
            self.spawn(stage, self._stage_failed(stage, exc, epoch), name=f"{stage.name}-failed")

    def _failed_while_stopping(self, stage: Stage, exc: Exception, epoch: int | None) -> None:
        # Work still in flight as the stages stop (a final an STT delivers as it stops) may meet a stage already
        # stopped. Recorded; it does not change how the run ended.
        problem = f"{type(exc).__name__}: {exc}"
        turn = self.epoch if epoch is None else epoch
        self.errors.append(ErrorFrame(epoch=turn, stage=stage.name, error=problem, fatal=False))
        log.warning("stage %r failed while pipeline %r was stopping: %s", stage.name, self.name, problem)

    async def _stage_failed(self, stage: Stage, exc: Exception, epoch: int | None) -> None:
        """``stage`` raised doing work of the turn ``epoch`` (the frame it was handling, the task's turn), or, when
        that is not known, of the turn in progress. The error goes on that turn, which may have ended (a reply a
        barge-in cut failing as it unwinds): then it amends that turn's record, not the turn in progress."""
        if self.stopping:
            self._failed_while_stopping(stage, exc, epoch)
            return
        turn = self.epoch if epoch is None else epoch
        problem = f"{type(exc).__name__}: {exc}"
        policy = stage.error_policy
        fatal = policy is ErrorPolicy.STOP
        error = ErrorFrame(epoch=turn, stage=stage.name, error=problem, fatal=fatal)
        self.errors.append(error)
        self.trace.annotate(turn, error=error.error, error_stage=stage.name)
        if fatal:
            log.error("stage %r failed; stopping pipeline %r: %s", stage.name, self.name, error.error)
            if self._failure is None:
                self._failure = exc
            self._finish("failed")
            return
        log.warning("stage %r failed (%s, %s); continuing", stage.name, policy.value, error.error)
        await stage.push(error, UPSTREAM)
        if policy is ErrorPolicy.SKIP_TURN and turn == self.epoch:
            # Only the turn in progress is skipped: work of a turn already closed (a cut reply failing as it
            # unwinds) has nothing left to skip, and interrupting would cut the reply that followed it.
            await self.interrupt(stage, reason=f"error in {stage.name}")

    async def report(self, stage: Stage, problem: str, *, epoch: int | None = None) -> ErrorFrame:
        """A non-fatal problem ``stage`` handled itself (a bad tool result, a provider message it skipped): recorded
        in :attr:`errors` and on the turn ``epoch`` in the trace (the turn in progress when not given), and sent
        upstream as a non-fatal :class:`ErrorFrame`."""
        turn = self.epoch if epoch is None else epoch
        error = ErrorFrame(epoch=turn, stage=stage.name, error=problem, fatal=False)
        self.errors.append(error)
        self.trace.annotate(turn, error=problem, error_stage=stage.name)
        log.warning("stage %r: %s", stage.name, problem)
        await stage.push(error, UPSTREAM)
        return error

    # --------------------------------------------------------------------------------- epochs

    def next_epoch(self) -> int:
        """Open a new turn generation without interrupting (nothing is in flight)."""
        self.epoch += 1
        self.usage.open_turn(self.epoch)
        return self.epoch

    async def interrupt(self, origin: Stage, reason: str = "barge-in") -> Interrupt:
        """Open a new epoch and send :class:`Interrupt` both ways from ``origin``."""
        self.epoch += 1
        self.usage.open_turn(self.epoch)
        interrupt = Interrupt(epoch=self.epoch, at=self.clock.now(), reason=reason)
        self._cancel_once_passed_on[interrupt] = []
        try:
            await origin._take_interrupt(interrupt, DOWNSTREAM)
            if origin._prev is not None:
                await origin._prev.receive(interrupt, UPSTREAM)
        finally:
            for task in self._cancel_once_passed_on.pop(interrupt):
                task.cancel()
        return interrupt

    def cancel_once_passed_on(self, interrupt: Interrupt, task: asyncio.Task[None]) -> None:
        """Cancel ``task`` — stale work whose own call stack carries ``interrupt`` — once the interrupt has been
        passed on both ways. Cancelled sooner, it would stop the interrupt at the first stage whose
        ``on_interrupt`` awaits. An interrupt that did not come from :meth:`interrupt` is complete when the task
        next yields to the loop."""
        carriers = self._cancel_once_passed_on.get(interrupt)
        if carriers is None:
            asyncio.get_running_loop().call_soon(task.cancel)
        else:
            carriers.append(task)

    async def _edge(self, frame: Frame, direction: Direction) -> None:
        """A frame left the pipeline: an End out of the tail completes a drain."""
        if direction is DOWNSTREAM and isinstance(frame, End):
            self._finish("ended")
