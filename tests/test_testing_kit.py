import asyncio

import numpy as np
import pytest

from tests.helpers import Collect
from voxpipe.pipeline import (
    DOWNSTREAM,
    AudioFormat,
    EndOfTurn,
    Pipeline,
    SpeakableChunk,
    TextDelta,
    ToolCall,
    ToolResult,
    TTSAudioFrame,
    VirtualClock,
)
from voxpipe.testing import ScriptedLLM, ScriptedReply, ScriptedTTS


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
