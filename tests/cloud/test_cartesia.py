"""Cartesia streaming TTS: the real cartesia SDK against FakeCartesia on 127.0.0.1, through real pipelines on a
RealClock.

A configured call runs on its own event loop (``run_configured_call`` calls ``asyncio.run``), so each test runs it
in a worker thread while the fake serves on the test's loop; what happened is read from the fake's records, the
call's artefacts and the pipeline — never from sleeps.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import wave
from typing import Any

import numpy as np
import pytest

from tests.helpers import cancel_while_stopping, watching_stop
from voxpipe.call import CallResult, run_configured_call
from voxpipe.config import BuildContext, ConfigError, Registry, parse_config
from voxpipe.pipeline import (
    DOWNSTREAM,
    AudioFormat,
    ErrorFrame,
    ErrorPolicy,
    LLMRequest,
    Pipeline,
    RealClock,
    ResponseEnd,
    SpeakableChunk,
    Stage,
    TTSDone,
    WordMark,
)
from voxpipe.stages.cartesia_tts import (
    CartesiaTTS,
    CartesiaTTSSettings,
    PendingMarks,
    decode_audio,
    looks_like_float32,
)
from voxpipe.stages.cloud import ProviderError
from voxpipe.stages.tts import LEADING_SILENCE_LEVEL
from voxpipe.testing.caller import Say
from voxpipe.testing.fakes.cartesia import ErrorEvent, FakeCartesia
from voxpipe.testing.fakes.server import Faults
from voxpipe.testing.signals import speechlike

RATE = 16000
REPLY = "Sure, four at eight tonight. Shall I book it?"
SECOND = "Done, see you then."
VOICE = "a0e99841-438c-4a64-b679-ae501e7d6091"


class Built:
    """A registry whose tts.cartesia is CartesiaTTS, keeping the built stage and its replies' receiver tasks for
    inspection."""

    def __init__(self) -> None:
        self.stages: list[CartesiaTTS] = []
        self.receivers: list[asyncio.Task[None]] = []
        self.context_queues_at_stop: list[int] = []  # the SDK's per-context queues left when the stage stopped
        self.marks: list[WordMark] = []  # every word mark the stage put on its audio, in order
        built = self

        class KeptCartesia(CartesiaTTS):
            @classmethod
            def from_settings(cls, settings: Any, context: Any, name: str) -> CartesiaTTS:
                stage = super().from_settings(settings, context, name)
                built.stages.append(stage)
                return stage

            def spawn(self, coro: Any, name: str = "", *, epoch: int | None = None) -> asyncio.Task[None]:
                task = super().spawn(coro, name, epoch=epoch)
                if "-receive-" in name:
                    built.receivers.append(task)
                return task

            async def emit_audio(self, epoch: int, pcm: bytes, marks: Any = (), text: str = "") -> None:
                built.marks.extend(marks)
                await super().emit_audio(epoch, pcm, marks, text)

            async def stop(self) -> None:
                if self._socket is not None:
                    built.context_queues_at_stop.append(len(self._socket.sdk._context_queues))
                await super().stop()

        self.registry = Registry.discover()
        self.registry.register("tts", "cartesia", KeptCartesia)

    @property
    def errors(self) -> list[Any]:
        return list(self.stages[0].pipeline.errors)


def config(fake: FakeCartesia, replies: list[Any] | None = None, **tts: Any) -> tuple[Any, Any]:
    tts_config = {
        "provider": "cartesia",
        "api_key": fake.api_key,
        "voice": VOICE,
        "base_url": fake.url,
        "websocket_url": fake.ws_url,
        **tts,
    }
    return parse_config(
        {
            "audio": {"sample_rate": RATE},
            "vad": {"provider": "scripted"},
            "stt": {"provider": "scripted"},
            "llm": {"provider": "scripted", "replies": replies or [REPLY, SECOND]},
            "tts": tts_config,
        }
    )


async def call(fake: FakeCartesia, script: list[Any], tmp_path: Any, built: Built, **tts: Any) -> CallResult:
    """Run a configured call against ``fake`` in a worker thread (its own loop, real time)."""
    parsed, settings = config(fake, **tts)
    return await asyncio.to_thread(
        run_configured_call, parsed, settings, script, tmp_path, clock=RealClock(), registry=built.registry
    )


async def failing_call(fake: FakeCartesia, script: list[Any], tmp_path: Any, built: Built, **tts: Any) -> str:
    """Run a call that must stop on the TTS's error; returns the error's text."""
    with pytest.raises(ProviderError) as raised:
        await call(fake, script, tmp_path, built, **tts)
    transcript = json.loads((tmp_path / "transcript.json").read_text())
    assert transcript["status"] == "failed"
    errors = built.errors
    assert len(errors) == 1 and errors[0].fatal and errors[0].stage == "tts"
    assert errors[0].error == f"ProviderError: {raised.value}"
    return str(raised.value)


def bot_channel(result: CallResult) -> np.ndarray:
    with wave.open(str(result.out_dir / "recording.wav")) as wav:
        data = np.frombuffer(wav.readframes(wav.getnframes()), dtype=np.int16).reshape(-1, 2)
    return data[:, 1]


def contexts(fake: FakeCartesia) -> list[str]:
    return [s.data["context_id"] for s in fake.of("context")]


def inputs(fake: FakeCartesia, context_id: str) -> list[dict[str, Any]]:
    return [
        s.data["message"]
        for s in fake.of("message")
        if s.data["message"].get("context_id") == context_id and "transcript" in s.data["message"]
    ]


# ------------------------------------------------------------------------------------------------ a turn


@pytest.mark.timeout(30)
async def test_a_reply_streams_through_one_context_and_every_word_is_heard(tmp_path):
    async with FakeCartesia() as fake:
        built = Built()
        result = await call(fake, [Say("A table for four?"), Say("Yes.")], tmp_path, built)
    assert result.outcome == "ended"
    assert built.errors == []

    # The handshake: Bearer key and API version, once for the whole call; closed at the end.
    connect = fake.of("connect")
    assert len(connect) == 1
    headers = {k.lower(): v for k, v in connect[0].data["headers"].items()}
    assert headers["authorization"] == f"Bearer {fake.api_key}" and headers["cartesia-version"]
    assert fake.kinds()[-1] == "disconnect"

    # One context per reply, each fed in several pushes and closed with continue: false.
    first, second = contexts(fake)
    assert first != second
    for context_id, text in ((first, REPLY), (second, SECOND)):
        messages = inputs(fake, context_id)
        pushes, last = messages[:-1], messages[-1]
        assert all(m["continue"] is True for m in pushes) and last == {**last, "continue": False, "transcript": ""}
        assert "".join(m["transcript"] for m in pushes).split() == text.split(), "the pieces join with spaces"
        assert messages[0]["output_format"] == {"container": "raw", "encoding": "pcm_s16le", "sample_rate": RATE}
        assert messages[0]["voice"] == VOICE and messages[0]["model_id"] == "sonic-3"
        assert messages[0]["language"] == "en" and messages[0]["add_timestamps"] is True
    assert len(inputs(fake, first)) >= 3, "the first reply's text was pushed as the reasoner streamed it"

    # The caller heard every word of both replies, by Cartesia's word timestamps.
    assert [t.heard for t in result.turns] == [REPLY.split(), SECOND.split()]
    assert not any(t.interrupted for t in result.turns)
    assert [m.text for m in result.conversation.messages if m.role == "assistant"] == [REPLY, SECOND]
    assert np.abs(bot_channel(result)).max() > 3000, "the bot's audio reached the recording"
    assert all("tts.first_audio" in t.marks for t in result.turns)
    # Each context's first audio is written the injected time after its first text, or later.
    assert [w.arrived for w in fake.waits()] == [s.at for s in fake.of("context")]
    assert all(w.served_s >= fake.ttfa_s for w in fake.waits())

    # Characters are counted per reply, as sent (Cartesia bills them), the space after each piece included.
    sent = [sum(len(m["transcript"]) for m in inputs(fake, c)) for c in (first, second)]
    assert [t.data["usage"]["tts"]["characters"] for t in result.turns] == sent
    assert sent[0] == len(REPLY) + 1


@pytest.mark.timeout(30)
async def test_a_barge_in_cancels_the_context_and_nothing_stale_plays(tmp_path):
    async with FakeCartesia(rtf=0.8) as fake:  # still speaking when the caller cuts in
        built = Built()
        script = [Say("A table for four?"), Say("No wait, make it five.", barge_in=0.6)]
        result = await call(fake, script, tmp_path, built)
    assert result.outcome == "ended" and built.errors == []

    first, second = contexts(fake)
    cancel = fake.of("cancel")
    assert [s.data["context_id"] for s in cancel] == [first], "Cartesia was told to stop the interrupted context"
    assert inputs(fake, second)[-1]["continue"] is False
    cancelled_at = fake.seen.index(cancel[0])
    assert not [s for s in fake.seen[cancelled_at:] if s.kind == "chunk" and s.data["context_id"] == first]
    assert not [s for s in fake.seen if s.kind == "done" and s.data["context_id"] == first]

    cut, answer = result.turns
    assert cut.interrupted and not answer.interrupted
    assert 0 < len(cut.heard) < len(REPLY.split()) and cut.heard == REPLY.split()[: len(cut.heard)]
    interrupted = [m for m in result.conversation.messages if m.role == "assistant" and m.interrupted]
    assert [m.text for m in interrupted] == [" ".join(cut.heard)]
    assert answer.heard == SECOND.split(), "the next reply, in a new context, is whole"
    cut_receiver, answer_receiver = built.receivers
    assert cut_receiver.cancelled(), "the interrupted reply's consumer task was cancelled, not left to drain"
    assert not answer_receiver.cancelled() and answer_receiver.exception() is None

    bot = bot_channel(result)
    cut_at, next_at = cut.marks["out.interrupted"], answer.marks["out.first_play"]
    assert np.any(bot[round((cut_at - 0.1) * RATE) : round(cut_at * RATE)]), "the bot was speaking before"
    assert not np.any(bot[round(cut_at * RATE) : round(next_at * RATE)]), "silent from the interrupt on"


@pytest.mark.timeout(30)
async def test_words_heard_before_a_pause_in_the_reply_are_kept_when_the_caller_cuts_in(tmp_path):
    # Cartesia sends a word's timestamps after the audio holding it: the preamble's last mark must not wait for the
    # next audio, which the tool's pause holds back past the caller's barge-in.
    preamble = "Let me check that for you."

    async def lookup() -> str:
        """Look up a free table."""
        await asyncio.sleep(5)
        return "eight"

    async with FakeCartesia() as fake:
        reply = {"text": "We have a table at {result}.", "tool": "lookup", "preamble": preamble}
        parsed, settings = config(fake, [reply, "Fine."])
        script = [Say("A table tonight?"), Say("Okay thanks.", barge_in=3.5)]
        result = await asyncio.to_thread(
            run_configured_call, parsed, settings, script, tmp_path, clock=RealClock(), tools={"lookup": lookup}
        )
    cut = result.turns[0]
    assert cut.interrupted
    assert list(cut.heard) == preamble.split(), "every word of the preamble was played before the cut"


@pytest.mark.timeout(30)
async def test_chinese_and_japanese_chunks_go_without_the_space_english_ones_need(tmp_path):
    # Cartesia joins a context's transcripts as sent: a space after "。" would be a space in Japanese text.
    reply = "はい、かしこまりました。お店は山田です。Thank you."
    async with FakeCartesia() as fake:
        built = Built()
        result = await call(fake, [Say("Hello?")], tmp_path, built, replies=[reply], language="ja")
    assert result.outcome == "ended" and built.errors == []
    (context,) = contexts(fake)
    pushed = [m["transcript"] for m in inputs(fake, context)]
    assert pushed == ["はい、かしこまりました。", "お店は山田です。", "Thank you. ", ""]


@pytest.mark.timeout(30)
async def test_a_chunk_closing_with_an_ellipsis_or_a_quote_mark_is_spaced_by_the_word_before_it(tmp_path):
    reply = "はい、そうですね…少々お待ちください。She said “yes…” Then we booked."
    async with FakeCartesia() as fake:
        built = Built()
        result = await call(fake, [Say("Hello?")], tmp_path, built, replies=[reply], language="ja")
    assert result.outcome == "ended" and built.errors == []
    (context,) = contexts(fake)
    pushed = [m["transcript"] for m in inputs(fake, context)]
    assert "".join(pushed) == "はい、そうですね…少々お待ちください。She said “yes…” Then we booked. ", pushed
    assert result.turns[0].data["usage"]["tts"] == {"characters": len(reply) + 1}, "counted as sent"


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("expiry_s", "how"),
    [
        (0.3, "Cartesia ended the context in the pause (its done came)"),
        (None, "the stage left the idle context before Cartesia could end it"),
    ],
)
async def test_text_after_a_pause_longer_than_a_contexts_life_is_spoken_on_a_new_context(tmp_path, expiry_s, how):
    # Cartesia expires a context 1 s after its last audio: text pushed to it after a tool's pause would not be
    # spoken. The reply goes on on a new context, its timestamps placed after the first's audio.
    preamble = "Let me check that for you."

    async def lookup() -> str:
        """Look up a free table."""
        await asyncio.sleep(1.5)
        return "eight"

    async with FakeCartesia(context_expiry_s=expiry_s) as fake:
        built = Built()
        reply = {"text": "We have a table at {result}.", "tool": "lookup", "preamble": preamble}
        parsed, settings = config(fake, [reply, "Fine."])
        result = await asyncio.to_thread(
            run_configured_call,
            parsed,
            settings,
            [Say("A table tonight?"), Say("Thanks.")],
            tmp_path,
            clock=RealClock(),
            registry=built.registry,
            tools={"lookup": lookup},
        )
    assert result.outcome == "ended" and built.errors == []
    first, second = result.turns[:2]
    assert list(first.heard) == f"{preamble} We have a table at eight.".split(), how
    assert not first.interrupted and list(second.heard) == ["Fine."]
    before, after, _ = contexts(fake)  # and the second reply's
    assert "".join(m["transcript"] for m in inputs(fake, before)).split() == preamble.split()
    assert [m["continue"] for m in inputs(fake, before)] == [True], "nothing more was sent to the first context"
    assert [s.data["context_id"] for s in fake.of("expired")] == ([before] if expiry_s else [])
    assert [s.data["context_id"] for s in fake.of("cancel")] == ([] if expiry_s else [before])
    assert inputs(fake, after)[-1]["continue"] is False, "the reply's end closed the context that spoke last"
    # The second context's words are marked after the first's audio (Cartesia counts from each context's start),
    # which is where the recording has them.
    marks = {m.word: m for m in built.marks}
    assert marks["We"].start >= marks["you."].end


@pytest.mark.timeout(30)
async def test_a_soft_first_word_is_heard_though_its_timestamps_came_before_any_audible_audio(tmp_path):
    # The first word is quieter than the leading silence the TTS base trims, and its timestamps arrive before any
    # audible audio: its mark must wait for the reply's first audible frame, not go out on no frame and be lost.
    async with FakeCartesia(quiet_words=1) as fake:
        built = Built()
        result = await call(fake, [Say("A table for four?")], tmp_path, built)
    assert result.outcome == "ended" and built.errors == []
    assert [t.heard for t in result.turns] == [REPLY.split()], "the soft first word was heard too"
    assert [m.text for m in result.conversation.messages if m.role == "assistant"] == [REPLY]


@pytest.mark.timeout(30)
async def test_only_the_text_that_reached_cartesia_is_counted():
    from voxpipe.pipeline import (
        DOWNSTREAM,
        ErrorFrame,
        ErrorPolicy,
        LLMRequest,
        Pipeline,
        ResponseEnd,
        SpeakableChunk,
        Stage,
    )

    class Errors(Stage):  # before the TTS: its ErrorFrames travel upstream to here
        def __init__(self) -> None:
            super().__init__(name="errors")
            self.seen = asyncio.Event()

        async def process(self, frame: Any, direction: Any) -> None:
            if isinstance(frame, ErrorFrame):
                self.seen.set()
            await self.push(frame, direction)

    async with FakeCartesia(error_event=ErrorEvent(context=0, after_chunks=0)) as fake:
        tts = CartesiaTTS(CartesiaTTSSettings(voice=VOICE, websocket_url=fake.ws_url), api_key=fake.api_key)
        tts.error_policy = ErrorPolicy.SKIP_FRAME  # the reply's receiver fails; the call goes on
        errors = Errors()
        pipeline = Pipeline([errors, tts, Stage()], clock=RealClock())
        running = asyncio.create_task(pipeline.run())
        await asyncio.sleep(0.05)
        epoch = pipeline.next_epoch()
        first = "Sure, four at eight tonight."
        await tts.receive(LLMRequest(epoch=epoch), DOWNSTREAM)
        await tts.receive(SpeakableChunk(epoch=epoch, text=first), DOWNSTREAM)
        await asyncio.wait_for(errors.seen.wait(), 10)  # Cartesia's error event ended the reply
        for text in ["Shall I book it for you?", "It is by the window."]:  # nowhere to go: the reply failed
            await tts.receive(SpeakableChunk(epoch=epoch, text=text), DOWNSTREAM)
        await tts.receive(ResponseEnd(epoch=epoch), DOWNSTREAM)
        await pipeline.end()
        await asyncio.wait_for(running, 10)
    sent = [s.data["message"]["transcript"] for s in fake.of("message") if s.data["message"].get("transcript")]
    assert sent == [first + " "]
    assert "error event 500" in pipeline.errors[0].error
    assert pipeline.usage.of_turn(epoch)["tts"] == {"characters": len(first) + 1}, "as sent, with its space"


@pytest.mark.timeout(30)
async def test_no_context_outlives_its_reply(tmp_path):
    # The SDK keeps a queue per context until its generator passes the context's done; a call's replies must not
    # pile them up (read from the SDK's connection: the leak is only visible there).
    async with FakeCartesia() as fake:
        built = Built()
        script = [Say("A table for four?"), Say("No wait, make it five.", barge_in=0.6), Say("Thanks.")]
        result = await call(fake, script, tmp_path, built)
    assert len(result.turns) == 3 and len(contexts(fake)) == 3
    assert built.context_queues_at_stop == [0]


# ------------------------------------------------------------------------------------------- refusals


@pytest.mark.timeout(30)
@pytest.mark.parametrize("given_by", ["config", "environment"])
async def test_a_wrong_api_key_is_rejected_at_the_handshake_and_stops_the_call(tmp_path, monkeypatch, given_by):
    monkeypatch.setenv("CARTESIA_API_KEY", "a-wrong-key")
    async with FakeCartesia(api_key="the-real-key") as fake:
        built = Built()
        key = {"api_key": "a-wrong-key"} if given_by == "config" else {"api_key": None}
        error = await failing_call(fake, [Say("Hello?")], tmp_path, built, **key)
    assert error.startswith("Cartesia: API key rejected (HTTP 401)")
    # Where the key came from: the config's (given there, or through a ${VAR} of its own), else the environment.
    assert error.endswith("; check tts.api_key" if given_by == "config" else "; check CARTESIA_API_KEY")
    assert fake.kinds()[:2] == ["connect", "refused"]
    assert "message" not in fake.kinds()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("status", "says"), [(429, "rate limited"), (500, "server error"), (503, "server error")])
async def test_a_refused_handshake_names_the_status(tmp_path, status, says):
    async with FakeCartesia(faults=Faults(refuse=status)) as fake:
        built = Built()
        error = await failing_call(fake, [Say("Hello?")], tmp_path, built)
    assert error.startswith(f"Cartesia: {says} (HTTP {status})")
    assert fake.of("refused")[0].data["status"] == status


@pytest.mark.timeout(30)
async def test_a_handshake_that_never_answers_times_out(tmp_path):
    """A server that accepts the TCP connection and then says nothing: the connect timeout ends the call."""
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with FakeCartesia() as fake:  # for its settings only; the socket goes to the silent server
            built = Built()
            error = await failing_call(
                fake, [Say("Hello?")], tmp_path, built, websocket_url=f"ws://127.0.0.1:{port}", connect_timeout_s=0.3
            )
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()
    assert error == f"Cartesia: no WebSocket handshake within 0.3 s at ws://127.0.0.1:{port}/tts/websocket"
    assert accepted and fake.seen == []


@pytest.mark.timeout(30)
async def test_nothing_listening_is_a_clear_error(tmp_path):
    import socket

    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with FakeCartesia() as fake:
        built = Built()
        error = await failing_call(fake, [Say("Hello?")], tmp_path, built, websocket_url=f"ws://127.0.0.1:{port}")
    assert error.startswith(f"Cartesia: cannot connect to ws://127.0.0.1:{port}/tts/websocket: ")


# -------------------------------------------------------------------------------------------- failures


@pytest.mark.timeout(30)
async def test_an_error_event_skips_the_turn_and_the_call_goes_on(tmp_path):
    failure = ErrorEvent(context=0, after_chunks=30, status_code=500, title="Internal Server Error", message="boom")
    async with FakeCartesia(error_event=failure) as fake:
        built = Built()
        script = [Say("A table for four?"), Say("Hello?")]
        result = await call(fake, script, tmp_path, built, on_error="skip-turn")
    assert result.outcome == "ended"
    (error,) = built.errors
    assert not error.fatal
    assert error.error == "ProviderError: Cartesia: error event 500: Internal Server Error: boom [internal_error]"

    failed, answer = result.turns
    assert failed.interrupted and 0 < len(failed.heard) < len(REPLY.split())
    assert failed.heard == REPLY.split()[: len(failed.heard)], "what was said before the error stays said"
    assert answer.heard == SECOND.split() and not answer.interrupted
    assert len(fake.of("connect")) == 1, "an error event is the context's, not the socket's"
    assert fake.of("cancel") == [], "Cartesia already ended that context"


@pytest.mark.timeout(30)
async def test_a_stall_before_the_first_audio_times_out(tmp_path):
    async with FakeCartesia(faults=Faults(stall_s=10)) as fake:
        built = Built()
        error = await failing_call(fake, [Say("Hello?")], tmp_path, built, first_audio_timeout_s=0.5)
    assert error == "Cartesia: no audio within 0.5 s of the reply's first text"
    assert fake.of("stall") and not fake.of("chunk")


@pytest.mark.timeout(30)
async def test_a_drop_mid_reply_is_an_error_and_the_next_reply_reconnects(tmp_path):
    async with FakeCartesia(faults=Faults(drop_after=40)) as fake:
        built = Built()
        script = [Say("A table for four?"), Say("Hello?")]
        result = await call(fake, script, tmp_path, built, on_error="skip-turn")
    assert result.outcome == "ended"
    (error,) = built.errors
    assert error.error == (
        "ProviderError: Cartesia: the connection was lost, without a close frame, in the middle of a reply"
    )
    assert len(fake.of("connect")) == 2 and fake.of("dropped")
    failed, answer = result.turns
    assert failed.interrupted and 0 < len(failed.heard) < len(REPLY.split())
    assert failed.heard == REPLY.split()[: len(failed.heard)], "what was said before the drop stays said"
    assert answer.heard == SECOND.split()
    bot = [line for line in json.loads((tmp_path / "transcript.json").read_text())["turns"] if line["speaker"] == "bot"]
    assert bot[0]["interrupted"] and bot[0]["error"] == error.error and "error" not in bot[1]
    report = (tmp_path / "report.html").read_text()  # the cut turn was a failure, not a barge-in: the report says so
    assert "Errors reported during the call:</p><ul><li>turn 1, tts: ProviderError: Cartesia: the connection" in report


@pytest.mark.timeout(30)
async def test_a_socket_closed_as_idle_while_a_tool_runs_before_the_first_word_is_replaced(tmp_path):
    # Cartesia closes idle sockets (after 5 minutes). A close after the reply began but before its first text (the
    # reasoner went straight to a tool) loses nothing: the reply opens its context on a new socket.
    async def lookup() -> str:
        """Look up a free table."""
        await asyncio.sleep(1.0)
        return "eight"

    async with FakeCartesia(idle_close_s=0.4) as fake:
        built = Built()
        reply = {"text": "We have a table at {result}.", "tool": "lookup"}
        parsed, settings = config(fake, [reply])
        result = await asyncio.to_thread(
            run_configured_call,
            parsed,
            settings,
            [Say("A table tonight?")],
            tmp_path,
            clock=RealClock(),
            registry=built.registry,
            tools={"lookup": lookup},
        )
    assert result.outcome == "ended" and built.errors == []
    assert list(result.turns[0].heard) == ["We", "have", "a", "table", "at", "eight."]
    (context,) = fake.of("context")
    closed = [s.data["connection"] for s in fake.of("idle-close") if s.at < context.at]
    assert closed and context.data["connection"] not in closed, "spoken on a socket opened after the idle close"


@pytest.mark.timeout(30)
async def test_malformed_json_mid_reply_retires_the_socket_and_keeps_what_was_said(tmp_path):
    async with FakeCartesia(faults=Faults(corrupt="malformed-json"), corrupt_after=40) as fake:
        built = Built()
        script = [Say("A table for four?"), Say("Hello?")]
        result = await call(fake, script, tmp_path, built, on_error="skip-turn")
    (error,) = built.errors
    assert error.error.startswith("ProviderError: Cartesia: sent a message that is not valid JSON (")
    assert len(fake.of("connect")) == 2, "the next reply reconnected"
    failed, answer = result.turns
    assert failed.interrupted and 0 < len(failed.heard) < len(REPLY.split())
    assert failed.heard == REPLY.split()[: len(failed.heard)], "what was said before the broken message stays said"
    assert answer.heard == SECOND.split()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("corrupt", "bad_audio", "says"),
    [
        ("malformed-json", "base64", "Cartesia: sent a message that is not valid JSON"),
        ("unknown-event", "base64", "Cartesia: unknown event type 'audio_chunk'"),
        ("bad-audio", "base64", "Cartesia: a chunk's audio is not valid base64"),
        ("bad-audio", "odd-length", "Cartesia: a chunk of 1279 bytes is not whole pcm_s16le samples"),
        ("bad-audio", "float32", "Cartesia: a chunk holds pcm_f32le audio where pcm_s16le was asked for"),
    ],
)
async def test_a_broken_message_is_a_clear_error(tmp_path, corrupt, bad_audio, says):
    async with FakeCartesia(faults=Faults(corrupt=corrupt), bad_audio=bad_audio) as fake:
        built = Built()
        error = await failing_call(fake, [Say("Hello?")], tmp_path, built)
    assert error.startswith(says)
    assert fake.of("corrupted")


# ---------------------------------------------------------------------------------------- the end of the call


class Frames(Stage):
    """Records the frames that reach it; ``got(kind, epoch)`` is an event set when one of that kind arrives."""

    def __init__(self, name: str) -> None:
        super().__init__(name=name)
        self.seen: list[Any] = []
        self._events: dict[tuple[type, int], asyncio.Event] = {}

    def got(self, kind: type, epoch: int) -> asyncio.Event:
        return self._events.setdefault((kind, epoch), asyncio.Event())

    async def process(self, frame: Any, direction: Any) -> None:
        self.seen.append(frame)
        self.got(type(frame), frame.epoch).set()
        await self.push(frame, direction)


class SlowToStop(Stage):
    """Before the TTS, so it stops after it (stages stop from the output back), and slow to stop, as a reasoner
    waiting for a tool is: it lets the held handshakes go on, then waits until the TTS's worker has passed the
    reply's LLMRequest on — so whatever that worker did after the TTS stopped is done before the teardown."""

    def __init__(self, fake: HeldHandshakes, tail: Frames) -> None:
        super().__init__(name="slow-to-stop")
        self.fake, self.tail, self.epoch_to_pass = fake, tail, 0

    async def stop(self) -> None:
        self.fake.release.set()
        await asyncio.wait_for(self.tail.got(LLMRequest, self.epoch_to_pass).wait(), 10)


class HeldHandshakes(FakeCartesia):
    """Holds every WebSocket handshake after the first ``free`` until :attr:`release` is set (recorded ``held``):
    a handshake that the end of the call overtakes."""

    def __init__(self, free: int = 0, **options: Any) -> None:
        super().__init__(**options)
        self.free = free
        self.release = asyncio.Event()
        self._attempts = 0

    async def _websocket(self, request: Any) -> Any:
        self._attempts += 1
        if self._attempts > self.free:
            self.record("held")
            await self.release.wait()
        return await super()._websocket(request)


@pytest.mark.timeout(30)
async def test_a_hang_up_during_the_first_handshake_leaves_no_socket_open():
    # The call ends while the first reply waits for the socket start() is opening: stop() cancels that handshake,
    # and the reply's worker, still running until the teardown, must not open another one that nothing would close
    # (Cartesia would speak, and bill, a reply nobody hears).
    async with HeldHandshakes() as fake:
        tts = CartesiaTTS(CartesiaTTSSettings(voice=VOICE, websocket_url=fake.ws_url), api_key=fake.api_key)
        tail = Frames("tail")
        slow = SlowToStop(fake, tail)
        pipeline = Pipeline([Stage(name="head"), slow, tts, tail], clock=RealClock())
        running = asyncio.create_task(pipeline.run())
        await fake.wait_for("held")
        epoch = slow.epoch_to_pass = pipeline.next_epoch()
        await tts.receive(LLMRequest(epoch=epoch), DOWNSTREAM)
        await asyncio.sleep(0)  # the worker takes the reply (a frame still queued at the hang-up is never started)
        assert not tts.queued
        await tts.receive(SpeakableChunk(epoch=epoch, text="Hello, thanks for calling."), DOWNSTREAM)
        pipeline.cancel("hung up")
        assert await asyncio.wait_for(running, 15) == "hung up" and not pipeline.errors
    assert len(fake.of("held")) == 1, "no handshake began after the hang-up"
    assert tts._socket is None and not fake.of("context")


@pytest.mark.timeout(30)
async def test_a_socket_whose_handshake_ends_after_the_hang_up_is_closed_at_once():
    # The first socket drops; the next reply reconnects in the stage's worker, and the call ends during that
    # handshake. stop() cannot cancel it; the handshake completing after stop() must close what it opened.
    async with HeldHandshakes(free=1, faults=Faults(drop_after=5)) as fake:
        tts = CartesiaTTS(CartesiaTTSSettings(voice=VOICE, websocket_url=fake.ws_url), api_key=fake.api_key)
        tts.error_policy = ErrorPolicy.SKIP_FRAME  # the dropped reply fails; the call goes on
        head, tail = Frames("head"), Frames("tail")
        slow = SlowToStop(fake, tail)
        pipeline = Pipeline([head, slow, tts, tail], clock=RealClock())
        running = asyncio.create_task(pipeline.run())
        first = pipeline.next_epoch()
        await tts.receive(LLMRequest(epoch=first), DOWNSTREAM)
        await tts.receive(SpeakableChunk(epoch=first, text="Sure, four at eight tonight."), DOWNSTREAM)
        await asyncio.wait_for(head.got(ErrorFrame, first).wait(), 10)  # the drop failed the reply
        second = slow.epoch_to_pass = pipeline.next_epoch()
        await tts.receive(LLMRequest(epoch=second), DOWNSTREAM)
        await tts.receive(SpeakableChunk(epoch=second, text="Anything else?"), DOWNSTREAM)
        await fake.wait_for("held")  # the reconnect's handshake is under way
        pipeline.cancel("hung up")
        assert await asyncio.wait_for(running, 15) == "hung up"
        await fake.wait_for("disconnect", lambda s: s.data["connection"] == 1)  # closed by the client
    assert len(fake.of("held")) == 1
    assert not [s for s in fake.of("context") if s.data["connection"] == 1], "nothing was said on it"
    assert tts._socket is None and pipeline.usage.of_turn(second) == {}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("run_cancelled", [False, True])
async def test_a_socket_retired_by_a_stall_is_closed_even_when_the_server_stopped_reading(run_cancelled):
    # A stall retires the socket and closes it in a task; the call then ends on the error. The server reads
    # nothing, so websockets' close waits for close_timeout_s before it aborts the connection. stop() waits for
    # that close; and if the close is cut short anyway (run() itself cancelled while the stages stop, so the
    # teardown cancels the close), the connection is aborted, not left CLOSING with its transport open for good.
    Watched, stopping = watching_stop(CartesiaTTS)

    async with FakeCartesia(deaf=True) as fake:
        close_timeout_s = 10 if run_cancelled else 1  # cancelled: the close must still be under way when cut
        settings = CartesiaTTSSettings(
            voice=VOICE, websocket_url=fake.ws_url, first_audio_timeout_s=0.3, close_timeout_s=close_timeout_s
        )
        tts = Watched(settings, api_key=fake.api_key)
        pipeline = Pipeline([Stage(name="head"), tts, Stage(name="tail")], clock=RealClock())
        running = asyncio.create_task(pipeline.run())
        epoch = pipeline.next_epoch()
        await tts.receive(LLMRequest(epoch=epoch), DOWNSTREAM)
        await tts.receive(SpeakableChunk(epoch=epoch, text="Hello there."), DOWNSTREAM)
        await fake.wait_for("deaf")
        assert tts._socket is not None
        websocket = tts._socket.sdk._connection
        if run_cancelled:
            await cancel_while_stopping(running, stopping, websocket)
        else:
            with pytest.raises(ProviderError, match=r"no audio within 0\.3 s"):
                await asyncio.wait_for(running, 15)
            assert websocket.state.name == "CLOSED", "closed by the time the call has ended"
    assert websocket.transport.is_closing()


@pytest.mark.timeout(30)
async def test_a_reply_whose_end_cannot_be_sent_still_ends_at_the_output():
    # The socket drops before the reply's end is sent: the send fails (a stage failure, skipped here), but the
    # output must still get the reply's ResponseEnd and TTSDone, or it never marks the reply done.
    async with FakeCartesia(faults=Faults(drop_after=5)) as fake:
        tts = CartesiaTTS(CartesiaTTSSettings(voice=VOICE, websocket_url=fake.ws_url), api_key=fake.api_key)
        tts.error_policy = ErrorPolicy.SKIP_FRAME
        tail = Frames("tail")
        pipeline = Pipeline([Stage(name="head"), tts, tail], clock=RealClock())
        running = asyncio.create_task(pipeline.run())
        epoch = pipeline.next_epoch()
        await tts.receive(LLMRequest(epoch=epoch), DOWNSTREAM)
        await tts.receive(SpeakableChunk(epoch=epoch, text="Sure, four at eight tonight."), DOWNSTREAM)
        await fake.wait_for("dropped")
        await tts.receive(ResponseEnd(epoch=epoch), DOWNSTREAM)
        await pipeline.end()  # End drains behind the reply's frames
        assert await asyncio.wait_for(running, 10) == "ended"
    assert pipeline.errors and "Cartesia: the connection was" in pipeline.errors[0].error
    ends = [type(f).__name__ for f in tail.seen if isinstance(f, ResponseEnd | TTSDone) and f.epoch == epoch]
    assert ends == ["ResponseEnd", "TTSDone"]
    assert tts._open_epoch is None


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.timeout(30)
async def test_a_missing_api_key_is_a_config_error_before_anything_connects(tmp_path, monkeypatch):
    monkeypatch.delenv("CARTESIA_API_KEY", raising=False)
    async with FakeCartesia() as fake:
        parsed, settings = config(fake, api_key=None)
        with pytest.raises(ConfigError) as raised:
            await asyncio.to_thread(run_configured_call, parsed, settings, [Say("Hi.")], tmp_path, clock=RealClock())
    assert "tts.api_key" in str(raised.value) and "CARTESIA_API_KEY" in str(raised.value)
    assert fake.seen == []


def test_the_api_key_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("CARTESIA_API_KEY", "from-env")
    stage = CartesiaTTS.from_settings(CartesiaTTSSettings(voice=VOICE), BuildContext(AudioFormat(RATE)), "tts")
    assert stage._api_key == "from-env"


def test_an_unsupported_sample_rate_is_a_config_error():
    with pytest.raises(ConfigError) as raised:
        CartesiaTTS.from_settings(
            CartesiaTTSSettings(voice=VOICE, api_key="k"), BuildContext(AudioFormat(11025)), "tts"
        )
    message = str(raised.value)
    assert "audio.sample_rate" in message and "cannot produce 11025 Hz" in message
    assert "8000, 16000, 22050, 24000, 44100, 48000" in message


def test_the_voice_is_required():
    with pytest.raises(ConfigError, match=r"tts\.voice: field required"):
        parse_config({"tts": {"provider": "cartesia", "api_key": "k"}, "vad": {"provider": "scripted"}})


def test_the_timeouts_must_outlast_cartesias_text_buffer():
    tts = {"provider": "cartesia", "api_key": "k", "voice": VOICE, "max_buffer_delay_ms": 3000}
    with pytest.raises(ConfigError, match=r"tts: max_buffer_delay_ms \(3000\) must be under first_audio_timeout_s"):
        parse_config({"tts": {**tts, "read_timeout_s": 2.5}, "vad": {"provider": "scripted"}})
    _, settings = parse_config({"tts": tts, "vad": {"provider": "scripted"}})  # the 5 s defaults outlast it
    assert settings["tts"].max_buffer_delay_ms == 3000


def test_the_module_imports_without_the_sdk_and_names_the_extra():
    program = (
        "import sys; sys.modules['cartesia'] = None\n"
        "from voxpipe.stages.cartesia_tts import CartesiaTTS, CartesiaTTSSettings\n"
        "try:\n"
        "    CartesiaTTS(CartesiaTTSSettings(voice='v'), api_key='k')\n"
        "except Exception as exc:\n"
        '    print(f"{type(exc).__name__}: {exc}")\n'
    )
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=20, check=True)
    assert out.stdout.startswith("ProviderError: Cartesia:") and "pip install 'voxpipe[cartesia]'" in out.stdout


# ------------------------------------------------------------------------------------- the fake itself


@pytest.mark.timeout(15)
async def test_the_fake_answers_a_bad_request_with_cartesias_error_event():
    from cartesia import AsyncCartesia

    async with FakeCartesia() as fake:
        client = AsyncCartesia(api_key=fake.api_key, base_url=fake.url, websocket_base_url=fake.ws_url)
        async with client.tts.websocket_connect() as connection:
            fmt = {"container": "raw", "encoding": "pcm_s16le", "sample_rate": 11025}
            context = connection.context(model_id="sonic-3", voice=VOICE, output_format=fmt)
            await context.push("Hello there.")
            async with asyncio.timeout(5):
                events = [event async for event in context.receive()]
        await client.close()
    assert [e.type for e in events] == ["error"]
    assert events[0].status_code == 400 and "unsupported sample_rate 11025" in events[0].message


@pytest.mark.timeout(15)
async def test_the_fake_speaks_f32_when_asked_and_stamps_words_in_seconds():
    from cartesia import AsyncCartesia

    async with FakeCartesia(rtf=0.05) as fake:
        client = AsyncCartesia(api_key=fake.api_key, base_url=fake.url, websocket_base_url=fake.ws_url)
        async with client.tts.websocket_connect() as connection:
            fmt = {"container": "raw", "encoding": "pcm_f32le", "sample_rate": 24000}
            context = connection.context(model_id="sonic-3", voice=VOICE, output_format=fmt, add_timestamps=True)
            await context.push("Hello there, ")
            await context.push("friend.")
            await context.no_more_inputs()
            async with asyncio.timeout(5):
                events = [event async for event in context.receive()]
        await client.close()
    audio = b"".join(e.audio for e in events if e.type == "chunk")
    assert looks_like_float32(audio) and np.abs(np.frombuffer(audio, dtype="<f4")).max() <= 1.0
    words = [w for e in events if e.type == "timestamps" for w in e.word_timestamps.words]
    assert words == ["Hello", "there,", "friend."]
    ends = [t for e in events if e.type == "timestamps" for t in e.word_timestamps.end]
    assert ends[-1] == pytest.approx(len(audio) / 4 / 24000, abs=1e-3)
    assert events[-1].type == "done"


@pytest.mark.timeout(15)
async def test_the_fake_speaks_quiet_words_whose_timestamps_come_before_any_audible_audio():
    from cartesia import AsyncCartesia

    async with FakeCartesia(rtf=0.05, quiet_words=1) as fake:
        client = AsyncCartesia(api_key=fake.api_key, base_url=fake.url, websocket_base_url=fake.ws_url)
        async with client.tts.websocket_connect() as connection:
            fmt = {"container": "raw", "encoding": "pcm_s16le", "sample_rate": RATE}
            context = connection.context(model_id="sonic-3", voice=VOICE, output_format=fmt, add_timestamps=True)
            await context.push("Hmm, let me see.")
            await context.no_more_inputs()
            async with asyncio.timeout(5):
                events = [event async for event in context.receive()]
        await client.close()
    stamped = next(i for i, e in enumerate(events) if e.type == "timestamps")
    assert events[stamped].word_timestamps.words == ["Hmm,"]
    before = np.frombuffer(b"".join(e.audio for e in events[:stamped] if e.type == "chunk"), dtype="<i2")
    assert before.size and np.abs(before).max() < LEADING_SILENCE_LEVEL * 32767, "trimmed as leading silence"
    after = np.frombuffer(b"".join(e.audio for e in events[stamped:] if e.type == "chunk"), dtype="<i2")
    assert np.abs(after).max() > 3000, "the other words are spoken aloud"


# ----------------------------------------------------------------------------------- the pieces, offline


def test_marks_wait_for_the_audio_holding_their_end():
    marks = PendingMarks()
    marks.add([WordMark("Hello", 100, 900), WordMark("there", 1000, 1800)])
    assert marks.take(640) == ()  # timestamps ahead of the audio
    assert marks.take(960) == (WordMark("Hello", 100, 900),)
    assert marks.take(1280) == ()
    assert marks.take(1920) == (WordMark("there", 1000, 1800),)
    marks.add([WordMark("late", 1300, 1500)])  # timestamps behind the audio: ready at once
    assert marks.take(1920) == (WordMark("late", 1300, 1500),)
    marks.add([WordMark("trailing", 2000, 2404)])  # rounded 4 samples past the last one
    assert marks.drain(2400) == (WordMark("trailing", 2000, 2400),) and len(marks) == 0


def test_audio_is_due_only_while_cartesia_owes_some():
    from voxpipe.stages.cartesia_tts import _Reply

    reply = _Reply(epoch=1, socket=None, context=None)  # type: ignore[arg-type]
    assert reply.deadline(5, 2) is None, "nothing pushed yet: the reasoner may take its time"
    reply.first_input_at = 10.0
    reply.input_sent(10.0)
    assert reply.deadline(5, 2) == 15.0, "first audio"
    reply.audio, reply.last_event_at, reply.unanswered_since = True, 11.0, None  # an event came
    assert reply.deadline(5, 2) is None, "all pushed text answered: waiting for the reasoner, not Cartesia"
    reply.input_sent(12.0)
    assert reply.deadline(5, 2) == 14.0, "new text since the last event"
    reply.input_sent(13.5)
    assert reply.deadline(5, 2) == 14.0, "more text while Cartesia is silent does not move the deadline"
    reply.last_event_at, reply.unanswered_since, reply.inputs_closed = 13.0, None, True
    assert reply.deadline(5, 2) == 15.0, "the end of the text was sent: done is due"


def test_audio_checks():
    samples, _ = speechlike("hello there friend", RATE)
    s16 = samples.tobytes()
    f32 = (samples.astype(np.float32) / 32768).astype("<f4").tobytes()
    assert decode_audio(base64.b64encode(s16).decode()) == s16
    assert not looks_like_float32(s16) and looks_like_float32(f32)
    assert not looks_like_float32(bytes(4096)), "silence is silence in either encoding"
    with pytest.raises(ProviderError, match="not valid base64"):
        decode_audio("%%%")
    with pytest.raises(ProviderError, match="carries no audio"):
        decode_audio(None)
