"""ElevenLabs streaming TTS: the stage (stream-input WebSocket, SDK message types) against FakeElevenLabs on
127.0.0.1, through configured calls on a RealClock.

A configured call runs on its own event loop (``run_configured_call`` calls ``asyncio.run``), so each test runs it
in a worker thread while the fake serves on the test's loop; tests wait on what the fake saw, never on sleeps.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import websockets
from websockets.asyncio.client import connect

from tests.helpers import Collect, cancel_while_stopping, watching_stop
from voxpipe.call import CallResult, run_configured_call
from voxpipe.config import BuildContext, ConfigError, parse_config
from voxpipe.pipeline import (
    DOWNSTREAM,
    AudioFormat,
    LLMRequest,
    Pipeline,
    RealClock,
    ResponseEnd,
    SpeakableChunk,
    Stage,
    TTSAudioFrame,
    TTSDone,
    WordMark,
)
from voxpipe.stages.cloud import ProviderError
from voxpipe.stages.elevenlabs_tts import ElevenLabsTTS, ElevenLabsTTSSettings, WordAligner, _container
from voxpipe.testing.caller import Say
from voxpipe.testing.fakes.elevenlabs import FakeElevenLabs
from voxpipe.testing.fakes.server import Faults
from voxpipe.testing.signals import speechlike

pytestmark = [pytest.mark.timeout(30)]  # the tests below that run calls set their own

RATE = 16000
QUESTION = "A table tonight?"
REPLY = "Yes, for four at eight. Shall I book it?"
SECOND = "Of course, red or white?"


def config(
    fake: FakeElevenLabs, replies: list[str], on_error: str = "stop", ttft_s: float = 0.1, **tts: Any
) -> tuple[Any, Any]:
    return parse_config(
        {
            "audio": {"sample_rate": RATE},
            "vad": {"provider": "scripted", "stop_ms": 300},
            "stt": {"provider": "scripted"},
            "llm": {"provider": "scripted", "replies": replies, "ttft_s": ttft_s},
            "tts": {
                "provider": "elevenlabs",
                "on_error": on_error,
                "base_url": fake.url,
                **({"api_key": fake.api_key} | tts),
            },
        }
    )


async def call(
    fake: FakeElevenLabs,
    script: list[Any],
    out: Path,
    replies: list[str] | None = None,
    on_error: str = "stop",
    ttft_s: float = 0.1,
    **tts: Any,
) -> CallResult:
    """Run a configured call against ``fake`` in a worker thread (its own loop, real time)."""
    parsed, settings = config(fake, replies or [REPLY], on_error, ttft_s, **tts)
    return await asyncio.to_thread(run_configured_call, parsed, settings, script, out, clock=RealClock())


def errors(out: Path) -> list[dict[str, Any]]:
    """The ErrorFrames of the call (pipeline.errors), as transcript.json keeps them."""
    return json.loads((out / "transcript.json").read_text())["errors"]


def bot_channel(out: Path) -> np.ndarray:
    with wave.open(str(out / "recording.wav")) as wav:
        data = np.frombuffer(wav.readframes(wav.getnframes()), dtype=np.int16).reshape(-1, 2)
    return data[:, 1]


def client_messages(fake: FakeElevenLabs, connection: int = 1) -> list[dict[str, Any]]:
    return [s.data for s in fake.of("message") if s.data["connection"] == connection]


def spoken_words(fake: FakeElevenLabs, connection: int = 1) -> list[tuple[str, int, int]]:
    """Where each word is in the audio the fake sent on ``connection``: its generations, one after the other."""
    spoken: list[tuple[str, int, int]] = []
    sent = 0
    for generation in (g for g in fake.of("generation") if g.data["connection"] == connection):
        samples, spans = speechlike(generation.data["text"], RATE, f0=fake.f0, rate=fake.rate)
        spoken += [(span.word, sent + span.start, sent + span.end) for span in spans]
        sent += len(samples)
    return spoken


def assert_marked_in_own_audio(
    marks: list[WordMark], spoken: list[tuple[str, int, int]], *, left_out: str = ""
) -> None:
    """Each mark (in samples of the audio sent) is its word's, in order, and ends inside that word's audio; a word
    ``left_out`` of the alignment is marked with no length where the next word starts, or at the reply's end."""
    assert [mark.word for mark in marks] == [word for word, _, _ in spoken[: len(marks)]]
    for i, (mark, (word, start, end)) in enumerate(zip(marks, spoken, strict=False)):
        if word == left_out:
            after = spoken[i + 1][1] if i + 1 < len(spoken) else end
            assert mark.start == mark.end and end <= mark.end <= after + RATE // 500, f"{mark}: where the next starts"
        else:
            assert start - RATE // 500 <= mark.start and start < mark.end <= end + RATE // 500, f"{mark} in its audio"


def recording_emitted(
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[list[tuple[int, bytes, WordMark | None]], dict[int, int]]:
    """What the stage hands to ``emit_audio`` (epoch, PCM, each mark: in samples of the audio ElevenLabs sent), and
    the leading silence the base then dropped, per reply."""
    emitted: list[tuple[int, bytes, WordMark | None]] = []
    trimmed: dict[int, int] = {}
    emit_audio = ElevenLabsTTS.emit_audio

    async def recording(self: ElevenLabsTTS, epoch: int, pcm: bytes, marks: Any = (), text: str = "") -> None:
        emitted.append((epoch, pcm, None))
        emitted.extend((epoch, b"", mark) for mark in marks)
        await emit_audio(self, epoch, pcm, marks, text)
        trimmed[epoch] = self._trimmed

    monkeypatch.setattr(ElevenLabsTTS, "emit_audio", recording)
    return emitted, trimmed


# ------------------------------------------------------------------------------------------- a normal reply


@pytest.mark.timeout(30)
async def test_a_reply_streams_with_word_marks_and_every_word_is_heard(tmp_path):
    async with FakeElevenLabs() as fake:
        result = await call(fake, [Say(QUESTION, pause=0.3)], tmp_path)
    assert result.outcome == "ended" and not errors(tmp_path)
    (turn,) = result.turns
    assert not turn.interrupted
    assert list(turn.heard) == REPLY.split(), "word marks from the alignment: every word heard, in order"
    assert np.any(bot_channel(tmp_path)), "the reply's audio is in the recording"
    connect_data = fake.of("connect")[0].data
    assert connect_data["path"] == "/v1/text-to-speech/JBFqnCBsd6RMkjVDRZzb/stream-input"
    assert connect_data["headers"]["xi-api-key"] == fake.api_key
    query = connect_data["query"]
    assert query["model_id"] == "eleven_flash_v2_5" and query["output_format"] == "pcm_16000"
    assert query["sync_alignment"] == "true" and query["inactivity_timeout"] == "20"
    messages = client_messages(fake)
    assert messages[0]["text"] == " " and "xi-api-key" not in messages[0], "BOS first; the key is in the header"
    texts = messages[1:-1]
    assert len(texts) >= 2 and all(m["flush"] is True and m["text"].endswith(" ") for m in texts)
    assert " ".join(m["text"].strip() for m in texts) == REPLY
    assert messages[-1] == {"connection": 1, "text": ""}, "EOS last"
    assert "final" in fake.kinds() and "end" in fake.kinds()
    assert "close" not in fake.kinds() and "disconnect" not in fake.kinds()
    assert result.usage["tts"]["characters"] == sum(len(m["text"]) for m in texts), "characters sent, spaces too"


@pytest.mark.timeout(30)
async def test_voice_settings_language_and_schedule_reach_elevenlabs(tmp_path):
    async with FakeElevenLabs() as fake:
        result = await call(
            fake,
            [Say(QUESTION, pause=0.3)],
            tmp_path,
            voice_id="voice123",
            model="eleven_turbo_v2_5",
            language_code="en",
            voice_settings={"stability": 0.4, "similarity_boost": 0.8, "speed": 1.1},
            flush_each_chunk=False,
            chunk_length_schedule=[50, 120],
        )
    assert result.outcome == "ended" and list(result.turns[0].heard) == REPLY.split()
    query = fake.of("connect")[0].data["query"]
    assert query["model_id"] == "eleven_turbo_v2_5" and query["language_code"] == "en"
    assert fake.of("connect")[0].data["path"] == "/v1/text-to-speech/voice123/stream-input"
    bos, *texts, _eos = client_messages(fake)
    assert bos["voice_settings"] == {"stability": 0.4, "similarity_boost": 0.8, "speed": 1.1}
    assert bos["generation_config"] == {"chunk_length_schedule": [50, 120]}
    assert all(m["try_trigger_generation"] is True and "flush" not in m for m in texts)


# ------------------------------------------------------------------------------------------------ barge-in


@pytest.mark.timeout(30)
async def test_barge_in_closes_the_socket_and_nothing_stale_is_played(tmp_path):
    long_reply = (
        "We have a table for four at eight, and another at nine by the window, "
        "and on the terrace there is room for six at half past seven."
    )
    script = [Say(QUESTION, pause=0.3), Say("Wait, what about wine?", barge_in=0.6)]
    async with FakeElevenLabs(rtf=0.9) as fake:  # slow synthesis: the reply is still streaming at the barge-in
        result = await call(fake, script, tmp_path, replies=[long_reply, SECOND])
        closed = await fake.wait_for("close", within_s=1)
    assert result.outcome == "ended" and not errors(tmp_path)
    assert closed.data["connection"] == 1, "the barge-in closed the first reply's socket (no cancel message exists)"
    cut, following = result.turns
    assert cut.interrupted and not following.interrupted
    full = long_reply.split()
    assert 0 < len(cut.heard) < len(full) and list(cut.heard) == full[: len(cut.heard)]
    interrupted = [m for m in result.conversation.messages if m.role == "assistant" and m.interrupted]
    assert [m.text for m in interrupted] == [" ".join(cut.heard)], "the context keeps exactly the heard words"
    assert list(following.heard) == SECOND.split(), "the next reply opened a new socket and was spoken in full"
    assert [s.data["connection"] for s in fake.of("end")] == [2]
    bot = bot_channel(tmp_path)
    cut_at, next_play = cut.marks["out.interrupted"], following.marks["out.first_play"]
    assert np.any(bot[round((cut_at - 0.1) * RATE) : round(cut_at * RATE)]), "the bot was speaking before"
    assert not np.any(bot[round(cut_at * RATE) : round(next_play * RATE)]), "silent from the interrupt on"


@pytest.mark.timeout(30)
async def test_a_misspelled_word_in_the_alignment_does_not_shift_the_words_heard_after_it(tmp_path, monkeypatch):
    # Flash v2.5 aligns "hospitalized" as "hospitt alized" (a doubled letter, a space inside the word): the words
    # after it must still be marked where their own audio is, so a barge-in keeps only the words that played.
    reply = "Have you ever been hospitalized for it, or has anyone in your family had it before, and when was that?"
    emitted, trimmed = recording_emitted(monkeypatch)
    script = [Say(QUESTION, pause=0.3), Say("Wait, what about wine?", barge_in=3.0)]
    glitches = {"hospitalized": "hospitt alized"}
    async with FakeElevenLabs(rtf=0.9, glitch_words=glitches, leading_space=True) as fake:
        result = await call(fake, script, tmp_path, replies=[reply, SECOND])
    assert result.outcome == "ended" and not errors(tmp_path)
    cut, following = result.turns
    full = reply.split()
    assert cut.interrupted and list(cut.heard) == full[: len(cut.heard)], "the heard words are the reply's, in order"
    assert full.index("hospitalized") + 2 < len(cut.heard) < len(full), "cut two words or more after the glitch"
    spoken = spoken_words(fake)
    first_epoch = min(epoch for epoch, _, _ in emitted)
    marks = [mark for epoch, _, mark in emitted if epoch == first_epoch and mark is not None]
    assert len(marks) >= len(cut.heard)
    assert_marked_in_own_audio(marks, spoken)
    last_heard, first_unheard = marks[len(cut.heard) - 1], spoken[len(cut.heard)]
    cut_at = round(cut.played_s * RATE) + trimmed[first_epoch]  # the cut, in samples of the audio sent
    assert last_heard.end <= cut_at < first_unheard[2], "heard: the words whose audio played, not one more"
    assert list(following.heard) == SECOND.split()


class Head(Stage):
    """The first stage of a pipeline driven frame by frame; it starts last (consumers before producers)."""

    def __init__(self) -> None:
        super().__init__(name="head")
        self.started = asyncio.Event()

    async def start(self) -> None:
        self.started.set()


class Tail(Collect):
    """Keeps every frame; ``done`` is set by the first reply's TTSDone."""

    def __init__(self) -> None:
        super().__init__(name="tail")
        self.done = asyncio.Event()

    async def process(self, frame: Any, direction: Any) -> None:
        await super().process(frame, direction)
        if isinstance(frame, TTSDone):
            self.done.set()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("glitch", "left_out"),
    [
        ({"going": "goi"}, ""),  # cut short by two letters or more
        ({"going": ""}, "going"),  # left out altogether
        ({"tonight.": "toni"}, ""),  # the text's last word cut short: the text counts as spoken at its end
        ({"tonight.": ""}, "tonight."),  # the text's last word left out
    ],
)
async def test_a_word_cut_short_or_left_out_of_the_alignment_costs_only_its_own_marks_and_a_pause_is_no_stall(
    glitch, left_out
):
    # All of the first text's audio comes, then the reasoner pauses (a tool call) three times read_timeout_s: no
    # audio is due, so that is not a stall; every later word is marked where its own audio is.
    first, second = "I am going to be there at eight tonight.", "See you then."
    async with FakeElevenLabs(glitch_words=glitch) as fake:
        head, tail = Head(), Tail()
        tts = ElevenLabsTTS(ElevenLabsTTSSettings(base_url=fake.url, read_timeout_s=0.5), api_key=fake.api_key)
        pipeline = Pipeline([head, tts, tail], clock=RealClock())
        running = asyncio.create_task(pipeline.run())
        await asyncio.wait_for(head.started.wait(), 10)
        epoch = pipeline.next_epoch()
        await tts.receive(LLMRequest(epoch=epoch), DOWNSTREAM)
        await tts.receive(SpeakableChunk(epoch=epoch, text=first), DOWNSTREAM)
        messages = -(-len(speechlike(first + " ", RATE, f0=fake.f0, rate=fake.rate)[0]) // round(fake.chunk_s * RATE))
        await fake.wait_for("audio", lambda _: len(fake.of("audio")) == messages, within_s=10)  # all its audio
        await asyncio.sleep(1.5)  # the reasoner's pause
        await tts.receive(SpeakableChunk(epoch=epoch, text=second), DOWNSTREAM)
        await tts.receive(ResponseEnd(epoch=epoch), DOWNSTREAM)
        done = asyncio.ensure_future(tail.done.wait())
        await asyncio.wait([running, done], timeout=10, return_when=asyncio.FIRST_COMPLETED)
        done.cancel()
        assert tail.done.is_set() and not running.done() and pipeline.errors == [], (
            "no stall: nothing was due during the pause"
        )
        pipeline.cancel("hung up")
        assert await asyncio.wait_for(running, 10) == "hung up"
    marks = [m for f in tail.frames if isinstance(f, TTSAudioFrame) for m in f.words]
    marks = [WordMark(m.word, m.start + tts._trimmed, m.end + tts._trimmed) for m in marks]  # in the audio sent
    assert [m.word for m in marks] == [*first.split(), *second.split()], "every word marked, once, in order"
    assert_marked_in_own_audio(marks, spoken_words(fake), left_out=left_out)


@pytest.mark.timeout(30)
async def test_audio_cut_mid_sample_across_messages_plays_in_full(tmp_path, monkeypatch):
    # ElevenLabs' messages need not end on a sample: the byte left over is the start of the next message's audio.
    emitted, _ = recording_emitted(monkeypatch)
    async with FakeElevenLabs(mid_sample_cuts=True) as fake:
        result = await call(fake, [Say(QUESTION, pause=0.3)], tmp_path)
    assert result.outcome == "ended" and not errors(tmp_path)
    sent = [s.data["bytes"] for s in fake.of("audio")]
    assert any(n % 2 for n in sent), "the fake cut messages mid-sample"
    assert sum(len(pcm) for _, pcm, _ in emitted) == sum(sent), "every byte the fake sent was emitted"
    assert all(len(pcm) % 2 == 0 for _, pcm, _ in emitted), "in whole samples"
    assert list(result.turns[0].heard) == REPLY.split()
    assert_marked_in_own_audio([mark for _, _, mark in emitted if mark is not None], spoken_words(fake))


@pytest.mark.timeout(30)
async def test_a_reply_closed_after_eos_without_isfinal_still_marks_its_last_word(tmp_path):
    # isFinal is optional before the 1000 close after EOS. The alignment cut the last word short ("i" for "it?", as
    # Flash v2.5 does), so only the reply's end marks it: the close must, as isFinal would, or it is never heard.
    async with FakeElevenLabs(close_without_final=True, glitch_words={"it?": "i"}) as fake:
        result = await call(fake, [Say(QUESTION, pause=0.3)], tmp_path)
    assert result.outcome == "ended" and not errors(tmp_path)
    assert not fake.of("final") and [s.data["connection"] for s in fake.of("end")] == [1], "closed with no isFinal"
    assert list(result.turns[0].heard) == REPLY.split(), "every word heard, the last one too"


CHINESE = "我们今晚八点有一张四人桌，靠窗的位置在大厅的最里面非常安静适合聊天您要现在就帮您预订吗？"  # noqa: RUF001


@pytest.mark.timeout(30)
async def test_a_chinese_reply_cut_midway_keeps_the_characters_that_played(tmp_path, monkeypatch):
    # Chinese has no spaces: each two characters are a word (as the chunker counts them), marked from ElevenLabs'
    # per-character alignment, so a barge-in in the middle of a clause keeps what played of it, not nothing.
    _, trimmed = recording_emitted(monkeypatch)
    script = [Say(QUESTION, pause=0.3), Say("Wait, what about wine?", barge_in=0.75)]
    async with FakeElevenLabs(rtf=0.9) as fake:
        result = await call(fake, script, tmp_path, replies=[CHINESE, SECOND], language_code="zh")
    assert result.outcome == "ended" and not errors(tmp_path)
    cut = result.turns[0]
    heard = "".join(cut.heard)
    assert cut.interrupted and heard and CHINESE.startswith(heard)
    # The fake spreads a text's characters evenly over its audio: those that had ended when the reply was cut.
    cut_at = round(cut.played_s * RATE) + trimmed[min(trimmed)]
    played = 0
    for word, start, end in spoken_words(fake):
        step = (end - start) / len(word)
        played += sum(start + round((k + 1) * step) <= cut_at for k in range(len(word)))
    texts = [g.data["text"].strip() for g in fake.of("generation") if g.data["connection"] == 1]
    assert len(texts[0]) + 4 < played < len(CHINESE) - 4, "cut in the middle of a text, not at its ends"
    assert played - 2 <= len(heard) <= played + 1, f"heard {heard!r}: the played characters, to two"
    [said] = [m for m in result.conversation.messages if m.role == "assistant" and m.interrupted]
    assert said.text == heard, "the conversation keeps it as written, with no spaces between its words"


# ------------------------------------------------------------------------------------------------- refusals


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("status", "meaning"),
    [(401, "API key rejected"), (429, "rate limited"), (500, "server error"), (503, "server error")],
)
async def test_a_refused_handshake_stops_the_call_with_a_clear_error(tmp_path, status, meaning):
    async with FakeElevenLabs(faults=Faults(refuse=status)) as fake:
        with pytest.raises(ProviderError, match=f"ElevenLabs: {meaning} \\(HTTP {status}: fake ElevenLabs"):
            await call(fake, [Say(QUESTION, pause=0.3), Say("Hello?", pause=1.0)], tmp_path)
    assert [s.data["status"] for s in fake.of("refused")] == [status], "refused once: no retry loop"
    (error,) = errors(tmp_path)
    assert error["fatal"] and error["stage"] == "tts" and f"HTTP {status}" in error["error"]
    if status == 401:
        assert "API key" in error["error"] and "tts.api_key" in error["error"], "the config gave the key"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("key_in_config", [True, False])
async def test_a_rejected_key_names_where_the_call_took_it_from(tmp_path, monkeypatch, key_in_config):
    # The hint points at the key that was used: tts.api_key when the config gives one, else ELEVENLABS_API_KEY.
    monkeypatch.setenv("ELEVENLABS_API_KEY", "a-key-from-the-environment")
    async with FakeElevenLabs(faults=Faults(refuse=401)) as fake:
        with pytest.raises(ProviderError, match=r"^ElevenLabs: API key rejected \(HTTP 401") as caught:
            api_key = "a-key-from-the-config" if key_in_config else None
            await call(fake, [Say(QUESTION, pause=0.3)], tmp_path, api_key=api_key)
    used, unused = ("tts.api_key", "ELEVENLABS_API_KEY") if key_in_config else ("ELEVENLABS_API_KEY", "tts.api_key")
    assert str(caught.value).endswith(f"; check {used}") and unused not in str(caught.value)


@pytest.mark.timeout(30)
async def test_a_wrong_key_is_refused_by_the_fake(tmp_path):
    async with FakeElevenLabs(api_key="the-right-key") as fake:
        parsed, settings = config(fake, [REPLY], api_key="a-wrong-key")
        with pytest.raises(ProviderError, match="API key rejected \\(HTTP 401"):
            await asyncio.to_thread(
                run_configured_call, parsed, settings, [Say(QUESTION, pause=0.3)], tmp_path, clock=RealClock()
            )
    assert fake.of("connect")[0].data["headers"]["xi-api-key"] == "a-wrong-key"


@pytest.mark.timeout(30)
async def test_skip_turn_abandons_the_failed_reply_and_the_call_continues(tmp_path):
    script = [Say(QUESTION, pause=0.3), Say("Hello, are you there?", pause=0.3)]
    # Synthesis at real time: the drop comes while the reply is being heard, after its first words.
    async with FakeElevenLabs(rtf=1.0, faults=Faults(drop_after=10), drop_connections=1) as fake:
        result = await call(fake, script, tmp_path, replies=[REPLY, SECOND], on_error="skip-turn")
    assert result.outcome == "ended"
    (error,) = errors(tmp_path)
    assert not error["fatal"] and "ElevenLabs: connection lost mid-reply" in error["error"]
    abandoned, following = result.turns
    assert abandoned.interrupted, "skip-turn interrupts the failed reply"
    assert 0 < len(abandoned.heard) < len(REPLY.split())
    interrupted = [m for m in result.conversation.messages if m.role == "assistant" and m.interrupted]
    assert [m.text for m in interrupted] == [" ".join(abandoned.heard)], "the context keeps what was heard"
    assert list(following.heard) == SECOND.split(), "the next turn is spoken on a new socket"
    assert len(fake.of("connect")) == 2 and [s.data["connection"] for s in fake.of("end")] == [2]


@pytest.mark.timeout(30)
async def test_a_socket_closed_right_after_the_upgrade_is_a_clear_error(tmp_path):
    # ElevenLabs refuses some requests after accepting the connection: it closes it at once, with 1008 and a
    # reason. The BOS send meets the closed socket; the error names ElevenLabs and the reason.
    reason = "quota_exceeded: this request exceeds your quota"
    async with FakeElevenLabs(close_on_open=(1008, reason)) as fake:
        with pytest.raises(ProviderError, match=f"ElevenLabs: .*closed with code 1008: {reason}"):
            await call(fake, [Say(QUESTION, pause=0.3), Say("Hello?", pause=1.0)], tmp_path)
    assert len(fake.of("closed-on-open")) == 1
    (error,) = errors(tmp_path)
    assert error["fatal"] and error["error"].startswith("ProviderError: ElevenLabs: ")


# ---------------------------------------------------------------------------------------- stalls and drops


@pytest.mark.timeout(30)
async def test_a_stall_before_the_first_audio_times_out(tmp_path):
    async with FakeElevenLabs(faults=Faults(stall_s=10)) as fake:
        with pytest.raises(ProviderError, match=r"ElevenLabs: no audio within 0\.5 s .*first_audio_timeout_s"):
            await call(fake, [Say(QUESTION, pause=0.3)], tmp_path, first_audio_timeout_s=0.5)
        await fake.wait_for("close")  # the socket was closed, not left hanging
    assert fake.of("stall") and not fake.of("audio")
    assert "first_audio_timeout_s" in errors(tmp_path)[0]["error"]


@pytest.mark.timeout(30)
async def test_keepalives_hold_the_socket_open_while_the_reasoner_is_slower_than_the_inactivity_timeout(tmp_path):
    # The socket opens when the reasoner is asked; its first text comes 6 s later, past the 5 s inactivity timeout.
    async with FakeElevenLabs() as fake:
        result = await call(fake, [Say(QUESTION, pause=0.3)], tmp_path, ttft_s=6.0, inactivity_timeout_s=5)
    assert result.outcome == "ended" and not errors(tmp_path)
    assert not fake.of("idle-timeout") and fake.of("keepalive")
    assert len(fake.of("connect")) == 1
    assert list(result.turns[0].heard) == REPLY.split(), "the reply after the keepalives is whole"


@pytest.mark.timeout(30)
async def test_with_buffering_on_a_pause_in_the_reply_asks_for_the_held_text_instead_of_failing(tmp_path):
    # flush_each_chunk off: ElevenLabs holds "Let me check." (below its schedule) while the tool runs; past
    # first_audio_timeout_s the stage asks it once to speak what it has, instead of calling that a stall.
    async def lookup() -> str:
        """Look up a free table."""
        await asyncio.sleep(2.5)
        return "eight"

    reply = {"text": "We have a table at {result}.", "tool": "lookup", "preamble": "Let me check."}
    async with FakeElevenLabs() as fake:
        parsed, settings = config(fake, [reply, "Fine."], flush_each_chunk=False, first_audio_timeout_s=1.0)
        script = [Say(QUESTION, pause=0.3)]
        result = await asyncio.to_thread(
            run_configured_call, parsed, settings, script, tmp_path, clock=RealClock(), tools={"lookup": lookup}
        )
    assert errors(tmp_path) == []
    assert [s.data["flush"] for s in fake.of("keepalive")] == [True]
    assert [s.data["text"] for s in fake.of("generation")][:2] == ["Let me check. ", "We have a table at eight. "]
    assert result.turns[0].heard == ["Let", "me", "check.", "We", "have", "a", "table", "at", "eight."]


@pytest.mark.timeout(30)
async def test_with_buffering_on_keepalives_hold_the_socket_while_held_text_waits_past_the_inactivity_timeout():
    # ElevenLabs holds "Let me check." (below trigger_chars) while a tool runs 6 s. The stage would ask for it only
    # after first_audio_timeout_s (8 s), but ElevenLabs closes a socket that gets no text for 5 s: keepalives must
    # go out while that audio is due too, so the held text and the text after the tool are both spoken.
    first, second = "Let me check.", "We have a table at eight."
    async with FakeElevenLabs() as fake:
        head, tail = Head(), Tail()
        settings = ElevenLabsTTSSettings(
            base_url=fake.url,
            flush_each_chunk=False,
            inactivity_timeout_s=5,
            first_audio_timeout_s=8.0,
            read_timeout_s=8.0,
        )
        tts = ElevenLabsTTS(settings, api_key=fake.api_key)
        pipeline = Pipeline([head, tts, tail], clock=RealClock())
        running = asyncio.create_task(pipeline.run())
        await asyncio.wait_for(head.started.wait(), 10)
        epoch = pipeline.next_epoch()
        await tts.receive(LLMRequest(epoch=epoch), DOWNSTREAM)
        await tts.receive(SpeakableChunk(epoch=epoch, text=first), DOWNSTREAM)
        await asyncio.sleep(6.0)  # the tool call
        assert not fake.of("generation"), "ElevenLabs still holds the text"
        await tts.receive(SpeakableChunk(epoch=epoch, text=second), DOWNSTREAM)
        await tts.receive(ResponseEnd(epoch=epoch), DOWNSTREAM)
        done = asyncio.ensure_future(tail.done.wait())
        await asyncio.wait([running, done], timeout=10, return_when=asyncio.FIRST_COMPLETED)
        done.cancel()
        assert tail.done.is_set() and pipeline.errors == [], "the socket stayed open through the tool call"
        pipeline.cancel("hung up")
        assert await asyncio.wait_for(running, 10) == "hung up"
    assert not fake.of("idle-timeout") and len(fake.of("connect")) == 1
    assert [s.data["flush"] for s in fake.of("keepalive")] == [False, False], "plain keepalives, at 2.5 s and 5 s"
    assert [s.data["text"] for s in fake.of("generation")] == [f"{first} {second} "], "spaces add no words"
    marks = [m.word for f in tail.frames if isinstance(f, TTSAudioFrame) for m in f.words]
    assert marks == [*first.split(), *second.split()], "every word spoken and marked"


@pytest.mark.timeout(30)
async def test_a_stall_mid_reply_times_out_instead_of_waiting_for_the_next_message(tmp_path):
    # All the text and EOS go out before the first audio (1 s); after it, the next message comes 4 s later.
    async with FakeElevenLabs(ttfa_s=1.0, rtf=40) as fake:
        with pytest.raises(ProviderError, match=r"ElevenLabs: stalled: no message for 0\.5 s while audio was due"):
            await call(fake, [Say(QUESTION, pause=0.3)], tmp_path, replies=["Sure."], read_timeout_s=0.5)
        await fake.wait_for("close")  # the socket was closed, not left hanging
    assert len(fake.of("audio")) == 1
    assert "read_timeout_s" in errors(tmp_path)[0]["error"]


@pytest.mark.timeout(30)
async def test_malformed_json_mid_reply_keeps_what_was_said_and_the_next_reply_connects_again(tmp_path):
    script = [Say(QUESTION, pause=0.3), Say("Hello, are you there?", pause=0.3)]
    # Real time: 1.5 s of the reply is played before the broken message comes.
    async with FakeElevenLabs(faults=Faults(corrupt="malformed-json"), corrupt_after=15, rtf=1.0) as fake:
        result = await call(fake, script, tmp_path, replies=[REPLY, SECOND], on_error="skip-turn")
    assert result.outcome == "ended"
    (error,) = errors(tmp_path)
    assert not error["fatal"] and "ElevenLabs: sent a message that is not JSON" in error["error"]
    failed, following = result.turns
    assert failed.interrupted and 0 < len(failed.heard) < len(REPLY.split())
    assert list(failed.heard) == REPLY.split()[: len(failed.heard)], "what was said before it stays said"
    said = [m for m in result.conversation.messages if m.role == "assistant"]
    assert said[0].text == " ".join(failed.heard) and said[0].interrupted
    assert list(following.heard) == SECOND.split() and len(fake.of("connect")) == 2


@pytest.mark.timeout(30)
async def test_a_drop_mid_stream_is_a_clear_error_and_the_next_reply_connects_again(tmp_path):
    script = [Say(QUESTION, pause=0.3), Say("Hello, are you there?", pause=0.3)]
    async with FakeElevenLabs(faults=Faults(drop_after=8), drop_connections=1) as fake:
        result = await call(fake, script, tmp_path, replies=[REPLY, SECOND], on_error="skip-frame")
    assert result.outcome == "ended"
    (error,) = errors(tmp_path)
    assert not error["fatal"] and "ElevenLabs: connection lost mid-reply" in error["error"]
    assert len(fake.of("audio")) >= 8 and fake.of("dropped")
    first, following = result.turns
    full = REPLY.split()
    assert not first.interrupted and 0 < len(first.heard) < len(full), "the audio before the drop was played out"
    assert list(first.heard) == full[: len(first.heard)]
    assert list(following.heard) == SECOND.split()
    assert len(fake.of("connect")) == 2 and [s.data["connection"] for s in fake.of("end")] == [2]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("run_cancelled", [False, True])
async def test_a_hang_up_closes_the_reply_socket_even_when_the_server_stopped_reading(run_cancelled):
    # The caller hangs up while ElevenLabs is wedged (it reads nothing more): stop() cancels the reply's receiver,
    # whose close then waits CLOSE_TIMEOUT_S for an answer before websockets aborts the connection. stop() waits
    # for it; and a close cut short anyway (run() itself cancelled while the stages stop, so the teardown cancels
    # the receiver again) aborts the connection rather than leave it CLOSING, its transport open, for good.
    Watched, stopping = watching_stop(ElevenLabsTTS)

    class SlowToStop(Stage):  # stops after the TTS (from the output back), and takes a while, as an STT flushing does
        async def stop(self) -> None:
            await asyncio.sleep(0.1)

    async with FakeElevenLabs(deaf=True) as fake:
        tts = Watched(ElevenLabsTTSSettings(base_url=fake.url), api_key=fake.api_key)
        pipeline = Pipeline([SlowToStop(name="head"), tts, Stage(name="tail")], clock=RealClock())
        running = asyncio.create_task(pipeline.run())
        epoch = pipeline.next_epoch()
        await tts.receive(LLMRequest(epoch=epoch), DOWNSTREAM)
        await tts.receive(SpeakableChunk(epoch=epoch, text="Hello there, how can I help?"), DOWNSTREAM)
        await fake.wait_for("deaf")
        assert tts._reply is not None and tts._reply.socket is not None
        websocket = tts._reply.socket
        pipeline.cancel("hung up")
        if run_cancelled:
            await cancel_while_stopping(running, stopping, websocket)
        else:
            assert await asyncio.wait_for(running, 10) == "hung up"
            assert websocket.state.name == "CLOSED", "closed by the time the call has ended"
    assert websocket.transport.is_closing()


@pytest.mark.timeout(30)
async def test_no_reply_connects_once_the_stage_has_stopped():
    # The stage's worker runs until the teardown: a reply it opens after stop() would be billed and never heard.
    started = asyncio.Event()

    class Head(Stage):  # the first stage starts last (consumers before producers)
        async def start(self) -> None:
            started.set()

    async with FakeElevenLabs() as fake:
        tts = ElevenLabsTTS(ElevenLabsTTSSettings(base_url=fake.url), api_key=fake.api_key)
        pipeline = Pipeline([Head(name="head"), tts, Stage(name="tail")], clock=RealClock())
        running = asyncio.create_task(pipeline.run())
        await asyncio.wait_for(started.wait(), 10)
        await tts.stop()
        epoch = pipeline.next_epoch()
        await tts.open_reply(epoch)
        assert not await tts.send_text(epoch, "Hello there.")
        pipeline.cancel("hung up")
        assert await asyncio.wait_for(running, 10) == "hung up"
    assert not fake.of("connect")


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("corrupt", "bad_audio", "problem"),
    [
        ("malformed-json", "base64", "sent a message that is not JSON"),
        ("unknown-event", "base64", "sent an unknown message"),
        ("bad-audio", "base64", "sent audio that is not valid base64"),
        # A byte lost: a message's audio may end mid-sample, so that is found at the reply's end (isFinal).
        ("bad-audio", "odd-bytes", "sent \\d+ bytes of audio in the reply, not a whole number of 16-bit samples"),
        ("bad-audio", "mp3", "sent MP3 audio, not the raw pcm_16000 PCM asked for"),
    ],
)
async def test_bad_messages_are_clear_errors(tmp_path, corrupt, bad_audio, problem):
    async with FakeElevenLabs(faults=Faults(corrupt=corrupt), bad_audio=bad_audio) as fake:
        with pytest.raises(ProviderError, match=f"^ElevenLabs: {problem}"):
            await call(fake, [Say(QUESTION, pause=0.3)], tmp_path)
        await fake.wait_for("end" if bad_audio == "odd-bytes" else "close")  # the socket was closed, not left hanging
    assert fake.of("corrupted")[0].data["how"] == corrupt
    assert errors(tmp_path)[0]["fatal"]


@pytest.mark.timeout(30)
async def test_pcm_that_starts_like_an_mp3_frame_header_is_played_as_pcm(tmp_path):
    # Samples -1025 then 144 are the bytes FF FB 90 00, which an MPEG layer III frame header starts with too: PCM
    # that starts so is still PCM, as no second frame header follows where that "frame" would end.
    async with FakeElevenLabs(first_samples=(-1025, 144)) as fake:
        result = await call(fake, [Say(QUESTION, pause=0.3)], tmp_path)
    assert result.outcome == "ended" and not errors(tmp_path)
    assert list(result.turns[0].heard) == REPLY.split() and np.any(bot_channel(tmp_path))


def test_mp3_is_told_from_pcm_by_the_frame_that_follows_its_first():
    frame = bytes([0xFF, 0xFB, 0x90, 0x64]) + bytes(413)  # MPEG-1 layer III, 128 kb/s, 44.1 kHz: 417 bytes
    assert _container(frame * 3) == "MP3", "frames back to back"
    assert _container(frame) == "MP3", "a message of exactly one frame"
    assert _container(frame + bytes(8)) is None, "a header with no frame after it: PCM that starts like one"
    assert _container(b"ID3\x04" + bytes(100)) == "MP3"


# ------------------------------------------------------------------------------------------------- config


@pytest.mark.timeout(30)
async def test_a_missing_api_key_is_a_config_error_before_any_connection(tmp_path, monkeypatch):
    monkeypatch.delenv("ELEVENLABS_API_KEY", raising=False)
    async with FakeElevenLabs() as fake:
        parsed, settings = config(fake, [REPLY], api_key=None)
        with pytest.raises(ConfigError, match=r"tts\.api_key: no API key for ElevenLabs: .*ELEVENLABS_API_KEY"):
            await asyncio.to_thread(run_configured_call, parsed, settings, [Say(QUESTION)], tmp_path, clock=RealClock())
    assert fake.seen == []


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "base_url", ["https://api.elevenlabs.io:443x", "https://api.elevenlabs.io:99999", "wss://[::1", "https://:443"]
)
async def test_a_base_url_with_a_bad_port_or_no_host_is_a_config_error_before_any_connection(tmp_path, base_url):
    async with FakeElevenLabs() as fake:
        with pytest.raises(ConfigError, match=r"tts\.base_url: not a URL ElevenLabs can be reached at: \S"):
            await call(fake, [Say(QUESTION)], tmp_path, base_url=base_url)
    assert fake.seen == []


def test_the_key_is_taken_from_the_environment(monkeypatch):
    monkeypatch.setenv("ELEVENLABS_API_KEY", "from-env")
    stage = ElevenLabsTTS.from_settings(ElevenLabsTTSSettings(), BuildContext(audio=AudioFormat(24000)), "tts")
    assert stage._api_key == "from-env" and stage.output_format == "pcm_24000"
    assert "from-env" not in repr(ElevenLabsTTSSettings(api_key="from-env")), "the key never shows in a repr"


@pytest.mark.parametrize("audio", [AudioFormat(11025), AudioFormat(16000, 2)])
def test_an_unsupported_audio_format_is_a_clear_error(audio):
    with pytest.raises(ConfigError, match=r"audio\.sample_rate: ElevenLabs streams mono PCM at 8000, 16000"):
        ElevenLabsTTS.from_settings(ElevenLabsTTSSettings(api_key="k"), BuildContext(audio=audio), "tts")


def test_settings_are_checked_with_their_key_paths():
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {
                "tts": {
                    "provider": "elevenlabs",
                    "voice_settings": {"speed": 3},
                    "chunk_length_schedule": [10],
                    "base_url": "ftp://x",
                    "colour": "blue",
                }
            }
        )
    text = str(caught.value)
    for path in ("tts.voice_settings.speed", "tts.chunk_length_schedule[0]", "tts.base_url", "tts.colour"):
        assert path in text


def test_the_module_imports_without_the_sdk_and_names_the_extra():
    code = (
        "import sys; sys.modules['elevenlabs'] = None\n"
        "import voxpipe.stages.elevenlabs_tts as m\n"
        "try:\n    m.ElevenLabsTTS(api_key='k')\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20, check=True)
    missing = "the ElevenLabs SDK is not installed (elevenlabs is missing): pip install 'voxpipe[elevenlabs]'"
    assert f"ProviderError ElevenLabs: {missing}" in out.stdout


# ------------------------------------------------------------------------------------------- the fake itself


@pytest.mark.timeout(10)
async def test_the_fake_takes_the_key_in_the_bos_message_when_there_is_no_header():
    async with FakeElevenLabs() as fake:
        url = f"{fake.ws_url}/v1/text-to-speech/v/stream-input?model_id=m&output_format=pcm_16000"
        async with connect(url) as socket:
            await socket.send(json.dumps({"text": " ", "xi-api-key": fake.api_key}))
            await socket.send(json.dumps({"text": "Hello there. ", "flush": True}))
            await socket.send(json.dumps({"text": ""}))
            received = [json.loads(m) async for m in socket]
        assert received[-1] == {"isFinal": True} and all("audio" in m for m in received[:-1])
        assert socket.close_code == 1000
        async with connect(url) as socket:
            await socket.send(json.dumps({"text": " ", "xi-api-key": "wrong"}))
            with pytest.raises(websockets.ConnectionClosedError):
                await socket.recv()
        assert socket.close_code == 1008
        assert [s.data["status"] for s in fake.of("refused")] == [401]


@pytest.mark.timeout(10)
async def test_the_fake_refuses_a_first_message_that_is_not_a_single_space():
    async with FakeElevenLabs() as fake:
        url = f"{fake.ws_url}/v1/text-to-speech/v/stream-input?model_id=m&output_format=pcm_16000"
        async with connect(url, additional_headers={"xi-api-key": fake.api_key}) as socket:
            await socket.send(json.dumps({"text": "Hello there. "}))
            with pytest.raises(websockets.ConnectionClosedError):
                await socket.recv()
        assert socket.close_code == 1008 and "single space" in (socket.close_reason or "")
    assert [s.data["text"] for s in fake.of("bad-first-message")] == ["Hello there. "]


@pytest.mark.timeout(30)
async def test_messages_as_elevenlabs_sends_them_are_spoken_with_every_word_marked(tmp_path, monkeypatch):
    # Audio messages carry "isFinal": null, and normalizedAlignment is not alignment: it starts with a space and
    # spells numbers as spoken. The stage marks words from alignment, the sent text.
    reply = "Yes, for 4 at 8. Shall I book it?"
    emitted, _ = recording_emitted(monkeypatch)
    async with FakeElevenLabs(null_is_final=True, normalized_words={"4": "four", "8.": "eight."}) as fake:
        result = await call(fake, [Say(QUESTION, pause=0.3)], tmp_path, replies=[reply])
        url = f"{fake.ws_url}/v1/text-to-speech/v/stream-input?model_id=m&output_format=pcm_16000"
        async with connect(url, additional_headers={"xi-api-key": fake.api_key}) as socket:  # what the fake sends
            for message in ({"text": " "}, {"text": reply + " ", "flush": True}, {"text": ""}):
                await socket.send(json.dumps(message))
            *audio, final = [json.loads(m) async for m in socket]
    assert all(m["isFinal"] is None for m in audio) and final == {"isFinal": True}
    assert "".join(c for m in audio for c in m["alignment"]["chars"]) == reply + " "
    normalized = "".join(c for m in audio for c in m["normalizedAlignment"]["chars"])
    assert normalized == " Yes, for four at eight. Shall I book it? "
    assert result.outcome == "ended" and not errors(tmp_path)
    assert list(result.turns[0].heard) == reply.split()
    assert_marked_in_own_audio([mark for _, _, mark in emitted if mark is not None], spoken_words(fake, connection=1))


# -------------------------------------------------------------------------------------------------- words


def test_characters_group_into_the_sent_words_across_messages():
    aligner = WordAligner(1000)  # 1 sample per ms: marks read as milliseconds
    aligner.expect("Hi there, ")
    aligner.expect("friend. ")
    # Message 1 (audio 0-100): "Hi the" — "Hi" is complete, "there," continues into the next message.
    first = aligner.add(list("Hi the"), [0, 10, 20, 30, 40, 50], [10, 10, 10, 10, 10, 10], offset=0, limit=100)
    assert first == [WordMark("Hi", 0, 20)]
    assert aligner.pending_chars == len("Hithere,friend.") - 5
    # Message 2 (audio 100-200, times from its own start): "re, friend." — both complete here.
    second = aligner.add(list("re, friend."), [i * 8 for i in range(11)], [8] * 11, offset=100, limit=200)
    assert second == [WordMark("there,", 30, 124), WordMark("friend.", 132, 188)]
    assert aligner.pending_chars == 0 and aligner.finish(at=200) == []


def test_a_mark_never_ends_after_the_audio_that_holds_it():
    aligner = WordAligner(16000)
    aligner.expect("Hello ")
    (mark,) = aligner.add(list("Hello"), [0, 50, 100, 150, 200], [50, 50, 50, 50, 90], offset=0, limit=4000)
    assert mark == WordMark("Hello", 0, 4000)


def aligned_as_elevenlabs_sends_it(
    text: str, misspelled: dict[str, str] | None = None, *, leading_space: bool = False, message_ms: int = 250
) -> tuple[list[list[WordMark]], WordAligner]:
    """The marks, message by message (then ``finish``'s), of ``text`` aligned in ``message_ms`` messages at 1
    sample per ms: word i is spoken from 100 i to 100 i + 80 ms, then a space; its characters (``misspelled``'s
    alignment text for it, if any, as Flash v2.5 sends) are spread evenly over it."""
    chars: list[tuple[str, int, int]] = [(" ", 0, 0)] if leading_space else []
    for i, word in enumerate(text.split()):
        spelled = (misspelled or {}).get(word, word)
        for k, char in enumerate(spelled):
            chars.append((char, 100 * i + 80 * k // len(spelled), 100 * i + 80 * (k + 1) // len(spelled)))
        chars.append((" ", 100 * i + 80, 100 * i + 100))
    aligner = WordAligner(1000)
    aligner.expect(text)
    audio_ms = chars[-1][2]
    messages = []
    for start in range(0, audio_ms, message_ms):
        held = [c for c in chars if start <= c[1] < start + message_ms]
        messages.append(
            aligner.add(
                [c[0] for c in held],
                [c[1] - start for c in held],
                [c[2] - c[1] for c in held],
                offset=start,
                limit=min(start + message_ms, audio_ms),
            )
        )
    return [*messages, aligner.finish(at=audio_ms)], aligner


GLITCHED = "Have you or your family ever been hospitalized for it? Tell me when."


@pytest.mark.parametrize(
    "misspelled",
    [
        {"hospitalized": "hospitt alized"},  # Flash v2.5 (pipecat #981): a doubled letter and a space in the word
        {"family": "ff amily"},  # the same, on the word's first letter
        {"been": "bean"},  # a letter substituted
        {"hospitalized": "hospitaized"},  # a letter dropped
        {"family": "ff amily", "hospitalized": "hospitt alized"},
    ],
)
def test_a_misspelled_alignment_marks_every_word_where_a_clean_one_does(misspelled):
    clean, _ = aligned_as_elevenlabs_sends_it(GLITCHED)
    glitched, aligner = aligned_as_elevenlabs_sends_it(GLITCHED, misspelled)
    assert [m.word for ms in glitched for m in ms] == GLITCHED.split(), "the sent words, each once, in order"
    assert glitched == clean, "each word marked in the same message, over the same audio, as a clean alignment's"
    assert aligner.pending_chars == 0


@pytest.mark.parametrize(
    "glitches",
    [
        {"hospitalized": "hospit"},  # cut short by letters
        {"family": "fam"},
        {"family": ""},  # left out of the alignment altogether
        {"ever": "", "been": ""},  # two words in a row
        {"family": "ff am", "ever": ""},  # garbled, then one left out
        {"Tell": ""},  # a sentence's first word
        {"when.": "wh"},  # the text's last word
        {"when.": ""},
    ],
)
def test_a_word_cut_short_or_left_out_costs_only_its_own_timing(glitches):
    clean, _ = aligned_as_elevenlabs_sends_it(GLITCHED)
    glitched, aligner = aligned_as_elevenlabs_sends_it(GLITCHED, glitches)
    marks = [m for ms in glitched for m in ms]
    assert [m.word for m in marks] == GLITCHED.split(), "the sent words, each once, in order"
    for clean_mark, mark in zip([m for ms in clean for m in ms], marks, strict=True):
        if mark.word not in glitches:
            assert mark == clean_mark, "the other words marked over the same audio as in a clean alignment"
    for word, spelled in glitches.items():
        i = GLITCHED.split().index(word)
        mark = marks[i]
        if spelled:
            assert 100 * i <= mark.start < mark.end <= 100 * i + 80, f"{mark}: over its own audio"
        else:  # with no length, where the next character starts: late, so never heard when it was not
            assert mark.start == mark.end >= 100 * i + 80, f"{mark}: after its own audio"
    assert aligner.pending_chars == 0


@pytest.mark.parametrize(
    "left_out",
    [
        # "table" ends in the "e" that "eight" begins with: after the whitespace, the alignment going on with "eight"
        # is not "table"'s last letter again (a repeat), which left "eight" and every word after it marked late.
        ("for", "two", "at"),
        # Four words: "tonight" is past the three words any run is looked for in, but a run that long is looked for
        # further; before, every word after the gap was marked at the reply's end.
        ("for", "two", "at", "eight"),
    ],
)
def test_after_words_left_out_the_alignment_goes_on_with_the_right_word(left_out):
    text = "We have a table for two at eight tonight by the window."
    glitched, aligner = aligned_as_elevenlabs_sends_it(text, dict.fromkeys(left_out, ""))
    marks = [m for ms in glitched for m in ms]
    assert [m.word for m in marks] == text.split()
    for i, mark in enumerate(marks):
        if mark.word not in left_out:
            assert 100 * i <= mark.start < mark.end <= 100 * i + 80, f"{mark}: over its own audio"
    assert aligner.pending_chars == 0


def test_a_message_ending_one_letter_after_a_word_cut_short_is_enough_to_go_on():
    # ElevenLabs' messages hold a tenth of a second or so: often a letter or two of a word. One is enough to find
    # the next word the alignment goes on with.
    aligner = WordAligner(1000)
    aligner.expect("I am going to be there. ")
    first = aligner.add(list("I am goi t"), [i * 10 for i in range(10)], [10] * 10, offset=0, limit=100)
    assert first == [WordMark("I", 0, 10), WordMark("am", 20, 40), WordMark("going", 50, 80)]
    second = aligner.add(list("o be there. "), [i * 10 for i in range(12)], [10] * 12, offset=100, limit=220)
    assert second == [WordMark("to", 90, 110), WordMark("be", 120, 140), WordMark("there.", 150, 210)]
    assert aligner.pending_chars == 0


def test_the_end_of_a_text_the_alignment_cut_short_leaves_no_audio_due():
    # No message says a text's audio is complete (isFinal comes after EOS only): whitespace after the alignment reached
    # the text's last word ends the text, so a reasoner's pause after it is not a stall.
    aligner = WordAligner(1000)
    aligner.expect("We will be there tonight. ")
    chars = list("We will be there toni")
    aligner.add(chars, [i * 10 for i in range(len(chars))], [10] * len(chars), offset=0, limit=210)
    assert aligner.pending_chars == 4, "the rest of the word may still come"
    aligner.add([" "], [0], [0], offset=210, limit=210)
    assert aligner.pending_chars == 0
    aligner.expect("Bye. ")
    assert aligner.pending_chars == len("ght.Bye."), "a new text: its audio is due (and the last one's rest, if any)"
    aligner.add(list("Bye. "), [0, 10, 20, 30, 40], [10] * 5, offset=210, limit=260)
    assert aligner.pending_chars == 0
    marks = aligner.finish(at=260)
    assert marks == [], "tonight. was marked when the next text's alignment passed it"


def test_a_text_whose_last_word_is_left_out_leaves_no_audio_due_but_a_new_text_does():
    aligner = WordAligner(1000)
    aligner.expect("See you then. ")
    marks = aligner.add(list("See you "), [i * 10 for i in range(8)], [10] * 8, offset=0, limit=100)
    assert [m.word for m in marks] == ["See", "you"] and aligner.pending_chars == 0
    aligner.expect("Bye. ")
    aligner.add([" "], [0], [0], offset=100, limit=100)  # whitespace, nothing of the new text yet: it is still due
    assert aligner.pending_chars == len("then.Bye.")
    assert aligner.finish(at=100) == [WordMark("then.", 100, 100), WordMark("Bye.", 100, 100)], "at the reply's end"


def test_chinese_is_marked_two_characters_at_a_time():
    # No spaces: the chunker counts two CJK characters as a word, and ElevenLabs aligns each character.
    aligner = WordAligner(1000)
    aligner.expect("我们今晚八点有空，您要来吗？ ")  # noqa: RUF001
    chars = list("我们今晚八点有空，您要来吗？ ")  # noqa: RUF001
    marks = aligner.add(chars, [i * 10 for i in range(len(chars))], [10] * len(chars), offset=0, limit=150)
    assert [m.word for m in marks] == ["我们", "今晚", "八点", "有空，", "您要", "来吗？"]  # noqa: RUF001
    assert marks[1] == WordMark("今晚", 20, 40) and aligner.pending_chars == 0
    dropped = WordAligner(1000)  # a character dropped at a word's end: the next word's first one passes it
    dropped.expect("我们今晚八点 ")
    marks = dropped.add(list("我们今八点"), [0, 10, 20, 30, 40], [10] * 5, offset=0, limit=50)
    assert [m.word for m in marks] == ["我们", "今晚", "八点"] and marks[1] == WordMark("今晚", 20, 30)


def test_a_leading_space_and_a_word_split_across_messages_are_one_word():
    # normalizedAlignment starts an utterance with a space; Flash may start a message with a space in the middle
    # of a word, carried over from the previous message (pipecat #4316, #4391): " la t" then " alent".
    aligner = WordAligner(1000)
    aligner.expect("Hola, la talent manager. ")
    first = aligner.add(list(" Hola, la t"), [i * 10 for i in range(11)], [10] * 11, offset=0, limit=110)
    assert first == [WordMark("Hola,", 10, 60), WordMark("la", 70, 90)]
    second = aligner.add(list(" alent manager. "), [i * 10 for i in range(16)], [10] * 16, offset=110, limit=270)
    assert second == [WordMark("talent", 100, 170), WordMark("manager.", 180, 260)]
    assert aligner.pending_chars == 0 and aligner.finish(at=270) == []


def test_dropped_letters_cost_only_their_own_word_and_leave_no_audio_due():
    # "yu" for "you", "wil" for "will" (the next word's first letter passes it), and the text's last word without
    # its last letter: that word counts as spoken, so the reply does not wait (read deadline) for a letter that
    # never comes; it is marked at the end of the reply.
    aligner = WordAligner(1000)
    aligner.expect("Do you think we will call you ")
    chars = list("Do yu think we wil call yo ")
    marks = aligner.add(chars, [i * 10 for i in range(len(chars))], [10] * len(chars), offset=0, limit=270)
    assert [m.word for m in marks] == ["Do", "you", "think", "we", "will", "call"]
    assert marks[1] == WordMark("you", 30, 50) and marks[4:] == [WordMark("will", 150, 180), WordMark("call", 190, 230)]
    assert aligner.pending_chars == 0
    assert aligner.finish(at=270) == [WordMark("you", 240, 260)]


def test_doubled_letters_do_not_count_as_the_rest_of_the_text():
    # "ff aami" has as many letters as "family": audio is still due until the word's last letters are aligned.
    aligner = WordAligner(1000)
    aligner.expect("Your family ")
    chars = list("Your ff aami")
    assert aligner.add(chars, [i * 10 for i in range(12)], [10] * 12, offset=0, limit=120) == [WordMark("Your", 0, 40)]
    assert aligner.pending_chars == 2
    (family,) = aligner.add(["l", "y", " "], [0, 10, 20], [10, 10, 10], offset=120, limit=150)
    assert family == WordMark("family", 50, 140) and aligner.pending_chars == 0


def test_characters_after_the_whole_text_is_aligned_are_ignored():
    aligner = WordAligner(1000)
    aligner.expect("Yes. ")
    chars = list("Yes. Yes. ")  # a second pass over the same text (as with pronunciation dictionaries)
    marks = aligner.add(chars, [i * 10 for i in range(10)], [10] * 10, offset=0, limit=100)
    assert marks == [WordMark("Yes.", 0, 40)] and aligner.pending_chars == 0 and aligner.finish(at=100) == []


def test_an_alignment_with_lists_of_different_lengths_is_an_error():
    with pytest.raises(ProviderError, match="alignment whose lists differ in length"):
        WordAligner(16000).add(["a", "b"], [0], [10, 10], offset=0, limit=100)


async def test_audio_is_due_from_the_first_text_since_the_last_message():
    from voxpipe.stages.elevenlabs_tts import _Reply

    settings = ElevenLabsTTSSettings(api_key="k", first_audio_timeout_s=5, read_timeout_s=2)
    reply = _Reply(1, settings, 16000)
    loop = asyncio.get_running_loop()
    assert reply.deadline() is None, "nothing sent yet: the reasoner may take its time"
    reply.first_text_at = loop.time()
    reply.words.expect("Sure, we have a table. ")
    reply.rearm()
    assert reply.deadline() == pytest.approx(reply.first_text_at + 5), "first audio"
    reply.audio_started = True
    reply.heard_at, reply.unanswered_since = loop.time(), None  # a message came; text is still pending
    assert reply.deadline() == pytest.approx(reply.heard_at + 2)
    await asyncio.sleep(0.05)
    reply.rearm()  # more text while ElevenLabs is silent
    first = reply.unanswered_since
    await asyncio.sleep(0.05)
    reply.rearm()
    assert reply.deadline() == pytest.approx(first + 2), "more text does not move the deadline"
