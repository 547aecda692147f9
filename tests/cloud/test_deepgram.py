"""Deepgram live STT: the real deepgram-sdk against FakeDeepgram on 127.0.0.1, through real pipelines on a RealClock.

A configured call runs on its own event loop (``run_configured_call`` calls ``asyncio.run``), so each test runs it
in a worker thread while the fake serves on the test's loop; tests wait on what the fake saw, never on sleeps.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket as socket_module
import subprocess
import sys
import threading
import time
import wave
from typing import Any

import numpy as np
import pytest

from voxpipe.call import CallResult, run_configured_call, run_pipeline_call
from voxpipe.config import ConfigError, Registry, parse_config
from voxpipe.pipeline import (
    AudioFormat,
    AudioFrame,
    Conversation,
    ErrorPolicy,
    Frame,
    Pipeline,
    RealClock,
    Stage,
    Start,
    Tracer,
    Transcript,
    UserSpeechStarted,
    UserSpeechStopped,
)
from voxpipe.stages.cloud import ProviderError
from voxpipe.stages.deepgram_stt import DeepgramSTT, DeepgramSTTSettings
from voxpipe.stages.turn import TurnTaker
from voxpipe.testing import ScriptedCaller, ScriptedLLM, ScriptedTTS, ScriptedVAD
from voxpipe.testing.caller import Noise, Say, Silence
from voxpipe.testing.fakes.deepgram import FakeDeepgram
from voxpipe.testing.fakes.server import Faults
from voxpipe.testing.signals import speechlike
from voxpipe.transports.playout import PlayoutOutput
from voxpipe.transports.recorder import StereoRecorder
from voxpipe.transports.simulated import SimulatedInput

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # deepgram-sdk imports websockets.legacy
]

RATE = 16000
AUDIO = AudioFormat(RATE)
REPLY = "Sure."
LONG_REPLY = "Sure, we have a table for four at eight tonight. Shall I book it for you?"


def sent(fake: FakeDeepgram, kind: str) -> list[dict[str, Any]]:
    """The client's control messages of ``kind`` (Finalize, KeepAlive, CloseStream) the fake received."""
    return [s.data for s in fake.of("message") if s.data.get("type") == kind]


class Stages:
    """A registry whose stt.deepgram is DeepgramSTT built from the config, with a test's error policy, kept for
    inspection (the config's ``on_error`` key is not there yet)."""

    def __init__(self, policy: ErrorPolicy = ErrorPolicy.STOP, fake: FakeDeepgram | None = None) -> None:
        self.built: list[Observed] = []
        stages = self

        class PolicedDeepgram(DeepgramSTT):
            @classmethod
            def from_settings(cls, settings: Any, context: Any, name: str) -> DeepgramSTT:
                stage = Observed.from_settings(settings, context, name)
                stage.error_policy = policy
                if fake is not None and fake.words is not None:
                    fake.words = context.caller  # words mode: the fake recognises this call's caller
                stages.built.append(stage)
                return stage

        self.registry = Registry.discover()
        self.registry.register("stt", "deepgram", PolicedDeepgram)

    @property
    def stt(self) -> Observed:
        return self.built[0]

    @property
    def errors(self) -> list[str]:
        return [e.error for e in self.stt.pipeline.errors]


def config(
    fake: FakeDeepgram, replies: list[str] | None = None, vad: str = "scripted", pricing: Any = None, **stt: Any
) -> tuple[Any, Any]:
    return parse_config(
        {
            "audio": {"sample_rate": RATE},
            "vad": {"provider": vad},
            "stt": {"provider": "deepgram", "api_key": fake.api_key, "base_url": fake.ws_url, **stt},
            "llm": {"provider": "scripted", "replies": replies or [REPLY]},
            "tts": {"provider": "scripted"},
            **({"pricing": pricing} if pricing else {}),
        }
    )


async def call(fake: FakeDeepgram, script: list[Any], tmp_path: Any, stages: Stages, **stt: Any) -> CallResult:
    """Run a configured call against ``fake`` in a worker thread (its own loop, real time)."""
    parsed, settings = config(fake, **stt)
    return await asyncio.to_thread(
        run_configured_call, parsed, settings, script, tmp_path, clock=RealClock(), registry=stages.registry
    )


def user_texts(result: CallResult) -> list[str]:
    return [m.text for m in result.conversation.messages if m.role == "user"]


# ------------------------------------------------------------------------------------------------ a turn


@pytest.mark.timeout(30)
async def test_a_turn_is_transcribed_with_partials_before_the_final(tmp_path):
    line = "A table for four tonight."
    async with FakeDeepgram(utterances=[line]) as fake:
        stages = Stages()
        result = await call(fake, [Say(line, pause=0.3)], tmp_path, stages)
    assert result.outcome == "ended"
    assert user_texts(result) == [line]
    connect = fake.of("connect")[0].data
    assert connect["headers"]["Authorization"] == f"Token {fake.api_key}"
    query = connect["query"]
    assert query["model"] == "nova-3" and query["encoding"] == "linear16" and query["sample_rate"] == str(RATE)
    assert query["interim_results"] == "true" and query["endpointing"] == "300"
    stats = stages.stt.stats
    assert stats.finals == 1 and stats.partials >= 2, "partials while the caller spoke, then one final"
    assert len(sent(fake, "Finalize")) == 1, "one Finalize at the end of the turn"
    kinds = fake.kinds()
    assert "close" in kinds and "disconnect" not in kinds, "CloseStream at the end, then Deepgram closed"
    messages = [s.data["type"] for s in fake.of("message")]
    assert messages[-1] == "CloseStream"
    usage = stages.stt.pipeline.usage.totals["stt"]["audio_seconds"]
    assert usage == pytest.approx(stats.audio_s) and usage > 1.0
    assert not stages.errors


@pytest.mark.timeout(30)
async def test_each_turn_is_billed_for_the_audio_of_its_utterance_and_the_turns_add_up(tmp_path):
    lines = ["A table for four tonight.", "At eight, please."]
    async with FakeDeepgram(utterances=lines) as fake:
        stages = Stages()
        script = [Say(line, pause=0.3) for line in lines]
        pricing = {"stt": {"audio_seconds": 0.01}}
        result = await call(fake, script, tmp_path, stages, replies=["Sure.", "Done."], pricing=pricing)
    assert user_texts(result) == lines
    written = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert [t["turn"] for t in written] == [t.turn for t in result.turns]
    billed = [t["data"]["usage"]["stt"]["audio_seconds"] for t in written]
    for turn, seconds, record in zip(result.turns, billed, written, strict=True):
        assert record["data"]["usage"] == turn.data["usage"], "the trace file has the turn's whole usage"
        assert record["data"]["cost_usd"]["stt"] == pytest.approx(seconds * 0.01), "priced by the config's table"
        spoken = turn.marks["user.speech_end"] - turn.marks["user.speech_start"]
        assert seconds > spoken, "the turn is billed for the audio of its own utterance"
    meter = stages.stt.pipeline.usage
    after_last_turn = meter.unassigned["stt"]["audio_seconds"]
    assert sum(billed) + after_last_turn == pytest.approx(meter.totals["stt"]["audio_seconds"])
    assert sum(billed) + after_last_turn == pytest.approx(stages.stt.stats.audio_s)
    assert result.cost_usd["stt"] == pytest.approx(stages.stt.stats.audio_s * 0.01)


def test_settings_are_checked_with_their_key_paths():
    with pytest.raises(ConfigError) as caught:
        parse_config({"stt": {"provider": "deepgram", "endpointing": 5, "base_url": "http://x", "volume": 11}})
    text = str(caught.value)
    for path in ("stt.endpointing", "stt.base_url", "stt.volume"):
        assert path in text
    with pytest.raises(ConfigError, match="speech_events needs endpointing or utterance_end_ms"):
        parse_config(
            {"stt": {"provider": "deepgram", "speech_events": True, "endpointing": None, "utterance_end_ms": None}}
        )
    with pytest.raises(ConfigError, match="utterance_end_ms needs interim_results"):
        parse_config({"stt": {"provider": "deepgram", "interim_results": False}})


def test_the_module_imports_without_the_sdk_and_a_missing_sdk_names_the_extra():
    code = (
        "import sys; sys.modules['deepgram'] = None\n"
        "import voxpipe.stages.deepgram_stt as m\n"
        "try:\n    m.DeepgramSTT(api_key='k')\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20, check=True).stdout
    assert out.startswith("ProviderError") and "pip install 'voxpipe[deepgram]'" in out, out


class _Later:
    """A placeholder word source; ``Stages`` hands the fake the call's caller once the call builds it."""

    def words_between(self, start: float, end: float) -> list[Any]:
        return []


@pytest.mark.timeout(30)
async def test_each_end_of_turn_sends_finalize_and_words_come_from_the_caller(tmp_path):
    first, second = "Do you have a table tonight?", "Great, four people at eight."
    async with FakeDeepgram(words=_Later()) as fake:
        stages = Stages(fake=fake)
        result = await call(fake, [Say(first, pause=0.3), Say(second, pause=0.3)], tmp_path, stages)
    assert user_texts(result) == [first, second]
    assert len(sent(fake, "Finalize")) == 2, "one Finalize per end of turn"
    # Each Finalize's result is written the injected latency after the Finalize arrived, or later.
    finalizes = [s for s in fake.of("message") if s.data.get("type") == "Finalize"]
    assert [w.arrived for w in fake.waits()] == [s.at for s in finalizes]
    assert all(w.served_s >= fake.latency_s for w in fake.waits())
    finals = [t for t in stages.stt.transcripts if t.final]
    assert [t.text for t in finals] == [first, second]
    for transcript in finals:  # word times are on the call's clock, in order
        assert transcript.words and all(w.start < w.end for w in transcript.words)
    assert finals[0].words[-1].end < finals[1].words[0].start


@pytest.mark.timeout(30)
async def test_barge_in_finalizes_the_new_utterance_and_no_stale_text_follows(tmp_path):
    first = "Can I book a table for two?"
    barge = "Actually make it four people."
    script = [Say(first, pause=0.3), Say(barge, barge_in=0.5)]
    async with FakeDeepgram(utterances=[first, barge]) as fake:
        stages = Stages()
        result = await call(fake, script, tmp_path, stages, replies=[LONG_REPLY, "Four it is."])
    assert next(t.interrupted for t in result.turns if "out.first_play" in t.marks), "the first reply was cut"
    assert user_texts(result) == [first, barge], "the conversation has the new user text, nothing stale"
    # The fake saw the barge-in utterance start, then its Finalize: Deepgram's own end-of-utterance flush.
    kinds = [(s.kind, s.data.get("utterance"), s.data.get("type")) for s in fake.seen]
    barge_heard = kinds.index(("speech", 1, None))
    finalizes = [i for i, k in enumerate(kinds) if k[2] == "Finalize"]
    assert len(finalizes) == 2 and finalizes[1] > barge_heard
    # Every transcript after the first final belongs to the barge-in utterance.
    transcripts = stages.stt.transcripts
    first_final = next(i for i, t in enumerate(transcripts) if t.final)
    later = transcripts[first_final + 1 :]
    assert later and all(barge.startswith(t.text) for t in later), [t.text for t in later]
    # The barge-in turn is billed for all its utterance's audio: the interrupt opened its epoch mid-utterance, and
    # the audio after it is the turn's all the same.
    [barge_turn] = [t for t in result.turns if t.data.get("barge_in")]
    billed = barge_turn.data["usage"]["stt"]["audio_seconds"]
    spoken = barge_turn.marks["user.speech_end"] - barge_turn.marks["user.speech_start"]
    assert billed > spoken, f"the barge-in turn was billed {billed:.2f} s for {spoken:.2f} s of its own speech"
    meter = stages.stt.pipeline.usage
    turns_billed = sum(t.data.get("usage", {}).get("stt", {}).get("audio_seconds", 0.0) for t in result.turns)
    after_last_turn = meter.unassigned.get("stt", {}).get("audio_seconds", 0.0)
    assert after_last_turn < 2.0, "only the audio after the last utterance is left to no turn"
    assert turns_billed + after_last_turn == pytest.approx(meter.totals["stt"]["audio_seconds"])
    assert meter.totals["stt"]["audio_seconds"] == pytest.approx(stages.stt.stats.audio_s)


# ---------------------------------------------------------------------------------------------- refusals


@pytest.mark.timeout(30)
async def test_a_rejected_api_key_stops_the_call_with_an_error_naming_it(tmp_path):
    async with FakeDeepgram(utterances=["Hello there."], api_key="the-right-key") as fake:
        stages = Stages()
        with pytest.raises(
            ProviderError, match=re.escape("Deepgram: API key rejected (HTTP 401: Invalid credentials.)")
        ):
            await call(fake, [Say("Hello there.")], tmp_path, stages, api_key="a-wrong-key")
    assert [s.data["status"] for s in fake.of("refused")] == [401]
    assert len(fake.of("connect")) == 1, "a refused handshake is not retried"
    [error] = stages.stt.pipeline.errors
    assert error.fatal and error.stage == "stt" and "Deepgram" in error.error and "API key" in error.error
    assert error.error.endswith("; check stt.api_key"), "the key came from the config: where to look"
    assert json.loads((tmp_path / "transcript.json").read_text())["status"] == "failed"


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("status", "problem"), [(429, "rate limited"), (503, "server error")])
async def test_rate_limits_and_server_errors_stop_the_call_naming_the_status(tmp_path, status, problem):
    async with FakeDeepgram(utterances=["Hello there."], faults=Faults(refuse=status)) as fake:
        stages = Stages()
        with pytest.raises(ProviderError, match=f"Deepgram: {problem} \\(HTTP {status}: "):
            await call(fake, [Say("Hello there.")], tmp_path, stages)
    assert len(fake.of("connect")) == 1
    [error] = stages.stt.pipeline.errors
    assert error.fatal and f"HTTP {status}: " in error.error


@pytest.mark.timeout(30)
async def test_a_refused_handshake_is_reported_with_deepgrams_own_message_and_request_id(tmp_path):
    # The SDK's ApiError says only "Unexpected error when initializing websocket connection."; Deepgram puts its
    # reason in the dg-error header of the refused handshake.
    async with FakeDeepgram(utterances=["Hello there."], faults=Faults(refuse=402)) as fake:
        stages = Stages()
        with pytest.raises(ProviderError) as raised:
            await call(fake, [Say("Hello there.")], tmp_path, stages)
    message = str(raised.value)
    assert "account out of credit (HTTP 402: Project does not have enough credits for an ASR request.)" in message
    assert re.search(r"\(request id [0-9a-f-]{36}\); check stt\.api_key$", message), message


@pytest.mark.timeout(30)
@pytest.mark.parametrize("status", [401, 402, 403])
@pytest.mark.parametrize("source", ["config", "environment"])
async def test_a_refusal_about_the_key_says_where_the_call_took_it(tmp_path, monkeypatch, status, source):
    # 401 (the key), 402 (its project's credit), 403 (its permissions): the operator must know which key to look at.
    monkeypatch.setenv("DEEPGRAM_API_KEY", "a-key-from-the-environment")
    api_key = "a-key-from-the-config" if source == "config" else None  # None: the config gives none
    async with FakeDeepgram(utterances=["Hello there."], faults=Faults(refuse=status)) as fake:
        stages = Stages()
        with pytest.raises(ProviderError) as raised:
            await call(fake, [Say("Hello there.")], tmp_path, stages, api_key=api_key)
    expected = "a-key-from-the-config" if source == "config" else "a-key-from-the-environment"
    assert fake.of("connect")[0].data["headers"]["Authorization"] == f"Token {expected}"
    where = "stt.api_key" if source == "config" else "DEEPGRAM_API_KEY"
    assert str(raised.value).endswith(f"; check {where}"), str(raised.value)


@pytest.mark.timeout(30)
@pytest.mark.timeout(30)
async def test_under_skip_turn_a_refusal_is_reported_and_the_stage_connects_again_after_retry_after_s(tmp_path):
    lines = ["Hello there.", "Is the terrace open tonight?"]
    script = [Say(lines[0], pause=0.3), Silence(1.5), Say(lines[1], pause=0.3)]
    async with FakeDeepgram(utterances=lines[1:], faults=Faults(refuse=503)) as fake:
        stages = Stages(ErrorPolicy.SKIP_TURN)
        running = asyncio.create_task(call(fake, script, tmp_path, stages, retry_after_s=0.5))
        await fake.wait_for("refused")
        fake.faults = Faults()  # the outage is over
        result = await running
    assert result.outcome == "ended", "the call went on"
    assert user_texts(result) == [lines[1]], "the first line was lost to the outage; the second was heard"
    assert [s.data["status"] for s in fake.of("refused")] == [503] and len(fake.of("connect")) == 2
    assert not any(e.fatal for e in stages.stt.pipeline.errors) and "HTTP 503" in stages.errors[0]


def test_a_missing_api_key_is_a_config_error_before_any_connection(tmp_path, monkeypatch):
    monkeypatch.delenv("DEEPGRAM_API_KEY", raising=False)

    async def scenario() -> FakeDeepgram:
        async with FakeDeepgram(utterances=["Hello."]) as fake:
            parsed, settings = parse_config(
                {
                    "vad": {"provider": "scripted"},
                    "stt": {"provider": "deepgram", "base_url": fake.ws_url},
                    "llm": {"provider": "scripted"},
                    "tts": {"provider": "scripted"},
                }
            )
            with pytest.raises(ConfigError, match="DEEPGRAM_API_KEY") as raised:
                await asyncio.to_thread(run_configured_call, parsed, settings, [Say("Hello.")], tmp_path)
            assert "stt.api_key" in str(raised.value)
            return fake

    fake = asyncio.run(scenario())
    assert fake.of("connect") == []


# ------------------------------------------------------------------------------------------- bad streams


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("corrupt", "problem"),
    [
        ("malformed-json", "malformed JSON"),
        ("unknown-event", "unknown type 'SpeechPaused'"),
        ("bad-audio", "binary data"),
    ],
)
async def test_a_broken_message_is_reported_and_the_call_continues(tmp_path, corrupt, problem):
    line = "When do you open?"
    async with FakeDeepgram(utterances=[line], faults=Faults(corrupt=corrupt)) as fake:
        stages = Stages()
        result = await call(fake, [Say(line, pause=0.3)], tmp_path, stages)
    assert fake.of("corrupted")
    assert result.outcome == "ended"
    assert user_texts(result) == [line], "nothing the caller said is lost"
    [error] = stages.stt.pipeline.errors
    assert not error.fatal and "Deepgram" in error.error and problem in error.error


@pytest.mark.timeout(30)
async def test_a_drop_mid_utterance_reconnects_and_replays_the_turns_audio(tmp_path):
    line = "I would like to book a table for four tonight."
    async with FakeDeepgram(utterances=[line], faults=Faults(drop_after=3)) as fake:
        stages = Stages()
        result = await call(fake, [Say(line, pause=0.3)], tmp_path, stages)
    assert fake.of("dropped") and len(fake.of("connect")) == 2, "the stage reconnected once"
    assert user_texts(result) == [line], "the turn's transcript is complete"
    # The second socket heard the utterance from its first word: the audio since the last final was replayed.
    [first_speech, second_speech] = fake.of("speech")
    assert first_speech.data["connection"] == 1 and second_speech.data["connection"] == 2
    [utterance] = fake.of("utterance")
    assert utterance.data["connection"] == 2
    audio, _ = speechlike(line, RATE)
    assert utterance.data["end"] - utterance.data["start"] >= 0.95 * len(audio) / RATE
    assert stages.stt.stats.reconnects == 1
    [turn] = result.turns
    assert turn.marks["stt.reconnect"] < turn.marks["stt.final"], "the reconnect is marked on the turn it hit"
    [error] = stages.stt.pipeline.errors
    assert not error.fatal and "Deepgram: connection lost" in error.error and "replaying" in error.error


@pytest.mark.timeout(30)
async def test_a_socket_gone_quiet_after_a_finalize_is_reconnected_after_result_timeout_s(tmp_path):
    line = "I would like to book a table for four tonight."
    async with FakeDeepgram(utterances=[line], deaf_connections=1) as fake:
        stages = Stages()
        # The Finalize goes out while the receiver is already waiting for a message: that wait gets the deadline.
        result = await call(
            fake, [Say(line, pause=0.3)], tmp_path, stages, endpointing=None, result_timeout_s=0.5, finalize_timeout_s=5
        )
    assert fake.of("unanswered") and len(fake.of("connect")) == 2, "the quiet socket was replaced"
    assert user_texts(result) == [line], "the new socket heard the replayed utterance and answered its Finalize"
    assert stages.stt.stats.reconnects == 1 and stages.stt.stats.finalize_timeouts == 0
    [error] = stages.stt.pipeline.errors
    assert not error.fatal and "no answer to a Finalize within 0.5 s (stalled)" in error.error


@pytest.mark.timeout(30)
async def test_a_server_that_drops_every_connection_ends_the_session_after_max_reconnects(tmp_path):
    line = "I would like to book a table for four tonight."
    # Every connection answers (SpeechStarted, an interim result), then drops: answering is not "recovered".
    async with FakeDeepgram(utterances=[line], faults=Faults(drop_after=2), drop_connections=100) as fake:
        stages = Stages()
        with pytest.raises(ProviderError, match="4 times within 60 s; gave up after 3 reconnects"):
            await call(fake, [Say(line, pause=0.3)], tmp_path, stages)
    assert len(fake.of("connect")) == 4 and len(fake.of("dropped")) == 4
    assert stages.stt.stats.reconnects == 3 and stages.stt.stats.messages >= 4
    drops, connects = [s.at for s in fake.of("dropped")], [s.at for s in fake.of("connect")]
    waits = [connect - drop for drop, connect in zip(drops, connects[1:], strict=False)]
    assert waits[1] >= 0.125 and waits[2] >= 0.5, f"backed off (at least half of 0.25 s, 1 s): {waits}"
    *reported, fatal = stages.stt.pipeline.errors
    assert [e.fatal for e in reported] == [False] * 3 and all("reconnecting" in e.error for e in reported)
    assert fatal.fatal and "Deepgram: connection lost" in fatal.error


# --------------------------------------------------------------------------- pipelines built in code


class Observed(DeepgramSTT):
    """DeepgramSTT keeping the transcripts and the speech events it emits."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.transcripts: list[Transcript] = []
        self.speech_events: list[UserSpeechStarted | UserSpeechStopped] = []

    async def push(self, frame: Frame, direction: Any = None) -> None:
        if isinstance(frame, Transcript):
            self.transcripts.append(frame)
        elif isinstance(frame, UserSpeechStarted | UserSpeechStopped):
            self.speech_events.append(frame)
        await (super().push(frame) if direction is None else super().push(frame, direction))


@pytest.mark.timeout(30)
async def test_a_stall_ends_the_utterance_at_the_finalize_timeout_and_drops_the_late_results(tmp_path):
    line = "Hello there."
    async with FakeDeepgram(utterances=[line], faults=Faults(stall_s=2.5)) as fake:
        caller = ScriptedCaller([Say(line, pause=0.2), Silence(2.2)], RATE, reply_timeout=0.5)
        stt = Observed(DeepgramSTTSettings(base_url=fake.ws_url, finalize_timeout_s=0.6), api_key=fake.api_key)
        recorder, tracer = StereoRecorder(RATE), Tracer()
        conversation = Conversation("test")
        stages: list[Stage] = [
            SimulatedInput(caller, AUDIO, recorder=recorder),
            ScriptedVAD(AUDIO),
            stt,
            TurnTaker(conversation),
            ScriptedLLM([REPLY]),
            ScriptedTTS(AUDIO),
            PlayoutOutput(AUDIO, recorder),
        ]
        pipeline = Pipeline(stages, clock=RealClock(), tracer=tracer)
        result = await asyncio.to_thread(run_pipeline_call, pipeline, conversation, tracer, recorder, tmp_path)
    assert result.outcome == "ended", "no hang, the call went on"
    assert stt.stats.finalize_timeouts == 1
    finals = [t for t in stt.transcripts if t.final]
    assert [t.text for t in finals] == [""], "exactly one final, with what was heard before the deadline"
    assert stt.transcripts[-1].final, "the stalled results arrived later and were dropped as stale"
    assert stt.stats.messages >= 3, "the late results did reach the stage"
    timed_out, late = pipeline.errors
    assert not timed_out.fatal and "Deepgram: no final result within 0.6 s" in timed_out.error
    assert not late.fatal and "late final result" in late.error and "'Hello there.'" in late.error


class Silent(Stage):
    """A head stage that sends nothing: the caller's audio pauses."""


class Sink(Stage):
    async def process(self, frame: Frame, direction: Any) -> None:
        await self.push(frame, direction)


@pytest.mark.timeout(30)
async def test_keepalive_flows_while_audio_pauses_and_closestream_ends_the_session():
    async with FakeDeepgram(utterances=["Hello."], idle_timeout_s=0.5) as fake:
        stt = Observed(DeepgramSTTSettings(base_url=fake.ws_url, keepalive_s=0.15), api_key=fake.api_key)
        pipeline = Pipeline([Silent(), stt, Sink()], clock=RealClock())
        run = asyncio.create_task(pipeline.run())
        try:
            await fake.wait_for("connect")
            for count in (1, 2, 3, 4):  # 4 x 0.15 s: longer than the fake's 0.5 s idle timeout
                await fake.wait_for("message", lambda s, n=count: len(sent(fake, "KeepAlive")) >= n, within_s=3)
        finally:
            pipeline.cancel()
            await run
        await fake.wait_for("close", within_s=3)
    assert "idle-timeout" not in fake.kinds() and not fake.of("audio")
    assert sent(fake, "CloseStream"), "stopping the pipeline closes the stream gracefully"
    assert stt.stats.connects == 1


@pytest.mark.timeout(30)
async def test_speech_events_turn_deepgrams_events_into_the_callers_turns(tmp_path):
    line = "Is the terrace open?"
    async with FakeDeepgram(utterances=[line]) as fake:
        result = await call(fake, [Say(line, pause=0.3)], tmp_path, Stages(), vad="none", speech_events=True)
    assert user_texts(result) == [line]
    [turn] = [t for t in result.turns if "user_text" in t.data]
    [speech] = fake.of("speech")
    start = turn.marks["user.speech_start"]
    assert start < turn.marks["user.speech_end"] < turn.marks["turn.end_detected"]
    # Deepgram's timestamp, mapped through the pts of the audio sent, is where the caller's line starts.
    with wave.open(str(tmp_path / "recording.wav")) as recording:
        pcm = np.frombuffer(recording.readframes(recording.getnframes()), dtype=np.int16).reshape(-1, 2)
    first_voiced = int(np.flatnonzero(np.abs(pcm[:, 0].astype(np.int32)) > 327)[0]) / RATE
    assert abs(start - first_voiced) <= 0.011 and speech.data["start"] >= 0
    assert len(sent(fake, "Finalize")) == 1


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("endpointing", "utterance_end_ms"), [(300, None), (None, 1000)])
async def test_with_speech_events_either_speech_final_or_utterance_end_ends_the_turn(
    tmp_path, endpointing, utterance_end_ms
):
    line = "Is the terrace open?"
    stt = {"endpointing": endpointing, "utterance_end_ms": utterance_end_ms, "speech_events": True}
    async with FakeDeepgram(utterances=[line]) as fake:
        result = await call(fake, [Say(line, pause=0.3)], tmp_path, Stages(), vad="none", **stt)
    assert user_texts(result) == [line]
    [turn] = [t for t in result.turns if "user_text" in t.data]
    silence = turn.marks["turn.end_detected"] - turn.marks["user.speech_end"]
    # The turn ends on the event the settings allow, after its silence: 0.3 s of endpointing, or 1 s without words.
    if endpointing is not None:
        assert 0.3 <= silence < 1.0
    else:
        assert silence >= 1.0


@pytest.mark.timeout(30)
async def test_with_speech_events_deepgrams_speech_started_barges_in(tmp_path):
    lines = ["What is on the menu?", "A table for two please."]
    async with FakeDeepgram(utterances=lines) as fake:
        script = [Say(lines[0], pause=0.3), Say(lines[1], pause=0.3, barge_in=1.0)]
        # No local VAD: only Deepgram can say the caller started speaking.
        result = await call(
            fake, script, tmp_path, Stages(), replies=[LONG_REPLY, REPLY], vad="none", speech_events=True
        )
    assert user_texts(result) == lines
    first, second = [t for t in result.turns if "user_text" in t.data]
    assert first.interrupted and 0 < len(first.heard) < len(LONG_REPLY.split())
    assert second.data["barge_in"] and list(second.heard) == REPLY.split()
    # The cut came from Deepgram hearing the second line: after it started and before it ended.
    assert len(fake.of("speech")) == 2
    assert second.marks["user.speech_start"] < first.marks["out.interrupted"] < second.marks["user.speech_end"]


# ----------------------------------------------------------------------------------- audit fixes (2026-11)


class CutHandshakeDeepgram(FakeDeepgram):
    """Closes the first connection's TCP stream before answering its handshake (a proxy hiccup)."""

    async def _listen(self, request: Any) -> Any:
        if not self.of("aborted-handshake"):
            self.record("aborted-handshake")
            request.transport.abort()
            raise asyncio.CancelledError  # the connection is gone: nothing to answer
        return await super()._listen(request)


@pytest.mark.timeout(30)
async def test_a_handshake_cut_short_is_reported_and_retried():
    async with CutHandshakeDeepgram(utterances=["Hello."]) as fake:
        stt = Observed(DeepgramSTTSettings(base_url=fake.ws_url, keepalive_s=0.2), api_key=fake.api_key)
        pipeline = Pipeline([Silent(), stt, Sink()], clock=RealClock())
        run = asyncio.create_task(pipeline.run())
        try:
            await fake.wait_for("message", lambda s: s.data.get("type") == "KeepAlive", within_s=10)
        finally:
            pipeline.cancel()
            await run  # the stage did not fail
    assert fake.of("aborted-handshake") and len(fake.of("connect")) == 1, "the second handshake got through"
    assert stt.stats.reconnects == 1
    [error] = pipeline.errors
    assert not error.fatal and "Deepgram: connection lost (handshake failed: " in error.error


@pytest.mark.timeout(40)
async def test_with_speech_events_a_speech_started_that_no_words_follow_is_closed(tmp_path):
    lines = ["Is the terrace open?", "", "And for four people?"]  # the fake hears the noise, with no words
    script = [Say(lines[0], pause=0.3), Noise(duration=0.4, pause=0.5), Silence(2.0), Say(lines[2], pause=0.3)]
    async with FakeDeepgram(utterances=lines) as fake:
        stages = Stages()
        result = await call(fake, script, tmp_path, stages, replies=["Yes.", "Sure."], vad="none", speech_events=True)
    assert user_texts(result) == [lines[0], lines[2]], "the noise was no turn"
    assert len(fake.of("speech")) == 3
    events = stages.stt.speech_events
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["UserSpeechStarted", "UserSpeechStopped"] * 3, "the noise's start was closed"
    noise_started, line_started = events[2].at, events[4].at
    second = [t for t in result.turns if "user_text" in t.data][1]
    assert second.marks["user.speech_start"] == line_started >= noise_started + 2.0, "the turn starts at its line"


@pytest.mark.timeout(40)
@pytest.mark.parametrize(
    ("event", "field", "stt"),
    [
        ("SpeechStarted", "timestamp", {}),
        ("UtteranceEnd", "last_word_end", {"speech_events": True, "endpointing": None, "utterance_end_ms": 1000}),
    ],
)
async def test_an_event_missing_its_time_is_reported_and_skipped(tmp_path, event, field, stt):
    line = "When do you open?"

    class IncompleteDeepgram(FakeDeepgram):
        def _send(self, stream: Any, message: Any, *, answering: float | None = None) -> None:
            if isinstance(message, dict) and message.get("type") == event:
                message = {k: v for k, v in message.items() if k != field}
            super()._send(stream, message, answering=answering)

    async with IncompleteDeepgram(utterances=[line]) as fake:
        stages = Stages()
        parsed, settings = config(fake, vad="none" if stt else "scripted", **stt)
        result = await asyncio.to_thread(
            run_configured_call,
            parsed,
            settings,
            [Say(line, pause=0.3)],
            tmp_path,
            clock=RealClock(),
            registry=stages.registry,
            reply_timeout_s=1.5,
        )
    assert result.outcome == "ended", "the call went on"
    assert fake.of("result")
    problem = f"Deepgram sent {event} without a usable {field} (None); skipped it"
    assert any(problem in e for e in stages.errors), stages.errors
    assert all(not e.fatal and "Deepgram" in e.error for e in stages.stt.pipeline.errors)
    if event == "SpeechStarted":
        assert user_texts(result) == [line], "nothing the caller said is lost"


def _with_hum(line: str, path: Any) -> Any:
    """``line`` spoken, then 0.6 s of a hum the fake hears (level 0.005) and the VAD does not (0.01): the VAD ends
    the utterance before Deepgram's endpointing, so its final waits for the Finalize's answer."""
    audio, _ = speechlike(line, RATE)
    t = np.arange(round(0.6 * RATE)) / RATE
    hum = (0.007 * 32767 * np.sin(2 * np.pi * 120 * t)).astype(np.int16)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(RATE)
        out.writeframes(np.concatenate([audio, hum]).tobytes())
    return path


@pytest.mark.timeout(40)
async def test_a_finalize_deepgram_never_answers_neither_stalls_the_socket_nor_takes_a_later_answer(tmp_path):
    lines = ["A table for four tonight.", "At eight, please."]
    hummed = _with_hum(lines[1], tmp_path / "hummed.wav")
    script = [Say(lines[0], pause=0.3), Silence(2.5), Say(lines[1], wav=hummed, pause=0.3)]
    async with FakeDeepgram(utterances=lines, answer_empty_finalize=False, level=0.005) as fake:
        stages = Stages()
        result = await call(fake, script, tmp_path, stages, replies=["Sure.", "Done."], result_timeout_s=1.0)
    # Endpointing finalized the first line before its Finalize arrived: nothing was buffered, nothing answered it.
    assert [s.data for s in fake.of("unanswered")] == [{"connection": 1, "buffered": False}]
    assert user_texts(result) == lines
    assert stages.stt.stats.reconnects == 0 and not stages.errors, "the quiet 2.5 s after it is no stall"
    first, second = [t for t in result.turns if "user_text" in t.data]
    assert "stt.sdk_answer" not in first.marks, "the first final went out on endpointing"
    assert second.marks["stt.sdk_call"] < second.marks["stt.sdk_answer"], "the second answer is the second turn's"
    finalizes = [s for s in fake.of("message") if s.data.get("type") == "Finalize"]
    assert [w.arrived for w in fake.waits()] == [finalizes[1].at], "only the second Finalize was answered"


class BlackholeDeepgram(FakeDeepgram):
    """The first connection stops answering, and reading, at its first Finalize: a hung server."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.release = asyncio.Event()

    async def _control(self, socket: Any, stream: Any, text: str) -> bool:
        if stream.number == 1 and '"Finalize"' in text:
            self.record("blackholed", connection=stream.number)
            stream.quiet = True
            await self.release.wait()  # reads nothing more: no close frame ever comes back
        return await super()._control(socket, stream, text)


@pytest.mark.timeout(40)
async def test_a_stalled_socket_is_replaced_at_once_without_a_closing_handshake(tmp_path):
    line = "I would like to book a table for four tonight."
    async with BlackholeDeepgram(utterances=[line]) as fake:
        stages = Stages()
        running = asyncio.create_task(
            call(fake, [Say(line, pause=0.3)], tmp_path, stages, endpointing=None, result_timeout_s=0.5)
        )
        try:
            hole = await fake.wait_for("blackholed", within_s=15)
            second = await fake.wait_for("connect", lambda s: s.data is not fake.of("connect")[0].data, within_s=10)
        finally:
            result = await running
            fake.release.set()  # the hung handler may now end (its Finalize would be answered on a dead socket)
    # websockets' closing handshake with the silent peer took 20 s (close_timeout, twice) before the fix.
    assert second.at - hole.at < 3.0, f"replaced {second.at - hole.at:.1f} s after the Finalize went unanswered"
    assert user_texts(result) == [line], "the new socket heard the replayed utterance"
    [error] = stages.stt.pipeline.errors
    assert not error.fatal and "stalled" in error.error


class SlowReconnectDeepgram(FakeDeepgram):
    """Every handshake after the first takes 1 s: a far region, or a later backoff plus latency."""

    async def _listen(self, request: Any) -> Any:
        if self._connections >= 1:
            await asyncio.sleep(1.0)
        return await super()._listen(request)


@pytest.mark.timeout(40)
async def test_with_speech_events_a_slow_reconnect_keeps_the_start_of_the_utterance(tmp_path):
    line = "I would like to book a table for four tonight."
    # The first connection drops at its first message (SpeechStarted); the caller goes on speaking meanwhile.
    async with SlowReconnectDeepgram(utterances=[line], faults=Faults(drop_after=0)) as fake:
        stages = Stages()
        result = await call(fake, [Say(line, pause=0.3)], tmp_path, stages, vad="none", speech_events=True)
    assert fake.of("dropped") and len(fake.of("connect")) == 2
    assert user_texts(result) == [line]
    [utterance] = [u.data for u in fake.of("utterance")]
    audio, _ = speechlike(line, RATE)
    heard = utterance["end"] - utterance["start"]
    assert utterance["connection"] == 2 and heard >= 0.95 * len(audio) / RATE, f"the new socket heard {heard:.2f} s"


@pytest.mark.timeout(30)
async def test_the_fake_sends_utterance_end_only_after_a_word():
    from deepgram import AsyncDeepgramClient, DeepgramClientEnvironment

    noise = (np.random.default_rng(0).uniform(-0.3, 0.3, RATE // 2) * 32767).astype(np.int16).tobytes()
    silence = bytes(2 * RATE * 2)
    got: list[str | None] = []
    async with FakeDeepgram(utterances=[""]) as fake:
        env = DeepgramClientEnvironment(base=fake.url, production=fake.ws_url, agent=fake.ws_url, agent_rest=fake.url)
        client = AsyncDeepgramClient(api_key=fake.api_key, environment=env)
        query = {"interim_results": True, "utterance_end_ms": 1000, "vad_events": True, "endpointing": 300}
        async with client.listen.v1.connect(
            model="nova-3", encoding="linear16", sample_rate=RATE, channels=1, **query
        ) as socket:
            for pcm in (noise, silence):
                for i in range(0, len(pcm), 640):
                    await socket.send_media(pcm[i : i + 640])
            await socket.send_close_stream()
            while (kind := getattr(await asyncio.wait_for(socket.recv(), 5), "type", None)) != "Metadata":
                got.append(kind)
    assert "SpeechStarted" in got and "Results" in got
    assert "UtteranceEnd" not in got, "Deepgram's UtteranceEnd follows a word; the noise had none"


@pytest.mark.timeout(30)
async def test_the_sdk_client_is_built_off_the_event_loop_once_for_every_reconnect(monkeypatch):
    import deepgram

    built: list[threading.Thread] = []

    class Counted(deepgram.AsyncDeepgramClient):  # the real client, counted
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            built.append(threading.current_thread())
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(deepgram, "AsyncDeepgramClient", Counted)
    # No audio and no KeepAlive within the fake's 0.3 s idle timeout: each connection is closed (1011), and replaced.
    async with FakeDeepgram(utterances=["Hello."], idle_timeout_s=0.3) as fake:
        stt = Observed(DeepgramSTTSettings(base_url=fake.ws_url, keepalive_s=5), api_key=fake.api_key)
        pipeline = Pipeline([Silent(), stt, Sink()], clock=RealClock())
        run = asyncio.create_task(pipeline.run())
        try:
            await fake.wait_for("connect", lambda s: len(fake.of("connect")) >= 3, within_s=10)
        finally:
            pipeline.cancel()
            await run
    assert stt.stats.reconnects >= 2
    assert len(built) == 1 and built[0] is not threading.main_thread(), "one client, built on a worker thread"


class UnreadDeepgram(FakeDeepgram):
    """The first connection stops reading after its first audio: a server whose socket is no longer read, so the
    client's sends back up once the TCP buffers are full. Its receive buffer is small, or the kernel would take in
    megabytes first."""

    async def start(self) -> UnreadDeepgram:
        await super().start()
        assert self._runner is not None
        for site in self._runner.sites:
            for listening in site._server.sockets:  # type: ignore[attr-defined]
                listening.setsockopt(
                    socket_module.SOL_SOCKET, socket_module.SO_RCVBUF, 4096
                )  # accepted ones inherit it
        return self

    async def _read(self, socket: Any, stream: Any) -> None:
        if stream.number > 1:
            return await super()._read(socket, stream)
        message = await socket.receive()
        self.record("stopped-reading", connection=stream.number, first=message.type.name)
        await asyncio.sleep(30)  # cancelled at shutdown; the client aborts long before


class Flood(Stage):
    """A head stage that sends the caller's audio about 200 times faster than real time."""

    def __init__(self, seconds: float) -> None:
        super().__init__(name="flood")
        self.seconds = seconds

    async def process(self, frame: Frame, direction: Any) -> None:
        await self.push(frame, direction)
        if isinstance(frame, Start):
            self.spawn(self._flood(), name="flood-audio")

    async def _flood(self) -> None:
        # Loud noise, repeating only every 10 s: the SDK's socket deflates what it sends, over a 32 KiB window.
        noise = np.random.default_rng(7).integers(-8000, 8000, 320 * 500, dtype=np.int16)
        for index in range(round(self.seconds / 0.02)):
            pcm = noise[(index % 500) * 320 : (index % 500 + 1) * 320].tobytes()
            await self.push(AudioFrame(pcm=pcm, sample_rate=RATE, pts=index * 320))
            if index % 50 == 0:
                await asyncio.sleep(0.005)  # a second of audio every 5 ms


@pytest.mark.timeout(60)
async def test_a_server_that_stops_reading_is_replaced_after_send_timeout_s():
    async with UnreadDeepgram(utterances=["Hello."]) as fake:
        stt = Observed(DeepgramSTTSettings(base_url=fake.ws_url, send_timeout_s=0.5), api_key=fake.api_key)
        stt.error_policy = ErrorPolicy.SKIP_FRAME
        pipeline = Pipeline([Flood(seconds=600), stt, Sink()], clock=RealClock())
        run = asyncio.create_task(pipeline.run())
        try:
            await fake.wait_for("stopped-reading", within_s=10)
            second = await fake.wait_for("audio", lambda s: s.data["connection"] == 2, within_s=30)
        finally:
            pipeline.cancel()
            await run
    assert second and stt.stats.reconnects == 1
    [error] = pipeline.errors
    assert not error.fatal and "audio not taken within 0.5 s (the server stopped reading)" in error.error


# ------------------------------------------------------------------------------- late answers, usage (2026-12)


@pytest.mark.timeout(40)
async def test_a_late_answer_to_a_timed_out_finalize_is_dropped_not_taken_for_the_next_utterances(tmp_path):
    lines = ["A table for four tonight.", "At eight, please."]
    # The first Finalize's answer is held until the second Finalize arrives, then goes out just before that one's.
    # Only Finalize ends an utterance at the fake: each final waits for its answer.
    async with FakeDeepgram(utterances=lines, late_answers=1) as fake:
        stages = Stages()
        result = await call(
            fake,
            [Say(lines[0], pause=0.3), Say(lines[1], pause=0.3)],
            tmp_path,
            stages,
            replies=["Sure.", "Done."],
            endpointing=None,
            utterance_end_ms=None,
            finalize_timeout_s=0.5,
        )
    assert [s.data["connection"] for s in fake.of("held")] == [1] and len(sent(fake, "Finalize")) == 2
    stt = stages.stt
    assert stt.stats.finalize_timeouts == 1, "only the first utterance waited in vain"
    finals = [t.text for t in stt.transcripts if t.final]
    assert finals[1] == lines[1], "the second utterance's final is its own answer's, not the first's late one"
    assert user_texts(result) == [finals[0], lines[1]], "the first turn ended at its timeout, with what was heard"
    assert stt.stats.late_finals == 1
    timed_out, late = stages.errors
    assert "no final result within 0.5 s" in timed_out
    assert "late" in late and repr(lines[0]) in late, "the late result is reported with the words it dropped"
    second = [t for t in result.turns if "user_text" in t.data][1]
    assert second.marks["stt.sdk_call"] < second.marks["stt.sdk_answer"] <= second.marks["stt.final"]


@pytest.mark.timeout(40)
@pytest.mark.parametrize("turn_taker", [False, True], ids=["stt-alone", "with-turn-taker"])
async def test_all_audio_sent_is_counted_once_with_or_without_a_turn_taker(turn_taker):
    lines = ["A table for four tonight.", "At eight, please."]
    async with FakeDeepgram(utterances=lines) as fake:
        # Nobody answers: the caller goes on after reply_timeout.
        caller = ScriptedCaller([Say(line, pause=0.3) for line in lines], RATE, reply_timeout=0.3)
        stt = Observed(DeepgramSTTSettings(base_url=fake.ws_url), api_key=fake.api_key)
        taker = [TurnTaker(Conversation("test"))] if turn_taker else []
        pipeline = Pipeline([SimulatedInput(caller, AUDIO), ScriptedVAD(AUDIO), stt, *taker, Sink()], clock=RealClock())
        assert await pipeline.run() == "ended"
    assert [t.text for t in stt.transcripts if t.final] == lines
    billed = pipeline.usage.totals["stt"]["audio_seconds"]
    assert billed == pytest.approx(stt.stats.audio_s), "the call's total is all the audio Deepgram was sent, once"
    assert stt.stats.audio_s > 2.0
    handed_over = [t.usage for t in stt.transcripts if t.final and t.usage]
    assert len(handed_over) == (2 if turn_taker else 0), "a final carries its audio only to a turn-taker"


# ------------------------------------------------------------- stall evidence, delivery across reconnects (2026-11)


@pytest.mark.timeout(40)
async def test_messages_a_hung_server_had_already_written_do_not_hide_that_it_hung(tmp_path):
    line = "I would like to book a table for four tonight."
    # The first connection hangs at the Finalize; the interim results it wrote in the 0.25 s before (latency_s) are
    # still on their way, and arrive after the Finalize went out.
    async with FakeDeepgram(utterances=[line], deaf_connections=1, latency_s=0.25) as fake:
        stages = Stages()
        result = await call(
            fake, [Say(line, pause=0.3)], tmp_path, stages, endpointing=None, result_timeout_s=0.5, finalize_timeout_s=5
        )
    assert [s.data["type"] for s in fake.of("in-flight")][:1] == ["Results"], "a message came after the Finalize"
    finalize = next(s for s in fake.of("message") if s.data.get("type") == "Finalize")
    _, second = fake.of("connect")
    assert second.at - finalize.at < 1.5, "replaced result_timeout_s after the Finalize, not at the finalize timeout"
    assert user_texts(result) == [line], "the new socket heard the replayed utterance and answered its Finalize"
    assert stages.stt.stats.reconnects == 1 and stages.stt.stats.finalize_timeouts == 0
    [error] = stages.stt.pipeline.errors
    assert not error.fatal and "no answer to a Finalize within 0.5 s (stalled)" in error.error


class DropsAfterAnswering(FakeDeepgram):
    """The first connection drops abruptly 0.1 s after it writes the answer to its first Finalize."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.first: Any = None

    async def _listen(self, request: Any) -> Any:
        if self.first is None:
            self.first = request
        return await super()._listen(request)

    async def _control(self, socket: Any, stream: Any, text: str) -> bool:
        if stream.number == 1 and '"Finalize"' in text and not sent(self, "Finalize"):

            def drop() -> None:
                self.record("dropped")
                self.first.transport.abort()

            asyncio.get_running_loop().call_later(self.latency_s + 0.1, drop)
        return await super()._control(socket, stream, text)


class SlowOverFinals(Stage):
    """Takes 0.3 s over each final transcript: a stage downstream that awaits (an interrupt's clean-up, a full
    inbox) while the final is on its way."""

    def __init__(self) -> None:
        super().__init__(name="slow")
        self.finals: list[tuple[str, float, float]] = []  # text, and when (monotonic) it arrived and went on

    async def process(self, frame: Frame, direction: Any) -> None:
        if isinstance(frame, Transcript) and frame.final:
            arrived = time.monotonic()
            await asyncio.sleep(0.3)
            self.finals.append((frame.text, arrived, time.monotonic()))
        await self.push(frame, direction)


@pytest.mark.timeout(40)
async def test_a_final_on_its_way_downstream_when_the_socket_drops_still_arrives():
    lines = ["A table for four tonight.", "At eight, please."]
    async with DropsAfterAnswering(utterances=lines) as fake:
        caller = ScriptedCaller([Say(line, pause=0.3) for line in lines], RATE, reply_timeout=0.3)
        stt = Observed(DeepgramSTTSettings(base_url=fake.ws_url, endpointing=None), api_key=fake.api_key)
        slow, conversation = SlowOverFinals(), Conversation("test")
        stages = [SimulatedInput(caller, AUDIO), ScriptedVAD(AUDIO), stt, slow, TurnTaker(conversation), Sink()]
        assert await Pipeline(stages, clock=RealClock()).run() == "ended"
    [dropped] = fake.of("dropped")
    assert stt.stats.reconnects == 1
    (first, arrived, went_on), *_ = slow.finals
    assert first == lines[0] and arrived < dropped.at < went_on, "the socket dropped while the final was on its way"
    assert [text for text, *_ in slow.finals] == lines
    assert [m.text for m in conversation.messages if m.role == "user"] == lines


class GateOnFirstFinal(Stage):
    """Holds the first final transcript until ``release`` is set: the frames after it queue up behind it."""

    def __init__(self) -> None:
        super().__init__(name="gate")
        self.release = asyncio.Event()
        self.finals: list[str] = []

    async def process(self, frame: Frame, direction: Any) -> None:
        if isinstance(frame, Transcript) and frame.final:
            if not self.finals:
                await self.release.wait()
            self.finals.append(frame.text)
        await self.push(frame, direction)


@pytest.mark.timeout(40)
async def test_stop_still_delivers_the_finals_already_made():
    lines = ["A table for four tonight.", "At eight, please."]
    async with FakeDeepgram(utterances=lines) as fake:
        caller = ScriptedCaller([Say(line, pause=0.3) for line in lines], RATE, reply_timeout=0.3)
        stt = Observed(DeepgramSTTSettings(base_url=fake.ws_url), api_key=fake.api_key)
        gate, conversation = GateOnFirstFinal(), Conversation("test")
        stages = [SimulatedInput(caller, AUDIO), ScriptedVAD(AUDIO), stt, gate, TurnTaker(conversation), Sink()]
        pipeline = Pipeline(stages, clock=RealClock())
        run = asyncio.create_task(pipeline.run())
        # The second answer is written while the gate holds the first final: the stage reads it before the close
        # that stopping asks for, and its final queues up behind the first.
        await fake.wait_for("answered", lambda s: len(fake.of("answered")) == 2, within_s=20)
        pipeline.cancel()
        asyncio.get_running_loop().call_later(0.2, gate.release.set)  # within close_timeout_s
        assert await run == "cancelled"
    assert gate.finals == lines, "the queued final went downstream as the stage stopped, in order"
    assert pipeline.usage.totals["stt"]["audio_seconds"] == pytest.approx(stt.stats.audio_s)


@pytest.mark.timeout(40)
async def test_a_finalize_given_up_at_its_timeout_and_never_answered_still_makes_the_socket_a_stalled_one(tmp_path):
    """The final goes out on its timeout, and no answer is paired with that Finalize any more; but a server that never
    shows it processed it has hung, and is replaced (else every later utterance would wait out its timeout)."""
    line = "A table for four tonight."
    # The Finalize's answer is held back (late_answers=1) until a next Finalize, which never comes: nothing follows.
    async with FakeDeepgram(utterances=[line], late_answers=1) as fake:
        stages = Stages()
        await call(
            fake,
            [Say(line, pause=0.3), Silence(2.5)],
            tmp_path,
            stages,
            endpointing=None,
            utterance_end_ms=None,
            interim_results=False,
            finalize_timeout_s=0.5,
            result_timeout_s=1.0,
        )
    assert fake.of("held") and len(fake.of("connect")) == 2, "replaced: the Finalize was never answered"
    stt = stages.stt
    assert stt.stats.finalize_timeouts == 1 and stt.stats.reconnects == 1
    timed_out, stalled = stages.errors
    assert "no final result within 0.5 s" in timed_out
    assert "no answer to a Finalize within 1 s (stalled)" in stalled


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("broken", "shown"), [(None, "None"), (42, "42")], ids=["missing", "not-a-string"])
async def test_a_word_without_usable_text_is_reported_and_its_results_skipped(tmp_path, broken, shown):
    line = "When do you open?"

    class BrokenWordDeepgram(FakeDeepgram):
        def _send(self, stream: Any, message: Any, *, answering: float | None = None) -> None:
            if isinstance(message, dict) and message.get("type") == "Results" and not self.of("broken-word"):
                words = message["channel"]["alternatives"][0]["words"]
                if words:
                    self.record("broken-word")
                    if broken is None:
                        del words[0]["word"], words[0]["punctuated_word"]
                    else:
                        words[0]["punctuated_word"] = broken
            super()._send(stream, message, answering=answering)

    async with BrokenWordDeepgram(utterances=[line]) as fake:
        stages = Stages()
        result = await call(fake, [Say(line, pause=0.3)], tmp_path, stages)
    assert fake.of("broken-word") and result.outcome == "ended"
    assert user_texts(result) == [line], "the results after it carried the words"
    [error] = stages.stt.pipeline.errors
    problem = f"Deepgram sent Results without a usable transcript (a word whose text is {shown}); skipped"
    assert not error.fatal and problem in error.error


class EmptyFrameAmongSilence(Stage):
    """A head stage sending ``frames`` 20 ms frames of silence in real time, the one at ``empty_at`` empty."""

    def __init__(self, frames: int, empty_at: int) -> None:
        super().__init__(name="head")
        self.frames, self.empty_at = frames, empty_at

    async def process(self, frame: Frame, direction: Any) -> None:
        await self.push(frame, direction)
        if isinstance(frame, Start):
            self.spawn(self._audio(), name="head-audio")

    async def _audio(self) -> None:
        pts = 0
        for index in range(self.frames):
            pcm = b"" if index == self.empty_at else bytes(640)
            await self.push(AudioFrame(pcm=pcm, sample_rate=RATE, pts=pts))
            pts += len(pcm) // 2
            await asyncio.sleep(0.02)


@pytest.mark.timeout(30)
async def test_an_empty_audio_frame_is_not_sent_deepgram_would_take_it_for_the_end_of_the_stream():
    async with FakeDeepgram(utterances=["Hello."]) as fake:
        stt = Observed(DeepgramSTTSettings(base_url=fake.ws_url), api_key=fake.api_key)
        pipeline = Pipeline([EmptyFrameAmongSilence(frames=30, empty_at=10), stt, Sink()], clock=RealClock())
        run = asyncio.create_task(pipeline.run())
        try:
            await fake.wait_for("audio", lambda s: len(fake.of("audio")) >= 29, within_s=10)
        finally:
            pipeline.cancel()
            await run
    assert [s.data["bytes"] for s in fake.of("audio")] == [640] * 29, "every frame but the empty one, once"
    assert len(fake.of("connect")) == 1 and stt.stats.reconnects == 0 and not pipeline.errors


@pytest.mark.timeout(30)
async def test_the_fake_takes_a_zero_byte_message_for_deepgrams_legacy_close_signal():
    from deepgram import AsyncDeepgramClient, DeepgramClientEnvironment
    from websockets.exceptions import ConnectionClosedOK

    noise = (np.random.default_rng(0).uniform(-0.3, 0.3, RATE // 2) * 32767).astype(np.int16).tobytes()
    got: list[str | None] = []
    async with FakeDeepgram(utterances=[""]) as fake:
        env = DeepgramClientEnvironment(base=fake.url, production=fake.ws_url, agent=fake.ws_url, agent_rest=fake.url)
        client = AsyncDeepgramClient(api_key=fake.api_key, environment=env)
        async with client.listen.v1.connect(model="nova-3", encoding="linear16", sample_rate=RATE) as socket:
            for i in range(0, len(noise), 640):
                await socket.send_media(noise[i : i + 640])
            await socket.send_media(b"")
            with pytest.raises(ConnectionClosedOK) as closed:
                while True:
                    got.append(getattr(await asyncio.wait_for(socket.recv(), 5), "type", None))
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000, "a normal close"
    assert got[-2:] == ["Results", "Metadata"], "what it heard finalized, then Metadata, as on CloseStream"
    assert fake.of("close") and not fake.of("disconnect")


@pytest.mark.timeout(30)
async def test_a_message_the_sdk_cannot_parse_is_reported_saying_what_it_was(tmp_path):
    line = "When do you open?"

    class OddDeepgram(FakeDeepgram):
        """Sends JSON that is no object, then a message type Deepgram may add later, before anything else."""

        async def _write(self, request: Any, socket: Any, stream: Any, dropping: bool) -> None:
            if stream.number == 1:
                await socket.send_str("[1, 2, 3]")
                await socket.send_str(json.dumps({"type": "Warning", "description": "audio arrives slowly"}))
            await super()._write(request, socket, stream, dropping)

    async with OddDeepgram(utterances=[line]) as fake:
        stages = Stages()
        result = await call(fake, [Say(line, pause=0.3)], tmp_path, stages)
    assert user_texts(result) == [line], "the call went on, nothing lost"
    assert stages.errors == [
        "stt: Deepgram sent JSON that is no object ('[1, 2, 3]'); skipped it",
        "stt: Deepgram sent a message of unknown type 'Warning'; skipped it",
    ]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("keyterms", "on_the_wire"), [(["Luigi", "tiramisu"], ["Luigi", "tiramisu"]), (["Luigi"], "Luigi")]
)
async def test_keyterms_reach_the_wire_each_as_a_keyterm_parameter(keyterms, on_the_wire):
    async with FakeDeepgram(utterances=["Hello."]) as fake:
        stt = Observed(DeepgramSTTSettings(base_url=fake.ws_url, keyterms=keyterms), api_key=fake.api_key)
        pipeline = Pipeline([Silent(), stt, Sink()], clock=RealClock())
        run = asyncio.create_task(pipeline.run())
        try:
            connect = await fake.wait_for("connect")
        finally:
            pipeline.cancel()
            await run
    query = connect.data["query"]
    assert query["keyterm"] == on_the_wire, "a repeated parameter is recorded with all its values"
    assert query["model"] == "nova-3" and query["language"] == "en"


class HangsUpAtTheFirstFinalize(FakeDeepgram):
    """The first connection closes as its first Finalize arrives, before answering it (its utterance left open);
    every later handshake takes 1 s: longer than the client's finalize timeout."""

    async def _listen(self, request: Any) -> Any:
        if self._connections >= 1:
            await asyncio.sleep(1.0)
        return await super()._listen(request)

    async def _control(self, socket: Any, stream: Any, text: str) -> bool:
        if stream.number == 1 and '"Finalize"' in text:
            self.record("hung-up", connection=stream.number)
            return True  # the stream is over: the handler closes the socket
        return await super()._control(socket, stream, text)


@pytest.mark.timeout(40)
async def test_after_an_utterance_given_up_at_its_timeout_the_replay_is_recognised_as_the_next_line(tmp_path):
    lines = ["A table for four tonight.", "At eight, please."]
    # The first utterance ends at its timeout, with the interim words, while the stage reconnects: the new socket is
    # given none of its audio, and the first speech it hears is the second line.
    async with HangsUpAtTheFirstFinalize(utterances=lines) as fake:
        stages = Stages()
        await call(
            fake,
            [Say(line, pause=0.3) for line in lines],
            tmp_path,
            stages,
            replies=["Sure.", "Done."],
            endpointing=None,
            finalize_timeout_s=0.5,
        )
    stt = stages.stt
    assert fake.of("hung-up") and stt.stats.finalize_timeouts == 1 and stt.stats.reconnects == 1
    first, second = [t.text for t in stt.transcripts if t.final]
    assert first and lines[0].startswith(first), "the first ended with the words heard so far"
    assert second == lines[1], "the second line's audio was recognised as the second line"
    assert [s.data for s in fake.of("abandoned")] == [{"connection": 1, "utterance": 0}]
    assert [(u.data["connection"], u.data["utterance"]) for u in fake.of("utterance")] == [(2, 1)]


# ------------------------------------------------------------------------ a server that says nothing at all


LINES = ["A table for two tonight.", "Around seven thirty, please.", "The name is Rossi."]


@pytest.mark.timeout(40)
async def test_with_speech_events_a_server_that_stalls_is_a_deepgram_error_that_stops_the_call(tmp_path):
    # With speech_events no Finalize goes out before Deepgram's own end of speech: a server that says nothing was
    # never found out, and the call "ended" with no turn and no error.
    async with FakeDeepgram(utterances=LINES, faults=Faults(stall_s=60)) as fake:
        stages = Stages()
        with pytest.raises(ProviderError, match=re.escape("no message from Deepgram for 2 s of audio sent (stalled)")):
            await call(
                fake,
                [Say(line, pause=0.3) for line in LINES],
                tmp_path,
                stages,
                vad="none",
                speech_events=True,
                message_timeout_s=2,
                max_reconnects=0,
            )
    assert len(fake.of("connect")) == 1 and stages.stt.stats.messages == 0, "Deepgram said nothing at all"
    [error] = stages.stt.pipeline.errors
    assert error.fatal and error.stage == "stt" and "Deepgram: connection lost (no message" in error.error
    assert json.loads((tmp_path / "transcript.json").read_text())["status"] == "failed"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("policy", "stt"),
    [
        (ErrorPolicy.STOP, {"max_reconnects": 3}),  # reconnected, the audio Deepgram never answered replayed
        (ErrorPolicy.SKIP_TURN, {"max_reconnects": 0, "retry_after_s": 0.5}),  # failed, then a new session
    ],
    ids=["reconnect", "skip-turn"],
)
async def test_with_speech_events_a_server_that_hangs_is_reported_and_the_callers_later_lines_are_heard(
    tmp_path, policy, stt
):
    # The first connection hangs at the Finalize after the first line (with speech_events only a flush, never
    # awaited): it reads on and says nothing more.
    async with FakeDeepgram(utterances=LINES, deaf_connections=1) as fake:
        stages = Stages(policy)
        result = await call(
            fake,
            [Say(line, pause=0.3) for line in LINES],
            tmp_path,
            stages,
            replies=["Sure.", "Fine.", "Done."],
            vad="none",
            speech_events=True,
            message_timeout_s=3,
            **stt,
        )
    assert fake.of("unanswered") and len(fake.of("connect")) == 2, "the silent socket was replaced"
    assert result.outcome == "ended", "the call went on"
    assert user_texts(result) == LINES, "every line was heard: what the silent socket got was given again"
    assert stages.errors, "never silent"
    assert not any(e.fatal for e in stages.stt.pipeline.errors)
    assert "Deepgram: connection lost (no message from Deepgram for 3 s of audio sent (stalled))" in stages.errors[0]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "stt", [{"vad": "none", "speech_events": True}, {"vad": "scripted"}], ids=["speech-events", "local-vad"]
)
async def test_a_long_silence_in_a_call_is_no_stall(tmp_path, stt):
    # Deepgram sends Results as it processes audio, silence included (the fake too): a caller who says nothing for
    # longer than message_timeout_s is no stalled socket.
    script = [Say(LINES[0], pause=0.3), Silence(10.0), Say(LINES[1], pause=0.3)]
    async with FakeDeepgram(utterances=LINES) as fake:
        stages = Stages()
        result = await call(fake, script, tmp_path, stages, replies=["Sure.", "Fine."], message_timeout_s=4, **stt)
    assert result.outcome == "ended"
    assert user_texts(result) == LINES[:2]
    assert len(fake.of("connect")) == 1 and stages.stt.stats.reconnects == 0, "no reconnect"
    assert not stages.errors
    empty = [s for s in fake.of("result") if not s.data["transcript"] and not s.data["from_finalize"]]
    assert len(empty) >= 8, "the silence was answered with empty Results"


# ------------------------------------------------------------------ messages the fake does not send: a scripted server


def _results(start: float, end: float, words: list[tuple[str, float, float]], **flags: bool) -> dict[str, Any]:
    """A Listen v1 Results message as Deepgram writes it."""
    return {
        "type": "Results",
        "channel_index": [0, 1],
        "start": start,
        "duration": round(end - start, 3),
        "is_final": flags.get("is_final", False),
        "speech_final": flags.get("speech_final", False),
        "from_finalize": False,
        "channel": {
            "alternatives": [
                {
                    "transcript": " ".join(w[0] for w in words),
                    "confidence": 0.9,
                    "words": [
                        {"word": w.lower(), "punctuated_word": w, "start": s, "end": e, "confidence": 0.9}
                        for w, s, e in words
                    ],
                }
            ]
        },
        "metadata": {"request_id": "r", "model_info": {"name": "n", "version": "v", "arch": "a"}, "model_uuid": "u"},
    }


class ScriptedListen:
    """A Listen v1 server on 127.0.0.1 that sends each scripted message (a dict, or raw JSON text) once it has
    received that many seconds of audio, answers CloseStream with Metadata and a close, and nothing else: for
    messages a real server may send that ``FakeDeepgram`` does not script."""

    def __init__(self, script: list[tuple[float, dict[str, Any] | str]]) -> None:
        self.script = script

    async def __aenter__(self) -> ScriptedListen:
        import websockets

        self.server = await websockets.serve(self._serve, "127.0.0.1", 0)
        self.url = f"ws://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, ws: Any) -> None:
        script, received = list(self.script), 0
        async for message in ws:
            if isinstance(message, bytes):
                received += len(message)
                while script and script[0][0] <= received / 2 / 16000:
                    due = script.pop(0)[1]
                    await ws.send(due if isinstance(due, str) else json.dumps(due))
            elif json.loads(message)["type"] == "CloseStream":
                await ws.send(json.dumps({"type": "Metadata", "request_id": "r", "duration": 1.0, "channels": 1}))
                await ws.close()
                return


class SilentCaller(Stage):
    """``seconds`` of silent 20 ms frames in real time, then the end of the call."""

    def __init__(self, seconds: float) -> None:
        super().__init__(name="caller")
        self.seconds = seconds

    async def process(self, frame: Frame, direction: Any) -> None:
        await self.push(frame, direction)
        if isinstance(frame, Start):
            self.spawn(self._speak(), name="caller-audio")

    async def _speak(self) -> None:
        for i in range(round(self.seconds / 0.02)):
            await self.push(AudioFrame(pcm=bytes(640), sample_rate=16000, pts=i * 320))
            await asyncio.sleep(0.02)
        await self.pipeline.end()


async def _listen(script: list[tuple[float, dict[str, Any] | str]], seconds: float) -> tuple[list[Frame], Pipeline]:
    """The real stage and SDK against ``script``, with speech_events; the speech and transcript frames it made."""
    async with ScriptedListen(script) as server:
        stt = DeepgramSTT(DeepgramSTTSettings(base_url=server.url, speech_events=True), api_key="key")
        kept: list[Frame] = []

        class Keep(Stage):
            async def process(self, frame: Frame, direction: Any) -> None:
                if isinstance(frame, Transcript | UserSpeechStarted | UserSpeechStopped):
                    kept.append(frame)
                await self.push(frame, direction)

        pipeline = Pipeline([SilentCaller(seconds), stt, Keep(name="keep")], clock=RealClock())
        assert await pipeline.run() == "ended"
    return kept, pipeline


@pytest.mark.timeout(20)
async def test_an_utterance_end_for_the_last_utterance_does_not_end_the_one_the_caller_just_began():
    """SpeechStarted comes before any word, so Deepgram's UtteranceEnd for the previous words can follow it."""
    table = [("Table", 1.3, 1.5), ("for", 1.55, 1.7), ("four.", 1.75, 2.0)]
    script: list[tuple[float, dict[str, Any] | str]] = [
        (0.25, {"type": "SpeechStarted", "channel": [0, 1], "timestamp": 0.2}),
        (0.8, _results(0.0, 0.8, [("Hello.", 0.2, 0.5)], is_final=True, speech_final=True)),
        (1.25, {"type": "SpeechStarted", "channel": [0, 1], "timestamp": 1.2}),
        (1.55, {"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": 0.5}),
        (2.3, _results(0.8, 2.3, table, is_final=True, speech_final=True)),
    ]
    frames, pipeline = await _listen(script, 3.0)
    stops = [f for f in frames if isinstance(f, UserSpeechStopped)]
    assert [round(stop.last_voiced_at, 2) for stop in stops] == [0.5, 2.0], "one stop per utterance, at its end"
    assert [f.text for f in frames if isinstance(f, Transcript) and f.final] == ["Hello.", "Table for four."]
    assert pipeline.errors == []


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        (
            json.dumps(_results(1.0, 1.2, [])).replace('"duration": 0.2', '"duration": NaN'),
            "stt: Deepgram sent Results without a usable transcript (start + duration is nan); skipped",
        ),
        (
            '{"type": "SpeechStarted", "channel": [0, 1], "timestamp": 1e400}',
            "stt: Deepgram sent SpeechStarted without a usable timestamp (inf); skipped it",
        ),
    ],
    ids=["nan-duration", "infinite-timestamp"],
)
async def test_a_time_that_is_no_finite_number_is_reported_and_the_call_goes_on(bad, problem):
    script: list[tuple[float, dict[str, Any] | str]] = [
        (0.25, {"type": "SpeechStarted", "channel": [0, 1], "timestamp": 0.2}),
        (1.0, _results(0.0, 1.0, [("Hello.", 0.2, 0.5)], is_final=True, speech_final=True)),
        (1.2, bad),
        (2.0, _results(1.2, 2.0, [], is_final=True)),
    ]
    frames, pipeline = await _listen(script, 2.5)
    assert [f.text for f in frames if isinstance(f, Transcript) and f.final] == ["Hello."], "what was said stays"
    assert [(e.error, e.fatal) for e in pipeline.errors] == [(problem, False)]


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        (
            '{"type": "SpeechStarted", "channel": [0, 1], "timestamp": 1e305}',
            "stt: Deepgram sent SpeechStarted without a usable timestamp (1e+305); skipped it",
        ),
        (
            '{"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": 1e305}',
            "stt: Deepgram sent UtteranceEnd without a usable last_word_end (1e+305); skipped it",
        ),
        (
            json.dumps(_results(1.0, 1.2, [])).replace('"start": 1.0', '"start": 1e305'),
            "stt: Deepgram sent Results without a usable transcript (start + duration is 1e+305); skipped",
        ),
    ],
    ids=["huge-timestamp", "huge-last-word-end", "huge-start"],
)
async def test_a_finite_time_too_large_to_count_in_samples_is_reported_and_the_call_goes_on(bad, problem):
    # 1e305 s is a finite float, but 1e305 * 16000 samples is not: it crashed the stage as a bare OverflowError.
    script: list[tuple[float, dict[str, Any] | str]] = [
        (0.25, {"type": "SpeechStarted", "channel": [0, 1], "timestamp": 0.2}),
        (1.0, _results(0.0, 1.0, [("Hello.", 0.2, 0.5)], is_final=True, speech_final=True)),
        (1.2, bad),
        (2.0, _results(1.2, 2.0, [], is_final=True)),
    ]
    frames, pipeline = await _listen(script, 2.5)
    assert [f.text for f in frames if isinstance(f, Transcript) and f.final] == ["Hello."], "what was said stays"
    assert [(e.error, e.fatal) for e in pipeline.errors] == [(problem, False)]


@pytest.mark.timeout(30)
async def test_a_stage_composed_in_code_without_a_key_names_it_or_takes_the_environments(monkeypatch):
    # DeepgramSTT(api_key=os.environ.get(...)) with the variable unset or blank: the SDK raised a bare ApiError at
    # the first connect (None), or the stage connected with "" and got a 401.
    async with FakeDeepgram(utterances=["Hello."]) as fake:
        settings = DeepgramSTTSettings(base_url=fake.ws_url, keepalive_s=0.2)
        monkeypatch.delenv("DEEPGRAM_API_KEY", raising=False)
        for missing in (None, "", "  \n"):
            with pytest.raises(ConfigError, match=r"stt\.api_key: no API key for Deepgram: set .*DEEPGRAM_API_KEY"):
                DeepgramSTT(settings, api_key=missing)
        assert fake.of("connect") == [], "named before anything connects"
        monkeypatch.setenv("DEEPGRAM_API_KEY", fake.api_key)
        stt = DeepgramSTT(settings, api_key=" ")
        pipeline = Pipeline([Silent(), stt, Sink()], clock=RealClock())
        run = asyncio.create_task(pipeline.run())
        try:
            connect = await fake.wait_for("connect")
            await fake.wait_for("message", lambda s: s.data.get("type") == "KeepAlive", within_s=5)
        finally:
            pipeline.cancel()
            await run
    assert connect.data["headers"]["Authorization"] == f"Token {fake.api_key}", "the environment's key"
    assert not fake.of("refused") and not pipeline.errors


@pytest.mark.timeout(30)
async def test_a_base_url_with_a_trailing_slash_still_reaches_v1_listen_and_one_with_a_query_is_refused():
    async with FakeDeepgram(utterances=["Hello."]) as fake:
        settings = DeepgramSTTSettings(base_url=fake.ws_url + "/", keepalive_s=0.2)
        stt = DeepgramSTT(settings, api_key=fake.api_key)
        pipeline = Pipeline([Silent(), stt, Sink()], clock=RealClock())
        run = asyncio.create_task(pipeline.run())
        try:
            await fake.wait_for("message", lambda s: s.data.get("type") == "KeepAlive", within_s=5)
        finally:
            pipeline.cancel()
            await run
        for url in (fake.ws_url + "?x=1", fake.ws_url + "/#part"):
            with pytest.raises(ConfigError, match=r"stt\.base_url: a base URL for Deepgram takes no query or fragment"):
                parse_config({"stt": {"provider": "deepgram", "base_url": url}})
    assert [s.data["path"] for s in fake.of("connect")] == ["/v1/listen"], "not '//v1/listen'"
    assert not pipeline.errors
