"""The trace's SDK-boundary marks: each cloud provider module marks where it hands a turn's request to its SDK
(``<kind>.sdk_call``) and where the SDK hands back the answer (``<kind>.sdk_answer``). Checked against what the
fakes saw (``FakeServer.waits()``): each provider's wait lies between its two marks (Deepgram's call starting with
the utterance's last frame), and the marks sit between the stage marks around them, so a turn's time splits exactly
into voxpipe's own and the SDKs' (which ``benchmarks/cloud_overhead.py`` reports)."""

from __future__ import annotations

from typing import Any

import pytest

from voxpipe.call import run_configured_call
from voxpipe.config import parse_config
from voxpipe.pipeline import RealClock
from voxpipe.testing.caller import Say
from voxpipe.testing.fakes.anthropic import FakeAnthropic
from voxpipe.testing.fakes.cartesia import FakeCartesia
from voxpipe.testing.fakes.deepgram import FakeDeepgram
from voxpipe.testing.fakes.elevenlabs import FakeElevenLabs
from voxpipe.testing.fakes.server import FakeServer, Wait, serving

LINES = ["Is the restaurant open tonight?", "Could I book a table for two?"]
STT_S, LLM_S, TTS_S = 0.06, 0.15, 0.1


def tts_settings(tts: FakeServer) -> dict[str, Any]:
    if isinstance(tts, FakeCartesia):
        return {"provider": "cartesia", "base_url": tts.url, "websocket_url": tts.ws_url, "voice": "test-voice"}
    return {"provider": "elevenlabs", "base_url": tts.ws_url}


def the_wait(waits: list[Wait], after: float) -> Wait:
    """The wait started by the request sent at ``after`` (loop time)."""
    return next(w for w in waits if w.arrived >= after)


def watch_deepgram_sends(monkeypatch: pytest.MonkeyPatch, clock: RealClock) -> dict[str, list[float]]:
    """When the Deepgram SDK's socket is handed each audio frame and each Finalize (the clock's time); the SDK's
    methods still run."""
    from deepgram.listen.v1.socket_client import AsyncV1SocketClient

    handed: dict[str, list[float]] = {"media": [], "finalize": []}
    for what in handed:
        method = getattr(AsyncV1SocketClient, f"send_{what}")

        async def watched(self: Any, *args: Any, _method: Any = method, _times: list[float] = handed[what]) -> None:
            _times.append(clock.now())
            await _method(self, *args)

        monkeypatch.setattr(AsyncV1SocketClient, f"send_{what}", watched)
    return handed


@pytest.mark.timeout(60)
@pytest.mark.parametrize("voice", [FakeCartesia, FakeElevenLabs])
def test_each_providers_wait_lies_between_its_sdk_marks(tmp_path, monkeypatch, voice):
    stt = FakeDeepgram(utterances=LINES, latency_s=STT_S)
    llm = FakeAnthropic(["Yes, we are open until ten.", "Of course, at what time?"], ttft_s=LLM_S)
    tts = voice(ttfa_s=TTS_S)
    clock = RealClock()
    handed = watch_deepgram_sends(monkeypatch, clock)
    with serving(stt, llm, tts):
        config, settings = parse_config(
            {
                "vad": {"provider": "scripted", "stop_ms": 300},
                "stt": {"provider": "deepgram", "base_url": stt.ws_url, "api_key": stt.api_key, "endpointing": None},
                "llm": {"provider": "anthropic", "base_url": llm.url, "api_key": llm.api_key},
                "tts": {**tts_settings(tts), "api_key": tts.api_key},
            }
        )
        result = run_configured_call(config, settings, [Say(line, pause=0.3) for line in LINES], tmp_path, clock=clock)
    assert result.outcome == "ended"
    turns = [t for t in result.turns if t.voice_to_voice_ms is not None]
    assert len(turns) == 2
    assert clock.origin is not None
    for turn in turns:
        at = {name: clock.origin + value for name, value in turn.marks.items()}  # the fakes' clock
        order = [
            "turn.end_detected",
            "stt.sdk_call",
            "stt.sdk_answer",
            "stt.final",
            "llm.request",
            "llm.sdk_call",
            "llm.sdk_answer",
            "llm.first_token",
            "llm.first_chunk",
            "tts.sdk_call",
            "tts.sdk_answer",
            "tts.first_audio",
        ]
        times = [at[name] for name in order]
        assert times == sorted(times), f"marks out of causal order: {dict(zip(order, times, strict=True))}"
        for kind, fake, latency in (("stt", stt, STT_S), ("llm", llm, LLM_S), ("tts", tts, TTS_S)):
            wait = the_wait(fake.waits(), at[f"{kind}.sdk_call"])
            # The SDK sent the request after the call mark, and the answer was written before the answer mark.
            assert at[f"{kind}.sdk_call"] <= wait.arrived
            assert wait.arrived + latency <= wait.answered <= at[f"{kind}.sdk_answer"], kind
        # Deepgram's call is the utterance's end: its last frame (the one that completed the silence), then Finalize.
        finalize = next(t for t in handed["finalize"] if t >= turn.marks["stt.sdk_call"])
        last_frame = max(t for t in handed["media"] if t < finalize)
        assert turn.marks["stt.sdk_call"] <= last_frame
        # Deepgram's SpeechStarted (next to the local VAD, for the trace) lands on the turn whose utterance it starts.
        assert turn.marks["stt.speech_started"] == pytest.approx(turn.marks["user.speech_start"], abs=0.05)
