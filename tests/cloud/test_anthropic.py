"""AnthropicLLM: the official anthropic SDK (2.x) against FakeAnthropic, a loopback server speaking the Messages API's
server-sent events — through whole scripted calls (RealClock) and through the stage in a small pipeline."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import wave
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from voxpipe.call import CallResult, run_configured_call, run_pipeline_call
from voxpipe.config import BuildContext, build_pipeline, parse_config
from voxpipe.config.errors import ConfigError
from voxpipe.config.prices import LIST_PRICES
from voxpipe.pipeline import (
    DOWNSTREAM,
    AudioFormat,
    Direction,
    EndOfTurn,
    ErrorPolicy,
    Frame,
    JsonlTraceWriter,
    Message,
    Pipeline,
    RealClock,
    Stage,
    TextDelta,
    ToolCall,
    ToolUse,
    Tracer,
)
from voxpipe.pipeline.turns import DEFAULT_RESUME_PROMPT
from voxpipe.stages.anthropic_llm import (
    AnthropicLLM,
    AnthropicSettings,
    _Progress,
    _RefusedExchanges,
    render_messages,
)
from voxpipe.stages.cloud import ProviderError
from voxpipe.stages.tools import Tool
from voxpipe.testing import Noise, Say, ScriptedCaller
from voxpipe.testing.fakes.anthropic import FakeAnthropic, TextReply, ToolUseReply
from voxpipe.testing.fakes.server import Faults
from voxpipe.transports.playout import PlayoutOutput
from voxpipe.transports.recorder import StereoRecorder
from voxpipe.transports.simulated import SimulatedInput

SYSTEM = "You answer the phone at Luigi's. Keep answers short."
WEATHER_CALLS: list[dict[str, Any]] = []


async def get_weather(city: str) -> dict[str, Any]:
    """The weather now.

    Args:
        city: the city, e.g. "Paris"
    """
    WEATHER_CALLS.append({"city": city})
    return {"city": city, "celsius": 18, "sky": "sunny"}


# ------------------------------------------------------------------------------------------- harness


class Served:
    """A fake served from its own event loop in a thread: ``run_configured_call`` runs the call's loop."""

    def __init__(self, fake: FakeAnthropic) -> None:
        self.fake = fake
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fake-anthropic", daemon=True)

    def __enter__(self) -> Served:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.fake.start(), self.loop).result(5)
        return self

    def __exit__(self, *exc_info: object) -> None:
        asyncio.run_coroutine_threadsafe(self.fake.stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def wait_for(self, kind: str, predicate: Any = None, within_s: float = 5.0) -> Any:
        waiting = self.fake.wait_for(kind, predicate, within_s=within_s)
        return asyncio.run_coroutine_threadsafe(waiting, self.loop).result(within_s + 1)

    def bodies(self) -> list[dict[str, Any]]:
        return [seen.data["body"] for seen in self.fake.of("request")]


@pytest.fixture
def serve() -> Iterator[Any]:
    served: list[Served] = []

    def start(fake: FakeAnthropic) -> Served:
        served.append(Served(fake).__enter__())
        return served[-1]

    yield start
    for item in served:
        item.__exit__()


def call(
    fake: FakeAnthropic,
    script: list[Any],
    out_dir: Any,
    *,
    on_error: str | None = None,
    tools: dict[str, Any] | None = None,
    reply_timeout: float | None = None,
    turn: dict[str, Any] | None = None,
    **llm: Any,
) -> CallResult:
    """A scripted call (RealClock) with the reasoner at ``fake``: ``run_configured_call``, or — with
    ``reply_timeout`` — the same pipeline with a caller who speaks again that soon after a reply that never came
    (``run_configured_call``'s caller waits 10 s)."""
    settings = {
        "provider": "anthropic",
        "base_url": fake.url,
        "api_key": fake.api_key,
        "first_token_timeout_s": 2,
        "read_timeout_s": 2,
        **llm,
    }
    if on_error is not None:
        settings["on_error"] = on_error
    config, validated = parse_config(
        {
            "system_prompt": SYSTEM,
            "vad": {"provider": "scripted"},
            "stt": {"provider": "scripted"},
            "llm": settings,
            "tts": {"provider": "scripted"},
            **({"turn": turn} if turn is not None else {}),
        }
    )
    if reply_timeout is None:
        return run_configured_call(config, validated, script, out_dir, clock=RealClock(), tools=tools)
    audio = AudioFormat(config.audio.sample_rate)
    caller = ScriptedCaller(script, audio.sample_rate, reply_timeout=reply_timeout)
    recorder, tracer = StereoRecorder(audio.sample_rate), Tracer()
    pipeline, conversation = build_pipeline(
        config,
        validated,
        input_stage=SimulatedInput(caller, audio, recorder=recorder),
        output_stage=PlayoutOutput(audio, recorder),
        context=BuildContext(audio=audio, caller=caller, tools=tools or {}),
        clock=RealClock(),
        tracer=tracer,
    )
    return run_pipeline_call(pipeline, conversation, tracer, recorder, out_dir)


def llm_usage(result: CallResult) -> tuple[float, float]:
    usage = [t.data.get("usage", {}).get("llm", {}) for t in result.turns]
    return sum(u.get("input_tokens", 0) for u in usage), sum(u.get("output_tokens", 0) for u in usage)


def sent_usage(fake: FakeAnthropic) -> tuple[int, int]:
    replies = fake.of("reply")
    return sum(r.data["input_tokens"] for r in replies), sum(r.data["output_tokens"] for r in replies)


class Collect(Stage):
    """A sink that keeps every downstream frame."""

    def __init__(self) -> None:
        super().__init__(name="collect")
        self.frames: list[Frame] = []
        self.first_text = asyncio.Event()

    async def process(self, frame: Frame, direction: Direction) -> None:
        if direction is DOWNSTREAM:
            self.frames.append(frame)
            if isinstance(frame, TextDelta):
                self.first_text.set()
        await self.push(frame, direction)


class Turn:
    """The stage alone in a small pipeline (RealClock): one EndOfTurn in, the frames it emits collected."""

    def __init__(self, llm: AnthropicLLM) -> None:
        self.llm = llm
        self.sink = Collect()
        self.pipeline = Pipeline([llm, self.sink], clock=RealClock())

    async def run(self, text: str = "Hello?") -> str:
        """Send one caller turn and drain; returns the pipeline's outcome (raises under STOP)."""
        running = await self.start(text)
        await self.pipeline.end()
        return await running

    async def start(self, text: str) -> asyncio.Task[str]:
        """Start the pipeline and send one caller turn (epoch 1, as the turn-taker would open it)."""
        running = asyncio.create_task(self.pipeline.run())
        await asyncio.sleep(0)
        epoch = self.pipeline.next_epoch()
        turn = EndOfTurn(epoch=epoch, text=text, at=0.0, system=SYSTEM, context=(Message("user", text),))
        await self.llm.receive(turn, DOWNSTREAM)
        return running

    def record(self) -> dict[str, Any]:
        return next(t.data for t in self.pipeline.trace.turns if t.turn == 1)

    def text(self) -> str:
        return "".join(f.text for f in self.sink.frames if isinstance(f, TextDelta))


def stage(fake: FakeAnthropic, *, policy: ErrorPolicy = ErrorPolicy.STOP, **settings: Any) -> AnthropicLLM:
    tools = settings.pop("tools", None)
    defaults: dict[str, Any] = {"base_url": fake.url, "first_token_timeout_s": 2.0, "read_timeout_s": 2.0}
    llm = AnthropicLLM(AnthropicSettings(**{**defaults, **settings}), api_key=fake.api_key, tools=tools)
    llm.error_policy = policy
    return llm


# ----------------------------------------------------------------------------------- whole calls


@pytest.fixture(scope="module")
def two_turns(tmp_path_factory: pytest.TempPathFactory) -> tuple[CallResult, Served]:
    fake = FakeAnthropic(["Luigi's, hello!", "Bye now."], input_tokens=40)
    with Served(fake) as served:
        script = [Say("Hello, who is this?", pause=0.3), Say("Thanks, bye.", pause=0.3)]
        result = call(fake, script, tmp_path_factory.mktemp("call"), tools={"get_weather": get_weather})
    return result, served


@pytest.mark.timeout(30)
def test_a_reply_is_spoken_and_the_request_carries_prompt_text_model_and_tools(two_turns):
    result, served = two_turns
    first = served.bodies()[0]
    assert first["model"] == "claude-opus-4-7" and first["max_tokens"] == 300 and first["stream"] is True
    assert first["system"] == SYSTEM
    assert first["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Hello, who is this?"}]}]
    assert [tool["name"] for tool in first["tools"]] == ["get_weather"]
    assert first["tools"][0]["input_schema"]["properties"]["city"]["type"] == "string"
    headers = served.fake.of("request")[0].data["headers"]
    assert headers["Authorization"] == "Bearer test-key" and headers["anthropic-version"]
    assert result.outcome == "ended"
    assert result.turns[0].heard == ["Luigi's,", "hello!"]


@pytest.mark.timeout(30)
def test_the_second_turn_carries_the_heard_reply_as_history(two_turns):
    result, served = two_turns
    second = served.bodies()[1]["messages"]
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[1]["content"] == [{"type": "text", "text": "Luigi's, hello!"}]
    assert second[2]["content"] == [{"type": "text", "text": "Thanks, bye."}]
    assert result.turns[1].heard == ["Bye", "now."]


@pytest.mark.timeout(30)
def test_the_connection_is_opened_at_the_start_and_kept_across_turns(two_turns):
    _, served = two_turns
    kinds = [s.kind for s in served.fake.seen if s.kind in ("models", "request")]
    assert kinds == ["models", "request", "request"], "pre-warmed before the first request"
    peers = {s.data["peer"] for s in served.fake.seen if s.kind in ("models", "request")}
    assert len(peers) == 1, f"every request went over the pre-warmed connection, not {peers}"


@pytest.mark.timeout(30)
def test_the_fake_writes_each_replys_first_text_no_sooner_than_its_time_to_first_token(two_turns):
    _, served = two_turns
    requests, waits = served.fake.of("request"), served.fake.waits()
    # ttft_s counts from the request's arrival, before the fake parsed its body (the "request" record)
    assert [w.arrived for w in waits] == [r.data["arrived"] for r in requests] and len(waits) == 2
    assert all(r.data["arrived"] <= r.at for r in requests)
    assert all(w.served_s >= served.fake.ttft_s for w in waits)


@pytest.mark.timeout(30)
def test_usage_is_what_the_api_reported(two_turns):
    result, served = two_turns
    assert llm_usage(result) == sent_usage(served.fake) == (80, 2 + 2)


@pytest.mark.timeout(30)
def test_prompt_cache_writes_and_reads_are_counted_and_priced_at_their_own_rates(serve, tmp_path):
    fake = FakeAnthropic(
        ["Luigi's, hello!"], input_tokens=40, cache_creation_input_tokens=1000, cache_read_input_tokens=3000
    )
    served = serve(fake)
    result = call(served.fake, [Say("Hello, who is this?", pause=0.3)], tmp_path)
    [reply] = served.fake.of("reply")
    assert (reply.data["cache_creation_input_tokens"], reply.data["cache_read_input_tokens"]) == (1000, 3000)
    usage = {"input_tokens": 40, "output_tokens": 2, "cache_write_tokens": 1000, "cache_read_tokens": 3000}
    assert result.usage["llm"] == result.turns[0].data["usage"]["llm"] == usage
    # Claude Opus list prices per token: input $5/M, output $25/M, cache writes 1.25x input, cache reads 0.1x input.
    assert result.cost_usd["llm"] == pytest.approx(40 * 5e-6 + 2 * 25e-6 + 1000 * 6.25e-6 + 3000 * 0.5e-6)


@pytest.mark.timeout(30)
def test_one_hour_cache_writes_are_counted_apart_and_priced_at_twice_the_input_price(serve, tmp_path):
    # Of 1000 tokens written to the cache, 600 went to the 1-hour cache (message_start's usage.cache_creation).
    fake = FakeAnthropic(
        ["Luigi's, hello!"],
        input_tokens=40,
        cache_creation_input_tokens=1000,
        ephemeral_1h_input_tokens=600,
        cache_read_input_tokens=3000,
    )
    served = serve(fake)
    result = call(served.fake, [Say("Hello, who is this?", pause=0.3)], tmp_path)
    [reply] = served.fake.of("reply")
    assert (reply.data["cache_creation_input_tokens"], reply.data["ephemeral_1h_input_tokens"]) == (1000, 600)
    usage = {
        "input_tokens": 40,
        "output_tokens": 2,
        "cache_write_tokens": 400,
        "cache_write_1h_tokens": 600,
        "cache_read_tokens": 3000,
    }
    assert result.usage["llm"] == result.turns[0].data["usage"]["llm"] == usage
    prices = LIST_PRICES["llm.anthropic"]["claude-opus-4-7"]
    assert prices["cache_write_1h_tokens"] == pytest.approx(2 * prices["input_tokens"])
    assert prices["cache_write_tokens"] == pytest.approx(1.25 * prices["input_tokens"])
    assert result.cost_usd["llm"] == pytest.approx(sum(count * prices[counter] for counter, count in usage.items()))


@pytest.mark.timeout(30)
def test_a_model_without_a_list_price_is_named_and_not_priced_as_another(serve, tmp_path, caplog):
    served = serve(FakeAnthropic(["Hello!"], input_tokens=40))
    result = call(served.fake, [Say("Hi.", pause=0.3)], tmp_path, model="claude-haiku-4-5-20251001")
    haiku = LIST_PRICES["llm.anthropic"]["claude-haiku-4-5"]
    usage = result.usage["llm"]
    assert result.cost_usd["llm"] == pytest.approx(sum(count * haiku[counter] for counter, count in usage.items()))
    assert result.unpriced == {}
    unknown = call(served.fake, [Say("Hi.", pause=0.3)], tmp_path / "unknown", model="claude-next")
    assert unknown.usage["llm"]["output_tokens"] > 0 and unknown.cost_usd["llm"] == 0
    assert unknown.unpriced["llm"].startswith("llm: no list price for anthropic model 'claude-next'")
    assert unknown.unpriced["llm"] in caplog.text


def test_the_cache_writes_split_follows_the_running_totals_of_message_start_and_message_delta():
    from anthropic.types import MessageDeltaUsage, Usage

    # message_start: 1000 written, 600 of them to the 1-hour cache.
    start = Usage.model_validate(
        {
            "input_tokens": 40,
            "output_tokens": 1,
            "cache_creation_input_tokens": 1000,
            "cache_creation": {"ephemeral_5m_input_tokens": 400, "ephemeral_1h_input_tokens": 600},
        }
    )
    # A message_delta updating the total without a breakdown keeps the last one; one with a breakdown (a field its
    # SDK type lacks, kept as a plain dict) replaces it. Totals, not increments: nothing adds up across events.
    delta_total_only = MessageDeltaUsage.model_validate({"output_tokens": 5, "cache_creation_input_tokens": 1200})
    delta_with_breakdown = MessageDeltaUsage.model_validate(
        {
            "output_tokens": 7,
            "cache_creation_input_tokens": 1200,
            "cache_creation": {"ephemeral_5m_input_tokens": 200, "ephemeral_1h_input_tokens": 1000},
        }
    )
    progress = _Progress(deadline=0.0)
    progress.take_usage(start)
    assert progress.usage() == {
        "input_tokens": 40,
        "output_tokens": 1,
        "cache_write_tokens": 400,
        "cache_write_1h_tokens": 600,
    }
    progress.take_usage(delta_total_only)
    assert progress.usage() == {
        "input_tokens": 40,
        "output_tokens": 5,
        "cache_write_tokens": 600,
        "cache_write_1h_tokens": 600,
    }
    progress.take_usage(delta_with_breakdown)
    assert progress.usage() == {
        "input_tokens": 40,
        "output_tokens": 7,
        "cache_write_tokens": 200,
        "cache_write_1h_tokens": 1000,
    }
    # No breakdown at all (an older API or a gateway): every write is a 5-minute one, as before.
    plain = _Progress(deadline=0.0)
    plain.take_usage(Usage.model_validate({"input_tokens": 40, "output_tokens": 1, "cache_creation_input_tokens": 900}))
    assert plain.usage() == {"input_tokens": 40, "output_tokens": 1, "cache_write_tokens": 900}


@pytest.mark.timeout(30)
def test_tools_asked_for_in_one_message_run_at_once_with_one_filler_and_both_results_go_back(serve, tmp_path):
    """Claude's parallel tool use: each tool here waits for the other to have started, so run one after the other
    the first would time out."""
    started: list[str] = []
    barrier = asyncio.Barrier(2)

    async def both_started() -> None:
        await barrier.wait()

    async def check_table(time: str) -> str:
        """Whether a table is free.

        Args:
            time: when, HH:MM
        """
        started.append(time)
        await both_started()
        return f"free at {time}"

    async def check_weather(city: str) -> str:
        """The weather now.

        Args:
            city: where
        """
        started.append(city)
        await both_started()
        return "sunny"

    asked = ToolUseReply(
        "check_table",
        {"time": "20:00"},
        text="Let me look.",
        id="toolu_a",
        also=(ToolUseReply("check_weather", {"city": "Rome"}, id="toolu_b"),),
    )
    served = serve(FakeAnthropic([asked, "Free at eight, and sunny."]))
    tools = {
        name: Tool.of(function, timeout_s=1.0, filler="One moment.", filler_after_s=0.0)
        for name, function in (("check_table", check_table), ("check_weather", check_weather))
    }
    result = call(served.fake, [Say("A table at eight? And the weather?", pause=0.3)], tmp_path, tools=tools)
    assert sorted(started) == ["20:00", "Rome"]
    _, follow_up = served.bodies()
    [tool_results] = [m for m in follow_up["messages"][-1:] if m["role"] == "user"]
    assert [(b["tool_use_id"], b["content"], b.get("is_error")) for b in tool_results["content"]] == [
        ("toolu_a", "free at 20:00", None),
        ("toolu_b", "sunny", None),
    ], "each result answers its own call, in the order asked"
    assert result.turns[0].data["bot_text"] == "Let me look. Free at eight, and sunny."
    spoken = [line["heard"] for line in result.transcript if line["speaker"] == "bot"]
    assert spoken == ["Let me look. One moment. Free at eight, and sunny."], "one filler for the two tools"
    audit = [json.loads(line) for line in (tmp_path / "tools.jsonl").read_text().splitlines()]
    assert sorted((a["tool"], a["outcome"]) for a in audit) == [("check_table", "ok"), ("check_weather", "ok")]


@pytest.mark.timeout(30)
def test_the_tool_loop_runs_the_tool_and_sends_its_result_back(serve, tmp_path):
    WEATHER_CALLS.clear()
    replies = [
        ToolUseReply("get_weather", {"city": "Paris"}, text="Let me check.", id="toolu_01"),
        "It is 18 degrees and sunny in Paris.",
    ]
    served = serve(FakeAnthropic(replies))
    result = call(
        served.fake, [Say("What is the weather in Paris?", pause=0.3)], tmp_path, tools={"get_weather": get_weather}
    )
    assert WEATHER_CALLS == [{"city": "Paris"}]
    first, second = served.bodies()
    assert len(first["messages"]) == 1
    assistant, results = second["messages"][-2:]
    assert assistant == {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}},
        ],
    }
    assert results["role"] == "user"
    (block,) = results["content"]
    assert block["type"] == "tool_result" and block["tool_use_id"] == "toolu_01" and "is_error" not in block
    assert json.loads(block["content"]) == {"city": "Paris", "celsius": 18, "sky": "sunny"}
    turn = result.turns[0]
    assert turn.data["bot_text"] == "Let me check. It is 18 degrees and sunny in Paris."
    assert "18" in turn.heard and turn.heard[-1] == "Paris."
    assert any(name.startswith("tool.start:toolu_01") for name in turn.marks)
    assert llm_usage(result) == sent_usage(served.fake)
    assert len(served.fake.of("reply")) == 2  # usage of both requests is in there
    audit = [json.loads(line) for line in (tmp_path / "tools.jsonl").read_text().splitlines()]
    assert [(a["tool"], a["outcome"]) for a in audit] == [("get_weather", "ok")]


@pytest.mark.timeout(30)
def test_a_barge_in_closes_the_stream_and_keeps_only_heard_words(serve, tmp_path, monkeypatch):
    long_reply = (
        "We have a lovely menu tonight, with fresh pasta, grilled fish, a mushroom risotto, three kinds of pizza, "
        "a seasonal salad, and for dessert a tiramisu that the chef makes every single morning."
    )
    served = serve(FakeAnthropic([long_reply, "Of course, for what time?"], tokens_per_s=6))
    script = [Say("What is on the menu?", pause=0.3), Say("A table for two please.", pause=0.3, barge_in=1.0)]
    rewrite, written_live = JsonlTraceWriter.rewrite, []

    def keep_what_was_written_live(writer: JsonlTraceWriter, records: Any) -> None:
        written_live.extend(json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines())
        rewrite(writer, records)

    monkeypatch.setattr(JsonlTraceWriter, "rewrite", keep_what_was_written_live)
    result = call(served.fake, script, tmp_path)
    gone = served.wait_for("disconnect")
    assert gone.data["text"] and gone.data["text"] != long_reply, "the client left mid-stream"
    first = result.turns[0]
    assert first.interrupted and 0 < len(first.heard) < len(long_reply.split())
    assert first.heard == long_reply.split()[: len(first.heard)]
    streamed = gone.data["text"].strip()
    assert long_reply.startswith(first.data["bot_text"]) and len(first.data["bot_text"]) <= len(streamed)
    heard = " ".join(first.heard)
    history = served.bodies()[1]["messages"]
    assert history[1] == {
        "role": "assistant",
        "content": [{"type": "text", "text": f"{heard} [interrupted by the caller]"}],
    }
    assistant = [m for m in result.conversation.messages if m.role == "assistant"]
    assert (assistant[0].text, assistant[0].interrupted) == (heard, True)
    # Nothing of the cut reply plays after the interrupt: silence until the next reply starts.
    with wave.open(str(tmp_path / "recording.wav")) as recording:
        bot = np.frombuffer(recording.readframes(recording.getnframes()), dtype=np.int16).reshape(-1, 2)[:, 1]
    cut, resumed = first.marks["out.interrupted"], result.turns[1].marks["out.first_play"]
    assert not np.any(bot[round(cut * 16000) : round(resumed * 16000)])
    # The cut reply's usage, counted as its stream closed after the turn's record was written, is in the trace file.
    written = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert written[0]["data"]["usage"]["llm"]["input_tokens"] > 0
    assert [w["data"]["usage"] for w in written] == [t.data["usage"] for t in result.turns]
    assert [w["data"]["cost_usd"] for w in written] == [t.data["cost_usd"] for t in result.turns]
    assert written[0]["data"]["cost_usd"]["llm"] > 0
    # ...and it was there as the call went, as an amendment line, priced: a process killed outright would keep it.
    amendments = [line for line in written_live if line["turn"] == first.turn and "usage" in line["late"]]
    assert amendments, "the cut reply's usage never reached the live trace"
    assert amendments[-1]["data"]["usage"] == written[0]["data"]["usage"]
    assert amendments[-1]["data"]["cost_usd"] == written[0]["data"]["cost_usd"]


@pytest.mark.timeout(30)
def test_after_a_false_interruption_claude_is_asked_to_carry_on(serve, tmp_path):
    """A noise long enough to cut the reply off (``min_words: 0``), with no words in it: the next request carries
    the reply as heard, marked interrupted, then the resume prompt as the caller's side; the continuation is
    spoken, and the conversation keeps it after the cut reply, without the prompt."""
    long_reply = (
        "We have a lovely menu tonight, with fresh pasta, grilled fish, a mushroom risotto, three kinds of pizza, "
        "a seasonal salad, and for dessert a tiramisu that the chef makes every single morning."
    )
    rest = "As I was saying, the tiramisu is made every morning."
    served = serve(FakeAnthropic([long_reply, rest], tokens_per_s=6))
    script = [Say("What is on the menu?", pause=0.3), Noise(duration=0.6, during_reply=1.0)]
    result = call(served.fake, script, tmp_path, turn={"min_words": 0})
    cut, resumed = result.turns
    assert cut.interrupted and resumed.data["resumed"] and resumed.data["bot_text"] == rest
    heard = " ".join(cut.heard)
    assert served.bodies()[1]["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "What is on the menu?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": f"{heard} [interrupted by the caller]"}]},
        {"role": "user", "content": [{"type": "text", "text": DEFAULT_RESUME_PROMPT}]},
    ]
    said = [(m.role, m.text) for m in result.conversation.messages]
    assert said == [("user", "What is on the menu?"), ("assistant", heard), ("assistant", rest)]


@pytest.mark.timeout(30)
def test_a_rejected_api_key_stops_the_call_with_a_clear_error(serve, tmp_path):
    served = serve(FakeAnthropic(["Hello."], api_key="the-right-key"))
    with pytest.raises(ProviderError, match=r"Anthropic: API key rejected \(401\): authentication_error"):
        call(served.fake, [Say("Hello?", pause=0.3), Say("Anyone there?", pause=0.3)], tmp_path, api_key="a-wrong-key")
    assert served.fake.of("refused")[0].data["status"] == 401
    transcript = json.loads((tmp_path / "transcript.json").read_text())
    assert transcript["status"] == "failed" and "API key" in transcript["error"]
    assert transcript["error"].endswith("; check llm.api_key"), "the key came from the config: where to look"
    assert len(served.fake.of("request")) == 1, "the call stopped at the first failure"


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("fault", "problem"),
    [
        ({"faults": Faults(refuse=429)}, "rate limited (429): rate_limit_error"),
        ({"faults": Faults(refuse=529)}, "server error (529): overloaded_error: Overloaded"),
        ({"stream_error_after": 2}, "stream error: overloaded_error: Overloaded (after"),
    ],
    ids=["429", "529", "error-event"],
)
def test_with_skip_turn_a_failed_reply_is_reported_and_the_call_goes_on(serve, tmp_path, fault, problem):
    served = serve(FakeAnthropic(["Sure, a table for two."], faulty_requests=1, **fault))
    script = [Say("Hello?", pause=0.3), Say("A table for two.", pause=0.3)]
    result = call(served.fake, script, tmp_path, on_error="skip-turn", reply_timeout=1.5)
    assert result.outcome == "ended"
    assert result.turns[0].data["error"].startswith(f"ProviderError: Anthropic: {problem}")
    assert len(served.fake.of("request")) == 2
    assert result.turns[-1].heard == ["Sure,", "a", "table", "for", "two."], "the next turn is answered"


@pytest.mark.timeout(30)
def test_with_skip_frame_a_reply_failing_mid_stream_ends_as_far_as_it_was_spoken(serve, tmp_path):
    reply = "Of course, we are open until ten tonight, and tomorrow from noon."
    fake = FakeAnthropic([reply, "Yes, we do."], stream_error_after=4, faulty_requests=1, tokens_per_s=20)
    served = serve(fake)
    script = [Say("When are you open?", pause=0.3), Say("Do you take cards?", pause=0.3)]
    result = call(served.fake, script, tmp_path, on_error="skip-frame")
    first = result.turns[0]
    assert "stream error" in first.data["error"]
    # The reply ended where it failed: played out in full, not left open to be cut by the caller's next words.
    assert not first.interrupted and "out.done" in first.marks and first.heard == ["Of", "course,"]
    assert served.bodies()[1]["messages"][1] == {
        "role": "assistant",
        "content": [{"type": "text", "text": "Of course,"}],
    }
    assert result.turns[-1].heard == ["Yes,", "we", "do."]


@pytest.mark.timeout(30)
def test_a_drop_mid_stream_keeps_what_was_streamed_and_heard(serve, tmp_path):
    reply = "Of course, we are open until ten tonight, and tomorrow from noon until eleven."
    # message_start, content_block_start, ping, then a word per delta at 5 words/s: dropped after 10 words, by
    # when "Of course," has been played.
    served = serve(FakeAnthropic([reply, "Yes."], tokens_per_s=5, faults=Faults(drop_after=13), faulty_requests=1))
    result = call(
        served.fake, [Say("When are you open?", pause=0.3), Say("Thanks.", pause=0.3)], tmp_path, on_error="skip-turn"
    )
    served.wait_for("dropped")
    first = result.turns[0]
    assert "stream disconnected after" in first.data["error"] and "Anthropic" in first.data["error"]
    assert first.data["bot_text"] == " ".join(reply.split()[:10])
    assert first.heard and first.heard == reply.split()[: len(first.heard)]
    assert any(m.role == "assistant" and m.text == " ".join(first.heard) for m in result.conversation.messages)
    transcript = json.loads((tmp_path / "transcript.json").read_text())
    assert transcript["turns"][1]["text"] == first.data["bot_text"]
    assert result.outcome == "ended" and result.turns[-1].heard == ["Yes."]


@pytest.mark.timeout(30)
def test_a_refusal_is_reported_and_answered_and_the_exchange_is_left_out_of_later_requests(serve, tmp_path):
    details = {"type": "refusal", "category": "cyber", "explanation": "This request could enable cyber harm."}
    replies = [
        "Luigi's, hello!",
        TextReply("Well, you start by", stop_reason="refusal", stop_details=details),
        "We open at noon.",
    ]
    served = serve(FakeAnthropic(replies))
    script = [Say("Hello there.", pause=0.3), Say("How do I pick a lock?", pause=0.3), Say("When do you open?")]
    result = call(served.fake, script, tmp_path)
    refused = result.turns[1]
    assert refused.data["bot_text"] == "Well, you start by Sorry, I can't help with that."
    assert refused.heard[-3:] == ["help", "with", "that."], "the caller is told, not left mid-sentence"
    assert refused.data["error"] == (
        "llm: Anthropic: the API refused the reply (cyber: This request could enable cyber harm.) after 18 "
        "characters; the exchange is left out of later requests"
    )
    # The API's guidance: remove the refused turn, or it refuses again. The conversation itself keeps what was said.
    assert served.bodies()[2]["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Hello there."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Luigi's, hello!"}]},
        {"role": "user", "content": [{"type": "text", "text": "When do you open?"}]},
    ]
    assert any(m.text == "How do I pick a lock?" for m in result.conversation.messages)
    assert result.outcome == "ended" and result.turns[-1].heard == ["We", "open", "at", "noon."]


def test_the_reasoners_tool_threads_are_set_in_its_config():
    config, validated = parse_config(
        {
            "vad": {"provider": "scripted"},
            "stt": {"provider": "scripted"},
            "llm": {"provider": "anthropic", "api_key": "sk-test", "tool_threads": 2, "thread_grace_s": 0.5},
            "tts": {"provider": "scripted"},
        }
    )
    audio = AudioFormat(16000)
    pipeline, _ = build_pipeline(
        config,
        validated,
        input_stage=Stage(name="in"),
        output_stage=Stage(name="out"),
        context=BuildContext(audio, caller=ScriptedCaller([Say("Hi.")], audio.sample_rate)),
    )
    llm = next(stage for stage in pipeline.stages if isinstance(stage, AnthropicLLM))
    assert (llm.tool_threads, llm.thread_grace_s) == (2, 0.5)
    with pytest.raises(ValueError, match="tool_threads"):
        AnthropicSettings.model_validate({"tool_threads": 0})


@pytest.mark.timeout(30)
def test_a_missing_api_key_is_a_config_error_before_any_request(serve, tmp_path, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    served = serve(FakeAnthropic())
    config, validated = parse_config(
        {
            "vad": {"provider": "scripted"},
            "stt": {"provider": "scripted"},
            "llm": {"provider": "anthropic", "base_url": served.fake.url},
            "tts": {"provider": "scripted"},
        }
    )
    with pytest.raises(ConfigError, match="ANTHROPIC_API_KEY") as raised:
        run_configured_call(config, validated, [Say("Hello?", pause=0.3)], tmp_path, clock=RealClock())
    assert "llm.api_key" in str(raised.value)
    assert served.fake.seen == []


# --------------------------------------------------------------------------------- the stage alone

# Failures and cancels depend on the HTTP transport under the SDK; both of the settings' choices are run.
BOTH_TRANSPORTS = pytest.mark.parametrize("http_client", ["aiohttp", "httpx"])


@pytest.mark.timeout(10)
@BOTH_TRANSPORTS
async def test_a_stall_before_the_first_byte_is_a_timeout_not_a_hang(http_client):
    async with FakeAnthropic(faults=Faults(stall_s=1.5)) as fake:
        turn = Turn(stage(fake, first_token_timeout_s=0.3, http_client=http_client))
        with pytest.raises(ProviderError, match=r"Anthropic: no first token within 0.3 s"):
            await turn.run()
        assert fake.of("stall") and not fake.of("reply")
        assert turn.pipeline.errors[0].fatal
        # The client gave up and closed the request: the fake finds it gone when its stall ends.
        gone = await fake.wait_for("disconnect", within_s=5)
        assert gone.data == {"events": 0, "text": ""}


@pytest.mark.timeout(10)
@BOTH_TRANSPORTS
async def test_an_unreachable_api_is_a_clear_error(http_client):
    async with FakeAnthropic() as fake:
        url = fake.url
    llm = AnthropicLLM(
        AnthropicSettings(base_url=url, http_client=http_client), api_key="k"
    )  # nothing listens there any more
    with pytest.raises(ProviderError, match=f"Anthropic: cannot connect to {url}: ConnectError"):
        await Turn(llm).run()


@pytest.mark.timeout(10)
@BOTH_TRANSPORTS
async def test_a_stream_that_stops_mid_reply_is_a_stall_error_and_keeps_the_text(http_client):
    async with FakeAnthropic(["One two three four five."], tokens_per_s=1, words_per_delta=2) as fake:
        turn = Turn(stage(fake, read_timeout_s=0.3, policy=ErrorPolicy.SKIP_TURN, http_client=http_client))
        assert await turn.run() == "ended"
        (error,) = turn.pipeline.errors
        assert "Anthropic: stream stalled: no event for 0.3 s after 7 characters" in error.error
        assert turn.text() == "One two"
        assert turn.record()["bot_text"] == "One two"
        await fake.wait_for("disconnect")


def test_the_fake_refuses_a_corruption_it_cannot_inject():
    with pytest.raises(ValueError, match=r"corrupt='bad-audio'\) does not apply: the API sends no audio"):
        FakeAnthropic(["Hello."], faults=Faults(corrupt="bad-audio"))


@pytest.mark.timeout(10)
@BOTH_TRANSPORTS
async def test_malformed_json_is_a_clear_error_and_the_text_before_it_is_kept(http_client):
    fake = FakeAnthropic(["Hello there, friend."], faults=Faults(corrupt="malformed-json"), corrupt_after=2)
    async with fake:
        turn = Turn(stage(fake, http_client=http_client))
        with pytest.raises(ProviderError, match=r"Anthropic: malformed stream event \(not JSON.*after 12 characters"):
            await turn.run()
        assert turn.text() == "Hello there,"
        assert turn.record()["bot_text"] == "Hello there,"


@pytest.mark.timeout(10)
async def test_an_unknown_event_is_skipped_with_a_reported_problem():
    async with FakeAnthropic(["Hello there, friend."], faults=Faults(corrupt="unknown-event")) as fake:
        turn = Turn(stage(fake))
        assert await turn.run() == "ended"
        assert turn.text() == "Hello there, friend."
        (problem,) = turn.pipeline.errors
        assert (
            not problem.fatal and "Anthropic: skipped an unknown stream event 'content_block_flourish'" in problem.error
        )
        assert fake.of("corrupted")


@pytest.mark.timeout(10)
async def test_the_tool_loop_is_bounded_and_the_last_round_forbids_tools():
    always = ToolUseReply("get_weather", {"city": "Rome"})
    async with FakeAnthropic(lambda body: always) as fake:
        turn = Turn(stage(fake, max_tool_rounds=2, tools=[get_weather]))
        assert await turn.run() == "ended"
        bodies = [seen.data["body"] for seen in fake.of("request")]
        assert len(bodies) == 3
        assert [body.get("tool_choice") for body in bodies] == [None, None, {"type": "none"}]
        assert [len(body["messages"]) for body in bodies] == [1, 3, 5], "each round adds tool_use + tool_result"
        asked = "the model asked for 'get_weather' after the last tool round (max_tool_rounds=2); not run"
        assert any(asked in e.error for e in turn.pipeline.errors)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("rounds", [0, 1])
async def test_a_tool_asked_for_in_the_last_round_is_not_run(rounds):
    booked: list[str] = []

    async def book(name: str) -> str:
        """Book a table.

        Args:
            name: who for
        """
        booked.append(name)
        return "booked"

    always = ToolUseReply("book", {"name": "Rossi"}, text="Booking that.")
    async with FakeAnthropic(lambda body: always) as fake:
        turn = Turn(stage(fake, max_tool_rounds=rounds, tools=[book]))
        assert await turn.run() == "ended"
        assert len(fake.of("request")) == rounds + 1
        assert booked == ["Rossi"] * rounds, "no follow-up would carry the last round's result: a side effect unsaid"
        assert sum(isinstance(frame, ToolCall) for frame in turn.sink.frames) == rounds
        assert turn.text() == " ".join(["Booking that."] * (rounds + 1)), "what the model said is kept"
        (problem,) = turn.pipeline.errors
        assert not problem.fatal
        assert f"asked for 'book' after the last tool round (max_tool_rounds={rounds}); not run" in problem.error


def test_every_request_declares_the_tools_with_schemas_built_once():
    llm = AnthropicLLM(AnthropicSettings(prewarm=False), api_key="k", tools=[get_weather])
    messages = [{"role": "user", "content": [{"type": "text", "text": "Weather in Rome?"}]}]
    first, second = (llm.build_request(messages, SYSTEM, offer_tools=True)["tools"] for _ in range(2))
    assert first == [Tool.of(get_weather).spec()]
    assert first[0] is second[0], "pydantic's schema is built once, not on every request of every turn"


class SlowToStop(Stage):
    """Stands before the reasoner and takes a moment to stop, as an STT closing its socket does: the reasoner's
    work has that long to carry on after the reasoner has stopped."""

    def __init__(self) -> None:
        super().__init__(name="head")

    async def stop(self) -> None:
        await asyncio.sleep(0.1)


@pytest.mark.timeout(10)
async def test_the_call_ending_while_a_finish_tool_runs_sends_no_follow_up():
    started, release = asyncio.Event(), asyncio.Event()
    booked: list[str] = []

    async def book(name: str) -> str:
        """Book a table.

        Args:
            name: who for
        """
        started.set()
        await release.wait()
        booked.append(name)
        return "booked"

    replies = [ToolUseReply("book", {"name": "Rossi"}, text="Let me book that."), "Done, see you tonight."]
    async with FakeAnthropic(replies) as fake:
        llm = stage(fake, tools=[Tool.of(book, on_barge_in="finish")])
        pipeline = Pipeline([SlowToStop(), llm, Collect()], clock=RealClock())
        running = asyncio.create_task(pipeline.run())
        await asyncio.sleep(0)
        turn = EndOfTurn(epoch=pipeline.next_epoch(), text="Book for Rossi.", at=0.0, system=SYSTEM)
        await llm.receive(turn, DOWNSTREAM)
        await started.wait()
        pipeline.cancel("the caller hung up")
        release.set()  # the booking ends as the call shuts down
        assert await running == "the caller hung up"
        assert booked == ["Rossi"], "the stage waited for the booking"
        assert len(fake.of("request")) == 1, "no follow-up request once the call has ended"
        assert pipeline.errors == [], "the reply did not resume into a stopped stage"


@pytest.mark.timeout(10)
@pytest.mark.parametrize("note", ["Noch in Arbeit, nicht erneut aufrufen: {calls}.", ""])
async def test_the_note_naming_a_finish_tool_still_running_is_the_configured_one(note):
    started, release = asyncio.Event(), asyncio.Event()

    async def book(name: str) -> str:
        """Book a table.

        Args:
            name: who for
        """
        started.set()
        await release.wait()
        return "booked"

    replies = [ToolUseReply("book", {"name": "Rossi"}, text="Let me book that."), "Sure, nine then."]
    async with FakeAnthropic(replies) as fake:
        turn = Turn(stage(fake, tools=[Tool.of(book, on_barge_in="finish")], running_tools_note=note))
        running = await turn.start("Book for Rossi at eight.")
        await started.wait()
        await turn.pipeline.interrupt(turn.llm)  # the caller cuts the reply off; the booking runs on
        later = "Make it nine."
        await turn.llm.receive(
            EndOfTurn(
                epoch=turn.pipeline.next_epoch(), text=later, at=0.0, system=SYSTEM, context=(Message("user", later),)
            ),
            DOWNSTREAM,
        )
        await fake.wait_for("reply", lambda _: len(fake.of("reply")) == 2)
        release.set()
        await turn.pipeline.end()
        assert await running == "ended"
        systems = [request.data["body"].get("system") for request in fake.of("request")]
        expected = SYSTEM + "\n\n" + note.format(calls="book(name='Rossi')") if note else SYSTEM
        assert systems == [SYSTEM, expected]


@pytest.mark.timeout(10)
async def test_the_fake_refuses_a_tool_result_without_its_tool_use_and_tool_blocks_without_tools():
    import anthropic

    hello = {"role": "user", "content": "Hi."}
    greeting = {"role": "assistant", "content": [{"type": "text", "text": "Luigi's, hello."}]}
    orphan = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_never", "content": "18"}]}
    tool = Tool.of(get_weather).spec()
    async with FakeAnthropic(["Fine."]) as fake:
        client = anthropic.AsyncAnthropic(api_key=fake.api_key, base_url=fake.url, max_retries=0)

        async def refusal(tools: list[dict[str, Any]]) -> str:
            with pytest.raises(anthropic.BadRequestError) as refused:
                async with client.messages.stream(
                    model="claude-opus-4-7", max_tokens=50, messages=[hello, greeting, orphan], tools=tools
                ):
                    pass
            assert refused.value.body["error"]["type"] == "invalid_request_error"
            return str(refused.value.body["error"]["message"])

        try:
            assert (await refusal([tool])).startswith(
                "messages.2.content.0: unexpected `tool_use_id` found in `tool_result` blocks: toolu_never."
            )
            assert await refusal([]) == "Requests which include `tool_use` or `tool_result` blocks must define tools."
        finally:
            await client.close()


@pytest.mark.timeout(10)
async def test_a_failing_tool_is_sent_back_as_an_error_result():
    async def book(time: str) -> str:
        """Book a table.

        Args:
            time: when
        """
        raise RuntimeError("the book is full")

    replies = [ToolUseReply("book", {"time": "19:30"}), "Sorry, we are full tonight."]
    async with FakeAnthropic(replies) as fake:
        turn = Turn(stage(fake, tools=[book]))
        assert await turn.run() == "ended"
        (block,) = fake.of("request")[1].data["body"]["messages"][-1]["content"]
        assert block["is_error"] is True and "the book is full" in block["content"]
        assert turn.text() == "Sorry, we are full tonight."


@pytest.mark.timeout(10)
async def test_a_tool_result_over_its_limit_is_sent_back_as_an_error_naming_the_size():
    async def menu() -> list[dict[str, Any]]:
        """The whole menu."""
        return [{"dish": f"pasta no. {n}", "price": 12} for n in range(100)]

    size = len(json.dumps(await menu(), ensure_ascii=False))
    replies = [ToolUseReply("menu"), "We have a lot of pasta."]
    async with FakeAnthropic(replies) as fake:
        turn = Turn(stage(fake, tools=[Tool.of(menu, max_result_chars=1000)]))
        assert await turn.run() == "ended"
        (block,) = fake.of("request")[1].data["body"]["messages"][-1]["content"]
        assert block["is_error"] is True
        assert block["content"] == (
            f"tool 'menu' returned {size:,} characters, over its limit of 1,000 (max_result_chars); the result was "
            "not sent"
        )
        assert turn.text() == "We have a lot of pasta."


@pytest.mark.timeout(10)
@BOTH_TRANSPORTS
async def test_an_interrupt_closes_the_stream_at_once_and_counts_the_usage_so_far(http_client):
    counting = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen"
    async with FakeAnthropic([counting], tokens_per_s=10) as fake:
        turn = Turn(stage(fake, http_client=http_client))
        running = await turn.start("Count to fifteen.")
        await turn.sink.first_text.wait()
        await asyncio.sleep(0.6)  # the reply is well under way
        await turn.pipeline.interrupt(turn.llm)
        gone = await fake.wait_for("disconnect")
        assert len(gone.data["text"]) < len(counting)
        await turn.pipeline.end()
        assert await running == "ended"
        usage = turn.pipeline.usage.of_turn(1)["llm"]
        # message_start reported 1 output token, a placeholder; the output is estimated at 4 characters a token
        # from what arrived: between what the stage passed on and what the fake wrote.
        assert usage["input_tokens"] > 0
        assert -(-len(turn.text()) // 4) <= usage["output_tokens"] <= -(-len(gone.data["text"]) // 4)
        assert usage["output_tokens"] > 1
        assert not fake.of("reply")


@pytest.mark.timeout(10)
async def test_a_stream_failing_mid_reply_counts_the_output_it_streamed():
    words = " ".join(f"word{n}" for n in range(60))
    async with FakeAnthropic([words], stream_error_after=40) as fake:
        turn = Turn(stage(fake, policy=ErrorPolicy.SKIP_TURN))
        assert await turn.run() == "ended"
        assert "stream error" in turn.pipeline.errors[0].error
        streamed = turn.text()
        assert len(streamed.split()) == 40
        assert turn.pipeline.usage.of_turn(1)["llm"]["output_tokens"] == -(-len(streamed) // 4)


@pytest.mark.timeout(10)
async def test_a_tool_call_cut_by_max_tokens_is_not_run():
    booked: list[dict[str, Any]] = []

    def book(name: str, people: int, time: str = "19:00") -> str:
        """Book a table.

        Args:
            name: who for
            people: how many
            time: when
        """
        booked.append({"name": name, "people": people, "time": time})
        return "booked"

    # "Let me book that." is 4 tokens; the input (~12 tokens) is cut at max_tokens=8, after {"name": "Rossi", "peo.
    cut = ToolUseReply("book", {"name": "Rossi", "people": 12, "time": "21:30"}, text="Let me book that.")
    async with FakeAnthropic([cut, "Done."]) as fake:
        turn = Turn(stage(fake, max_tokens=8, tools=[book]))
        assert await turn.run() == "ended"
        assert booked == [], "a call the token limit cut short ran on partial arguments"
        assert len(fake.of("request")) == 1, "no follow-up carries the truncated tool_use"
        assert turn.text() == "Let me book that."
        (problem,) = turn.pipeline.errors
        assert not problem.fatal
        assert "Anthropic: the reply reached max_tokens=8 inside a call of 'book'; not run" in problem.error
        [reply] = fake.of("reply")
        assert reply.data["stop_reason"] == "max_tokens"
        assert turn.pipeline.usage.of_turn(1)["llm"]["output_tokens"] == reply.data["output_tokens"]


@pytest.mark.timeout(10)
async def test_a_text_reply_cut_by_max_tokens_is_kept_and_reported():
    async with FakeAnthropic(["one two three four five six"]) as fake:
        turn = Turn(stage(fake, max_tokens=3))
        assert await turn.run() == "ended"
        assert turn.text() == "one two three"
        (problem,) = turn.pipeline.errors
        assert not problem.fatal and "the reply reached max_tokens=3 and was cut there" in problem.error


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("stop_reason", "problem"),
    [
        ("model_context_window_exceeded", "the reply reached the context window and was cut there"),
        ("pause_turn", "the API paused the turn (pause_turn, a server tool's long run); not continued"),
    ],
)
async def test_a_reply_stopped_short_by_the_api_is_kept_and_reported(stop_reason, problem):
    async with FakeAnthropic([TextReply("We open at", stop_reason=stop_reason)]) as fake:
        turn = Turn(stage(fake))
        assert await turn.run() == "ended"
        assert turn.text() == "We open at"
        (reported,) = turn.pipeline.errors
        assert not reported.fatal and f"Anthropic: {problem}" in reported.error
        assert len(fake.of("request")) == 1


@pytest.mark.timeout(10)
@pytest.mark.parametrize("after_tool", [False, True])
async def test_a_reply_without_a_word_is_reported_not_silent(after_tool):
    async def lookup(city: str) -> str:
        """Look up the weather.

        Args:
            city: where
        """
        return "sunny"

    replies: list[Any] = [ToolUseReply("lookup", {"city": "Paris"}, text="Let me check."), ""] if after_tool else [""]
    async with FakeAnthropic(replies) as fake:
        turn = Turn(stage(fake, tools=[lookup]))
        assert await turn.run() == "ended"
        assert turn.text() == ("Let me check." if after_tool else "")
        (reported,) = turn.pipeline.errors
        after = " after the tool results" if after_tool else ""
        assert not reported.fatal and f"Anthropic: the model ended its reply{after} without a word" in reported.error


@pytest.mark.timeout(10)
@BOTH_TRANSPORTS
async def test_a_stream_that_ends_before_message_stop_is_an_error_not_a_short_reply(http_client):
    async with FakeAnthropic(["We are open until ten tonight."], eof_after=3) as fake:
        turn = Turn(stage(fake, policy=ErrorPolicy.SKIP_TURN, http_client=http_client))
        assert await turn.run() == "ended"
        assert fake.of("eof")
        (error,) = turn.pipeline.errors
        assert "Anthropic: the stream ended before message_stop, after 11 characters" in error.error
        assert turn.text() == "We are open", "what was streamed before stays"


@pytest.mark.timeout(10)
async def test_a_barge_in_during_a_tool_counts_the_whole_replys_usage():
    started = asyncio.Event()

    async def lookup(city: str) -> str:
        """Look up the weather.

        Args:
            city: where
        """
        started.set()
        await asyncio.sleep(5)
        return "sunny"

    replies = [ToolUseReply("lookup", {"city": "Paris"}, text="Let me check that for you."), "It is sunny."]
    async with FakeAnthropic(replies) as fake:
        turn = Turn(stage(fake, tools=[lookup]))
        running = await turn.start("Weather in Paris?")
        await started.wait()
        await turn.pipeline.interrupt(turn.llm)
        await turn.pipeline.end()
        assert await running == "ended"
        [reply] = fake.of("reply")
        usage = turn.pipeline.usage.of_turn(1)["llm"]
        assert usage["output_tokens"] == reply.data["output_tokens"] > 1, "the response was complete and billed"


@pytest.mark.timeout(10)
@pytest.mark.parametrize("shape", ["no usage in message_start", "a block's end before message_start"])
async def test_an_event_of_the_wrong_shape_is_a_clear_error_and_the_text_before_it_stays(shape):
    text_delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello."}}
    start = {"type": "message_start", "message": {"id": "m", "type": "message", "role": "assistant", "content": []}}
    block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    stop = {"type": "content_block_stop", "index": 0}
    # Valid JSON, not the API's shape: what an Anthropic-compatible gateway or proxy might send.
    events = [start, block, text_delta, stop] if shape.startswith("no usage") else [stop, start, block, text_delta]
    events += [{"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 2}}]

    class Gateway(FakeAnthropic):
        async def _stream(self, request, response, body, reply, sent, arrived):  # type: ignore[no-untyped-def]
            for event in events:
                await response.write(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode())
            await response.write_eof()

    async with Gateway() as fake:
        turn = Turn(stage(fake, policy=ErrorPolicy.SKIP_TURN))
        assert await turn.run() == "ended"
        (error,) = turn.pipeline.errors
        expected = {
            "no usage in message_start": "Anthropic: unusable stream after 6 characters (AttributeError",  # the SDK's
            "a block's end before message_start": "Anthropic: malformed 'content_block_stop' event after 0 characters",
        }[shape]
        assert error.error.startswith(f"ProviderError: {expected}"), error.error
        assert turn.text() == ("Hello." if shape.startswith("no usage") else "")


# ------------------------------------------------------------------------------------ the prompt


def test_a_refused_exchange_is_left_out_with_its_tool_uses_and_a_resumed_ones_continuation():
    use = ToolUse("toolu_1", "lookup", {"q": "locks"}, result="found")
    hello, hi = Message("user", "Hello."), Message("assistant", "Hi!")
    asked, again = Message("user", "How do I pick a lock?"), Message("user", "A lock, I said.")
    refused = _RefusedExchanges()
    refused.add((hello, hi, asked, again))  # the refused request ended with the caller's two lines
    later = (hello, hi, asked, again, Message("tool", "lookup", tool=use), Message("assistant", "Well, Sorry."))
    then = Message("user", "When do you open?")
    assert refused.leave_out((*later, then, Message("assistant", "At noon."))) == [
        hello,
        hi,
        then,
        Message("assistant", "At noon."),
    ]
    # A resumed turn's context ends with the resume prompt, which is in no conversation: the continuation heard
    # after it takes its place, and goes too; the reply that was cut before it stays.
    resumed = _RefusedExchanges()
    cut = Message("assistant", "We open", interrupted=True)
    resumed.add((hello, cut, Message("user", DEFAULT_RESUME_PROMPT)))
    assert resumed.leave_out((hello, cut, Message("assistant", "at, Sorry."), then)) == [hello, cut, then]


def test_the_conversation_renders_as_alternating_messages_with_tool_blocks():
    use = ToolUse("toolu_9", "get_weather", {"city": "Oslo"}, result={"celsius": 3})
    failed = ToolUse("toolu_10", "book", {"time": "9"}, error="no tables")
    context = (
        Message("assistant", "Luigi's, hello!"),
        Message("user", "Weather in Oslo?"),
        Message("tool", "get_weather(...)", tool=use),
        Message("assistant", "It is three degrees.", interrupted=False),
        Message("user", "Book at nine."),
        Message("assistant", "Let me book", interrupted=True),
        Message("tool", "book(...)", tool=failed),  # a tool that finished after the barge-in
        Message("user", "  "),
        Message("user", "Hello?"),
    )
    messages = render_messages(context, "[cut off]")
    text = {"type": "text", "text": "(the call connected)"}
    assert messages == [
        {"role": "user", "content": [text]},  # a call that starts with the bot gets a caller line first
        {"role": "assistant", "content": [{"type": "text", "text": "Luigi's, hello!"}]},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Oslo?"}]},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_9", "name": "get_weather", "input": {"city": "Oslo"}}],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_9", "content": '{"celsius": 3}'}]},
        {"role": "assistant", "content": [{"type": "text", "text": "It is three degrees."}]},
        {"role": "user", "content": [{"type": "text", "text": "Book at nine."}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me book [cut off]"},
                {"type": "tool_use", "id": "toolu_10", "name": "book", "input": {"time": "9"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_10", "content": "no tables", "is_error": True},
                {"type": "text", "text": "Hello?"},
            ],
        },
    ]


def test_the_module_imports_without_the_sdk_and_a_missing_sdk_names_the_extra():
    code = (
        "import sys; sys.modules['anthropic'] = None\n"
        "import voxpipe.stages.anthropic_llm as m\n"
        "from voxpipe.stages.cloud import ProviderError\n"
        "try:\n    m.AnthropicLLM(api_key='k')\nexcept ProviderError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20, check=True).stdout
    assert "pip install 'voxpipe[anthropic]'" in out and "Anthropic SDK is not installed (anthropic" in out


# ------------------------------------------------------------------------------------ the warm-up


@pytest.mark.timeout(30)
async def test_the_sdk_is_warmed_up_in_memory_once_at_start_and_nothing_of_it_reaches_the_api(monkeypatch):
    import voxpipe.stages.anthropic_llm as module

    monkeypatch.setattr(module, "_sdk_warm", False)
    streamed: list[str] = []
    canned = module._stream_canned_reply

    async def counted(model: str) -> None:
        streamed.append(model)
        await canned(model)  # the SDK streams the canned events: a malformed one would raise here

    monkeypatch.setattr(module, "_stream_canned_reply", counted)
    async with FakeAnthropic(["Hello there."]) as fake:
        first, second = Turn(stage(fake)), Turn(stage(fake))
        assert await first.run() == "ended"
        assert await second.run() == "ended"
        assert module._sdk_warm and streamed == ["claude-opus-4-7"], "once per process"
        assert [s.kind for s in fake.seen if s.kind in ("models", "request")].count("request") == 2
        assert first.text() == second.text() == "Hello there."


@pytest.mark.timeout(30)
async def test_a_failing_warm_up_is_not_the_calls_failure(monkeypatch):
    import voxpipe.stages.anthropic_llm as module

    async def broken(model: str) -> None:
        raise RuntimeError("the SDK changed its events")

    monkeypatch.setattr(module, "_sdk_warm", False)
    monkeypatch.setattr(module, "_stream_canned_reply", broken)
    async with FakeAnthropic(["Hello there."]) as fake:
        turn = Turn(stage(fake))
        assert await turn.run() == "ended"
        assert turn.text() == "Hello there." and not turn.pipeline.errors
        assert not module._sdk_warm, "tried again by the next call"


_HI = {"role": "user", "content": [{"type": "text", "text": "Hi."}]}
_USE = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
_RESULT = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18 degrees"}
_CACHED = {"type": "ephemeral"}


def _weather_tool(name: str = "get_weather", **extra: Any) -> dict[str, Any]:
    return {**Tool.of(get_weather).spec(), "name": name, **extra}


def _cached_texts(n: int) -> list[dict[str, Any]]:
    return [{"type": "text", "text": f"Part {i}.", "cache_control": _CACHED} for i in range(n)]


async def _streamed(fake: FakeAnthropic, **request: Any) -> str:
    """Stream one request from the fake with the official SDK: the reply's text (or the SDK's error)."""
    import anthropic

    client = anthropic.AsyncAnthropic(api_key=fake.api_key, base_url=fake.url, max_retries=0)
    try:
        async with client.messages.stream(model="claude-opus-4-7", max_tokens=20, **request) as stream:
            message = await stream.get_final_message()
        return "".join(block.text for block in message.content if block.type == "text")
    finally:
        await client.close()


_TOOL_NAME_RULE = "String should match pattern '^[a-zA-Z0-9_-]{1,64}$'"


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"messages": [_HI], "tools": [_weather_tool("book table")]}, f"tools.0.name: {_TOOL_NAME_RULE}"),
        (
            {"messages": [_HI], "tools": [_weather_tool(), _weather_tool("<lambda>")]},
            f"tools.1.name: {_TOOL_NAME_RULE}",
        ),
        ({"messages": [_HI], "tools": [_weather_tool("a" * 65)]}, f"tools.0.name: {_TOOL_NAME_RULE}"),
        (
            {
                "messages": [
                    _HI,
                    {"role": "assistant", "content": [_USE]},
                    {"role": "user", "content": [{"type": "text", "text": "And parking?"}, _RESULT]},
                ],
                "tools": [_weather_tool()],
            },
            "messages.2: `tool_result` blocks must come before any other content in a user message",
        ),
        (
            {"messages": [_HI, {"role": "assistant", "content": [{"type": "text", "text": "Sure, "}]}]},
            "messages: final assistant content cannot end with trailing whitespace",
        ),
        (
            {
                "system": _cached_texts(1),
                "tools": [_weather_tool(cache_control=_CACHED)],
                "messages": [{"role": "user", "content": _cached_texts(3)}],
            },
            "A maximum of 4 blocks with cache_control may be provided. Found 5.",
        ),
        (
            {
                "messages": [
                    _HI,
                    {"role": "assistant", "content": [_USE, _USE]},
                    {"role": "user", "content": [_RESULT]},
                ],
                "tools": [_weather_tool()],
            },
            "messages.1.content.1: `tool_use` ids must be unique",
        ),
        (
            {"messages": [_HI], "tool_choice": {"type": "none"}},
            "tool_choice may only be specified while providing tools.",
        ),
    ],
    ids=[
        "tool-name-with-a-space",
        "tool-name-of-a-lambda",
        "tool-name-of-65-characters",
        "text-before-tool-result",
        "final-assistant-text-ending-in-whitespace",
        "five-cache-control-blocks",
        "duplicate-tool-use-ids",
        "tool-choice-without-tools",
    ],
)
async def test_the_fake_refuses_what_the_api_refuses(request_, message):
    import anthropic

    async with FakeAnthropic(["Fine."]) as fake:
        with pytest.raises(anthropic.BadRequestError) as refused:
            await _streamed(fake, **request_)
        assert refused.value.body["error"] == {"type": "invalid_request_error", "message": message}
        assert fake.of("refused")[-1].data["message"] == message


@pytest.mark.timeout(10)
async def test_the_fake_takes_a_request_just_inside_each_limit_and_refuses_one_just_outside():
    import anthropic

    tool = _weather_tool("a" * 64, cache_control=_CACHED)
    tool_turn = [_HI, {"role": "assistant", "content": [{"type": "text", "text": "Let me check. "}, _USE]}]
    answer = {"role": "user", "content": [_RESULT, {"type": "text", "text": "And parking?", "cache_control": _CACHED}]}
    valid = {"system": _cached_texts(2), "tools": [tool], "messages": [*tool_turn, answer]}  # 4 cache_control blocks
    async with FakeAnthropic(["Fine."]) as fake:
        assert await _streamed(fake, **valid) == "Fine."
        fifth = {**answer, "content": [*answer["content"], *_cached_texts(1)]}
        with pytest.raises(anthropic.BadRequestError, match="Found 5"):
            await _streamed(fake, **{**valid, "messages": [*tool_turn, fifth]})
        text_first = {**answer, "content": answer["content"][::-1]}
        with pytest.raises(anthropic.BadRequestError, match="must come before any other content"):
            await _streamed(fake, **{**valid, "messages": [*tool_turn, text_first]})
        with pytest.raises(anthropic.BadRequestError, match=r"tools\.0\.name: String should match pattern"):
            await _streamed(fake, **{**valid, "tools": [_weather_tool("a" * 65)]})


@pytest.mark.timeout(10)
async def test_the_fake_refuses_an_anthropic_version_the_api_does_not_know():
    import anthropic

    async with FakeAnthropic(["Fine."]) as fake:
        assert await _streamed(fake, messages=[_HI]) == "Fine."  # the version the installed SDK sends
        assert fake.of("request")[-1].data["headers"]["anthropic-version"] == anthropic._constants.ANTHROPIC_API_VERSION
        assert await _streamed(fake, messages=[_HI], extra_headers={"anthropic-version": "2023-06-01"}) == "Fine."
        with pytest.raises(anthropic.BadRequestError, match="anthropic-version: unknown version '1999-01-01'"):
            await _streamed(fake, messages=[_HI], extra_headers={"anthropic-version": "1999-01-01"})
        with pytest.raises(anthropic.BadRequestError, match="anthropic-version: header is required"):
            await _streamed(fake, messages=[_HI], extra_headers={"anthropic-version": anthropic.Omit()})
