import asyncio
import itertools
import wave

import numpy as np
import pytest

from tests.helpers import Collect
from voxpipe.pipeline import (
    DOWNSTREAM,
    AudioFormat,
    AudioFrame,
    Conversation,
    EndOfTurn,
    Pipeline,
    SpeakableChunk,
    TextDelta,
    ToolCall,
    ToolResult,
    TTSAudioFrame,
    VirtualClock,
)
from voxpipe.stages.turn import TurnTaker
from voxpipe.testing import (
    ClipCaller,
    Noise,
    Say,
    ScriptedCaller,
    ScriptedLLM,
    ScriptedReply,
    ScriptedSTT,
    ScriptedTTS,
    ScriptedVAD,
)
from voxpipe.testing.signals import speechlike
from voxpipe.transports.playout import PlayoutOutput
from voxpipe.transports.simulated import SimulatedInput


def run_stage(stage, frames, seconds=30.0):
    clock = VirtualClock()
    sink = Collect()
    pipeline = Pipeline([stage, sink], clock=clock)
    times = []

    class Timed(Collect):
        pass

    async def main():
        run = asyncio.create_task(pipeline.run())
        await asyncio.sleep(0)
        for frame in frames:
            await stage.receive(frame, DOWNSTREAM)
        await pipeline.end()
        await run

    original = sink.process

    async def timed(frame, direction):
        times.append(clock.now())
        await original(frame, direction)

    sink.process = timed
    clock.run(main())
    return sink.frames, times


def test_scripted_tts_is_audible_of_the_right_length_and_paced():
    tts = ScriptedTTS(AudioFormat(16000), ttfa_s=0.15, rtf=0.5)
    frames, times = run_stage(tts, [SpeakableChunk(text="Hello there, how are you today?")])
    audio = [(f, t) for f, t in zip(frames, times, strict=True) if isinstance(f, TTSAudioFrame)]
    pcm = np.concatenate([np.frombuffer(f.pcm, dtype=np.int16) for f, _ in audio])
    duration = len(pcm) / 16000
    assert 1.0 < duration < 3.0
    assert np.sqrt(np.mean(pcm.astype(np.float64) ** 2)) > 1000, "audible, not silence"
    assert audio[0][1] == pytest.approx(0.15), "time to first audio"
    assert audio[-1][1] - audio[0][1] == pytest.approx(duration * 0.5, abs=0.05), "real-time factor"
    words = [w.word for f, _ in audio for w in f.words]
    assert words == ["Hello", "there,", "how", "are", "you", "today?"]
    ends = [w.end for f, _ in audio for w in f.words]
    assert ends == sorted(ends) and ends[-1] <= len(pcm)


def test_scripted_llm_streams_at_its_rate_after_its_ttft():
    llm = ScriptedLLM(["one two three four five six seven eight nine ten."], ttft_s=0.3, tokens_per_s=10)
    frames, times = run_stage(llm, [EndOfTurn(text="count", at=0.0)])
    deltas = [(f.text, t) for f, t in zip(frames, times, strict=True) if isinstance(f, TextDelta)]
    assert "".join(d for d, _ in deltas) == "one two three four five six seven eight nine ten."
    assert deltas[0][1] == pytest.approx(0.3)
    assert deltas[-1][1] - deltas[0][1] == pytest.approx(0.9)
    chunks = [f.text for f in frames if isinstance(f, SpeakableChunk)]
    assert " ".join(chunks) == "one two three four five six seven eight nine ten."


def test_scripted_llm_calls_tools_and_reports_errors():
    async def lookup(city: str) -> str:
        return f"sunny in {city}"

    def broken() -> str:
        raise RuntimeError("service down")

    llm = ScriptedLLM(
        [
            ScriptedReply("It is {result}.", tool="lookup", arguments={"city": "Rome"}),
            ScriptedReply("Sorry, {result}.", tool="broken"),
        ],
        tools={"lookup": lookup, "broken": broken},
    )
    frames, _ = run_stage(llm, [EndOfTurn(epoch=0, text="weather?", at=0.0), EndOfTurn(epoch=0, text="x", at=0.0)])
    calls = [f for f in frames if isinstance(f, ToolCall)]
    results = [f for f in frames if isinstance(f, ToolResult)]
    assert [c.name for c in calls] == ["lookup", "broken"]
    assert results[0].result == "sunny in Rome" and results[0].error is None
    assert results[1].error == "tool 'broken' raised RuntimeError: service down"
    text = "".join(f.text for f in frames if isinstance(f, TextDelta))
    assert "It is sunny in Rome." in text and "service down" in text


# ------------------------------------------------------------------------------------------- the scripted caller

RATE, FRAME = 16000, 320
LEAD_S, TAIL_S = 0.25, 0.21  # silence around a recorded line (Piper's clips end in ~0.2 s of it)
ROOM_TONE = 100  # a recording's quiet hiss around the voice: under the voiced level (-40 dBFS, 327)


def recorded_line(text: str, sample_rate: int = RATE) -> np.ndarray:
    """``text`` as a recording: speech with room tone before and after it, and no word times."""
    speech, _ = speechlike(text, sample_rate)
    lead, tail = (np.full(round(s * sample_rate), ROOM_TONE, np.int16) for s in (LEAD_S, TAIL_S))
    return np.concatenate([lead, speech, tail])


def recorded_voice(text: str, sample_rate: int) -> tuple[np.ndarray, None]:
    return recorded_line(text, sample_rate), None


def voiced_end_of(text: str) -> float:
    """Seconds from a recorded line's start to the end of its voice."""
    return LEAD_S + len(speechlike(text, RATE)[0]) / RATE


def drive(caller: ScriptedCaller, replies: list[tuple[float, float]], until: float = 20.0) -> np.ndarray:
    """Play the caller frame by frame as SimulatedInput does; the bot replies from ``start`` to ``end`` for each
    ``(start, end)`` (clock seconds). Returns everything the caller said."""
    pending = [(at, "start") for at, _ in replies] + [(at, "stop") for _, at in replies]
    pending.sort()
    pcm, t = [], 0.0
    while t < until and not caller.finished:
        pcm.append(np.frombuffer(caller.audio(t, FRAME), np.int16))
        t = round(t + FRAME / RATE, 6)
        while pending and pending[0][0] <= t:  # what the bot did by the end of this frame, at its own time
            at, kind = pending.pop(0)
            caller.bot_started(at) if kind == "start" else caller.bot_stopped(at, interrupted=False)
    return np.concatenate(pcm)


def loud_after(pcm: np.ndarray, after: float) -> float:
    """When the caller's audio is next voiced after ``after`` seconds."""
    loud = np.flatnonzero(np.abs(pcm[round(after * RATE) :].astype(np.int32)) > 327)
    assert loud.size, f"nothing voiced after {after} s"
    return after + loud[0] / RATE


LINE = "Hi, do you have any vegetarian dishes?"


def test_a_reply_in_the_silence_after_a_recorded_line_answers_it():
    # The bot answers 0.15 s after the caller's voice stops, before the recording's room tone has played out: that
    # is the answer to the line, so the cough meant for 0.8 s into it comes then, not after the 10 s reply timeout.
    caller = ScriptedCaller(
        [Say(LINE, pause=0.5), Noise(0.18, during_reply=0.8), Say("Thanks, bye.")], RATE, voice=recorded_voice
    )
    line_start = 0.5
    reply = line_start + voiced_end_of(LINE) + 0.15
    assert reply < line_start + len(recorded_line(LINE)) / RATE, "the reply starts before the recording ends"

    pcm = drive(caller, [(reply, reply + 1.5)])

    assert caller.lines[0][0] == pytest.approx(line_start)
    assert loud_after(pcm, line_start + voiced_end_of(LINE)) == pytest.approx(reply + 0.8, abs=FRAME / RATE)


def test_the_rest_of_a_recording_still_plays_after_its_voice_stops():
    caller = ScriptedCaller([Say(LINE, pause=0.5)], RATE, voice=recorded_voice, hangup_after=0.1)
    reply = 0.5 + voiced_end_of(LINE) + 0.05  # answered at once: the room tone still plays out

    pcm = drive(caller, [(reply, reply + 1.0)])

    line = recorded_line(LINE)
    assert np.array_equal(pcm[round(0.5 * RATE) :][: len(line)], line)


def test_a_reply_that_starts_while_the_caller_still_speaks_does_not_answer_the_line():
    # The bot talks over the line (a turn ended in one of its pauses): the caller waits for the answer that comes
    # after it, and the cough lands 0.8 s into that one.
    caller = ScriptedCaller(
        [Say(LINE, pause=0.5), Noise(0.18, during_reply=0.8), Say("Thanks, bye.")], RATE, voice=recorded_voice
    )
    voice_end = 0.5 + voiced_end_of(LINE)
    answer = voice_end + 2.0

    pcm = drive(caller, [(voice_end - 1.0, voice_end - 0.3), (answer, answer + 1.5)])

    assert loud_after(pcm, voice_end) == pytest.approx(answer + 0.8, abs=FRAME / RATE)


def test_a_recordings_words_are_spread_over_its_voice_and_all_of_them_heard(tmp_path):
    path = tmp_path / "line.wav"
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(RATE)
        wav.writeframes(recorded_line(LINE).tobytes())
    audio, clock = AudioFormat(RATE), VirtualClock()
    caller = ScriptedCaller([Say(LINE, wav=path)], RATE)
    conversation = Conversation(system="You answer the phone at Luigi's.")
    stages = [
        SimulatedInput(caller, audio),
        ScriptedVAD(audio),
        ScriptedSTT(caller),
        TurnTaker(conversation),
        ScriptedLLM(["Yes, we are open until eleven."]),
        ScriptedTTS(audio),
        PlayoutOutput(audio),
    ]

    assert clock.run(Pipeline(stages, clock=clock).run()) == "ended"

    start = caller.lines[0][0]
    assert caller.spoken[0].start == pytest.approx(start + LEAD_S)
    assert caller.spoken[-1].end == pytest.approx(start + voiced_end_of(LINE))
    assert [m.text for m in conversation.messages if m.role == "user"] == [LINE]


# ------------------------------------------------------------------------------------------ the simulated input


class Frames(Collect):
    @property
    def audio(self) -> list[AudioFrame]:
        return [f for f in self.frames if isinstance(f, AudioFrame)]


@pytest.mark.parametrize("caller", [ScriptedCaller([Say("Hello there.")]), ClipCaller(np.zeros(800, np.int16))])
def test_the_input_refuses_a_caller_at_another_rate(caller):
    with pytest.raises(ValueError, match=r"input: delivers 8000 Hz audio, but its caller \w+ speaks at 16000 Hz"):
        SimulatedInput(caller, AudioFormat(8000))


def test_the_input_refuses_a_period_that_is_not_a_whole_number_of_samples():
    with pytest.raises(ValueError, match=r"input: a 0.02 s period holds 220.5 samples of 11025 Hz audio, not a whole"):
        SimulatedInput(ScriptedCaller([Say("Hello.")], 11025), AudioFormat(11025))


@pytest.mark.parametrize(("rate", "period"), [(8000, 0.02), (22050, 0.02), (44100, 0.02), (11025, 0.04)])
def test_the_input_delivers_every_sample_once_at_any_rate_a_period_holds_whole(rate, period):
    caller = ScriptedCaller([Say("one two three", pause=0.1)], rate, reply_timeout=0.3, hangup_after=0.1)
    frames, clock = Frames(), VirtualClock()
    pipeline = Pipeline([SimulatedInput(caller, AudioFormat(rate), period=period), frames], clock=clock)

    assert clock.run(pipeline.run()) == "ended"

    audio = frames.audio
    assert {f.samples for f in audio} == {round(period * rate)}
    assert [b.pts - a.pts for a, b in itertools.pairwise(audio)] == [round(period * rate)] * (len(audio) - 1)
