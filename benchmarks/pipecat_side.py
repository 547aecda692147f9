"""Pipecat side of the voxpipe-vs-Pipecat benchmarks.

Each public function runs one workload on Pipecat (``pipecat-ai`` 1.14.0) and
returns plain numbers, so a driver can put them next to the voxpipe figures for
the identical workload. Nothing here prints except the ``__main__`` smoke test.

Pipecat API used (1.14 renamed "task" to "worker"; the old names still work
but warn):

* ``PipelineWorker(Pipeline([...]), ...)`` run by a ``WorkerRunner`` (the
  1.14 names of ``PipelineTask`` / ``PipelineRunner``). One runner per call,
  the way Pipecat's own bot templates start a session, with
  ``handle_sigint=False`` because a library function must not take SIGINT.
* Frames enter through the first processor's ``push_frame()``, called by the
  producer: that is how an input transport or a TTS service emits the frames
  it makes, so it is the realistic path. ``per_frame_overhead`` can also
  measure the external-injection path, ``worker.queue_frames()``.
* Interruption: the source processor calls ``broadcast_interruption()``,
  exactly what ``UserTurnProcessor`` does in 1.14 when the user starts
  speaking. It pushes an ``InterruptionFrame`` (a ``SystemFrame``) both ways;
  every processor it reaches drops the data frames waiting in its process
  queue.
* Ending: ``worker.stop_when_done()`` (queues an ``EndFrame``, which drains
  the pipeline); ``worker.cancel()`` (a ``CancelFrame``) only if that does not
  finish in time.

Lean settings (``lean=True``; ``lean=False`` leaves every argument at its
default so the out-of-the-box cost can be measured too):

* ``PipelineParams(enable_metrics=False, enable_usage_metrics=False,
  enable_heartbeats=False, send_initial_empty_metrics=False)``; the first
  three are already the defaults in 1.14.
* ``PipelineWorker(enable_rtvi=False, enable_turn_tracking=False,
  enable_tracing=False, idle_timeout_secs=None, observers=[])``. By default
  1.14 prepends an ``RTVIProcessor`` and adds an RTVI observer, a turn
  tracking observer and an idle-timeout observer plus its monitor task.
  Even when lean, the worker installs its ``WorkerObserver`` proxy, so every
  push and every ``process_frame`` still builds a ``FramePushed`` /
  ``FrameProcessed`` record; that cannot be turned off.

Harness settings, the same in both modes: on import, loguru (Pipecat's logger)
is given a single WARNING-level stderr handler, replacing its handlers
process-wide (override the level with ``PIPECAT_BENCH_LOG_LEVEL``), so
Pipecat's debug lines neither flood stderr nor cost time. Pipecat still formats its
``logger.trace(f"Pushing {frame} ...")`` message on every push whatever the
level, which is part of its real per-frame cost.

Audio frames are ``OutputAudioRawFrame`` (a ``DataFrame``: it goes through
each processor's input queue and then its process queue, and an interruption
can drop it) holding 20 ms of 16 kHz mono int16 PCM, 640 bytes allocated once.
``frame_kind="input"`` uses ``InputAudioRawFrame`` instead, a ``SystemFrame``
that is handled straight from the input queue and is never dropped by an
interruption. Pipecat queues are unbounded, so a producer never blocks.

Gotchas found in 1.14:

* Frames pushed before the ``StartFrame`` are not dropped: each processor
  holds them until it has been set up and started (the comment in Pipecat's
  own ``tests/utils.py`` saying they are dropped is out of date). The
  benchmarks still wait for ``on_pipeline_started`` before pushing.
* The sink must forward non-audio frames: the worker only starts (and only
  ends) once the ``StartFrame`` (``EndFrame``) reaches its own sink after the
  user processors.
* ``push_frame()`` never yields (the queues are unbounded and a ``put`` on
  them does not suspend), and neither does taking a frame from a non-empty
  queue, so with processors that never wait, each task drains its whole queue
  in one go: a 500-frame burst crosses the pipeline in a few event-loop turns.
* An interruption only flushes frames already in a processor's process queue.
  The input queue is a priority queue, so an ``InterruptionFrame`` overtakes
  the data frames still waiting there; they are moved to the process queue
  after the interruption has been handled and are all delivered. A burst
  pushed without yielding is exactly that case: the interruption drops none of
  it, and with a real-time sink (``play_realtime=True``) about 10 s of stale
  audio plays after the interruption. Yield to the loop a few times between
  the burst and the interruption and the frames reach the sink's queue first,
  where the interruption does drop them.
"""

from __future__ import annotations

import asyncio
import gc
import math
import os
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from voxpipe.pipeline.trace import percentile  # the same definition on both sides

_INSTALL_HINT = "install the bench extra: pip install -e .[bench]"

try:
    from loguru import logger as _pipecat_logger

    # Set before Pipecat is imported, as importing it logs a banner.
    _pipecat_logger.remove()
    _pipecat_logger.add(sys.stderr, level=os.environ.get("PIPECAT_BENCH_LOG_LEVEL", "WARNING"))

    from pipecat.frames.frames import (
        AudioRawFrame,
        Frame,
        InputAudioRawFrame,
        InterruptionFrame,
        OutputAudioRawFrame,
    )
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
    from pipecat.workers.runner import WorkerRunner
except ImportError as exc:
    raise ImportError(_INSTALL_HINT) from exc

__all__ = [
    "concurrent_calls",
    "idle_memory_kib",
    "interrupt_latency",
    "per_frame_overhead",
]

SAMPLE_RATE = 16_000
FRAME_SECONDS = 0.020
PCM_20MS = bytes(int(SAMPLE_RATE * FRAME_SECONDS) * 2)  # 640 bytes of int16 silence
WARMUP_FRAMES = 200
CONCURRENT_STAGES = 4
INTERRUPT_STAGES = 2
STEADY_FRAMES = 50  # 1 s of audio
BURST_FRAMES = 500
START_TIMEOUT_S = 30.0
END_TIMEOUT_S = 10.0
SETTLE_S = 0.2

FrameKind = Literal["output", "input"]
Entry = Literal["push", "queue"]


# --------------------------------------------------------------------------
# Processors and pipeline plumbing shared by the benchmarks
# --------------------------------------------------------------------------


class _PassThrough(FrameProcessor):
    """Forwards every frame unchanged: the cheapest stage Pipecat allows.

    Also used as the source: the producer calls its ``push_frame()``, the way
    a transport or service emits the frames it makes.
    """

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)


class _AudioSink(FrameProcessor):
    """Output-like last processor: consumes audio, forwards everything else.

    Audio stops here, as it would in an output transport. Every other frame
    must go on, or the worker never sees its ``StartFrame``/``EndFrame`` reach
    the end and never starts or ends.

    With ``play_seconds`` > 0 the sink holds each audio frame that long, like
    an output transport playing it out in real time, so audio queues up in
    front of it. An interruption cancels the frame playing and drops the
    queue, which is what Pipecat's interruption is built to do.
    """

    def __init__(
        self,
        on_audio: Callable[[Frame], None],
        on_interruption: Callable[[], None] | None = None,
        play_seconds: float = 0.0,
    ) -> None:
        super().__init__()
        self._on_audio = on_audio
        self._on_interruption = on_interruption
        self._play_seconds = play_seconds

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if direction is FrameDirection.DOWNSTREAM:
            if isinstance(frame, AudioRawFrame):
                self._on_audio(frame)
                if self._play_seconds:
                    await asyncio.sleep(self._play_seconds)
                return
            if isinstance(frame, InterruptionFrame) and self._on_interruption:
                self._on_interruption()
        await self.push_frame(frame, direction)


@dataclass
class _Call:
    """One running Pipecat pipeline: worker, its runner task, and its source."""

    worker: PipelineWorker
    source: _PassThrough
    run_task: asyncio.Task[None]
    started: asyncio.Event


def _make_worker(pipeline: Pipeline, lean: bool) -> PipelineWorker:
    """Build the worker with the lean settings, or with Pipecat's defaults."""
    if not lean:
        return PipelineWorker(pipeline)
    return PipelineWorker(
        pipeline,
        params=PipelineParams(
            enable_metrics=False,
            enable_usage_metrics=False,
            enable_heartbeats=False,
            send_initial_empty_metrics=False,
        ),
        enable_rtvi=False,
        enable_turn_tracking=False,
        enable_tracing=False,
        idle_timeout_secs=None,
        observers=[],
    )


async def _start_call(n_stages: int, sink: _AudioSink, lean: bool) -> _Call:
    """Create source → n_stages pass-throughs → sink and start running it."""
    source = _PassThrough()
    stages = [_PassThrough() for _ in range(n_stages)]
    worker = _make_worker(Pipeline([source, *stages, sink]), lean)
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def _on_started(_worker: PipelineWorker, _frame: Frame) -> None:
        started.set()

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    run_task = asyncio.create_task(runner.run())
    return _Call(worker=worker, source=source, run_task=run_task, started=started)


async def _wait_started(calls: Sequence[_Call], within: float = START_TIMEOUT_S) -> None:
    """Wait until every pipeline's StartFrame has reached its end."""
    async with asyncio.timeout(within):
        await asyncio.gather(*(call.started.wait() for call in calls))


async def _end_call(call: _Call) -> None:
    """End one pipeline with an EndFrame; cancel it if it does not finish."""
    if call.run_task.done():
        return
    await call.worker.stop_when_done()
    try:
        await asyncio.wait_for(asyncio.shield(call.run_task), END_TIMEOUT_S)
        return
    except TimeoutError:
        pass
    await call.worker.cancel(reason="benchmark teardown timed out")
    try:
        await asyncio.wait_for(asyncio.shield(call.run_task), END_TIMEOUT_S)
    except TimeoutError:
        call.run_task.cancel()
        await asyncio.gather(call.run_task, return_exceptions=True)


async def _end_calls(calls: Sequence[_Call]) -> None:
    await asyncio.gather(*(_end_call(call) for call in calls))


def _make_frame(kind: FrameKind) -> Frame:
    """A new 20 ms audio frame around the shared PCM buffer."""
    if kind == "output":
        return OutputAudioRawFrame(audio=PCM_20MS, sample_rate=SAMPLE_RATE, num_channels=1)
    if kind == "input":
        return InputAudioRawFrame(audio=PCM_20MS, sample_rate=SAMPLE_RATE, num_channels=1)
    raise ValueError(f"frame_kind must be 'output' or 'input', not {kind!r}")


async def _sleep_until(deadline: float) -> None:
    """Sleep until ``perf_counter()`` reaches ``deadline`` (absolute, no drift)."""
    delay = deadline - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)


async def _settle(count: Callable[[], int], quiet: float = SETTLE_S, limit: float = 10.0) -> None:
    """Return once ``count()`` has not changed for ``quiet`` seconds (or ``limit`` passed)."""
    deadline = time.perf_counter() + limit
    last = count()
    while time.perf_counter() < deadline:
        await asyncio.sleep(quiet)
        now = count()
        if now == last:
            return
        last = now


# --------------------------------------------------------------------------
# 1. Per-frame overhead
# --------------------------------------------------------------------------


class _CountingTarget:
    """Counts audio at the sink and timestamps the arrival of the last one."""

    def __init__(self) -> None:
        self.count = 0
        self.target = 0
        self.t_done = 0.0
        self.done = asyncio.Event()

    def arm(self, target: int) -> None:
        self.count = 0
        self.target = target
        self.t_done = 0.0
        self.done.clear()

    def on_audio(self, _frame: Frame) -> None:
        self.count += 1
        if self.count == self.target:
            self.t_done = time.perf_counter()
            self.done.set()


async def per_frame_overhead(
    n_stages: int,
    n_frames: int,
    lean: bool = True,
    *,
    frame_kind: FrameKind = "output",
    entry: Entry = "push",
) -> float:
    """Microseconds per frame per stage for a back-to-back burst.

    The pipeline (source → ``n_stages`` pass-throughs → counting sink) is
    built and started once, warmed up with 200 frames, then timed from just
    before the first push until the sink has counted all ``n_frames``.
    Nothing is subtracted; the result is ``elapsed / (n_frames * n_stages)``.

    The frame objects are created before the clock starts (all sharing one
    PCM buffer), so only Pipecat's own work is timed, and each frame is a
    distinct object, as in a real pipeline (its observers key on frame ids).

    Args:
        n_stages: Pass-through processors between source and sink.
        n_frames: Frames in the timed burst.
        lean: Lean settings (see module docstring) or Pipecat's defaults.
        frame_kind: ``"output"`` (OutputAudioRawFrame, data path) or
            ``"input"`` (InputAudioRawFrame, system-frame path).
        entry: ``"push"``: the source processor's ``push_frame()``, how a
            transport or service emits frames (default). ``"queue"``:
            ``worker.queue_frames()``, how application code injects frames;
            it adds the worker's push queue and the source's own queues.
    """
    if n_stages < 1 or n_frames < 1:
        raise ValueError("n_stages and n_frames must be >= 1")
    if entry not in ("push", "queue"):
        raise ValueError(f"entry must be 'push' or 'queue', not {entry!r}")

    counter = _CountingTarget()
    call = await _start_call(n_stages, _AudioSink(counter.on_audio), lean)
    try:
        await _wait_started([call])
        elapsed = 0.0
        for count in (WARMUP_FRAMES, n_frames):
            frames = [_make_frame(frame_kind) for _ in range(count)]
            counter.arm(count)
            t0 = time.perf_counter()
            if entry == "push":
                for frame in frames:
                    await call.source.push_frame(frame)
            else:
                await call.worker.queue_frames(frames)
            # Generous: even 1 ms per frame per stage finishes well within it.
            await asyncio.wait_for(counter.done.wait(), 30.0 + count * (n_stages + 2) * 1e-3)
            elapsed = counter.t_done - t0
        return elapsed * 1e6 / (n_frames * n_stages)
    finally:
        await _end_calls([call])


# --------------------------------------------------------------------------
# 2. Interruption latency
# --------------------------------------------------------------------------


async def interrupt_latency(mode: str, lean: bool = True, *, play_realtime: bool = False) -> dict[str, float | int]:
    """How long stale audio keeps reaching the output after an interruption.

    Pipeline: source → 2 pass-throughs → output-like sink that timestamps every
    audio frame it receives. Every frame is pushed before the interruption
    (``OutputAudioRawFrame``, the kind an interruption is meant to drop).
    With ``play_realtime`` the sink also holds each frame for 20 ms, as an
    output transport playing it would (default off: the sink only records).

    * ``"steady"``: one frame every 20 ms for 1 s (50 frames, absolute
      schedule), then the interruption at the next 20 ms slot.
    * ``"burst"``: 500 frames pushed back to back, then the interruption at
      once, without yielding to the event loop in between.

    The interruption is triggered the way Pipecat's ``UserTurnProcessor``
    does: ``t0 = perf_counter()`` right before the source processor's
    ``broadcast_interruption()``. After the ``InterruptionFrame`` reaches the
    sink, the pipeline is left to settle until no audio arrives for 200 ms,
    then ended with an EndFrame.

    Returns:
        ``to_silence_ms``: last stale frame's arrival at the sink minus t0, or
        the ``InterruptionFrame``'s arrival minus t0 if no stale frame arrived
        after t0. ``stale_after_interrupt``: frames pushed before the interrupt
        that reached the sink after t0. Also ``interrupt_reach_ms`` (the
        ``InterruptionFrame``'s arrival minus t0) and ``dropped`` (frames that
        never reached the sink).

    With the default sink nothing waits anywhere, so every processor drains
    its queue in one go and a burst reaches the sink in a few ms whatever the
    interruption does. With ``play_realtime`` a burst of 500 frames is 10 s
    of audio; see the module docstring for why Pipecat plays it all.
    """
    if mode == "steady":
        n_frames, paced = STEADY_FRAMES, True
    elif mode == "burst":
        n_frames, paced = BURST_FRAMES, False
    else:
        raise ValueError(f"mode must be 'steady' or 'burst', not {mode!r}")

    arrivals: list[float] = []
    interrupt_seen = asyncio.Event()
    t_interrupt_at_sink = 0.0

    def on_audio(_frame: Frame) -> None:
        arrivals.append(time.perf_counter())

    def on_interruption() -> None:
        nonlocal t_interrupt_at_sink
        if not interrupt_seen.is_set():
            t_interrupt_at_sink = time.perf_counter()
            interrupt_seen.set()

    sink = _AudioSink(on_audio, on_interruption, FRAME_SECONDS if play_realtime else 0.0)
    call = await _start_call(INTERRUPT_STAGES, sink, lean)
    try:
        await _wait_started([call])
        frames = [_make_frame("output") for _ in range(n_frames)]
        if paced:
            start = time.perf_counter()
            for k, frame in enumerate(frames):
                await _sleep_until(start + k * FRAME_SECONDS)
                await call.source.push_frame(frame)
            await _sleep_until(start + n_frames * FRAME_SECONDS)
        else:
            for frame in frames:
                await call.source.push_frame(frame)

        t0 = time.perf_counter()
        await call.source.broadcast_interruption()

        await asyncio.wait_for(interrupt_seen.wait(), 10.0)
        # Long enough for a real-time sink to play out the whole burst.
        await _settle(lambda: len(arrivals), limit=5.0 + 1.5 * n_frames * FRAME_SECONDS)

        stale = [t for t in arrivals if t > t0]
        end = max(stale) if stale else t_interrupt_at_sink
        return {
            "to_silence_ms": (end - t0) * 1e3,
            "stale_after_interrupt": len(stale),
            "interrupt_reach_ms": (t_interrupt_at_sink - t0) * 1e3,
            "dropped": n_frames - len(arrivals),
        }
    finally:
        await _end_calls([call])


# --------------------------------------------------------------------------
# 3. Many concurrent calls in one event loop
# --------------------------------------------------------------------------


class _LatenessRecorder:
    """Collects sink lateness of frames due after the warm-up second."""

    def __init__(self) -> None:
        self.measure_from = math.inf
        self.lateness: list[float] = []

    def on_audio(self, frame: Frame) -> None:
        now = time.perf_counter()
        due = frame.metadata["due"]
        if due >= self.measure_from:
            self.lateness.append(now - due)


async def _emit_paced(source: _PassThrough, kind: FrameKind, start: float, stop: float) -> int:
    """Push one frame every 20 ms on an absolute schedule; return frames sent."""
    k = 0
    while (due := start + k * FRAME_SECONDS) < stop:
        await _sleep_until(due)
        frame = _make_frame(kind)
        frame.metadata["due"] = due
        await source.push_frame(frame)
        k += 1
    return k


async def _concurrent_calls(
    n_calls: int, seconds: float, lean: bool, stagger: bool, frame_kind: FrameKind
) -> dict[str, float | int]:
    recorder = _LatenessRecorder()
    calls = [await _start_call(CONCURRENT_STAGES, _AudioSink(recorder.on_audio), lean) for _ in range(n_calls)]
    try:
        await _wait_started(calls, START_TIMEOUT_S + 0.1 * n_calls)
        t_base = time.perf_counter() + 0.05
        t_stop = t_base + seconds
        recorder.measure_from = t_base + 1.0
        emitters = [
            _emit_paced(
                call.source,
                frame_kind,
                t_base + (i / n_calls * FRAME_SECONDS if stagger else 0.0),
                t_stop,
            )
            for i, call in enumerate(calls)
        ]
        async with asyncio.timeout(seconds + 60.0):
            await asyncio.gather(*emitters)
        await _settle(lambda: len(recorder.lateness))
    finally:
        await _end_calls(calls)

    values = sorted(recorder.lateness)
    return {
        "p50_ms": percentile(values, 50) * 1e3,
        "p99_ms": percentile(values, 99) * 1e3,
        "max_ms": (values[-1] if values else math.nan) * 1e3,
        "frames": len(values),
    }


def concurrent_calls(
    n_calls: int,
    seconds: float,
    lean: bool = True,
    *,
    stagger: bool = False,
    frame_kind: FrameKind = "output",
) -> dict[str, float | int]:
    """Sink lateness with ``n_calls`` real-time pipelines in one event loop.

    Runs its own event loop (``asyncio.run``) in the calling thread; pin the
    process to one core (``taskset -c 0``) to compare frameworks per core.
    Each call is its own ``WorkerRunner`` + ``PipelineWorker`` (source → 4
    pass-throughs → sink). Each source pushes one new 20 ms frame every 20 ms:
    frame k is due at ``start + k * 0.02`` and the producer sleeps until then
    (absolute schedule, no drift), as its own task: Pipecat has no shared
    clock, so every call keeps its own time. The sink records
    ``perf_counter() - due`` (the due time rides in ``frame.metadata``).
    Frames due in the first second are ignored as warm-up; the run lasts
    ``seconds`` in total, then the frames still in flight are waited for, so
    an overloaded run reports its whole backlog.

    Args:
        n_calls: Concurrent pipelines.
        seconds: Total run time, including the 1 s warm-up.
        lean: Lean settings (see module docstring) or Pipecat's defaults.
        stagger: Spread the calls' start phases evenly over one 20 ms period,
            as independent real calls would be. The default, ``False``, gives
            every call the same ``start``, so frame k of every call is due at
            the same instant, the schedule of voxpipe's shared metronome. The
            event loop then serves all the calls' timers in one wake-up, which
            on this kind of host is much cheaper than n separate wake-ups.
        frame_kind: ``"output"`` or ``"input"`` audio frames.

    Returns:
        ``p50_ms``, ``p99_ms``, ``max_ms`` lateness and ``frames`` measured.
    """
    if n_calls < 1 or seconds <= 1.0:
        raise ValueError("need n_calls >= 1 and seconds > 1 (the first second is warm-up)")
    return asyncio.run(_concurrent_calls(n_calls, seconds, lean, stagger, frame_kind))


# --------------------------------------------------------------------------
# 4. Idle memory per pipeline
# --------------------------------------------------------------------------


def _rss_bytes() -> int:
    """Resident set size from /proc (Linux only)."""
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


async def _idle_memory(n: int, lean: bool, method: str) -> float:
    def noop(_frame: Frame) -> None:
        pass

    # One pipeline started and ended first, so one-off costs (lazy imports,
    # class-level caches) are not charged to the measured pipelines.
    warmup = await _start_call(CONCURRENT_STAGES, _AudioSink(noop), lean)
    await _wait_started([warmup])
    await _end_calls([warmup])
    del warmup
    gc.collect()

    was_tracing = tracemalloc.is_tracing()
    if method == "tracemalloc" and not was_tracing:
        tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0] if method == "tracemalloc" else _rss_bytes()

    calls: list[_Call] = []
    try:
        for _ in range(n):
            calls.append(await _start_call(CONCURRENT_STAGES, _AudioSink(noop), lean))
        await _wait_started(calls, START_TIMEOUT_S + 0.1 * n)
        await asyncio.sleep(0.5)  # let start-up tasks finish: steady idle state
        gc.collect()
        after = tracemalloc.get_traced_memory()[0] if method == "tracemalloc" else _rss_bytes()
    finally:
        if method == "tracemalloc" and not was_tracing:
            tracemalloc.stop()
        await _end_calls(calls)
    return (after - before) / n / 1024


def idle_memory_kib(n: int = 200, lean: bool = True, *, method: str = "tracemalloc") -> float:
    """KiB of memory per idle, running pipeline (source + 4 pass-throughs + sink).

    Method (voxpipe uses the same): in a fresh event loop, start and end one
    pipeline first so one-off costs are excluded, ``gc.collect()``, then read
    ``tracemalloc``'s current traced size (tracing starts here). Create and
    start ``n`` pipelines, each its own ``WorkerRunner`` + ``PipelineWorker``,
    wait until every one has started, sleep 0.5 s so start-up work is over and
    only idle tasks remain, ``gc.collect()``, read the traced size again and
    return the difference / n / 1024. tracemalloc counts every allocation made
    through Python's allocators (objects, tasks, queues) but not memory C
    extensions allocate themselves. ``method="rss"`` uses the resident-set
    difference instead, which includes allocator slack and is noisier.

    Runs its own event loop (``asyncio.run``) in the calling thread.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    if method not in ("tracemalloc", "rss"):
        raise ValueError(f"method must be 'tracemalloc' or 'rss', not {method!r}")
    return asyncio.run(_idle_memory(n, lean, method))


# --------------------------------------------------------------------------
# Smoke test
# --------------------------------------------------------------------------


def _main() -> None:
    """Run every benchmark at small sizes (or the report sizes with --full)."""
    import argparse

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--full", action="store_true", help="report sizes (~2 min; run under taskset -c 0)")
    args = parser.parse_args()

    n_frames = 5000 if args.full else 500
    calls = (100, 200) if args.full else (20,)
    seconds = 5.0 if args.full else 2.0
    idle_n = 200 if args.full else 20

    def show(name: str, value: object) -> None:
        print(f"{name:<48} {value}", flush=True)

    for lean in (True, False):
        tag = "lean" if lean else "default"
        for stages in (8, 1):
            for kind in ("output", "input"):
                us = asyncio.run(per_frame_overhead(stages, n_frames, lean, frame_kind=kind))
                show(f"per_frame_overhead({stages}, {n_frames}) {kind} {tag}", f"{us:.2f} us")
        us = asyncio.run(per_frame_overhead(8, n_frames, lean, entry="queue"))
        show(f"per_frame_overhead(8, {n_frames}) queue_frames {tag}", f"{us:.2f} us")
        for mode in ("steady", "burst"):
            for play in (False, True):
                result = asyncio.run(interrupt_latency(mode, lean, play_realtime=play))
                label = f"interrupt_latency({mode}{', play_realtime' if play else ''}) {tag}"
                show(label, _fmt(result))
        for n in calls:
            show(f"concurrent_calls({n}, {seconds}) {tag}", _fmt(concurrent_calls(n, seconds, lean)))
        show(f"idle_memory_kib({idle_n}) {tag}", f"{idle_memory_kib(idle_n, lean):.1f} KiB")


def _fmt(result: dict[str, float | int]) -> str:
    return ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items())


if __name__ == "__main__":
    _main()
