"""`voxpipe call --fake-providers`: the cloud example configs run end to end — official SDKs, loopback fakes, tools,
usage and cost — with no keys and no network."""

import asyncio
import base64
import gc
import json
import logging
import os
import socket
import struct
import textwrap
import time

import httpx
import pytest
from aiohttp import web

from voxpipe.cli import main
from voxpipe.testing.fakes.anthropic import FakeAnthropic
from voxpipe.testing.fakes.cartesia import FakeCartesia
from voxpipe.testing.fakes.deepgram import FakeDeepgram
from voxpipe.testing.fakes.elevenlabs import FakeElevenLabs
from voxpipe.testing.fakes.server import FakeServer, Faults, serving

SCENARIO = """
caller:
  voice: tones
steps:
  - say: Hi, I'd like to book a table for two tonight.
    pause: 0.4
  - say: Around seven thirty please.
    pause: 0.4
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("config", ["cloud.yaml", "cloud-elevenlabs.yaml"])
def test_the_cloud_configs_run_against_the_fakes(tmp_path, monkeypatch, capsys, config):
    for variable in ("DEEPGRAM_API_KEY", "ANTHROPIC_API_KEY", "CARTESIA_API_KEY", "ELEVENLABS_API_KEY"):
        monkeypatch.delenv(variable, raising=False)  # the fakes' key is given to every faked stage
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text(textwrap.dedent(SCENARIO))
    out = tmp_path / "out"
    code = main(
        [
            "call",
            "--config",
            f"examples/configs/{config}",
            "--fake-providers",
            "--scenario",
            str(scenario),
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().out
    transcript = json.loads((out / "transcript.json").read_text())
    assert transcript["status"] == "ended" and transcript["errors"] == []
    caller = [t["text"] for t in transcript["turns"] if t["speaker"] == "caller"]
    assert caller == ["Hi, I'd like to book a table for two tonight.", "Around seven thirty please."]
    bot = [t for t in transcript["turns"] if t["speaker"] == "bot"]
    assert len(bot) == 2 and all(t["heard"] == t["text"] for t in bot), "every reply was heard in full"
    # The second reply went through the tool loop: Claude's fake asked for check_availability.
    [audit] = [json.loads(line) for line in (out / "tools.jsonl").read_text().splitlines()]
    assert audit["tool"] == "check_availability" and audit["outcome"] == "ok"
    assert [m["role"] for m in transcript["conversation"]].count("tool") == 1
    usage = transcript["usage"]
    assert usage["llm"]["input_tokens"] > 0 and usage["llm"]["output_tokens"] > 0
    assert usage["stt"]["audio_seconds"] > 3 and usage["tts"]["characters"] > 40
    assert transcript["cost_usd"]["total"] == pytest.approx(
        sum(v for k, v in transcript["cost_usd"].items() if k != "total")
    )
    assert transcript["cost_usd"]["llm"] > 0
    # The turns' usage (in the trace) adds up to the call's, less what no turn took (the audio after the last line).
    records = [json.loads(line) for line in (out / "trace.jsonl").read_text().splitlines()]
    for stage, counts in usage.items():
        for counter, total in counts.items():
            turns = sum(r["data"].get("usage", {}).get(stage, {}).get(counter, 0) for r in records)
            rest = transcript["usage_unassigned"].get(stage, {}).get(counter, 0)
            assert turns + rest == pytest.approx(total), (stage, counter)
    assert transcript["usage_unassigned"]["stt"]["audio_seconds"] > 0
    report = (out / "report.html").read_text()
    assert "<h2>Usage and cost</h2>" in report and f"{transcript['cost_usd']['total']:.6f}" in report
    printed = capsys.readouterr().out
    assert "usage and cost" in printed and "faked on 127.0.0.1: stt, llm, tts" in printed
    assert "stt (deepgram nova-3)" in printed and "llm (anthropic claude-opus-4-7)" in printed, "who billed what"


def test_without_keys_the_call_names_every_missing_one_before_anything_connects(tmp_path, monkeypatch, capsys):
    for variable in ("DEEPGRAM_API_KEY", "CARTESIA_API_KEY"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "  \n")  # blank: no key either
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text(textwrap.dedent(SCENARIO))
    out = tmp_path / "out"
    args = ["call", "--config", "examples/configs/cloud.yaml", "--scenario", str(scenario), "--out", str(out)]
    code = main(args)
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert code != 0
    for path, variable in (("stt", "DEEPGRAM"), ("llm", "ANTHROPIC"), ("tts", "CARTESIA")):
        assert f"{path}.api_key" in text and f"{variable}_API_KEY" in text, text
    assert not (out / "transcript.json").exists(), "no call was started"


@pytest.mark.timeout(10)
async def test_a_fakes_records_wake_every_waiter_at_once():
    fake = FakeAnthropic()  # not started: records alone
    first = asyncio.ensure_future(fake.wait_for("request", within_s=5))
    second = asyncio.ensure_future(fake.wait_for("disconnect", within_s=5))
    await asyncio.sleep(0.01)  # both are waiting
    fake.record("request")
    fake.record("disconnect")
    seen = await asyncio.wait_for(asyncio.gather(first, second), 1)
    assert [s.kind for s in seen] == ["request", "disconnect"]


async def _leave_during_handshake(port: int, path: str, headers: dict[str, str]) -> None:
    """Send a websocket upgrade request and reset the connection at once: a client cancelled while connecting."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    writer.transport.abort()  # an RST, as from a connect task cancelled by a barge-in


@pytest.mark.timeout(20)
@pytest.mark.parametrize("provider", ["deepgram", "cartesia", "elevenlabs"])
async def test_a_client_leaving_during_the_websocket_handshake_is_recorded_as_gone(provider, caplog):
    fake, path, headers = {
        "deepgram": (
            FakeDeepgram(utterances=["hello"]),
            "/v1/listen?model=nova-3",
            {"Authorization": "Token test-key"},
        ),
        "cartesia": (
            FakeCartesia(),
            "/tts/websocket",
            {"Authorization": "Bearer test-key", "cartesia-version": "2025-04-16"},
        ),
        "elevenlabs": (
            FakeElevenLabs(),
            "/v1/text-to-speech/voice/stream-input?output_format=pcm_16000",
            {"xi-api-key": "test-key"},
        ),
    }[provider]
    caplog.set_level(logging.ERROR)
    async with fake:
        for left in range(1, 4):
            await _leave_during_handshake(fake.port, path, headers)
            await fake.wait_for("gone", lambda _, left=left: len(fake.of("gone")) == left)
    assert [seen.data for seen in fake.of("gone")] == [{"during": "handshake"}] * 3
    assert not [r for r in caplog.records if r.name.startswith("aiohttp")], "the server logged an error"


_MESSAGES_BODY = {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hello"}]}


def _anthropic_headers(fake: FakeAnthropic) -> dict[str, str]:
    return {"Authorization": f"Bearer {fake.api_key}", "anthropic-version": "2023-06-01"}


@pytest.mark.timeout(30)
async def test_a_client_leaving_during_an_anthropic_stall_is_recorded_as_disconnect_at_once():
    async with FakeAnthropic(["Hi."], faults=Faults(stall_s=20)) as fake:
        async with httpx.AsyncClient() as client:
            with pytest.raises(httpx.TimeoutException):  # gives up 0.5 s into the stall: a barge-in
                await client.post(
                    fake.url + "/v1/messages", json=_MESSAGES_BODY, headers=_anthropic_headers(fake), timeout=0.5
                )
        left = time.monotonic()
        seen = await fake.wait_for("disconnect", within_s=3)  # the stall has 19.5 s to go
        assert seen.at - left < 1.0
        assert seen.data == {"events": 0, "text": ""}
        assert fake.kinds() == ["request", "connect", "stall", "disconnect"]


class _Hanging(FakeServer):
    """A server whose handler waits, ignoring its client: one aiohttp stops tracking once the client has left."""

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/hang", self._hang)

    def authorized(self, request: web.Request) -> bool:
        return True

    async def _hang(self, request: web.Request) -> web.Response:
        self.record("hang")
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.record("cancelled")
            raise
        return web.Response()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("server", ["anthropic-stall", "handler-ignoring-its-client"])
def test_leaving_serving_with_a_stalled_request_leaves_no_task_pending(server, caplog):
    caplog.set_level(logging.ERROR)
    if server == "anthropic-stall":
        fake: FakeServer = FakeAnthropic(["Hi."], faults=Faults(stall_s=20))
        path, kwargs = "/v1/messages", {"json": _MESSAGES_BODY, "headers": _anthropic_headers(fake)}
    else:
        fake = _Hanging()
        path, kwargs = "/hang", {}
    with serving(fake):
        with pytest.raises(httpx.TimeoutException):  # the client gives up; its request is still being handled
            httpx.request("POST" if kwargs else "GET", fake.url + path, timeout=0.5, **kwargs)
        time.sleep(0.2)
    gc.collect()  # a task destroyed pending says so when it is collected
    destroyed = [r.getMessage() for r in caplog.records if "destroyed but it is pending" in r.getMessage()]
    assert not destroyed, destroyed
    assert not [r for r in caplog.records if r.name.startswith("aiohttp")], "the server logged an error"
    if server != "anthropic-stall":
        assert "cancelled" in fake.kinds(), "the pending handler was cancelled, not dropped with the loop"


def test_claudes_fake_answers_the_booking_scenarios_lines_and_calls_the_configs_tools():
    import yaml

    from voxpipe.testing.fakes.anthropic import ToolUseReply
    from voxpipe.testing.fakes.launch import booking_replies

    with open("examples/scenarios/booking.yaml", encoding="utf-8") as file:
        lines = [step["say"] for step in yaml.safe_load(file)["steps"]]
    reply = booking_replies(["check_availability", "book_table"])
    messages: list[dict] = []
    said: list[str] = []
    for line in lines:
        messages.append({"role": "user", "content": line})
        answer = reply({"messages": messages})
        if isinstance(answer, ToolUseReply):  # the stage runs the tool and asks again with its result
            said.append(f"{answer.name}({answer.input})")
            call = {"type": "tool_use", "id": "toolu_1", "name": answer.name, "input": answer.input}
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer.text}, call]})
            messages.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1"}]})
            answer = reply({"messages": messages})
        messages.append({"role": "assistant", "content": answer})
        said.append(answer)
    assert said == [
        "Of course. What time would you like to come in tonight?",
        "check_availability({'time': '7:30 pm', 'people': 2})",
        "Good news, we have a table then. Shall I put it under your name?",
        "book_table({'name': 'Rossi', 'people': 2, 'time': '7:30 pm'})",
        "Thank you, you're booked for two tonight. Anything else I can do for you?",
        "You're welcome. See you tonight, goodbye!",
    ]


@pytest.mark.parametrize("key", [None, "", "  \n"])
def test_a_stage_composed_in_code_with_no_key_names_it_before_anything_connects(monkeypatch, key):
    """``DeepgramSTT(api_key=os.environ.get("DEEPGRAM_API_KEY"))`` with the variable unset or blank."""
    from voxpipe.config import ConfigError
    from voxpipe.stages.anthropic_llm import AnthropicLLM, AnthropicSettings
    from voxpipe.stages.cartesia_tts import CartesiaTTS, CartesiaTTSSettings
    from voxpipe.stages.deepgram_stt import DeepgramSTT, DeepgramSTTSettings
    from voxpipe.stages.elevenlabs_tts import ElevenLabsTTS, ElevenLabsTTSSettings

    for variable in ("DEEPGRAM_API_KEY", "ANTHROPIC_API_KEY", "CARTESIA_API_KEY", "ELEVENLABS_API_KEY"):
        monkeypatch.delenv(variable, raising=False)
    stages = [
        (lambda: DeepgramSTT(DeepgramSTTSettings(), api_key=key), "stt.api_key: no API key for Deepgram"),
        (lambda: AnthropicLLM(AnthropicSettings(), api_key=key), "llm.api_key: no API key for Anthropic"),
        (lambda: CartesiaTTS(CartesiaTTSSettings(voice="v"), api_key=key), "tts.api_key: no API key for Cartesia"),
        (lambda: ElevenLabsTTS(ElevenLabsTTSSettings(), api_key=key), "tts.api_key: no API key for ElevenLabs"),
    ]
    for make, problem in stages:
        with pytest.raises(ConfigError) as caught:
            make()
        assert problem in str(caught.value)
    monkeypatch.setenv("DEEPGRAM_API_KEY", "from-the-environment")
    assert DeepgramSTT(DeepgramSTTSettings(), api_key=key)._api_key == "from-the-environment"
