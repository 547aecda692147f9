import asyncio
import gc
from typing import Any

import numpy as np
import pytest

from tests.helpers import Collect
from voxpipe.pipeline import (
    DOWNSTREAM,
    AudioFormat,
    AudioFrame,
    Cancel,
    Direction,
    End,
    EndOfTurn,
    ErrorFrame,
    ErrorPolicy,
    Frame,
    Interrupt,
    Pipeline,
    PipelineBuildError,
    QueuedStage,
    SpeakableChunk,
    Stage,
    TextDelta,
    TTSAudioFrame,
    VirtualClock,
    WordMark,
)
from voxpipe.pipeline.errors import StrayCancellation
from voxpipe.pipeline.heap import HEAP
from voxpipe.stages.tts import StreamingTTSStage
from voxpipe.transports.paced import PacedStage


def frame(i: int = 0) -> AudioFrame:
    return AudioFrame(pcm=bytes(640), sample_rate=16000, pts=i * 320)


async def feed_and_end(pipeline: Pipeline, frames: list[Frame]) -> str:
    run = asyncio.create_task(pipeline.run())
    await asyncio.sleep(0)
    for f in frames:
        await pipeline.stages[0].receive(f, DOWNSTREAM)
    await pipeline.end()
    return await asyncio.wait_for(run, 5)


async def test_frames_pass_through_in_order():
    sink = Collect()
    pipeline = Pipeline([Stage(name="a"), Stage(name="b"), sink])
    outcome = await feed_and_end(pipeline, [frame(i) for i in range(10)])
    assert outcome == "ended"
    pts = [f.pts for f in sink.frames if isinstance(f, AudioFrame)]
    assert pts == [i * 320 for i in range(10)]


async def test_a_plain_async_function_is_a_stage():
    async def shout(f: Frame):
        if isinstance(f, TextDelta):
            return TextDelta(text=f.text.upper())
        return f

    sink = Collect()
    pipeline = Pipeline([shout, sink])
    await feed_and_end(pipeline, [TextDelta(text="hi")])
    assert [f.text for f in sink.frames if isinstance(f, TextDelta)] == ["HI"]


def test_building_wrongly_fails_with_the_stage_named():
    with pytest.raises(PipelineBuildError, match="no stages"):
        Pipeline([])
    stage = Stage(name="twice")
    with pytest.raises(PipelineBuildError, match="'twice' appears twice"):
        Pipeline([stage, Stage(name="x"), stage])
    with pytest.raises(PipelineBuildError, match="two stages are named 'a'"):
        Pipeline([Stage(name="a"), Stage(name="a")])
    with pytest.raises(PipelineBuildError, match="neither a Stage"):
        Pipeline([Stage(), 42])  # type: ignore[list-item]
    linked = Stage(name="linked")
    Pipeline([linked])
    with pytest.raises(PipelineBuildError, match="already belongs"):
        Pipeline([linked])


def test_wrong_audio_format_between_stages_fails_at_build_time():
    source = Stage(name="tts")
    source.produces = AudioFormat(22050)
    sink = Stage(name="speaker")
    sink.consumes = AudioFormat(16000)
    with pytest.raises(PipelineBuildError, match=r"'speaker' expects 16000 Hz mono audio but stage 'tts'.*22050 Hz"):
        Pipeline([source, Stage(name="mid"), sink])


class Boom(Stage):
    def __init__(self, policy: ErrorPolicy = ErrorPolicy.STOP) -> None:
        super().__init__(name="boom")
        self.error_policy = policy

    async def process(self, frame: Frame, direction: Direction) -> None:
        if isinstance(frame, TextDelta) and frame.text == "bad":
            raise ValueError("bad delta")
        await self.push(frame, direction)


async def test_an_exception_stops_the_pipeline_and_run_reraises_it():
    pipeline = Pipeline([Boom(), Collect()])
    run = asyncio.create_task(pipeline.run())
    await asyncio.sleep(0)
    await pipeline.stages[0].receive(TextDelta(text="bad"), DOWNSTREAM)
    with pytest.raises(ValueError, match="bad delta"):
        await asyncio.wait_for(run, 5)
    assert pipeline.errors[0].stage == "boom"


async def test_skip_frame_policy_reports_and_carries_on():
    upstream = Collect("first")

    class Head(Stage):
        def __init__(self) -> None:
            super().__init__(name="head")
            self.errors: list[ErrorFrame] = []

        async def process(self, frame: Frame, direction: Direction) -> None:
            if isinstance(frame, ErrorFrame):
                self.errors.append(frame)
            await self.push(frame, direction)

    head = Head()
    sink = Collect()
    pipeline = Pipeline([head, upstream, Boom(ErrorPolicy.SKIP_FRAME), sink])
    await feed_and_end(pipeline, [TextDelta(text="ok"), TextDelta(text="bad"), TextDelta(text="ok2")])
    assert [f.text for f in sink.frames if isinstance(f, TextDelta)] == ["ok", "ok2"]
    assert len(head.errors) == 1 and "bad delta" in head.errors[0].error and not head.errors[0].fatal


def test_a_skip_turn_failure_in_a_queued_stage_sends_its_interrupt_all_the_way():
    """The failing worker raises the skip-turn interrupt itself; it is done with its frame by then, so the interrupt
    does not cancel the very task carrying it at the first await of a stage's cancel."""

    class FailingTTS(QueuedStage):
        error_policy = ErrorPolicy.SKIP_TURN

        def __init__(self) -> None:
            super().__init__(name="tts")
            self.cancel_sent = False

        async def process(self, frame: Frame, direction: Direction) -> None:
            if isinstance(frame, SpeakableChunk):
                raise ConnectionError("provider said 500")
            await self.push(frame, direction)

        async def on_interrupt(self, interrupt: Interrupt) -> None:
            await asyncio.sleep(0)  # as a provider's cancel message would: the task yields here
            self.cancel_sent = True

    clock = VirtualClock()
    head, tts, sink = Collect("head"), FailingTTS(), Collect("out")
    pipeline = Pipeline([head, tts, sink], clock=clock)

    async def main() -> None:
        run = asyncio.create_task(pipeline.run())
        await asyncio.sleep(0)
        await head.receive(SpeakableChunk(epoch=0, text="hello"), DOWNSTREAM)
        await clock.sleep(0.1)
        await pipeline.end()
        await run

    clock.run(main())
    assert tts.cancel_sent
    assert [f.reason for f in sink.frames if isinstance(f, Interrupt)] == ["error in tts"]
    assert [f.reason for f in head.frames if isinstance(f, Interrupt)] == ["error in tts"]


class Slow(QueuedStage):
    """Takes `delay` of clock time per data frame."""

    def __init__(self, delay: float, name: str = "slow") -> None:
        super().__init__(name=name)
        self.delay = delay
        self.started: list[Frame] = []
        self.cancelled: list[Frame] = []

    async def process(self, frame: Frame, direction: Direction) -> None:
        if isinstance(frame, (TextDelta, SpeakableChunk)):
            self.started.append(frame)
            try:
                await self.clock.sleep(self.delay)
            except asyncio.CancelledError:
                self.cancelled.append(frame)
                raise
        await self.push(frame, direction)


def test_end_drains_queued_work_before_run_returns():
    clock = VirtualClock()
    sink = Collect()
    pipeline = Pipeline([Stage(name="head"), Slow(0.5), sink], clock=clock)

    async def main() -> float:
        run = asyncio.create_task(pipeline.run())
        await asyncio.sleep(0)
        for i in range(4):
            await pipeline.stages[0].receive(TextDelta(text=str(i)), DOWNSTREAM)
        await pipeline.end()
        await run
        return clock.now()

    elapsed = clock.run(main())
    assert [f.text for f in sink.frames if isinstance(f, TextDelta)] == ["0", "1", "2", "3"]
    assert isinstance(sink.frames[-1], End)
    assert elapsed == pytest.approx(2.0)


def test_a_worker_takes_no_queued_frame_once_the_run_is_over():
    # The stages stop from the output back; while one in front of a queued stage is still stopping (a model thread
    # it waits for), that stage's worker must not start the next frame in its inbox: the call is over, and the work
    # would fail on what its own stop() already closed.
    class SlowToStop(Stage):
        async def stop(self) -> None:
            await self.clock.sleep(2.0)
            await super().stop()

    clock = VirtualClock()
    slow = Slow(0.5)
    pipeline = Pipeline([SlowToStop(name="head"), slow, Collect()], clock=clock)

    async def main() -> str:
        run = asyncio.create_task(pipeline.run())
        await asyncio.sleep(0)
        for i in range(3):
            await pipeline.stages[0].receive(TextDelta(text=str(i)), DOWNSTREAM)
        await clock.sleep(0.1)
        pipeline.cancel()
        return await run

    assert clock.run(main()) == "cancelled"
    assert [f.text for f in slow.started] == ["0"], "frames still queued when the run ended were not started"


def test_cancel_aborts_without_waiting_and_leaves_no_task():
    clock = VirtualClock()
    slow = Slow(100.0)
    pipeline = Pipeline([Stage(name="head"), slow, Collect()], clock=clock)

    async def main() -> tuple[str, float, set[asyncio.Task]]:
        run = asyncio.create_task(pipeline.run())
        await asyncio.sleep(0)
        await pipeline.stages[0].receive(TextDelta(text="x"), DOWNSTREAM)
        await clock.sleep(1.0)
        pipeline.cancel()
        outcome = await run
        return outcome, clock.now(), asyncio.all_tasks() - {asyncio.current_task()}

    outcome, elapsed, left = clock.run(main())
    assert outcome == "cancelled"
    assert elapsed == pytest.approx(1.0)
    assert slow.cancelled, "the in-flight work was cancelled"
    assert left == set()


class _FlushesOnStop(Stage):
    """Emits what it still holds when stopped, as an STT delivers a pending final."""

    async def stop(self) -> None:
        await self.push(TextDelta(text="late"))


class _RefusesOnceStopped(Stage):
    """Cannot take work once stopped, as a reasoner whose client is closed."""

    def __init__(self) -> None:
        super().__init__(name="refuses")
        self.stopped = False

    async def stop(self) -> None:
        self.stopped = True

    async def process(self, frame, direction) -> None:
        if self.stopped:
            raise RuntimeError("the stage is not started")
        await self.push(frame, direction)


def test_work_meeting_a_stopped_stage_while_the_pipeline_stops_does_not_turn_a_cancel_into_a_failure():
    clock = VirtualClock()
    refuses = _RefusesOnceStopped()
    pipeline = Pipeline([Stage(name="head"), _FlushesOnStop(name="flushes"), refuses, Collect()], clock=clock)

    async def main() -> str:
        run = asyncio.create_task(pipeline.run())
        await asyncio.sleep(0)
        pipeline.cancel()
        return await run

    assert clock.run(main()) == "cancelled"
    [error] = pipeline.errors
    assert error.stage == "refuses" and not error.fatal and "not started" in error.error


def test_interrupt_overtakes_queued_data_and_cancels_stale_work():
    clock = VirtualClock()
    slow = Slow(1.0)
    sink = Collect()
    head = Stage(name="head")
    pipeline = Pipeline([head, slow, sink], clock=clock)

    async def main() -> None:
        run = asyncio.create_task(pipeline.run())
        await asyncio.sleep(0)
        for i in range(5):
            await head.receive(SpeakableChunk(epoch=0, text=f"old{i}"), DOWNSTREAM)
        await clock.sleep(0.5)  # old0 is being worked on, old1..old4 are queued
        assert slow.queued == 4
        interrupt = await head.interrupt()
        assert slow.queued == 0, "stale queued frames dropped at once"
        assert isinstance(sink.frames[-1], Interrupt) and sink.frames[-1].epoch == interrupt.epoch
        await head.push(SpeakableChunk(epoch=interrupt.epoch, text="new"))
        await clock.sleep(2.0)
        await pipeline.end()
        await run

    clock.run(main())
    texts = [f.text for f in sink.frames if isinstance(f, SpeakableChunk)]
    assert texts == ["new"]
    assert [f.text for f in slow.cancelled] == ["old0"]


class ToyStreamingTTS(StreamingTTSStage):
    """A third-party provider: its receiver hands every piece it gets to emit_audio(), of whatever reply."""

    async def open_reply(self, epoch: int) -> None:
        pass

    async def send_text(self, epoch: int, text: str) -> str | None:
        return text

    async def finish_reply(self, epoch: int) -> None:
        pass

    async def cancel_reply(self, epoch: int) -> None:
        pass


def test_audio_of_a_cut_reply_does_not_restart_the_timeline_of_the_reply_under_way():
    loud = np.full(1600, 3000, np.int16).tobytes()
    pause = bytes(1600)  # 800 silent samples
    clock = VirtualClock()
    tts, sink = ToyStreamingTTS(AudioFormat(16000), name="tts"), Collect()
    pipeline = Pipeline([Stage(name="head"), tts, sink], clock=clock)

    async def main() -> int:
        run = asyncio.create_task(pipeline.run())
        await asyncio.sleep(0)
        await tts.emit_audio(0, loud)
        epoch = (await pipeline.interrupt(tts)).epoch  # a barge-in: the next reply starts
        await tts.emit_audio(epoch, loud, (WordMark("one", 0, 1600),))
        await tts.emit_audio(0, loud)  # the cut reply's receiver hands over one last piece
        await tts.emit_audio(epoch, pause + loud, (WordMark("two", 2400, 4000),))  # a pause, then word two
        pipeline.cancel()
        await run
        return epoch

    epoch = clock.run(main())
    replies = [(f.pts, f.samples, f.words) for f in sink.frames if isinstance(f, TTSAudioFrame) and f.epoch == epoch]
    assert replies == [
        (0, 1600, (WordMark("one", 0, 1600),)),
        (1600, 2400, (WordMark("two", 2400, 4000),)),  # on from the first, pause kept: no leading-silence trim
    ]


def test_the_words_of_a_piece_trimmed_as_leading_silence_join_the_first_audible_frame_as_words():
    clock = VirtualClock()
    tts, sink = ToyStreamingTTS(AudioFormat(16000), name="tts"), Collect()
    pipeline = Pipeline([Stage(name="head"), tts, sink], clock=clock)

    async def main() -> None:
        run = asyncio.create_task(pipeline.run())
        await asyncio.sleep(0)
        await tts.emit_audio(0, bytes(640), (WordMark("Hmm,", 0, 320),), "Hmm,")  # a soft word, trimmed whole
        await tts.emit_audio(0, np.full(1600, 3000, np.int16).tobytes(), (WordMark("four", 320, 1920),), "four")
        pipeline.cancel()
        await run

    clock.run(main())
    [frame] = [f for f in sink.frames if isinstance(f, TTSAudioFrame)]
    assert frame.text == "Hmm, four"
    assert [m.word for m in frame.words] == ["Hmm,", "four"]


def test_bounded_queue_applies_back_pressure():
    clock = VirtualClock()
    slow = Slow(0.1)
    slow.max_queued = 3
    head = Stage(name="head")
    pipeline = Pipeline([head, slow, Collect()], clock=clock)
    depths: list[int] = []

    async def main() -> None:
        run = asyncio.create_task(pipeline.run())
        await asyncio.sleep(0)
        for i in range(10):
            await head.push(TextDelta(text=str(i)))
            depths.append(slow.queued)
        await pipeline.end()
        await run

    clock.run(main())
    assert max(depths) <= 3


def test_run_twice_is_refused():
    pipeline = Pipeline([Stage()], clock=VirtualClock())

    async def main() -> None:
        run = asyncio.create_task(pipeline.run())
        await asyncio.sleep(0)
        await pipeline.end()
        await run
        with pytest.raises(RuntimeError, match="already running or has run"):
            await pipeline.run()

    VirtualClock().run(main())


async def test_running_pipelines_hold_the_heap_frozen_and_the_last_one_out_unfreezes_it():
    frozen_while_running: list[int] = []

    class Probe(Stage):
        async def process(self, frame: Frame, direction: Direction) -> None:
            frozen_while_running.append(gc.get_freeze_count())
            await self.push(frame, direction)

    assert gc.get_freeze_count() == 0
    first, second = Pipeline([Probe(), Collect()]), Pipeline([Probe(), Collect()])
    first_run = asyncio.create_task(first.run())
    second_run = asyncio.create_task(second.run())
    await asyncio.sleep(0.01)
    assert HEAP.holders == 2 and gc.get_freeze_count() > 0  # models and modules: skipped by every collection
    garbage_made_later = [[]]
    garbage_made_later[0].append(garbage_made_later)  # a cycle made while frozen: the collector still sees it
    del garbage_made_later
    assert gc.collect() >= 1
    await first.end()
    await first_run
    assert HEAP.holders == 1 and gc.get_freeze_count() > 0, "the second pipeline still runs"
    await second.end()
    await second_run
    assert HEAP.holders == 0 and gc.get_freeze_count() == 0
    assert frozen_while_running and all(count > 0 for count in frozen_while_running)
    with pytest.raises(RuntimeError, match="without a matching hold"):
        HEAP.release()


async def test_a_pipeline_can_leave_the_heap_alone():
    pipeline = Pipeline([Stage(), Collect()], freeze_heap=False)
    run = asyncio.create_task(pipeline.run())
    await asyncio.sleep(0.01)
    assert gc.get_freeze_count() == 0
    await pipeline.end()
    await run


# ------------------------------------------------------------------------------ the metronome and back-pressure


class Ticker(PacedStage):
    """A real-time source: one audio frame per tick."""

    def __init__(self, name: str) -> None:
        super().__init__(name=name)
        self.ticks = 0

    async def tick(self, now: float) -> None:
        self.ticks += 1
        await self.push(frame(self.ticks))


async def keeps_ticking(clock: VirtualClock, ticker: Any, pipeline: Pipeline, run: asyncio.Task[str]) -> None:
    """The other call on the clock ticks on for a second (every 20 ms), then is cancelled cleanly."""
    ticks = ticker.ticks
    await clock.sleep(1.0)
    assert ticker.ticks - ticks >= 49, "the other call kept ticking"
    pipeline.cancel()
    assert await asyncio.wait_for(run, 5) == "cancelled"


class Stuck(QueuedStage):
    """A queued stage whose provider never answers."""

    async def process(self, frame: Frame, direction: Direction) -> None:
        if isinstance(frame, AudioFrame):
            await asyncio.get_running_loop().create_future()
        await self.push(frame, direction)


def test_a_tick_never_waits_on_back_pressure_and_the_stage_behind_is_reported_once():
    """A stuck stage of one call fills its inbox from the metronome's tick: the tick queues beyond max_queued
    instead of waiting, so the metronome every call shares keeps ticking, also after that call is cancelled."""
    clock = VirtualClock()
    a_in, b_in = Ticker("a-in"), Ticker("b-in")
    stuck = Stuck(name="stt", max_queued=4)
    a = Pipeline([a_in, stuck, Collect()], clock=clock, name="a", freeze_heap=False)
    b = Pipeline([b_in, Collect()], clock=clock, name="b", freeze_heap=False)

    async def main() -> tuple[int, int, int]:
        runs = asyncio.create_task(a.run()), asyncio.create_task(b.run())
        await clock.sleep(1.0)
        a_ticks, queued = a_in.ticks, stuck.queued
        a.cancel()
        await asyncio.wait_for(runs[0], 5)
        ticks_after_a = b_in.ticks
        await clock.sleep(1.0)
        b.cancel()
        await asyncio.wait_for(runs[1], 5)
        return a_ticks, queued, b_in.ticks - ticks_after_a

    a_ticks, queued, b_ticks_after_a = clock.run(main())
    assert a_ticks == b_in.ticks - b_ticks_after_a >= 49, "both calls ticked every 20 ms"
    assert queued == a_ticks - 1, "every frame queued: one is with the stuck worker"
    assert b_ticks_after_a >= 49
    [behind] = a.errors
    assert behind.stage == "stt" and not behind.fatal
    assert "behind real time: 5 frames queued (max_queued=4)" in behind.error


def test_a_sender_waiting_on_back_pressure_is_released_when_the_run_is_over():
    clock = VirtualClock()
    head = Stage(name="head")
    slow = Slow(100.0)
    slow.max_queued = 2
    pipeline = Pipeline([head, slow, Collect()], clock=clock, freeze_heap=False)

    async def main() -> bool:
        run = asyncio.create_task(pipeline.run())
        await asyncio.sleep(0)
        for i in range(3):  # one with the worker, two queued: full
            await head.push(TextDelta(text=str(i)))
        ending = asyncio.create_task(pipeline.end())  # waits for room
        await clock.sleep(1.0)
        assert not ending.done()
        pipeline.cancel()
        assert await asyncio.wait_for(run, 5) == "cancelled"
        await asyncio.wait_for(ending, 5)
        return ending.done()

    assert clock.run(main())


# ------------------------------------------------------------------------------ stray cancellations


class AwaitsACancelledTask(Stage):
    """Awaits its connection task, which a reconnect cancelled: CancelledError, though nobody cancelled this task."""

    def __init__(self, name: str, policy: ErrorPolicy, fail_on: str = "bad") -> None:
        super().__init__(name=name)
        self.error_policy = policy
        self.fail_on = fail_on
        self.handled: list[str] = []

    async def process(self, frame: Frame, direction: Direction) -> None:
        if isinstance(frame, TextDelta):
            if frame.text == self.fail_on:
                connection = asyncio.create_task(asyncio.sleep(10))
                connection.cancel()
                await connection
            self.handled.append(frame.text)
        await self.push(frame, direction)


class QueuedAwaitsACancelledTask(QueuedStage):
    error_policy = ErrorPolicy.SKIP_FRAME
    process = AwaitsACancelledTask.process

    def __init__(self) -> None:
        super().__init__(name="provider")
        self.fail_on = "bad"
        self.handled: list[str] = []


def test_a_stray_cancelled_error_in_a_worker_is_the_stages_failure_not_the_workers_end():
    clock = VirtualClock()
    head, provider, sink = Stage(name="head"), QueuedAwaitsACancelledTask(), Collect()
    pipeline = Pipeline([head, provider, sink], clock=clock, freeze_heap=False)

    async def main() -> str:
        run = asyncio.create_task(pipeline.run())
        await asyncio.sleep(0)
        for text in ("a", "bad", "b"):
            await head.push(TextDelta(text=text))
        await pipeline.end()
        return await asyncio.wait_for(run, 30)

    assert clock.run(main()) == "ended"
    assert provider.handled == ["a", "b"]
    [error] = pipeline.errors
    assert error.stage == "provider" and error.error.startswith("StrayCancellation")


def test_a_stray_cancelled_error_in_a_tick_fails_its_own_call_and_the_metronome_ticks_on():
    clock = VirtualClock()
    a_in, b_in = Ticker("a-in"), Ticker("b-in")

    class FailsAtTick(AwaitsACancelledTask):
        async def process(self, frame: Frame, direction: Direction) -> None:
            if isinstance(frame, AudioFrame) and a_in.ticks == 10:
                frame = TextDelta(text="bad")
            await super().process(frame, direction)

    a = Pipeline([a_in, FailsAtTick("stt", ErrorPolicy.STOP), Collect()], clock=clock, name="a", freeze_heap=False)
    b = Pipeline([b_in, Collect()], clock=clock, name="b", freeze_heap=False)

    async def main() -> None:
        run_a, run_b = asyncio.create_task(a.run()), asyncio.create_task(b.run())
        with pytest.raises(StrayCancellation):
            await asyncio.wait_for(run_a, 5)
        await keeps_ticking(clock, b_in, b, run_b)

    clock.run(main())
    assert a_in.ticks == 10
    assert [e.stage for e in a.errors] == ["stt"] and a.errors[0].fatal


# ------------------------------------------------------------------------------ failures at shutdown


class FailsToTick(PacedStage):
    def __init__(self, name: str, fail_from: float | None = None) -> None:
        super().__init__(name=name)
        self.fail_from = fail_from
        self.ticks = 0

    async def tick(self, now: float) -> None:
        self.ticks += 1
        if self.fail_from is not None and now >= self.fail_from:
            raise ConnectionError("the caller's socket is closed")


class FailsOneTick(PacedStage):
    def __init__(self, policy: ErrorPolicy) -> None:
        super().__init__(name="output")
        self.error_policy = policy
        self.ticks = 0

    async def tick(self, now: float) -> None:
        self.ticks += 1
        if self.ticks == 10:
            raise ConnectionError("the device refused a frame")


@pytest.mark.parametrize("policy", list(ErrorPolicy))
def test_a_tick_failure_the_policy_skips_leaves_the_stage_ticking_and_stop_still_ends_the_call(policy):
    clock = VirtualClock()
    output = FailsOneTick(policy)
    pipeline = Pipeline([Stage(name="head"), output], clock=clock, freeze_heap=False)

    async def main() -> str:
        run = asyncio.create_task(pipeline.run())
        await clock.sleep(1.0)
        if not run.done():
            await asyncio.wait_for(pipeline.end(), 5)
        return await asyncio.wait_for(run, 5)

    if policy is ErrorPolicy.STOP:
        with pytest.raises(ConnectionError, match="refused a frame"):
            clock.run(main())
        assert output.ticks == 10, "a stage failed under stop ticks no more"
    else:
        assert clock.run(main()) == "ended"
        assert output.ticks >= 50, "it ticked on, every 20 ms, for the rest of the second"
    [error] = pipeline.errors
    assert error.stage == "output" and error.fatal == (policy is ErrorPolicy.STOP)
    assert pipeline.epoch == (1 if policy is ErrorPolicy.SKIP_TURN else 0), "skip-turn skipped the turn"


class FailsForAWhile(PacedStage):
    """A device that refuses every frame from 0.2 s to 0.6 s of the call, then recovers."""

    def __init__(self) -> None:
        super().__init__(name="output")
        self.error_policy = ErrorPolicy.SKIP_FRAME
        self.ticks = 0

    async def tick(self, now: float) -> None:
        self.ticks += 1
        if 0.2 <= now - self.started < 0.6:
            raise ConnectionError("the device is gone")

    async def start(self) -> None:
        await super().start()
        self.started = self.clock.now()


def test_a_failure_repeating_on_every_tick_is_reported_once_then_counted_when_it_stops():
    clock = VirtualClock()
    output = FailsForAWhile()
    pipeline = Pipeline([Stage(name="head"), output], clock=clock, freeze_heap=False)

    async def main() -> str:
        run = asyncio.create_task(pipeline.run())
        await clock.sleep(1.0)
        await asyncio.wait_for(pipeline.end(), 5)
        return await asyncio.wait_for(run, 5)

    assert clock.run(main()) == "ended"
    assert output.ticks >= 50, "it ticked on through the failures"
    first, repeats = pipeline.errors
    assert first.error == "ConnectionError: the device is gone" and not first.fatal
    assert repeats.error.startswith("output: the same failure on 19 more ticks (0.38 s): ConnectionError")


def test_a_tick_failing_while_its_call_is_cancelled_is_recorded_and_the_metronome_ticks_on():
    """The tick fails in the loop iteration that cancels its call: the failure cannot start a task of a run that is
    stopping, and must not take down the metronome the other calls share."""
    clock = VirtualClock()
    a_in, b_in = FailsToTick("a-in", fail_from=0.5), FailsToTick("b-in")
    a = Pipeline([a_in, Stage(name="a-x")], clock=clock, name="a", freeze_heap=False)
    b = Pipeline([b_in, Stage(name="b-x")], clock=clock, name="b", freeze_heap=False)

    async def main() -> None:
        run_a = asyncio.create_task(a.run())
        await asyncio.sleep(0)
        run_b = asyncio.create_task(b.run())
        asyncio.get_running_loop().call_at(0.5, run_a.cancel)
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(run_a, 5)
        await keeps_ticking(clock, b_in, b, run_b)

    clock.run(main())
    [error] = a.errors
    assert error.stage == "a-in" and not error.fatal and "socket is closed" in error.error
    assert b.errors == []


def test_a_task_spawned_during_teardown_is_cancelled_before_it_starts():
    clock = VirtualClock()
    started: list[str] = []

    class Provider(QueuedStage):
        async def process(self, frame: Frame, direction: Direction) -> None:
            if isinstance(frame, TextDelta):
                try:
                    await self.clock.sleep(100)
                finally:  # a provider's cancel message, sent from a task of its own
                    self.spawn(self._send_cancel(), name="provider-cancel")
            await self.push(frame, direction)

        async def _send_cancel(self) -> None:
            started.append("cancel")
            await asyncio.get_running_loop().create_future()  # a stuck socket: never answers

    head = Stage(name="head")
    pipeline = Pipeline([head, Provider(name="provider"), Collect()], clock=clock, freeze_heap=False)

    async def main() -> tuple[str, set[asyncio.Task]]:
        run = asyncio.create_task(pipeline.run())
        await asyncio.sleep(0)
        await head.push(TextDelta(text="x"))
        await clock.sleep(1.0)
        pipeline.cancel()
        outcome = await asyncio.wait_for(run, 3600)
        return outcome, asyncio.all_tasks() - {asyncio.current_task()}

    outcome, left = clock.run(main())
    assert outcome == "cancelled"
    assert left == set()
    assert started == []


def test_cancelling_run_while_one_stage_stops_still_stops_the_others():
    clock = VirtualClock()
    stopped: list[str] = []

    class SlowToStop(Stage):
        def __init__(self, name: str, takes: float) -> None:
            super().__init__(name=name)
            self.takes = takes

        async def stop(self) -> None:
            try:
                await self.clock.sleep(self.takes)
            finally:
                stopped.append(self.name)

    pipeline = Pipeline(
        [SlowToStop("input", 0.0), SlowToStop("llm", 0.0), SlowToStop("tts", 2.0)], clock=clock, freeze_heap=False
    )

    async def main() -> None:
        run = asyncio.create_task(pipeline.run())
        await clock.sleep(0.1)
        pipeline.cancel()  # the stages stop from the output back: tts takes 2 s
        await clock.sleep(0.5)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(run, 5)

    clock.run(main())
    assert stopped == ["tts", "llm", "input"]


# ------------------------------------------------------------------------------ interrupts and Cancel


def test_an_interrupt_raised_through_stale_work_cancels_that_work_once_it_has_been_passed_on():
    """A stage after a queued LLM fails (skip-turn) on a delta the LLM's worker pushed: the interrupt is raised in
    that worker's own call stack. The stale generation must stop, but only after the interrupt reached every stage
    (the head's on_interrupt awaits, as a provider's cancel would)."""
    clock = VirtualClock()

    class LLM(QueuedStage):
        def __init__(self) -> None:
            super().__init__(name="llm")
            self.generated: list[tuple[int, float]] = []

        async def process(self, frame: Frame, direction: Direction) -> None:
            if isinstance(frame, EndOfTurn):
                for i in range(50):
                    await self.clock.sleep(0.1)
                    self.generated.append((frame.epoch, self.clock.now()))
                    await self.push(TextDelta(epoch=frame.epoch, text=f"{frame.text}{i}"))
            else:
                await self.push(frame, direction)

    class Picky(Stage):
        error_policy = ErrorPolicy.SKIP_TURN

        async def process(self, frame: Frame, direction: Direction) -> None:
            if isinstance(frame, TextDelta) and frame.text == "a2":
                raise ValueError("cannot handle this delta")
            await self.push(frame, direction)

    class Head(Collect):
        async def on_interrupt(self, interrupt: Interrupt) -> None:
            await asyncio.sleep(0)
            await super().on_interrupt(interrupt)

    head, llm = Head("head"), LLM()
    pipeline = Pipeline([head, llm, Picky(name="picky"), Collect()], clock=clock, freeze_heap=False)

    async def main() -> list[str]:
        run = asyncio.create_task(pipeline.run())
        await asyncio.sleep(0)
        await head.push(EndOfTurn(epoch=0, text="a", at=0.0))
        await clock.sleep(1.0)
        await head.push(EndOfTurn(epoch=pipeline.epoch, text="b", at=clock.now()))
        await clock.sleep(0.5)
        workers = [t.get_name() for t in asyncio.all_tasks() if t.get_name() == "llm-worker"]
        pipeline.cancel()
        await asyncio.wait_for(run, 5)
        return workers

    workers = clock.run(main())
    assert pipeline.epoch == 1
    assert [f.reason for f in head.frames if isinstance(f, Interrupt)] == ["error in picky"]
    assert [at for epoch, at in llm.generated if epoch == 0] == pytest.approx([0.1, 0.2, 0.3])
    assert workers == ["llm-worker"], "one worker: the stale one is gone"


def test_a_cancel_frame_aborts_the_run_and_drops_what_is_queued():
    clock = VirtualClock()
    head, slow = Stage(name="head"), Slow(1.0)
    pipeline = Pipeline([head, slow, Collect()], clock=clock, freeze_heap=False)

    async def main() -> tuple[str, float]:
        run = asyncio.create_task(pipeline.run())
        await asyncio.sleep(0)
        for i in range(5):
            await head.push(TextDelta(text=str(i)))
            await asyncio.sleep(0)  # the worker takes "0"; the rest wait behind it
        await head.push(Cancel())
        return await asyncio.wait_for(run, 5), clock.now()

    outcome, ended_at = clock.run(main())
    assert outcome == "cancelled" and ended_at == 0.0
    assert [f.text for f in slow.started] == ["0"] and [f.text for f in slow.cancelled] == ["0"]


# ------------------------------------------------------------------------------ errors on their own turn


@pytest.mark.parametrize("policy", [ErrorPolicy.SKIP_FRAME, ErrorPolicy.SKIP_TURN])
def test_a_failure_of_work_a_barge_in_cut_goes_on_that_turn_not_the_one_in_progress(policy):
    """A TTS's provider answers the cut reply with an error after the barge-in: the error is the cut turn's. The
    turn in progress, which was fine, shows none, and skip-turn does not skip it (the cut turn is already over)."""

    class RefusedLate(Stage):
        error_policy = policy

        async def process(self, frame: Frame, direction: Direction) -> None:
            if isinstance(frame, SpeakableChunk):
                await self.clock.sleep(1.0)  # the provider answers after the barge-in
                raise ConnectionError(f"the provider refused reply {frame.epoch}")
            await self.push(frame, direction)

    clock = VirtualClock()
    head, out = Collect("head"), Collect("out")
    pipeline = Pipeline([head, RefusedLate(name="tts"), out], clock=clock, freeze_heap=False)

    async def main() -> tuple[int, int]:
        run = asyncio.create_task(pipeline.run())
        await asyncio.sleep(0)
        cut = pipeline.next_epoch()
        head.mark("user.speech_end", cut)
        speaking = asyncio.create_task(head.push(SpeakableChunk(epoch=cut, text="Hello there.")))
        await clock.sleep(0.5)
        barge_in = (await pipeline.interrupt(head)).epoch
        out.mark("out.interrupted", cut)  # the cut turn's record is finished (and written) here
        head.mark("user.speech_end", barge_in)
        await asyncio.wait_for(speaking, 5)  # the refusal of the cut reply lands during the barge-in's turn
        out.mark("out.done", barge_in)
        await pipeline.end()
        await asyncio.wait_for(run, 5)
        return cut, barge_in

    cut, barge_in = clock.run(main())
    assert pipeline.epoch == barge_in, "the reply in progress was not interrupted"
    records = {record.turn: record for record in pipeline.trace.turns}
    assert "error" not in records[barge_in].data, "the turn in progress was fine"
    assert records[cut].data["error"] == f"ConnectionError: the provider refused reply {cut}"
    assert records[cut].data["error_stage"] == "tts"
    assert records[cut].late == ["error", "error_stage"], "the record says the error came after it was written"
    assert [(e.epoch, e.stage) for e in pipeline.errors] == [(cut, "tts")]


def test_a_stage_names_the_turn_of_work_that_fails_or_reports_after_that_turn_ended():
    """A tool that ran on after a barge-in reports its error, a reply's receiver task fails, a tick fails while it
    plays a reply: each names its turn, and the error goes there, not on the turn in progress."""
    clock = VirtualClock()
    llm = Stage(name="llm")
    llm.error_policy = ErrorPolicy.SKIP_FRAME
    pipeline = Pipeline([llm, Collect("out")], clock=clock, freeze_heap=False)

    async def fails(problem: str) -> None:
        raise ConnectionError(problem)

    async def main() -> tuple[int, int]:
        run = asyncio.create_task(pipeline.run())
        await asyncio.sleep(0)
        earlier = pipeline.next_epoch()
        llm.mark("out.interrupted", earlier)
        current = (await pipeline.interrupt(llm)).epoch
        llm.mark("user.speech_end", current)
        await llm.report("tool 'book' raised RuntimeError: booking system down", epoch=earlier)
        await asyncio.wait_for(llm.spawn(fails("the receiver lost its socket"), epoch=earlier), 5)
        pipeline.fail_later(llm, ConnectionError("the tick's sink is gone"), epoch=earlier)
        await clock.sleep(0.1)
        llm.mark("out.done", current)
        await pipeline.end()
        await asyncio.wait_for(run, 5)
        return earlier, current

    earlier, current = clock.run(main())
    assert [e.epoch for e in pipeline.errors] == [earlier] * 3
    records = {record.turn: record for record in pipeline.trace.turns}
    assert "error" not in records[current].data
    assert records[earlier].data["error"] == "ConnectionError: the tick's sink is gone", "the last of the three"


def test_a_task_cancelled_before_its_first_step_leaves_no_coroutine_never_awaited(recwarn):
    """A barge-in right after a provider spawned its receiver: the task's guard never got to await the coroutine."""
    clock = VirtualClock()
    ran: list[str] = []

    async def receive() -> None:
        ran.append("receive")

    head = Stage(name="head")
    pipeline = Pipeline([head, Collect()], clock=clock, freeze_heap=False)

    async def main() -> str:
        run = asyncio.create_task(pipeline.run())
        await asyncio.sleep(0)
        pipeline.spawn(head, receive(), name="receiver").cancel()  # before it ever ran
        await pipeline.end()
        return await asyncio.wait_for(run, 3600)

    assert clock.run(main()) == "ended"
    gc.collect()
    assert ran == []
    assert not [w for w in recwarn if "was never awaited" in str(w.message)]
