"""PlayoutOutput's timing: a reply that starts while the output is idle plays at once, up to the next tick, and no
two frames handed to the sink ever overlap, whatever the arrival times and interrupts."""

from __future__ import annotations

import asyncio
import itertools

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pytest import approx

from voxpipe.pipeline import (
    DOWNSTREAM,
    AudioFormat,
    BotStartedSpeaking,
    BotStoppedSpeaking,
    Conversation,
    End,
    ErrorPolicy,
    LLMRequest,
    Pipeline,
    Stage,
    Tracer,
    Transcript,
    TTSAudioFrame,
    TTSDone,
    UserSpeechStarted,
    UserSpeechStopped,
    VirtualClock,
    WordMark,
)
from voxpipe.stages.turn import TurnTaker
from voxpipe.testing import ScriptedCaller, ScriptedLLM, ScriptedTTS
from voxpipe.testing.caller import Silence
from voxpipe.transports.paced import PacedStage
from voxpipe.transports.playout import PlayoutOutput
from voxpipe.transports.recorder import StereoRecorder
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
    assert arrival <= first_at < arrival + 1 / RATE  # not at the next tick: within a sample of the arrival
    assert first_samples == int((next_tick - arrival) * RATE)
    assert first_at + first_samples / RATE == approx(next_tick)  # the samples that end on the tick, no hole
    assert marks["out.first_play"] == [first_at]
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
    sink, origin, _tick0, _marks = run(events)

    assert_no_overlap(sink)
    # each reply that played reports its start, then its stop, both with its own epoch (not the next turn's)
    reports = [f for f in origin.upstream if isinstance(f, BotStartedSpeaking | BotStoppedSpeaking)]
    assert [type(f) for f in reports] == [BotStartedSpeaking, BotStoppedSpeaking] * (len(reports) // 2)
    assert all(start.epoch == stop.epoch for start, stop in zip(reports[::2], reports[1::2], strict=True))
    # each BotStoppedSpeaking reports the samples handed over since the reply before it stopped, less what its
    # interrupt cut from the frame playing at that instant (its BotStartedSpeaking follows its first frame)
    handed, last = 0, (0.0, 0)
    for entry in sink.log:
        if entry[0] == "play":
            handed, last = handed + entry[2], (entry[1], entry[2])
        elif entry[0] == "upstream" and isinstance(entry[1], BotStoppedSpeaking):
            stopped = entry[1]
            cut = max(0.0, last[0] + last[1] / RATE - stopped.at) if stopped.interrupted else 0.0
            assert abs(stopped.played * RATE - (handed - cut * RATE)) <= 1
            handed = 0


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


# ------------------------------------------------------------------------------------ reports upstream


class _SlowReports(Stage):
    """Passes the output's reports on after ``delay`` (forwarding them to a client's socket, say) and logs them as
    they go on, to the shared log."""

    def __init__(self, log: list[tuple], delay: float) -> None:
        super().__init__(name="observer")
        self.log = log
        self.delay = delay

    async def process(self, frame, direction):
        if direction is not DOWNSTREAM and isinstance(frame, BotStartedSpeaking | BotStoppedSpeaking):
            await self.clock.sleep(self.delay)
            self.log.append(("upstream", frame))
        await self.push(frame, direction)


def test_an_interrupt_while_the_replys_start_travels_upstream_cuts_it_and_reports_its_stop_after_its_start():
    # The reply's first audio arrives at 0.005 (a lead-in until the tick at 0.02); its BotStartedSpeaking takes 2 ms
    # to pass the observer, and the caller's next turn interrupts at 0.006, while it does.
    clock = VirtualClock()
    log: list[tuple] = []
    conversation = Conversation()
    turns = TurnTaker(conversation)
    pipeline = Pipeline([turns, _SlowReports(log, 0.002), PlayoutOutput(AUDIO, Sink(log))], clock=clock)
    pcm = np.full(8000, 3000, dtype=np.int16).tobytes()
    reply = TTSAudioFrame(epoch=0, pcm=pcm, sample_rate=RATE, pts=0, words=(WordMark("oh", 0, 8),))

    async def speak() -> None:  # the TTS's worker
        await turns.push(LLMRequest(epoch=0))
        await turns.push(reply)
        await turns.push(TTSDone(epoch=0))

    async def main() -> list[tuple[str, str]]:
        running = asyncio.create_task(pipeline.run())
        await clock.sleep(0.005)
        speaking = asyncio.create_task(speak())
        await clock.sleep(0.001)
        await turns.interrupt("new-turn")
        kept = [(m.role, m.text) for m in conversation.messages]  # what the next turn's request would carry
        await clock.sleep(1.0)
        await speaking
        pipeline.cancel()
        await running
        return kept

    kept = clock.run(main())
    assert [entry[:3] for entry in log if entry[0] != "upstream"] == [("play", approx(0.005), 240), ("cut", 0.006)]
    started, stopped = [entry[1] for entry in log if entry[0] == "upstream"]
    assert isinstance(started, BotStartedSpeaking) and isinstance(stopped, BotStoppedSpeaking), "in that order"
    assert stopped.interrupted and round(stopped.played * RATE) == 16 and stopped.heard == ("oh",)
    assert kept == [("assistant", "oh")], "the reply as heard is in the conversation when the interrupt returns"
    assert not turns.bot_speaking


def test_a_tick_never_waits_for_the_reports_upstream():
    # Each report takes 50 ms to pass the observer; the reply starts on a tick and ends on one.
    clock = VirtualClock()
    log: list[tuple] = []
    ticks = _TickTimes()
    pipeline = Pipeline([ticks, _SlowReports(log, 0.05), PlayoutOutput(AUDIO, Sink(log))], clock=clock)

    async def main() -> None:
        running = asyncio.create_task(pipeline.run())
        await clock.sleep(0.04)  # a tick is due right then
        await ticks.push(audio(0, 0.1))
        await ticks.push(TTSDone(epoch=0))
        await clock.sleep(0.5)
        pipeline.cancel()
        await running

    clock.run(main())
    assert len(ticks.lateness) >= 25
    assert max(ticks.lateness) < 0.001, "no tick waited for a report to pass the observer"
    reports = [entry[1] for entry in log if entry[0] == "upstream"]
    assert [type(f) for f in reports] == [BotStartedSpeaking, BotStoppedSpeaking]
    assert reports[0].at == approx(0.04) and reports[1].at == approx(0.14) and not reports[1].interrupted


def test_a_report_that_a_stage_fails_on_under_skip_turn_cuts_its_reply_and_the_stop_follows():
    # The stage's skip-turn interrupt comes back to the output while that very report is on its way: the interrupt
    # must not wait for it (it never would), and the reply's stop still goes up after it.
    class RefusesStarts(Stage):
        error_policy = ErrorPolicy.SKIP_TURN

        async def process(self, frame, direction):
            if isinstance(frame, BotStartedSpeaking):
                raise ConnectionError("the client's socket is gone")
            await self.push(frame, direction)

    clock = VirtualClock()
    log: list[tuple] = []
    origin, sink = Origin(log), Sink(log)
    pipeline = Pipeline([origin, RefusesStarts(name="observer"), PlayoutOutput(AUDIO, sink)], clock=clock)

    async def main() -> None:
        running = asyncio.create_task(pipeline.run())
        await clock.sleep(0.001)
        await origin.receive(audio(0, 0.2), DOWNSTREAM)
        await origin.receive(TTSDone(epoch=0), DOWNSTREAM)
        await clock.sleep(0.5)
        pipeline.cancel()
        await asyncio.wait_for(running, 5)

    clock.run(main())
    assert sink.plays == [(approx(0.001), 304)] and sink.cuts == [approx(0.001)], "cut by the interrupt, at once"
    error, stopped = origin.upstream
    assert error.stage == "observer" and isinstance(stopped, BotStoppedSpeaking) and stopped.interrupted
    assert pipeline.epoch == 1


def test_the_reports_of_a_reply_cut_by_the_next_turn_carry_the_replys_epoch():
    sink, origin, _tick0, _marks = run([(0.0, "audio", 0.2), (0.05, "interrupt", 0)])

    assert sink.cuts == [approx(0.051)]
    assert [(type(f), f.epoch) for f in origin.upstream] == [(BotStartedSpeaking, 0), (BotStoppedSpeaking, 0)]


class _FailsOnce(Sink):
    """A sink whose device refuses one frame (the first a tick hands over), then recovers."""

    def play(self, at: float, pcm: bytes) -> None:
        if sum(1 for entry in self.log if entry[0] == "refused") == 0 and at == approx(0.02):
            self.log.append(("refused", at))
            raise OSError("device busy")
        super().play(at, pcm)


def test_a_frame_the_sink_refuses_under_skip_frame_is_dropped_and_the_call_plays_on():
    clock = VirtualClock()
    log: list[tuple] = []
    origin = Origin(log)
    output = PlayoutOutput(AUDIO, _FailsOnce(log))
    output.error_policy = ErrorPolicy.SKIP_FRAME
    pipeline = Pipeline([origin, output], clock=clock)

    async def main() -> str:
        running = asyncio.create_task(pipeline.run())
        await clock.sleep(0.001)
        await origin.receive(audio(0, 0.1), DOWNSTREAM)
        await origin.receive(TTSDone(epoch=0), DOWNSTREAM)
        await clock.sleep(0.5)
        epoch = (await origin.interrupt("new-turn")).epoch
        await origin.receive(audio(epoch, 0.3), DOWNSTREAM)  # the next turn's reply
        await origin.receive(TTSDone(epoch=epoch), DOWNSTREAM)
        await clock.sleep(0.5)
        await asyncio.wait_for(pipeline.end(), 5)
        return await asyncio.wait_for(running, 5)

    assert clock.run(main()) == "ended", "the output drained"
    [error] = pipeline.errors
    assert error.stage == "output" and not error.fatal and "device busy" in error.error
    first, second = [f for f in origin.upstream if isinstance(f, BotStoppedSpeaking)]
    assert round(first.played * RATE) == 1600 - 320, "the refused frame is not reported played"
    assert round(second.played * RATE) == 4800, "the next reply played in full"
    assert sum(entry[2] for entry in log if entry[0] == "play") == 1600 - 320 + 4800


# --------------------------------------------------------------------------- a reply's end, whenever it comes


def test_a_reply_cut_before_any_of_it_played_ends_its_turn_at_the_cut():
    # Turn 1's reply is still being generated (0.5 s to first token) when turn 2 ends: its record must close then,
    # interrupted with nothing heard — not at the end of the call, as not interrupted.
    clock = VirtualClock()
    tracer = Tracer()
    audio = AudioFormat(16000)
    turns = TurnTaker(Conversation())
    llm = ScriptedLLM(["one two three four five six"], ttft_s=0.5)
    pipeline = Pipeline([turns, llm, ScriptedTTS(audio), PlayoutOutput(audio)], clock=clock, tracer=tracer)

    async def main() -> None:
        running = asyncio.create_task(pipeline.run())
        await clock.sleep(0.1)
        for text in ("first question", "actually something else"):
            await turns.receive(UserSpeechStarted(at=clock.now()), DOWNSTREAM)
            await clock.sleep(0.5)
            await turns.receive(UserSpeechStopped(at=clock.now(), last_voiced_at=clock.now() - 0.2), DOWNSTREAM)
            await turns.receive(Transcript(text=text, final=True), DOWNSTREAM)
            await clock.sleep(0.2)  # turn 2 ends 0.7 s after turn 1: before turn 1's reply had any audio
        await clock.sleep(5)
        pipeline.cancel()
        await running

    clock.run(main())
    first, second = sorted(tracer.turns, key=lambda record: record.turn)
    assert "out.first_play" not in first.marks
    assert first.interrupted and first.heard == [] and first.played_s == 0
    assert first.marks["out.interrupted"] == second.marks["turn.end_detected"]  # closed by the cut, at the cut
    assert not second.interrupted and "out.done" in second.marks


@pytest.mark.parametrize("hang_up_at", [0.3, 1.5])  # before the reply's first audio (0.5 s to first token), mid-reply
def test_a_call_ended_mid_reply_keeps_only_what_the_caller_heard(hang_up_at):
    clock = VirtualClock()
    tracer = Tracer()
    audio = AudioFormat(16000)
    conversation = Conversation()
    turns = TurnTaker(conversation)
    llm = ScriptedLLM(["one two three four five six seven eight nine ten"], ttft_s=0.5)
    pipeline = Pipeline([turns, llm, ScriptedTTS(audio), PlayoutOutput(audio)], clock=clock, tracer=tracer)

    async def main() -> None:
        running = asyncio.create_task(pipeline.run())
        await clock.sleep(0.1)
        await turns.receive(UserSpeechStarted(at=clock.now()), DOWNSTREAM)
        await clock.sleep(0.5)
        await turns.receive(UserSpeechStopped(at=clock.now(), last_voiced_at=clock.now() - 0.2), DOWNSTREAM)
        await turns.receive(Transcript(text="tell me the numbers", final=True), DOWNSTREAM)
        await clock.sleep(hang_up_at)
        pipeline.cancel()  # the caller hangs up
        await running

    clock.run(main())
    [record] = tracer.turns
    assert record.interrupted and record.marks["out.interrupted"] == approx(0.6 + hang_up_at)
    first_play = record.marks.get("out.first_play", 0.6 + hang_up_at)
    assert record.played_s == approx(0.6 + hang_up_at - first_play, abs=0.001), "cut at the hang-up"
    said = " ".join(record.heard)
    assert "ten" not in said and "one two three four five six seven eight nine ten".startswith(said)
    bot = [m for m in conversation.messages if m.role == "assistant"]
    assert [m.text for m in bot] == ([said] if said else []), "the conversation keeps only what was heard"


def test_a_reply_without_audio_is_done_when_its_synthesis_ends():
    clock = VirtualClock()
    tracer = Tracer()
    origin = Origin([])
    pipeline = Pipeline([origin, PlayoutOutput(AUDIO)], clock=clock, tracer=tracer)

    async def main() -> None:
        running = asyncio.create_task(pipeline.run())
        epoch = (await origin.interrupt("new-turn")).epoch
        await origin.receive(LLMRequest(epoch=epoch), DOWNSTREAM)
        await clock.sleep(0.3)
        await origin.receive(TTSDone(epoch=epoch), DOWNSTREAM)  # the reply had nothing to say
        await clock.sleep(0.2)
        await origin.interrupt("new-turn")  # the next turn does not cut it: it was over
        pipeline.cancel()
        await running

    clock.run(main())
    [record] = tracer.turns
    assert not record.interrupted and record.marks["out.done"] == approx(0.3) and record.heard == []


def test_a_reply_fully_played_before_the_barge_in_is_not_reported_cut():
    # 0.1 s from 0.001: a 304-sample lead-in, frames at 0.02 … 0.08, the last 16 samples at 0.1 (ends 0.101). The
    # caller barges in at 0.105, before the tick at 0.12 that would report the reply done: nothing was unplayed.
    sink, origin, _tick0, marks = run([(0.0, "audio", 0.1), (0.0, "done", 0), (0.104, "interrupt", 0)])

    assert sum(samples for _, samples in sink.plays) == 1600 and sink.cuts == []
    [stopped] = [frame for frame in origin.upstream if isinstance(frame, BotStoppedSpeaking)]
    assert not stopped.interrupted and stopped.at == approx(0.101) and round(stopped.played * RATE) == 1600
    assert marks["out.done"] == [approx(0.101)] and "out.interrupted" not in marks


def test_a_hang_up_while_the_last_frame_plays_still_reports_the_reply():
    clock = VirtualClock()
    log: list[tuple] = []
    sink, origin = Sink(log), Origin(log)
    output = PlayoutOutput(AUDIO, sink)
    pipeline = Pipeline([origin, output], clock=clock)

    async def main() -> None:
        running = asyncio.create_task(pipeline.run())
        await clock.sleep(0.001)
        await origin.receive(audio(0, 0.1), DOWNSTREAM)
        await origin.receive(TTSDone(epoch=0), DOWNSTREAM)
        await clock.sleep(0.1005 - clock.now())  # the last 16 samples (0.100 to 0.101) play; the buffer is empty
        await origin.receive(End(epoch=0), DOWNSTREAM)
        await running

    clock.run(main())
    assert sum(samples for _, samples in sink.plays) == 1600
    [stopped] = [frame for frame in origin.upstream if isinstance(frame, BotStoppedSpeaking)]
    assert not stopped.interrupted and stopped.at == approx(0.101)


# ------------------------------------------------------------------------------ no hole, in the air or on disk


def test_audio_arriving_while_a_short_lead_in_plays_follows_it_without_a_hole():
    # A streaming TTS's first chunk can be tiny (what the leading-silence trim left): 2 ms, and the next chunk at
    # once. The second must follow the first, not wait for the tick at 0.02.
    clock = VirtualClock()
    log: list[tuple] = []
    sink, origin = Sink(log), Origin(log)
    pipeline = Pipeline([origin, PlayoutOutput(AUDIO, sink)], clock=clock)

    def chunk(samples: int) -> TTSAudioFrame:
        return TTSAudioFrame(epoch=0, pcm=np.full(samples, 3000, np.int16).tobytes(), sample_rate=RATE, pts=0)

    async def main() -> None:
        running = asyncio.create_task(pipeline.run())
        await clock.sleep(0.001)
        await origin.receive(chunk(32), DOWNSTREAM)
        await origin.receive(chunk(1600), DOWNSTREAM)
        await origin.receive(TTSDone(epoch=0), DOWNSTREAM)
        await clock.sleep(0.5)
        pipeline.cancel()
        await running

    clock.run(main())
    plays = sink.plays
    assert plays[0] == (approx(0.001), 32) and plays[1] == (approx(0.003), 272) and plays[2][0] == approx(0.02)
    for (at, samples), (next_at, _) in itertools.pairwise(plays):
        assert next_at == approx(at + samples / RATE), f"a hole from {at + samples / RATE} to {next_at}"
    assert sum(samples for _, samples in plays) == 1632


def _recorded(arrival: float, seconds: float, cut_after: float | None, fmt: AudioFormat = AUDIO):
    """One reply of ``seconds`` arriving at ``arrival``, cut ``cut_after`` later (or not); the recording's bot
    channel and the seconds the output reported played."""
    clock = VirtualClock()
    origin = Origin([])
    recorder = StereoRecorder(RATE, channels=fmt.channels)
    pipeline = Pipeline([origin, PlayoutOutput(fmt, recorder)], clock=clock)
    pcm = np.full((round(seconds * RATE), fmt.channels), [3000, 1000][: fmt.channels], dtype=np.int16).tobytes()

    async def main() -> None:
        running = asyncio.create_task(pipeline.run())
        await clock.sleep(arrival)
        frame = TTSAudioFrame(epoch=0, pcm=pcm, sample_rate=RATE, channels=fmt.channels, pts=0)
        await origin.receive(frame, DOWNSTREAM)
        await origin.receive(TTSDone(epoch=0), DOWNSTREAM)
        if cut_after is not None:
            await clock.sleep(cut_after)
            await origin.interrupt()
        await clock.sleep(1.0)
        pipeline.cancel()
        await running

    clock.run(main())
    stopped = [frame for frame in origin.upstream if isinstance(frame, BotStoppedSpeaking)]
    return recorder.render()[:, 1], (stopped[0].played if stopped else 0.0)  # cut before it started: none


@settings(max_examples=60, deadline=None)
@given(st.floats(0.0005, 0.1), st.floats(0.01, 0.3), st.one_of(st.none(), st.floats(0.0, 0.3)))
@example(0.00103, 0.1, None)  # the lead-in starts 0.48 sample into a sample: a 1-sample hole before the tick
@example(0.00103, 0.1, 0.0497)  # cut inside a tick frame: the recording one sample short of what was reported
@example(0.0390625, 0.25, 0.0)  # cut before it started: nothing played, nothing recorded
def test_the_recording_holds_exactly_the_samples_reported_played(arrival, seconds, cut_after):
    bot, played = _recorded(arrival, seconds, cut_after)

    voiced = np.flatnonzero(bot)
    assert len(voiced) == round(played * RATE)
    if len(voiced):
        assert voiced[-1] - voiced[0] + 1 == len(voiced), "a silent sample inside the reply"


def test_the_recorder_mixes_stereo_bot_audio_down_at_its_length():
    bot, played = _recorded(0.001, 0.1, None, AudioFormat(RATE, 2))

    assert len(np.flatnonzero(bot)) == 1600 == round(played * RATE)
    assert set(bot[np.flatnonzero(bot)]) == {2000}  # (3000 + 1000) / 2


def test_a_stereo_output_refuses_a_mono_recorder():
    with pytest.raises(ValueError, match="takes 1-channel audio"):
        PlayoutOutput(AudioFormat(RATE, 2), StereoRecorder(RATE))


def test_the_output_refuses_a_period_that_is_not_a_whole_number_of_samples():
    # 220.5 samples a tick: playing 220 would play 11000 samples a clock second, each reply 0.23 % slow.
    with pytest.raises(ValueError, match=r"output: a 0.02 s period holds 220.5 samples of 11025 Hz audio, not a whole"):
        PlayoutOutput(AudioFormat(11025))


@pytest.mark.parametrize(("rate", "period"), [(8000, 0.02), (22050, 0.02), (44100, 0.02), (11025, 0.04)])
def test_the_output_plays_a_second_of_audio_in_a_second_at_any_rate_a_period_holds_whole(rate, period):
    clock, log = VirtualClock(), []
    sink = Sink(log)
    origin = Origin(log)
    pipeline = Pipeline([origin, PlayoutOutput(AudioFormat(rate), sink, period=period)], clock=clock)

    async def main() -> None:
        running = asyncio.create_task(pipeline.run())
        await clock.sleep(0.001)  # ticking
        await origin.receive(TTSAudioFrame(epoch=0, pcm=bytes(2 * rate), sample_rate=rate, pts=0), DOWNSTREAM)
        await origin.receive(TTSDone(epoch=0), DOWNSTREAM)
        await clock.sleep(2.0)
        pipeline.cancel()
        await running

    clock.run(main())
    (first, _), (last, last_samples) = sink.plays[0], sink.plays[-1]
    assert sum(samples for _, samples in sink.plays) == rate
    assert last + last_samples / rate - first == approx(1.0, abs=1e-9)
