"""voxpipe side of the voxpipe-vs-Pipecat benchmarks.

Each public function runs one workload on voxpipe and returns plain numbers with the same names and shapes as
``pipecat_side.py``, so ``run.py`` can put both next to each other. The workloads are built the way voxpipe is
meant to be used, not the way Pipecat is, because that is what a user of each framework would actually run:

* frames enter a pipeline the way a transport stage emits them: ``await head.receive(frame, DOWNSTREAM)``, so
  every pass-through stage costs a few coroutine calls in the sender's stack and never a queue hop (DESIGN §4);
* real-time pacing uses the clock's shared :class:`~voxpipe.pipeline.pacing.Metronome` — one timer wakes every
  call's tick handler in turn — with the subscribe / unsubscribe-in-``finally`` pattern of
  ``transports/simulated.py``; all pipelines of one run share one :class:`RealClock`, as calls in one server
  process would, otherwise every call would get its own metronome task;
* bot audio is :class:`TTSAudioFrame` played by the real :class:`PlayoutOutput`, paced by that metronome, with a
  :class:`QueuedStage` in front of it so frames can be queued when the interrupt lands (DESIGN §5).

``lean`` is accepted everywhere for symmetry with the Pipecat side and ignored: voxpipe has no optional
observers, metrics or RTVI processors to switch off. Nothing here prints except the ``__main__`` smoke test.
"""

from __future__ import annotations

import asyncio
import gc
import math
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from voxpipe.pipeline import (
    DOWNSTREAM,
    AudioFormat,
    AudioFrame,
    Clock,
    Direction,
    Frame,
    Pipeline,
    QueuedStage,
    RealClock,
    Stage,
    Start,
    TTSAudioFrame,
)
from voxpipe.pipeline.frames import Interrupt
from voxpipe.pipeline.trace import percentile
from voxpipe.transports.playout import PlayoutOutput

__all__ = [
    "concurrent_calls",
    "idle_memory_kib",
    "interrupt_latency",
    "per_frame_overhead",
]

SAMPLE_RATE = 16_000
FRAME_SECONDS = 0.020
AUDIO = AudioFormat(SAMPLE_RATE)
PCM_20MS = bytes(AUDIO.frame_bytes(FRAME_SECONDS))  # 640 bytes of int16 silence, shared by every frame
WARMUP_FRAMES = 200
CONCURRENT_STAGES = 4
STEADY_FRAMES = 50  # 1 s of audio
BURST_FRAMES = 500
START_TIMEOUT_S = 30.0
END_TIMEOUT_S = 10.0
SETTLE_S = 0.2
INTERRUPT_MODES = ("steady", "burst", "burst-buffered")


# ----------------------------------------------------------------------------------------- plumbing


class _StartWatch:
    """An event set when the pipeline's :class:`Start` reaches the tail.

    A :class:`QueuedStage` queues ``Start`` behind nothing but still hands it over on its worker task, so "the
    pipeline is running" is only certain once ``Start`` has come out of the last stage.
    """

    def __init__(self) -> None:
        self.started = asyncio.Event()

    def see(self, frame: Frame) -> None:
        if isinstance(frame, Start):
            self.started.set()


@asynccontextmanager
async def _running(pipeline: Pipeline, watch: _StartWatch) -> AsyncIterator[asyncio.Task[str]]:
    """Run ``pipeline`` in its own task until the block exits, then drain it with ``end()`` (cancel on error).

    The run task is separate from the caller's task on purpose: the caller plays the transport pushing frames
    in, exactly as a transport's own task would.
    """
    run_task = asyncio.create_task(pipeline.run(), name=f"{pipeline.name}-run")
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            await _first_of(watch.started.wait(), run_task)
        yield run_task
    except BaseException:
        pipeline.cancel("benchmark failed")
        await asyncio.gather(run_task, return_exceptions=True)
        raise
    await _stop(pipeline, run_task)


async def _first_of(wait: Coroutine[Any, Any, Any], run_task: asyncio.Task[str]) -> None:
    """Await ``wait`` unless the run task finishes first (then surface its error instead of hanging)."""
    waiter = asyncio.ensure_future(wait)
    done, _ = await asyncio.wait({waiter, run_task}, return_when=asyncio.FIRST_COMPLETED)
    if waiter not in done:
        waiter.cancel()
        await run_task  # raises the stage failure, if any
        raise RuntimeError("pipeline finished before it started")


async def _stop(pipeline: Pipeline, run_task: asyncio.Task[str]) -> None:
    """Drain with ``end()``; fall back to ``cancel()`` if the drain does not finish in time."""
    if run_task.done():
        await run_task
        return
    await pipeline.end()
    try:
        await asyncio.wait_for(asyncio.shield(run_task), END_TIMEOUT_S)
    except TimeoutError:
        pipeline.cancel("benchmark teardown timed out")
        await run_task


async def _sleep_until(deadline: float) -> None:
    """Sleep until ``perf_counter()`` reaches ``deadline`` (absolute schedule, no drift)."""
    delay = deadline - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)


# ------------------------------------------------------------------------------- 1. per-frame overhead


class _CountingSink(Stage):
    """Counts audio frames and timestamps the one that completes the expected count; forwards the rest.

    Audio stops here, as at an output transport; control frames go on so ``End`` can drain out of the tail.
    """

    def __init__(self, watch: _StartWatch) -> None:
        super().__init__(name="sink")
        self.watch = watch
        self.count = 0
        self.target = 0
        self.t_done = 0.0
        self.done = asyncio.Event()

    def arm(self, target: int) -> None:
        self.count, self.target, self.t_done = 0, target, 0.0
        self.done.clear()

    async def process(self, frame: Frame, direction: Direction) -> None:
        if isinstance(frame, AudioFrame):
            self.count += 1
            if self.count == self.target:
                self.t_done = time.perf_counter()
                self.done.set()
            return
        self.watch.see(frame)
        await self.push(frame, direction)


async def per_frame_overhead(n_stages: int, n_frames: int, lean: bool = True) -> float:
    """Microseconds per frame per stage for a back-to-back burst through ``n_stages`` pass-through stages.

    The pipeline (``n_stages`` plain :class:`Stage` s → counting sink) is started once, warmed up with 200
    frames, then timed from just before the first push until the sink has counted all ``n_frames``; the result
    is ``elapsed / (n_frames * n_stages)`` with nothing subtracted. Frames are created before the clock starts
    (each a distinct object around the one shared 640-byte buffer), so only the runtime's own work is timed —
    the same as the Pipecat side.
    """
    del lean  # nothing to switch off in voxpipe
    if n_stages < 1 or n_frames < 1:
        raise ValueError("n_stages and n_frames must be >= 1")
    watch = _StartWatch()
    sink = _CountingSink(watch)
    pipeline = Pipeline([*(Stage(name=f"s{i}") for i in range(n_stages)), sink], name="overhead")
    head = pipeline.stages[0]
    elapsed = 0.0
    async with _running(pipeline, watch):
        for count in (WARMUP_FRAMES, n_frames):
            frames = [AudioFrame(pcm=PCM_20MS, sample_rate=SAMPLE_RATE) for _ in range(count)]
            sink.arm(count)
            t0 = time.perf_counter()
            for frame in frames:
                await head.receive(frame, DOWNSTREAM)
            await asyncio.wait_for(sink.done.wait(), 30.0 + count * (n_stages + 2) * 1e-3)
            elapsed = sink.t_done - t0
    return elapsed * 1e6 / (n_frames * n_stages)


# ------------------------------------------------------------------------------ 2. interrupt latency


class _RecordingSink:
    """An :class:`~voxpipe.transports.playout.AudioSink` that records when audio was played and cut.

    Times are ``perf_counter()`` so they compare directly with the benchmark's ``t0``.
    """

    def __init__(self) -> None:
        self.plays: list[float] = []
        self.cuts: list[float] = []

    def play(self, at: float, pcm: bytes) -> None:
        self.plays.append(time.perf_counter())

    def cut(self, at: float) -> None:
        self.cuts.append(time.perf_counter())


class _AsyncWork(QueuedStage):
    """Pass-through with an inbox and a worker, standing in for a TTS stage: frames can wait here.

    Bot audio yields once to the loop, the smallest piece of "real async work"; other frames pass straight on,
    so upstream reports from the output are not delayed inside the metronome's tick.
    """

    async def process(self, frame: Frame, direction: Direction) -> None:
        if direction is DOWNSTREAM and isinstance(frame, TTSAudioFrame):
            await asyncio.sleep(0)
        await self.push(frame, direction)


class _ObservedOutput(PlayoutOutput):
    """The real playout output, instrumented: when bot audio reached it and when its interrupt flush ended."""

    def __init__(self, sink: _RecordingSink, watch: _StartWatch) -> None:
        super().__init__(AUDIO, sink)
        self.recorder = sink
        self.watch = watch
        self.arrivals: list[float] = []
        self.t_interrupt_seen = math.nan
        self.t_flushed = math.nan

    async def process(self, frame: Frame, direction: Direction) -> None:
        if isinstance(frame, TTSAudioFrame):
            self.arrivals.append(time.perf_counter())  # only frames that passed the epoch gate get here
        self.watch.see(frame)
        await super().process(frame, direction)

    async def on_interrupt(self, interrupt: Interrupt) -> None:
        self.t_interrupt_seen = time.perf_counter()
        await super().on_interrupt(interrupt)
        self.t_flushed = time.perf_counter()


def _bot_audio(n: int) -> list[TTSAudioFrame]:
    return [TTSAudioFrame(epoch=0, pcm=PCM_20MS, sample_rate=SAMPLE_RATE) for _ in range(n)]


async def _feed(head: Stage, mode: str, output: _ObservedOutput) -> int:
    """Push the reply's audio per ``mode``; return how many frames were pushed."""
    if mode == "steady":
        frames = _bot_audio(STEADY_FRAMES)
        start = time.perf_counter()
        for k, frame in enumerate(frames):
            await _sleep_until(start + k * FRAME_SECONDS)
            await head.receive(frame, DOWNSTREAM)
        await _sleep_until(start + len(frames) * FRAME_SECONDS)
        return len(frames)
    frames = _bot_audio(BURST_FRAMES)
    for frame in frames:  # never yields: the QueuedStage's inbox takes the whole burst
        await head.receive(frame, DOWNSTREAM)
    if mode == "burst-buffered":  # all of it in the playout buffer, and the output in mid-reply
        await _wait_for(lambda: len(output.arrivals) >= len(frames) and len(output.recorder.plays) >= 2, limit=10.0)
    return len(frames)


async def _wait_for(condition: Callable[[], bool], limit: float) -> None:
    deadline = time.perf_counter() + limit
    while not condition():
        if time.perf_counter() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.001)


async def interrupt_latency(mode: str, lean: bool = True) -> dict[str, float | int]:
    """How fast a confirmed barge-in silences the output, and whether any stale audio is played after it.

    Pipeline: source → :class:`QueuedStage` pass-through (async work, frames queue here) → pass-through →
    :class:`PlayoutOutput` playing into a recording sink, paced by the shared 20 ms metronome.

    * ``"steady"``: one 20 ms ``TTSAudioFrame`` every 20 ms for 1 s, then the interrupt at the next slot;
    * ``"burst"``: 500 frames pushed back to back, then the interrupt at once (they are still in the inbox);
    * ``"burst-buffered"`` (voxpipe only): the same burst, but the interrupt comes once all 500 frames have
      reached the output's playout buffer and two have been played — ~10 s of audio the flush must drop, and a
      frame in mid-play that must be cut.

    ``t0 = perf_counter()`` right before ``source.interrupt("barge-in")``. Then the pipeline settles for
    200 ms and is cancelled.

    Returns:
        ``to_silence_ms``: end of ``PlayoutOutput.on_interrupt`` (buffer flushed, the frame playing cut, the
        stop reported upstream) minus t0 — also when nothing was playing, then it is the time the interrupt
        reached the output. ``stale_after_interrupt``: frames the sink played after t0 (all audio is of the
        interrupted epoch). ``stale_reaching_output``: old-epoch frames that got past the output's epoch gate
        after t0. ``interrupt_reach_ms``: arrival of the interrupt at the output minus t0. ``dropped``:
        frames that never reached the output. ``cut``: 1 if a frame was playing and was cut. ``played``: frames
        the sink played in all (a sanity check that the output really was playing).
    """
    del lean
    if mode not in INTERRUPT_MODES:
        raise ValueError(f"mode must be one of {INTERRUPT_MODES}, not {mode!r}")
    watch = _StartWatch()
    sink = _RecordingSink()
    output = _ObservedOutput(sink, watch)
    source = Stage(name="source")
    pipeline = Pipeline([source, _AsyncWork(name="work"), Stage(name="pass"), output], name="interrupt")
    run_task = asyncio.create_task(pipeline.run(), name="interrupt-run")
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            await _first_of(watch.started.wait(), run_task)
        pushed = await _feed(source, mode, output)
        t0 = time.perf_counter()
        await source.interrupt("barge-in")
        await asyncio.sleep(SETTLE_S)
    finally:
        pipeline.cancel("benchmark done")
        await asyncio.gather(run_task, return_exceptions=True)
    if run_task.exception() is not None:
        raise RuntimeError("interrupt pipeline failed") from run_task.exception()
    return {
        "to_silence_ms": (output.t_flushed - t0) * 1e3,
        "stale_after_interrupt": sum(t > t0 for t in sink.plays),
        "stale_reaching_output": sum(t > t0 for t in output.arrivals),
        "interrupt_reach_ms": (output.t_interrupt_seen - t0) * 1e3,
        "dropped": pushed - len(output.arrivals),
        "cut": int(bool(sink.cuts)),
        "played": len(sink.plays),
    }


# ------------------------------------------------------------------------------- 3. concurrent calls


@dataclass(frozen=True, slots=True, kw_only=True)
class _DueAudioFrame(AudioFrame):
    """Caller audio that knows the metronome tick it was due at, so the sink can measure its lateness."""

    due: float


class _Window:
    """Which frames count: set ``open`` after the warm-up; shared by every call's sink."""

    def __init__(self) -> None:
        self.open = False


class _MetronomeSource(Stage):
    """A transport input: one 20 ms frame per tick of the clock's shared metronome (as ``SimulatedInput``).

    ``flowing=False`` keeps the subscription but sends nothing — an idle call, for the memory benchmark.
    """

    def __init__(self, *, flowing: bool = True) -> None:
        super().__init__(name="source")
        self.flowing = flowing
        self.failure: BaseException | None = None

    async def start(self) -> None:
        metronome = self.clock.metronome(FRAME_SECONDS)
        self.spawn(metronome.ticking(self._tick, self._tick_failed, group=self.pipeline), name="source-ticks")

    def _tick_failed(self, exc: BaseException) -> None:
        """A failed tick would silently stop this call's audio; stop the call instead so the run notices."""
        self.failure = exc
        self.pipeline.cancel("source tick failed")

    async def _tick(self, due: float) -> None:
        if self.flowing:
            await self.push(_DueAudioFrame(pcm=PCM_20MS, sample_rate=SAMPLE_RATE, due=due))


class _LatenessSink(Stage):
    """Records ``clock.now() - due`` for every frame that arrives while the window is open."""

    def __init__(self, window: _Window, watch: _StartWatch) -> None:
        super().__init__(name="sink")
        self.window = window
        self.watch = watch
        self.lateness: list[float] = []

    async def process(self, frame: Frame, direction: Direction) -> None:
        if isinstance(frame, _DueAudioFrame):
            if self.window.open:
                self.lateness.append(self.clock.now() - frame.due)
            return
        self.watch.see(frame)
        await self.push(frame, direction)


@dataclass
class _Call:
    pipeline: Pipeline
    source: _MetronomeSource
    sink: _LatenessSink
    watch: _StartWatch
    run_task: asyncio.Task[str]


def _start_call(clock: Clock, window: _Window, *, flowing: bool) -> _Call:
    """Build source → 4 pass-throughs → sink on ``clock`` and start its ``run()`` task."""
    watch = _StartWatch()
    source = _MetronomeSource(flowing=flowing)
    sink = _LatenessSink(window, watch)
    passes = [Stage(name=f"s{i}") for i in range(CONCURRENT_STAGES)]
    pipeline = Pipeline([source, *passes, sink], clock=clock, name="call")
    run_task = asyncio.create_task(pipeline.run(), name="call-run")
    return _Call(pipeline, source, sink, watch, run_task)


async def _wait_started(calls: Sequence[_Call], limit: float) -> None:
    async with asyncio.timeout(limit):
        await asyncio.gather(*(_first_of(call.watch.started.wait(), call.run_task) for call in calls))


async def _end_calls(calls: Sequence[_Call]) -> None:
    await asyncio.gather(*(_stop(call.pipeline, call.run_task) for call in calls))
    failures = [call.source.failure for call in calls if call.source.failure is not None]
    if failures:
        raise RuntimeError(f"{len(failures)} call(s) had a failing tick") from failures[0]


async def _concurrent_calls(n_calls: int, seconds: float, shared_clock: bool) -> dict[str, float | int]:
    shared = RealClock()
    window = _Window()
    calls = [_start_call(shared if shared_clock else RealClock(), window, flowing=True) for _ in range(n_calls)]
    try:
        await _wait_started(calls, START_TIMEOUT_S + 0.1 * n_calls)
        await asyncio.sleep(1.0)  # warm-up second: not measured
        window.open = True
        await asyncio.sleep(seconds - 1.0)
        window.open = False
    finally:
        await _end_calls(calls)
    values = sorted(x for call in calls for x in call.sink.lateness)
    return {
        "p50_ms": percentile(values, 50) * 1e3,
        "p99_ms": percentile(values, 99) * 1e3,
        "max_ms": (values[-1] if values else math.nan) * 1e3,
        "frames": len(values),
    }


def concurrent_calls(
    n_calls: int, seconds: float, lean: bool = True, *, shared_clock: bool = True
) -> dict[str, float | int]:
    """Sink lateness with ``n_calls`` real-time pipelines in one event loop.

    Runs its own event loop (``asyncio.run``); pin the process to one core (``taskset -c 0``) to compare per
    core. Each call is source → 4 pass-throughs → sink; the source pushes one 20 ms frame per tick of the
    shared 20 ms metronome and the sink records ``clock.now() - due``. Frames in the first second are ignored.

    ``shared_clock=False`` gives every call its own :class:`RealClock`, hence its own metronome task whose phase
    is set by when the call started — the per-call-timer design the metronome replaces, kept for comparison.

    Returns:
        ``p50_ms``, ``p99_ms``, ``max_ms`` lateness and ``frames`` measured.
    """
    del lean
    if n_calls < 1 or seconds <= 1.0:
        raise ValueError("need n_calls >= 1 and seconds > 1 (the first second is warm-up)")
    return asyncio.run(_concurrent_calls(n_calls, seconds, shared_clock))


# ---------------------------------------------------------------------------------- 4. idle memory


async def _idle_memory(n: int) -> float:
    clock = RealClock()
    window = _Window()
    # One call started and ended first, so one-off costs (lazy imports, caches) are not charged to the others.
    warmup = _start_call(clock, window, flowing=False)
    await _wait_started([warmup], START_TIMEOUT_S)
    await _end_calls([warmup])
    del warmup
    gc.collect()

    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    calls: list[_Call] = []
    try:
        calls.extend(_start_call(clock, window, flowing=False) for _ in range(n))
        await _wait_started(calls, START_TIMEOUT_S + 0.1 * n)
        await asyncio.sleep(0.5)  # let start-up finish: only idle tasks and the ticking metronome remain
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        if not was_tracing:
            tracemalloc.stop()
        await _end_calls(calls)
    return (after - before) / n / 1024


def idle_memory_kib(n: int = 200, lean: bool = True) -> float:
    """KiB of memory per idle, running call (metronome-subscribed source + 4 pass-throughs + sink).

    Same method as the Pipecat side: in a fresh event loop, start and end one call so one-off costs are
    excluded, ``gc.collect()``, start ``tracemalloc`` and read the traced size; start ``n`` calls (one shared
    clock), wait until each has started, sleep 0.5 s, ``gc.collect()``, read again; return the difference / n.
    """
    del lean
    if n < 1:
        raise ValueError("n must be >= 1")
    return asyncio.run(_idle_memory(n))


# -------------------------------------------------------------------------------------- smoke test


def _main() -> None:
    """Run every benchmark once at small sizes."""
    print(f"per_frame_overhead(8, 5000): {asyncio.run(per_frame_overhead(8, 5000)):.2f} us")
    for mode in INTERRUPT_MODES:
        print(f"interrupt_latency({mode}): {asyncio.run(interrupt_latency(mode))}")
    print(f"concurrent_calls(100, 2.0): {concurrent_calls(100, 2.0)}")
    print(f"idle_memory_kib(50): {idle_memory_kib(50):.1f} KiB")


if __name__ == "__main__":
    _main()
