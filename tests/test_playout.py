"""PlayoutOutput's timing: a reply that starts while the output is idle plays at once, up to the next tick, and no
two frames handed to the sink ever overlap, whatever the arrival times and interrupts."""

from __future__ import annotations

import asyncio

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from pytest import approx

from voxpipe.pipeline import (
    DOWNSTREAM,
    AudioFormat,
    BotStartedSpeaking,
    BotStoppedSpeaking,
    End,
    Pipeline,
    Stage,
    TTSAudioFrame,
    TTSDone,
    VirtualClock,
)
from voxpipe.testing import ScriptedCaller
from voxpipe.testing.caller import Silence
from voxpipe.transports.paced import PacedStage
from voxpipe.transports.playout import PlayoutOutput
from voxpipe.transports.simulated import SimulatedInput

AUDIO = AudioFormat(16000)
RATE = AUDIO.sample_rate


class Origin(Stage):
    """The pipeline's head: logs what comes back upstream (BotStartedSpeaking, BotStoppedSpeaking)."""

    def __init__(self, log: list[tuple]) -> None:
        super().__init__(name="origin")
        self.log = log

    @property
    def upstream(self) -> list[object]:
        return [entry[1] for entry in self.log if entry[0] == "upstream"]

    async def process(self, frame, direction):
        if direction is not DOWNSTREAM:
            self.log.append(("upstream", frame))
        await self.push(frame, direction)


class Sink:
    """Logs each frame handed over (start, samples) and each cut, in order with the upstream frames."""

    def __init__(self, log: list[tuple]) -> None:
        self.log = log

    @property
    def plays(self) -> list[tuple[float, int]]:
        return [(entry[1], entry[2]) for entry in self.log if entry[0] == "play"]

    @property
    def cuts(self) -> list[float]:
        return [entry[1] for entry in self.log if entry[0] == "cut"]

    def play(self, at: float, pcm: bytes) -> None:
        self.log.append(("play", at, len(pcm) // 2))

    def cut(self, at: float) -> None:
        self.log.append(("cut", at))


def audio(epoch: int, seconds: float) -> TTSAudioFrame:
    pcm = np.full(round(seconds * RATE), 3000, dtype=np.int16).tobytes()
    return TTSAudioFrame(epoch=epoch, pcm=pcm, sample_rate=RATE, pts=0)


def run(events: list[tuple[float, str, float]]) -> tuple[Sink, Origin, float, dict[str, list[float]]]:
    """Feed the output ``(delay, kind, seconds)`` events: ``audio`` of that length, ``done`` (the reply's text is all
    spoken: audio after it is the next turn's), or ``interrupt``; the
    sink, the pipeline's head, the metronome's origin and the output's marks."""
    clock = VirtualClock()
    log: list[tuple] = []
    sink, origin = Sink(log), Origin(log)
    output = PlayoutOutput(AUDIO, sink)
    pipeline = Pipeline([origin, output], clock=clock)
    marks: dict[str, list[float]] = {}
    output.mark = lambda name, epoch, at=None, **data: marks.setdefault(name, []).append(  # type: ignore[method-assign]
        clock.now() if at is None else at
    )

    async def main() -> None:
        running = asyncio.create_task(pipeline.run())
        await clock.sleep(0.001)  # started and ticking
        epoch, done = 0, False
        for delay, kind, seconds in events:
            await clock.sleep(delay)
            if kind == "audio":
                if done:  # the next turn's reply: a new epoch, with an interrupt in case the last one still plays
                    epoch, done = (await origin.interrupt()).epoch, False
                await origin.receive(audio(epoch, seconds), DOWNSTREAM)
            elif kind == "done":
                await origin.receive(TTSDone(epoch=epoch), DOWNSTREAM)
                done = True
            else:
                epoch, done = (await origin.interrupt()).epoch, False
        await clock.sleep(2.0)
        pipeline.cancel()
        await running

    clock.run(main())
    metronome_origin = clock.metronome(output.period).origin
    assert metronome_origin is not None
    return sink, origin, metronome_origin, marks


def test_a_reply_that_starts_while_idle_plays_at_once_up_to_the_next_tick():
    sink, _output, tick0, marks = run([(0.0363, "audio", 0.1), (0.0, "done", 0)])

    arrival = 0.001 + 0.0363
    next_tick = tick0 + 0.02 * (int((arrival - tick0) / 0.02) + 1)
    first_at, first_samples = sink.plays[0]
    assert first_at == arrival  # not at the next tick
    assert first_samples == int((next_tick - arrival) * RATE)
    assert marks["out.first_play"] == [arrival]
    # then one frame per tick from that tick on, and every sample played once
    assert [at for at, _ in sink.plays[1:]] == [next_tick + 0.02 * k for k in range(len(sink.plays) - 1)]
    assert sum(samples for _, samples in sink.plays) == round(0.1 * RATE)
    assert marks["out.done"] == [sink.plays[-1][0] + sink.plays[-1][1] / RATE]


def test_a_reply_arriving_on_a_tick_waits_for_that_tick():
    sink, _output, tick0, _marks = run([(0.039, "audio", 0.05)])  # arrives at 0.040: a tick is due right then

    assert sink.plays[0] == (tick0 + 0.04, 320)


def test_a_reply_after_a_barge_in_starts_at_once_after_the_cut():
    # ticks at 0.000, 0.020, …; reply 1 arrives at 0.001: a 19 ms lead-in, then a frame at 0.020, cut by the
    # interrupt at 0.030; reply 2 arrives at 0.031: a 9 ms lead-in, then frames from the tick at 0.040
    sink, origin, tick0, marks = run([(0.0, "audio", 0.2), (0.029, "interrupt", 0), (0.001, "audio", 0.1)])

    assert tick0 == 0.0
    assert [(approx(at), n) for at, n in sink.plays[:4]] == [(0.001, 304), (0.02, 320), (0.031, 144), (0.04, 320)]
    assert sink.cuts == [approx(0.03)]
    assert marks["out.first_play"] == [approx(0.001), approx(0.031)]
    stopped = next(f for f in origin.upstream if isinstance(f, BotStoppedSpeaking))
    assert stopped.interrupted and round(stopped.played * RATE) == 304 + 160  # the lead-in, and the cut frame's part


def assert_no_overlap(sink: Sink) -> None:
    playing_until = float("-inf")
    for entry in sink.log:
        if entry[0] == "cut":
            playing_until = min(playing_until, entry[1])  # the interrupt stopped the frame there
        elif entry[0] == "play":
            at, samples = entry[1], entry[2]
            assert at >= playing_until - 1e-9, f"a frame at {at} overlaps the one playing until {playing_until}"
            playing_until = at + samples / RATE


event = st.one_of(
    st.tuples(st.floats(0, 0.1), st.just("audio"), st.floats(0.001, 0.2)),
    st.tuples(st.floats(0, 0.1), st.just("done"), st.just(0.0)),
    st.tuples(st.floats(0, 0.1), st.just("interrupt"), st.just(0.0)),
)


@settings(max_examples=80, deadline=None)
@given(st.lists(event, min_size=1, max_size=12))
def test_frames_never_overlap_and_each_reply_reports_what_was_played(events: list[tuple[float, str, float]]):
    sink, _origin, _tick0, _marks = run(events)

    assert_no_overlap(sink)
    # each BotStoppedSpeaking reports the samples handed over since its BotStartedSpeaking, less what its interrupt
    # cut from the frame playing at that instant
    handed, last = 0, (0.0, 0)
    for entry in sink.log:
        if entry[0] == "play":
            handed, last = handed + entry[2], (entry[1], entry[2])
        elif entry[0] == "upstream" and isinstance(entry[1], BotStartedSpeaking):
            handed = 0
        elif entry[0] == "upstream" and isinstance(entry[1], BotStoppedSpeaking):
            stopped = entry[1]
            cut = max(0.0, last[0] + last[1] / RATE - stopped.at) if stopped.interrupted else 0.0
            assert abs(stopped.played * RATE - (handed - cut * RATE)) <= 1


class _DrainsSlowly(Stage):
    """Holds End for half a second, as an STT waiting for its last final does."""

    async def process(self, frame, direction):
        if isinstance(frame, End):
            await self.clock.sleep(0.5)
        await self.push(frame, direction)


class _TickTimes(PacedStage):
    """Records how late each of its ticks ran."""

    def __init__(self) -> None:
        super().__init__(name="ticks")
        self.lateness: list[float] = []

    async def tick(self, now: float) -> None:
        self.lateness.append(self.clock.now() - now)


def test_a_hang_up_drains_the_call_without_holding_up_the_metronome():
    clock = VirtualClock()
    ticks = _TickTimes()
    caller = ScriptedCaller([Silence(0.2)], 16000)
    pipeline = Pipeline([SimulatedInput(caller, AudioFormat(16000)), _DrainsSlowly(), ticks], clock=clock)

    async def main() -> float:
        await pipeline.run()
        return clock.now()

    assert clock.run(main()) >= 0.7, "the drain took its half second"
    assert len(ticks.lateness) >= 30, "the call's other transport kept ticking through the drain"
    assert max(ticks.lateness) < 0.02, "no tick waited for the drain"
