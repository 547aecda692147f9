"""The turn-taker and the VAD events it works from: when a barge-in fires, and that every turn gets its answer.

Most tests drive a lone TurnTaker with the frames a VAD, an STT and the output would send, on a virtual clock; the
last ones run whole scripted calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import numpy as np
import pytest

from tests.helpers import Collect
from voxpipe.call import run_call
from voxpipe.pipeline import (
    DOWNSTREAM,
    UPSTREAM,
    AudioFormat,
    AudioFrame,
    BotStartedSpeaking,
    Conversation,
    EndOfTurn,
    Interrupt,
    Message,
    Pipeline,
    Transcript,
    TurnPolicy,
    UserSpeechProgress,
    UserSpeechStarted,
    UserSpeechStopped,
    VirtualClock,
)
from voxpipe.pipeline.turns import DEFAULT_RESUME_PROMPT
from voxpipe.stages.turn import TurnTaker
from voxpipe.testing import Noise, Say, ScriptedVAD
from voxpipe.testing.signals import word_duration

RATE = 16000


class Harness:
    """A TurnTaker between a test and a sink, on a virtual clock. ``run(script)`` runs ``script(harness)`` inside
    the running pipeline."""

    def __init__(self, policy: TurnPolicy | None = None) -> None:
        self.clock = VirtualClock()
        self.turn = TurnTaker(Conversation("test"), policy or TurnPolicy())
        self.sink = Collect()
        self.pipeline = Pipeline([self.turn, self.sink], clock=self.clock)

    def run(self, script: Callable[[Harness], Awaitable[None]]) -> None:
        async def main() -> None:
            run = asyncio.create_task(self.pipeline.run())
            await asyncio.sleep(0)
            await script(self)
            await self.pipeline.end()
            await run

        self.clock.run(main())

    async def send(self, *frames: object) -> None:
        for frame in frames:
            await self.turn.receive(frame, DOWNSTREAM)  # type: ignore[arg-type]

    async def bot_starts(self) -> None:
        await self.turn.receive(BotStartedSpeaking(epoch=self.pipeline.epoch, at=self.clock.now()), UPSTREAM)

    async def audio(self, start_s: float, end_s: float) -> None:
        """Caller audio in 20 ms frames from ``start_s`` to ``end_s``."""
        for pts in range(round(start_s * RATE), round(end_s * RATE), 320):
            await self.send(AudioFrame(pcm=bytes(640), sample_rate=RATE, pts=pts))

    @property
    def interrupts(self) -> list[Interrupt]:
        return [f for f in self.sink.frames if isinstance(f, Interrupt)]

    @property
    def turns(self) -> list[EndOfTurn]:
        return [f for f in self.sink.frames if isinstance(f, EndOfTurn)]


# ------------------------------------------------------------------------------------------- barge-in


def test_the_silence_after_a_short_sound_does_not_count_as_speech():
    """A 100 ms click over the bot, then the VAD's hang-over: the caller stopped speaking at 100 ms, however long
    the VAD waits before saying so. ``min_speech_ms`` counts to the last voiced sample."""
    harness = Harness(TurnPolicy(min_speech_ms=300, min_words=0))

    async def script(h: Harness) -> None:
        await h.bot_starts()
        await h.send(UserSpeechStarted(at=1.0), UserSpeechProgress(voiced_until=1.1))
        await h.audio(1.0, 1.6)  # 500 ms of silence follow; no more progress
        assert not h.interrupts
        await h.send(UserSpeechProgress(voiced_until=1.35))  # the caller goes on: 350 ms of speech
        assert [i.reason for i in h.interrupts] == ["barge-in"]

    harness.run(script)


def test_without_progress_events_speech_is_measured_to_the_audio_received():
    """A speech-event source with no per-frame progress (Deepgram's SpeechStarted) still gets its barge-in."""
    harness = Harness(TurnPolicy(min_speech_ms=300, min_words=0))

    async def script(h: Harness) -> None:
        await h.bot_starts()
        await h.send(UserSpeechStarted(at=1.0))
        await h.audio(1.0, 1.28)
        assert not h.interrupts
        await h.audio(1.28, 1.32)
        assert len(h.interrupts) == 1

    harness.run(script)


def test_a_partial_that_brings_the_missing_word_interrupts_at_once():
    """Long enough already, no words yet: the partial with the first content word cuts the bot off itself, not at
    the next audio frame (which may never come before the caller stops)."""
    harness = Harness(TurnPolicy(min_speech_ms=300, min_words=1))

    async def script(h: Harness) -> None:
        await h.bot_starts()
        await h.send(UserSpeechStarted(at=1.0), UserSpeechProgress(voiced_until=1.5))
        assert not h.interrupts
        await h.send(Transcript(text="wait stop", final=False))
        assert len(h.interrupts) == 1

    harness.run(script)


def test_a_barged_in_utterance_is_answered_after_an_earlier_one_ends_as_a_turn():
    """Utterance A ("no", too short to barge in) and B (which barges in) over the bot; A's final comes late and
    ends A as a turn with a new epoch. B's turn then needs an epoch of its own: the one its barge-in opened is
    closed, and an EndOfTurn in it would be dropped unanswered."""
    harness = Harness(TurnPolicy(min_speech_ms=300, min_words=1))

    async def script(h: Harness) -> None:
        await h.bot_starts()
        await h.send(UserSpeechStarted(at=1.0), UserSpeechProgress(voiced_until=1.24))
        await h.send(UserSpeechStopped(at=1.74, last_voiced_at=1.24))
        await h.send(UserSpeechStarted(at=1.9), Transcript(text="wait friday for four", final=False))
        await h.send(UserSpeechProgress(voiced_until=2.3))
        assert [i.reason for i in h.interrupts] == ["barge-in"]
        await h.send(Transcript(text="no", final=True))  # A's final, after B's barge-in
        await h.send(UserSpeechStopped(at=3.0, last_voiced_at=2.5), Transcript(text="wait friday for four", final=True))

    harness.run(script)
    assert [t.text for t in harness.turns] == ["no", "wait friday for four"]
    assert harness.turns[-1].epoch == harness.pipeline.epoch, "the last turn is answered in the open epoch"


def test_a_final_that_arrives_after_the_next_utterance_started_is_not_lost():
    """The STT's final for utterance 1 lands after utterance 2 began: both turns keep their own words."""
    harness = Harness()

    async def script(h: Harness) -> None:
        await h.send(
            UserSpeechStarted(at=0.0),
            UserSpeechStopped(at=1.5, last_voiced_at=1.0),
            UserSpeechStarted(at=1.6),  # the caller speaks again before the first final arrives
            Transcript(text="a table for two", final=True),
            UserSpeechStopped(at=3.0, last_voiced_at=2.5),
            Transcript(text="at eight please", final=True),
        )

    harness.run(script)
    assert [t.text for t in harness.turns] == ["a table for two", "at eight please"]


def test_a_finals_marks_are_recorded_on_the_turn_it_ends():
    """An STT cannot key marks by epoch (the turn's epoch opens when the turn ends): the turn-taker records the marks
    a final Transcript carries on the turn it ends — whether the final came after its stop or before it."""
    harness = Harness()

    async def script(h: Harness) -> None:
        await h.send(
            UserSpeechStarted(at=0.0),
            UserSpeechStopped(at=1.5, last_voiced_at=1.0),
            Transcript(text="a table for two", final=True, marks=(("stt.sdk_call", 1.51), ("stt.sdk_answer", 1.6))),
            UserSpeechStarted(at=2.0),
            Transcript(text="at eight please", final=True, marks=(("stt.sdk_answer", 2.9),)),  # before its stop
            UserSpeechStopped(at=3.0, last_voiced_at=2.5),
        )

    harness.run(script)
    epochs = [t.epoch for t in harness.turns]
    assert len(epochs) == 2
    turns = {t.turn: t.marks for t in harness.pipeline.trace.turns}
    assert (turns[epochs[0]]["stt.sdk_call"], turns[epochs[0]]["stt.sdk_answer"]) == (1.51, 1.6)
    assert turns[epochs[1]]["stt.sdk_answer"] == 2.9 and "stt.sdk_call" not in turns[epochs[1]]


# ------------------------------------------------------------------------------------------- the VAD


def _vad_events(pcm: np.ndarray, *, start_ms: float) -> list[object]:
    """What a VADStage emits besides audio for ``pcm`` fed in 20 ms frames."""
    clock = VirtualClock()
    vad = ScriptedVAD(AudioFormat(RATE), start_ms=start_ms, stop_ms=300)
    sink = Collect()
    pipeline = Pipeline([vad, sink], clock=clock)

    async def main() -> None:
        run = asyncio.create_task(pipeline.run())
        await asyncio.sleep(0)
        for pts in range(0, pcm.size, 320):
            await vad.receive(AudioFrame(pcm=pcm[pts : pts + 320].tobytes(), sample_rate=RATE, pts=pts), DOWNSTREAM)
        await pipeline.end()
        await run

    clock.run(main())
    return [f for f in sink.frames if isinstance(f, UserSpeechStarted | UserSpeechProgress | UserSpeechStopped)]


def test_the_vad_counts_start_ms_to_the_last_voiced_sample():
    pcm = np.zeros(RATE, dtype=np.int16)
    pcm[1280 : 1280 + 657] = 10000  # 41 ms of sound from a frame edge: its third frame ends 60 ms after it began
    assert _vad_events(pcm, start_ms=60) == []
    pcm[1280 : 1280 + 960] = 10000  # 60 ms
    assert [type(e) for e in _vad_events(pcm, start_ms=60)] == [
        UserSpeechStarted,
        UserSpeechProgress,
        UserSpeechStopped,
    ]


def test_the_vad_reports_progress_with_every_voiced_frame_after_the_start():
    pcm = np.zeros(RATE, dtype=np.int16)
    pcm[3200:6400] = 10000  # 200 ms of sound from 0.2 s
    events = _vad_events(pcm, start_ms=60)
    assert isinstance(events[0], UserSpeechStarted) and events[0].at == 0.2
    progress = [e.voiced_until for e in events if isinstance(e, UserSpeechProgress)]
    assert progress == pytest.approx([0.26, 0.28, 0.30, 0.32, 0.34, 0.36, 0.38, 0.40])
    assert isinstance(events[-1], UserSpeechStopped) and events[-1].last_voiced_at == 0.4


# --------------------------------------------------------------------------------------- whole calls

OPENING_HOURS = "We are open every day from noon until eleven at night, and on Sundays we close at ten."


def test_a_short_noise_over_the_bot_does_not_cut_it_off_on_duration_alone(tmp_path):
    """``min_words: 0`` interrupts on duration alone; a 100 ms noise is not 300 ms of speech, however long the VAD's
    hang-over (500 ms) keeps the utterance open."""
    script = [
        Say("Tell me about your opening hours."),
        Noise(duration=0.1, during_reply=0.8),
        Say("Thanks.", pause=0.5),
    ]
    result = run_call(script, tmp_path, replies=[OPENING_HOURS, "You're welcome."], policy=TurnPolicy(min_words=0))
    assert not any(t.interrupted for t in result.turns)


def test_a_word_shorter_than_min_speech_ms_does_not_barge_in(tmp_path):
    assert word_duration("no") < 0.3
    script = [Say("Tell me about your opening hours."), Say("no", barge_in=0.8), Say("Thanks.", pause=0.5)]
    result = run_call(script, tmp_path, replies=[OPENING_HOURS, "OK.", "You're welcome."])
    assert not [t for t in result.turns if t.data.get("barge_in")]


def test_the_usage_of_a_final_whose_stop_never_came_is_kept_when_the_call_ends():
    # A cloud STT's endpointing may send a final before the VAD's stop; if the call ends in between, the audio the
    # STT measured for that utterance is still the call's (billed), not lost with the final waiting for its stop.
    harness = Harness()

    async def script(h: Harness) -> None:
        await h.send(UserSpeechStarted(at=0.0))
        await h.send(Transcript(text="Hello.", final=True, usage=(("stt", "audio_seconds", 1.25),)))

    harness.run(script)
    assert harness.turns == []
    assert harness.pipeline.usage.totals == {"stt": {"audio_seconds": 1.25}}
    assert harness.pipeline.usage.unassigned == {"stt": {"audio_seconds": 1.25}}


# ------------------------------------------------------------------------------- false interruptions


async def _cut_off_then(h: Harness, final: str) -> None:
    """The caller cuts the bot off ("wait" in a partial), stops, and the final says ``final``."""
    await h.bot_starts()
    await h.send(UserSpeechStarted(at=1.0), UserSpeechProgress(voiced_until=1.5))
    await h.send(Transcript(text="wait", final=False))
    assert [i.reason for i in h.interrupts] == ["barge-in"]
    await h.send(UserSpeechStopped(at=2.0, last_voiced_at=1.5), Transcript(text=final, final=True))


def test_a_barge_in_that_said_nothing_asks_the_bot_to_carry_on():
    """The partial heard "wait", the final heard nothing: the bot was cut off for nothing. Instead of leaving the
    line silent until the caller speaks, the turn-taker asks the reasoner to carry on, in the epoch the barge-in
    opened, with the policy's resume prompt as the caller's side — given to the reasoner, never to the
    conversation."""
    harness = Harness()
    harness.run(lambda h: _cut_off_then(h, ""))
    (resumed,) = harness.turns
    assert resumed.resumed and resumed.text == ""
    assert resumed.epoch == harness.interrupts[0].epoch == harness.pipeline.epoch
    assert resumed.context[-1] == Message("user", DEFAULT_RESUME_PROMPT)
    assert all(m.text != DEFAULT_RESUME_PROMPT for m in harness.turn.conversation.messages)


def test_a_barge_in_that_said_nothing_leaves_the_line_silent_without_a_resume_prompt():
    harness = Harness(TurnPolicy(resume_prompt=None))
    harness.run(lambda h: _cut_off_then(h, " "))
    assert harness.turns == []


def test_a_barge_in_that_said_something_is_a_turn_not_a_resume():
    harness = Harness()
    harness.run(lambda h: _cut_off_then(h, "wait a second"))
    assert [(t.text, t.resumed) for t in harness.turns] == [("wait a second", False)]


@pytest.mark.parametrize(
    ("second", "answered"),
    [
        ("a table for two", [("a table for two", False)]),  # a turn: it is what the bot answers, not a resume
        ("", [("", True)]),  # no turn either: the resume the false interruption owes comes with its final
    ],
)
def test_a_resume_waits_while_the_caller_has_the_floor_again(second: str, answered: list[tuple[str, bool]]):
    """The caller speaks again before the empty final of the barge-in lands: that utterance decides."""
    harness = Harness()

    async def script(h: Harness) -> None:
        await h.bot_starts()
        await h.send(UserSpeechStarted(at=1.0), UserSpeechProgress(voiced_until=1.5))
        await h.send(Transcript(text="wait", final=False))
        await h.send(UserSpeechStopped(at=2.0, last_voiced_at=1.5), UserSpeechStarted(at=2.1))
        await h.send(Transcript(text="", final=True))
        assert h.turns == []
        await h.send(UserSpeechStopped(at=3.0, last_voiced_at=2.6), Transcript(text=second, final=True))

    harness.run(script)
    assert [(t.text, t.resumed) for t in harness.turns] == answered
    assert harness.turns[0].epoch == harness.pipeline.epoch


def test_a_noise_that_cut_the_bot_off_is_followed_by_the_rest_of_the_reply(tmp_path):
    """A whole call: with ``min_words: 0`` a 600 ms noise over the reply cuts it off on duration alone, and its
    utterance holds no words. The bot carries on (the next reply), the caller hears it, and the conversation keeps
    the cut reply as heard, then the continuation — no resume prompt in it."""
    rest = "As I was saying, on Sundays we close at ten."
    script = [Say("Tell me about your opening hours."), Noise(duration=0.6, during_reply=1.0)]
    result = run_call(script, tmp_path, replies=[OPENING_HOURS, rest], policy=TurnPolicy(min_words=0))
    cut, resumed = result.turns
    assert cut.interrupted and 0 < len(cut.heard) < len(OPENING_HOURS.split())
    assert resumed.data["resumed"] and resumed.data["user_text"] == "" and resumed.data["barge_in"]
    assert resumed.heard == rest.split() and not resumed.interrupted
    caller_lines = [(line["text"], line["resumed"]) for line in result.transcript if line["speaker"] == "caller"]
    assert caller_lines == [("Tell me about your opening hours.", False), ("", True)]
    assert "no words; the bot carried on" in (tmp_path / "report.html").read_text()
    said = [(m.role, m.text, m.interrupted) for m in result.conversation.messages]
    assert said == [
        ("user", "Tell me about your opening hours.", False),
        ("assistant", " ".join(cut.heard), True),
        ("assistant", rest, False),
    ]


def test_heard_words_are_joined_as_written_in_every_script():
    from voxpipe.pipeline.context import join_words

    assert join_words(("Sure,", "four", "at", "eight.")) == "Sure, four at eight."
    assert join_words(("我们", "今晚", "八点，", "好吗？")) == "我们今晚八点，好吗？"  # noqa: RUF001
    assert join_words(("今晚", "at", "8", "点。")) == "今晚 at 8 点。", "a space stays where Latin meets CJK"
