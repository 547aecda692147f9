"""Tools: described from type hints and docstrings; run by the reasoner with timeouts, barge-in policies, fillers
and an audit log — tested with the scripted LLM, so no provider is involved."""

import asyncio
import functools
import json
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any

import pytest
from pydantic import Field

from tests.helpers import Collect, Tap
from voxpipe.call import run_call, run_configured_call
from voxpipe.config import ConfigError, parse_config
from voxpipe.config.build import config_tools
from voxpipe.pipeline import DOWNSTREAM, EndOfTurn, Message, Pipeline, RealClock, SpeakableChunk, ToolResult
from voxpipe.stages.tools import ResultTooLarge, Tool, ToolAuditLog, ToolError, tools_by_name
from voxpipe.testing import Say, ScriptedLLM, ScriptedReply, Silence


async def book_table(name: str, people: int, time: str = "19:00") -> dict:
    """Book a table at the restaurant.

    Args:
        name: who the booking is for
        people: how many people are coming
        time: when, as HH:MM
    """
    await asyncio.sleep(3.0)  # virtual time in these tests: the scripted calls run under VirtualClock
    return {"booked": True, "name": name, "people": people, "time": time}


def test_schema_comes_from_type_hints_and_docstring():
    spec = Tool.of(book_table).spec()
    assert spec["name"] == "book_table"
    assert spec["description"] == "Book a table at the restaurant."
    schema = spec["input_schema"]
    assert schema["type"] == "object"
    assert schema["required"] == ["name", "people"]
    assert schema["properties"]["people"] == {"type": "integer", "description": "how many people are coming"}
    assert schema["properties"]["time"]["default"] == "19:00"
    assert schema["additionalProperties"] is False


def test_a_function_the_model_cannot_be_told_about_is_refused():
    def untyped(city):
        return city

    def star(*cities: str) -> str:
        return ""

    with pytest.raises(ToolError, match="argument 'city' needs a type hint"):
        Tool.of(untyped)
    with pytest.raises(ToolError, match=r"\*args"):
        Tool.of(star)


@pytest.mark.asyncio
async def test_invoke_checks_arguments_and_runs_sync_functions_off_the_loop():
    import threading

    def where() -> str:
        return threading.current_thread().name

    assert await Tool.of(where).invoke({}) != threading.current_thread().name
    with pytest.raises(ToolError, match=r"tool 'book_table' was called with bad arguments: people: .*integer"):
        await Tool.of(book_table).invoke({"name": "Rossi", "people": "many"})


@pytest.mark.asyncio
async def test_results_json_cannot_carry_are_a_clear_error_and_dataclasses_are_fine():
    @dataclass
    class Slot:
        time: str

    def slot() -> Slot:
        return Slot("20:00")

    def handle() -> object:
        return object()

    assert await Tool.of(slot).invoke({}) == {"time": "20:00"}
    with pytest.raises(ToolError, match="returned a object, which cannot be sent to the model as JSON"):
        await Tool.of(handle).invoke({})


@pytest.mark.asyncio
async def test_a_result_over_its_limit_is_an_error_naming_the_tool_the_size_and_the_limit():
    def listing() -> str:
        return "x" * 101

    async def slots() -> list[dict[str, str]]:
        return [{"time": "20:00"}] * 10  # 190 characters as the JSON text the model would get

    assert Tool.of(listing).max_result_chars == 20_000, "a limit even when none is given"
    assert await Tool.of(listing, max_result_chars=101).invoke({}) == "x" * 101
    with pytest.raises(ResultTooLarge) as caught:
        await Tool.of(listing, max_result_chars=100).invoke({})
    assert str(caught.value) == (
        "tool 'listing' returned 101 characters, over its limit of 100 (max_result_chars); the result was not sent"
    )
    with pytest.raises(ResultTooLarge, match=r"tool 'slots' returned 190 characters, over its limit of 189") as big:
        await Tool.of(slots, max_result_chars=189).invoke({})
    assert (big.value.chars, big.value.limit) == (190, 189)
    with pytest.raises(ToolError, match="max_result_chars >= 1"):
        Tool.of(listing, max_result_chars=0)


def test_annotated_constraints_and_descriptions_reach_the_schema_and_the_argument_check():
    async def book(
        people: Annotated[int, Field(ge=1, le=12, description="how many people (1-12)")],
        time: Annotated[str, Field(pattern=r"^\d\d:\d\d$")],
    ) -> str:
        """Book a table.

        Args:
            time: when, as HH:MM
        """
        return "booked"

    tool = Tool.of(book)
    properties = tool.input_schema()["properties"]
    assert properties["people"] == {
        "type": "integer",
        "minimum": 1,
        "maximum": 12,
        "description": "how many people (1-12)",
    }
    assert properties["time"]["pattern"] == r"^\d\d:\d\d$" and properties["time"]["description"] == "when, as HH:MM"
    with pytest.raises(ToolError, match=r"people: Input should be less than or equal to 12; time: String should"):
        asyncio.run(tool.invoke({"people": 500, "time": "tonight"}))


def test_a_partial_or_a_callable_object_is_described_by_the_function_underneath():
    bookings: list[tuple[object, str]] = []

    def book(db: object, name: str, table: int = 1) -> str:
        """Book a table.

        Args:
            name: who for
            table: which table
        """
        bookings.append((db, name))
        return "booked"

    class Booker:
        async def __call__(self, name: str) -> str:
            """Book a table through the booking service.

            Args:
                name: who for
            """
            return f"booked for {name}"

    db = object()
    for bound in (functools.partial(book, db), functools.partial(book, db=db)):
        tool = Tool.of(bound)
        assert tool.name == "book" and tool.description == "Book a table."
        assert tool.input_schema()["properties"] == {
            "name": {"type": "string", "description": "who for"},
            "table": {"type": "integer", "default": 1, "description": "which table"},
        }, "what the partial binds is the program's, not the model's"
        assert asyncio.run(tool.invoke({"name": "Rossi"})) == "booked"
    assert bookings == [(db, "Rossi"), (db, "Rossi")]
    booker = Tool.of(Booker())
    assert booker.name == "Booker" and booker.description == "Book a table through the booking service."
    assert not booker.runs_in_thread
    assert asyncio.run(booker.invoke({"name": "Rossi"})) == "booked for Rossi"

    def reserve(table: "Table") -> str:  # noqa: F821 - a hint that does not resolve
        return "reserved"

    with pytest.raises(ToolError, match=r"tool 'reserve': cannot read its signature and type hints \(name 'Table'"):
        Tool.of(reserve)


def test_the_schema_is_built_once_per_tool_and_a_renamed_tool_gets_its_own():
    tool = Tool.of(book_table)
    assert tool.spec() is tool.spec(), "pydantic builds the schema once, not on every request"
    assert tool.input_schema() is tool.spec()["input_schema"]
    renamed = tools_by_name({"reserve": tool})["reserve"]
    assert renamed.spec()["name"] == "reserve" and tool.spec()["name"] == "book_table"


BOOKING = [Say("Book a table for two at eight, name Rossi.", pause=0.4), Say("Thanks.", pause=0.8)]


def _booking_reply() -> ScriptedReply:
    arguments = {"name": "Rossi", "people": 2, "time": "20:00"}
    return ScriptedReply("Done: {result}.", tool="book_table", arguments=arguments)


def _audit(out) -> list[dict]:
    return [json.loads(line) for line in (out / "tools.jsonl").read_text().splitlines()]


def test_a_slow_tool_gets_a_filler_line_and_its_result_and_audit(tmp_path):
    tool = Tool.of(book_table, filler="One moment, I'm booking that.", filler_after_s=0.5)
    result = run_call(BOOKING, tmp_path, replies=[_booking_reply(), "Bye."], tools={"book_table": tool})
    first = result.turns[0]
    assert first.data["bot_text"].startswith("Done: {'booked': True")
    spoken = [line["heard"] for line in result.transcript if line["speaker"] == "bot"]
    assert spoken[0].startswith("One moment, I'm booking that. Done:")
    # The filler is what the caller hears first: voice-to-voice is measured to it, not to the tool's answer.
    assert first.voice_to_voice_ms < 1500
    [entry] = _audit(tmp_path)
    assert entry["tool"] == "book_table" and entry["outcome"] == "ok" and entry["epoch"] == first.turn
    assert entry["arguments"] == {"name": "Rossi", "people": 2, "time": "20:00"}
    assert entry["result"]["booked"] is True and entry["duration_s"] == pytest.approx(3.0, abs=0.01)
    tool_messages = [m for m in result.conversation.messages if m.role == "tool"]
    assert [m.tool.name for m in tool_messages] == ["book_table"]


def test_each_invocation_is_in_the_audit_log_as_soon_as_it_ends(tmp_path):
    def audited_so_far() -> int:
        """How many tool invocations the audit log holds."""
        return len((tmp_path / "tools.jsonl").read_text().splitlines())

    replies = [_booking_reply(), ScriptedReply("{result} so far.", tool="audited_so_far")]
    tools = {"book_table": Tool.of(book_table), "audited_so_far": Tool.of(audited_so_far)}
    result = run_call(BOOKING, tmp_path, replies=replies, tools=tools)
    booking, count = _audit(tmp_path)
    assert booking["tool"] == "book_table" and count["tool"] == "audited_so_far"
    assert count["result"] == 1, "the booking was on disk while the call went on"
    assert result.turns[1].data["bot_text"] == "1 so far."


def test_a_sync_tool_doing_real_work_takes_no_virtual_time(tmp_path):
    import time

    def check_availability(time_: str) -> str:
        """Whether a table is free at that time."""
        time.sleep(0.3)  # real work in the tool's thread: 0.3 s of wall time, many times the virtual ticks in 1 s
        return "free"

    tool = Tool.of(check_availability, timeout_s=1.0)
    reply = ScriptedReply("It is {result}.", tool="check_availability", arguments={"time_": "20:00"})
    result = run_call(BOOKING, tmp_path, replies=[reply, "Bye."], tools=[tool])
    [entry] = _audit(tmp_path)
    assert entry["outcome"] == "ok", "virtual time ran past the tool's timeout while its thread worked"
    assert entry["duration_s"] == 0.0, "computation takes no virtual time"
    assert result.turns[0].data["bot_text"] == "It is free."


def test_what_the_model_says_before_a_tool_call_is_spoken_while_the_tool_runs(tmp_path):
    arguments = {"name": "Rossi", "people": 2, "time": "20:00"}
    reply = ScriptedReply("Done: {result}.", tool="book_table", arguments=arguments, preamble="Let me book that.")
    result = run_call(BOOKING, tmp_path, replies=[reply, "Bye."], tools={"book_table": Tool.of(book_table)})
    first = result.turns[0]
    assert first.marks["out.first_play"] < first.marks["tool.end:call_1"], "the caller hears it during the 3 s tool"
    assert first.data["bot_text"].startswith("Let me book that. Done: {'booked': True")
    assert first.heard[:5] == ["Let", "me", "book", "that.", "Done:"], "two rounds, two sentences, no glued word"
    [bot, *_] = [line["heard"] for line in result.transcript if line["speaker"] == "bot"]
    assert bot.startswith("Let me book that. Done:")


BARGE_IN = [
    Say("Book a table for two at eight, name Rossi.", pause=0.4),
    Say("Actually wait, make it nine.", barge_in=0.9),
    Say("Thanks.", pause=0.8),
]


@pytest.mark.parametrize("policy", ["cancel", "finish"])
def test_barge_in_cancels_or_finishes_the_tool_by_policy(tmp_path, policy):
    tool = Tool.of(book_table, filler="One moment, I'm booking that.", filler_after_s=0.3, on_barge_in=policy)
    replies = [_booking_reply(), "Sure, nine then.", "Bye."]
    result = run_call(BARGE_IN, tmp_path, replies=replies, tools={"book_table": tool})
    assert result.turns[0].interrupted, "the caller cut the filler off"
    [entry] = _audit(tmp_path)
    tool_messages = [m for m in result.conversation.messages if m.role == "tool"]
    if policy == "cancel":
        assert entry["outcome"] == "cancelled" and "result" not in entry
        assert entry["duration_s"] < 3.0
        assert tool_messages == [], "a cancelled tool leaves nothing in the conversation"
    else:
        assert entry["outcome"] == "finished-after-barge-in" and entry["result"]["booked"] is True
        assert entry["duration_s"] == pytest.approx(3.0, abs=0.01)
        assert [m.tool.result["booked"] for m in tool_messages] == [True], "the booking made is remembered"
    transcript = json.loads((tmp_path / "transcript.json").read_text())
    assert [m["role"] for m in transcript["conversation"]].count("tool") == (policy == "finish")


def test_a_finish_tool_still_running_is_named_to_the_model_until_its_result_is_in_the_conversation(tmp_path):
    async def book_table(name: str, people: int, time: str = "19:00") -> dict:
        """Book a table, through a slow booking system."""
        await asyncio.sleep(12.0)
        return {"booked": True}

    tool = Tool.of(book_table, timeout_s=30, filler="One moment.", filler_after_s=0.3, on_barge_in="finish")
    replies = iter([_booking_reply(), "Sure, nine then.", "Bye."])
    asked: list[EndOfTurn] = []

    def reply(turn: EndOfTurn) -> ScriptedReply | str:
        asked.append(turn)
        return next(replies)

    script = [*BARGE_IN[:2], Silence(8.0), BARGE_IN[2]]  # the booking ends in the silence
    result = run_call(script, tmp_path, replies=reply, tools={"book_table": tool})
    first, barge_in, thanks = asked
    assert first.system == barge_in.system.split("\n\n")[0] == thanks.system
    # The caller cut the booking's reply off 0.9 s in; the 12 s booking runs on through their next turn.
    assert barge_in.system.endswith(
        "\n\nStill running, called earlier in this call: book_table(name='Rossi', people=2, time='20:00'). Their "
        "results will follow; do not call them again for the same request."
    )
    assert not any(m.role == "tool" for m in barge_in.context)
    assert [m.tool.name for m in thanks.context if m.tool is not None] == ["book_table"], "done: in the conversation"
    assert result.outcome == "ended"


def test_a_tool_that_fails_after_the_barge_in_puts_its_error_on_the_turn_that_called_it(tmp_path):
    async def book_table(name: str, people: int, time: str = "19:00") -> dict:
        """Book a table at the restaurant.

        Args:
            name: who the booking is for
            people: how many people are coming
            time: when, as HH:MM
        """
        await asyncio.sleep(3.0)
        raise RuntimeError("the booking system is down")

    tool = Tool.of(book_table, filler="One moment.", filler_after_s=0.3, on_barge_in="finish")
    replies = [_booking_reply(), "Sure, nine then.", "Bye."]
    result = run_call(BARGE_IN, tmp_path, replies=replies, tools={"book_table": tool})
    called, barge_in, _ = result.turns
    assert called.interrupted and "tool.end:call_1" in called.marks
    assert "the booking system is down" in called.data["error"] and "error" in called.late
    assert "error" not in barge_in.data, "the barge-in's turn was fine"


def test_a_finish_tool_runs_to_its_end_when_the_call_ends_right_after_the_barge_in(tmp_path):
    async def book_slowly(name: str, people: int, time: str) -> dict:
        """Book a table, through a slow booking system."""
        await asyncio.sleep(20.0)
        return {"booked": True}

    tool = Tool.of(book_slowly, timeout_s=30, filler="One moment.", filler_after_s=0.3, on_barge_in="finish")
    reply = ScriptedReply("Done: {result}.", tool="book_slowly", arguments={"name": "R", "people": 2, "time": "20:00"})
    script = [Say("Book a table for two at eight, name Rossi.", pause=0.4), Say("Thanks, bye.", barge_in=0.9)]
    result = run_call(script, tmp_path, replies=[reply, "Bye."], tools=[tool])
    [entry] = _audit(tmp_path)
    assert entry["outcome"] == "finished-after-barge-in" and entry["result"]["booked"] is True
    assert entry["duration_s"] == pytest.approx(20.0, abs=0.01), "the call ending did not cut the booking"
    assert [m.tool.name for m in result.conversation.messages if m.role == "tool"] == ["book_slowly"]


def test_a_tools_own_timeout_is_its_error_not_the_per_tool_timeout(tmp_path):
    async def lookup() -> str:
        """Look up a free table (over an HTTP client with its own 0.2 s deadline)."""
        async with asyncio.timeout(0.2):
            await asyncio.sleep(1.0)
        return "free"

    reply = ScriptedReply("Sorry, {result}.", tool="lookup")
    run_call(BOOKING, tmp_path, replies=[reply, "Bye."], tools=[Tool.of(lookup, timeout_s=10)])
    [entry] = _audit(tmp_path)
    assert entry["outcome"] == "error" and entry["error"] == "tool 'lookup' raised TimeoutError: "
    assert entry["duration_s"] == pytest.approx(0.2)


def test_a_tool_that_times_out_gives_the_model_an_error_and_an_error_frame(tmp_path):
    tool = Tool.of(book_table, timeout_s=1.0)
    reply = ScriptedReply("Sorry, {result}.", tool="book_table", arguments={"name": "Rossi", "people": 2})
    result = run_call(BOOKING, tmp_path, replies=[reply, "Bye."], tools={"book_table": tool})
    [entry] = _audit(tmp_path)
    assert entry["outcome"] == "timeout" and entry["error"] == "tool 'book_table' timed out after 1 s"
    assert "timed out after 1 s" in result.turns[0].data["bot_text"]
    transcript = json.loads((tmp_path / "transcript.json").read_text())
    assert transcript["status"] == "ended"
    turn = result.turns[0].turn  # the error is on the turn whose reply called the tool
    assert transcript["errors"] == [
        {"turn": turn, "stage": "llm", "error": "llm: tool 'book_table' timed out after 1 s", "fatal": False}
    ]


def test_a_non_serializable_result_is_a_named_error_and_the_call_goes_on(tmp_path):
    def lookup() -> object:
        return object()

    reply = ScriptedReply("Hmm, {result}.", tool="lookup")
    result = run_call(BOOKING, tmp_path, replies=[reply, "Bye."], tools={"lookup": lookup})
    [entry] = _audit(tmp_path)
    assert entry["outcome"] == "error" and "cannot be sent to the model as JSON" in entry["error"]
    assert result.outcome == "ended" and len(result.turns) == 2
    errors = json.loads((tmp_path / "transcript.json").read_text())["errors"]
    assert errors[0]["stage"] == "llm" and "tool 'lookup' returned a object" in errors[0]["error"]


def test_a_huge_result_reaches_neither_the_model_nor_the_audit_log_and_the_call_goes_on(tmp_path):
    def export_bookings() -> str:
        """Every booking ever made, as text."""
        return "Rossi, 2, 20:00\n" * 62_500  # a megabyte

    reply = ScriptedReply("Hmm, {result}.", tool="export_bookings")
    result = run_call(BOOKING, tmp_path, replies=[reply, "Bye."], tools=[export_bookings])
    error = (
        "tool 'export_bookings' returned 1,000,000 characters, over its limit of 20,000 (max_result_chars); the "
        "result was not sent"
    )
    assert result.outcome == "ended" and len(result.turns) == 2
    assert result.turns[0].data["bot_text"] == f"Hmm, an error ({error})."
    [entry] = _audit(tmp_path)
    assert entry["outcome"] == "error" and entry["error"] == error
    assert entry["result_chars"] == 1_000_000 and "result" not in entry
    assert (tmp_path / "tools.jsonl").stat().st_size < 1000, "the audit log holds the size, not the megabyte"
    [kept] = [m.tool for m in result.conversation.messages if m.role == "tool"]
    assert kept.error == error and kept.result is None, "the conversation does not carry it to every later request"


def test_tools_by_import_path_in_config(tmp_path):
    config, _ = parse_config(
        {
            **{kind: {"provider": "scripted"} for kind in ("vad", "stt", "llm", "tts")},
            "tools": [{"function": "voxpipe.demo:check_availability", "timeout_s": 2, "on_barge_in": "finish"}],
        }
    )
    [tool] = config_tools(config).values()
    assert tool.name == "check_availability" and tool.timeout_s == 2 and tool.on_barge_in == "finish"
    assert tool.input_schema()["required"] == ["time", "people"]
    assert tool.max_result_chars == 20_000


def test_a_tools_result_limit_is_set_in_config():
    tools = [{"function": "voxpipe.demo:check_availability", "max_result_chars": 500}]
    config, _ = parse_config(
        {**{kind: {"provider": "scripted"} for kind in ("vad", "stt", "llm", "tts")}, "tools": tools}
    )
    [tool] = config_tools(config).values()
    assert tool.max_result_chars == 500


def test_a_tool_path_that_does_not_import_names_the_key():
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {
                **{kind: {"provider": "scripted"} for kind in ("vad", "stt", "llm", "tts")},
                "tools": [{"function": "voxpipe.demo:no_such_tool"}],
            }
        )
    assert "tools[0].function: tool path 'voxpipe.demo:no_such_tool'" in str(caught.value)
    assert "has no function 'no_such_tool'" in str(caught.value)


@pytest.mark.timeout(20)
def test_a_tool_that_awaits_something_cancelled_fails_as_a_tool_and_the_call_goes_on(tmp_path):
    async def lookup() -> str:
        """Look up a free table (a request shared with another caller, who cancelled it)."""
        shared = asyncio.get_running_loop().create_future()
        shared.cancel()
        return await shared

    reply = ScriptedReply("Sorry, {result}.", tool="lookup")
    result = run_call(BOOKING, tmp_path, replies=[reply, "Bye."], tools=[Tool.of(lookup)])
    [entry] = _audit(tmp_path)
    error = "tool 'lookup' raised CancelledError (it awaited something that was cancelled)"
    assert entry["outcome"] == "error" and entry["error"] == error, "not taken for the reply being cancelled"
    assert result.outcome == "ended"
    assert [turn.data["bot_text"] for turn in result.turns] == [f"Sorry, an error ({error}).", "Bye."]


# A sync tool runs in a thread, which nothing can stop. These run the reasoner alone on a real clock, so the thread
# can be held in the middle of its work while the reply is interrupted or times out.


class ReasonerAlone:
    """ScriptedLLM between a tap (what it sends upstream: tool results for the conversation) and a sink."""

    def __init__(self, reply: ScriptedReply, tool: Tool, **llm: Any) -> None:
        self.audit: list[dict[str, Any]] = []
        self.audited = asyncio.Event()
        self.llm = ScriptedLLM([reply], ttft_s=0.0, tools=[tool], audit=self.keep, **llm)
        self.head = Tap("head")
        self.pipeline = Pipeline([self.head, self.llm, Collect()], clock=RealClock())

    async def start(self, text: str) -> asyncio.Task[str]:
        running = asyncio.create_task(self.pipeline.run())
        await asyncio.sleep(0)
        await self.turn(text)
        return running

    async def turn(self, text: str) -> None:
        """The caller's next turn (the scripted reply again)."""
        epoch = self.pipeline.next_epoch()
        turn = EndOfTurn(epoch=epoch, text=text, at=0.0, context=(Message("user", text),))
        await self.llm.receive(turn, DOWNSTREAM)

    def keep(self, entry: Any) -> None:
        self.audit.append(entry)
        self.audited.set()

    async def audited_entries(self, count: int) -> None:
        while len(self.audit) < count:
            self.audited.clear()
            await self.audited.wait()

    def results(self) -> list[ToolResult]:
        return [seen.frame for seen in self.head.log if isinstance(seen.frame, ToolResult)]


class BlockingBooking:
    """A sync booking tool that holds its thread until released."""

    def __init__(self) -> None:
        self.started, self.release = threading.Event(), threading.Event()
        self.made: list[str] = []
        self.threads: list[str] = []  # the threads it ran on

    def book(self, name: str) -> str:
        """Book a table.

        Args:
            name: who for
        """
        self.threads.append(threading.current_thread().name)
        self.started.set()
        self.release.wait(10)
        self.made.append(name)
        return "booked"


@pytest.mark.timeout(20)
async def test_a_barge_in_lets_a_sync_tool_finish_and_keeps_what_it_did():
    booking = BlockingBooking()
    tool = Tool.of(booking.book, on_barge_in="cancel")  # a thread cannot be cancelled: "finish" in effect
    alone = ReasonerAlone(ScriptedReply("Done: {result}.", tool="book", arguments={"name": "Rossi"}), tool)
    running = await alone.start("Book for Rossi.")
    assert await asyncio.to_thread(booking.started.wait, 10)
    await alone.pipeline.interrupt(alone.llm)  # the caller barges in while the thread books
    booking.release.set()
    await alone.pipeline.end()
    assert await running == "ended"
    assert booking.made == ["Rossi"]
    [entry] = alone.audit
    assert entry["outcome"] == "finished-after-barge-in" and entry["result"] == "booked", "not 'cancelled'"
    assert [result.result for result in alone.results()] == ["booked"], "the booking reaches the conversation"


@pytest.mark.timeout(20)
async def test_a_sync_tool_that_times_out_runs_on_and_what_it_did_is_audited_when_it_ends():
    booking = BlockingBooking()
    tool = Tool.of(booking.book, timeout_s=0.05)
    alone = ReasonerAlone(ScriptedReply("Sorry, {result}.", tool="book", arguments={"name": "Rossi"}), tool)
    running = await alone.start("Book for Rossi.")
    await alone.audited.wait()  # the timeout's entry
    booking.release.set()  # the thread was still booking
    await alone.pipeline.end()
    assert await running == "ended"
    timed_out, late = alone.audit
    assert timed_out["outcome"] == "timeout"
    assert timed_out["error"] == "tool 'book' timed out after 0.05 s (its thread runs on)"
    assert late["outcome"] == "finished-after-timeout" and late["result"] == "booked", "the booking made is on record"
    assert late["call_id"] == timed_out["call_id"]
    assert [result.error for result in alone.results()] == [timed_out["error"]], "the model heard it timed out"


def test_a_call_in_a_reused_output_directory_audits_only_its_own_tool_calls(tmp_path):
    for _ in range(2):
        run_call(BOOKING, tmp_path, replies=[_booking_reply(), "Bye."], tools={"book_table": Tool.of(book_table)})
    [entry] = _audit(tmp_path)
    assert entry["tool"] == "book_table"


def test_an_audit_log_asked_to_append_keeps_what_the_file_holds(tmp_path):
    path = tmp_path / "tools.jsonl"
    path.write_text('{"tool":"earlier"}\n')
    log = ToolAuditLog(path, append=True)
    log({"tool": "book_table"})
    log.close()
    assert [entry["tool"] for entry in _audit(tmp_path)] == ["earlier", "book_table"]


def test_a_call_that_never_starts_leaves_the_last_calls_tool_log_alone(tmp_path, monkeypatch):
    run_call(BOOKING, tmp_path, replies=[_booking_reply(), "Bye."], tools={"book_table": Tool.of(book_table)})
    monkeypatch.delenv("DEEPGRAM_API_KEY", raising=False)
    config, settings = parse_config(
        {
            "stt": {"provider": "deepgram"},
            "llm": {"provider": "scripted"},
            "tools": [{"function": "tests.test_tools:book_table"}],
        }
    )
    with pytest.raises(ConfigError, match="no API key for Deepgram"):
        run_configured_call(config, settings, BOOKING, tmp_path)
    [entry] = _audit(tmp_path)
    assert entry["tool"] == "book_table"


@pytest.mark.timeout(20)
async def test_a_hung_sync_tool_holds_a_thread_of_the_reasoner_not_one_that_resolves_host_names():
    # The loop's default executor also runs getaddrinfo for every connection; one thread of it, so a tool holding
    # it would stall every lookup.
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=1, thread_name_prefix="default"))
    booking = BlockingBooking()
    alone = ReasonerAlone(
        ScriptedReply("Sorry, {result}.", tool="book", arguments={"name": "Rossi"}),
        Tool.of(booking.book, timeout_s=0.05),
    )
    running = await alone.start("Book for Rossi.")
    try:
        await alone.audited_entries(1)  # timed out, the thread still booking
        assert booking.made == [] and booking.threads[0].startswith("llm-tool")
        # Not a timing check: without threads of its own, the lookup waits for the tool's 10 s.
        resolved = await asyncio.wait_for(loop.getaddrinfo("127.0.0.1", 80), 5)
        assert resolved[0][4][0] == "127.0.0.1"
    finally:
        booking.release.set()
    await alone.audited_entries(2)
    await alone.pipeline.end()
    assert await running == "ended"
    assert [entry["outcome"] for entry in alone.audit] == ["timeout", "finished-after-timeout"]


@pytest.mark.timeout(20)
async def test_with_every_tool_thread_held_by_a_hung_tool_the_next_sync_tool_is_a_clear_error():
    booking = BlockingBooking()
    reply = ScriptedReply("Sorry, {result}.", tool="book", arguments={"name": "Rossi"})
    alone = ReasonerAlone(reply, Tool.of(booking.book, timeout_s=0.05), tool_threads=1)
    running = await alone.start("Book for Rossi.")
    try:
        await alone.audited_entries(1)
        await alone.turn("Hello? Book for Rossi.")
        await alone.audited_entries(2)
    finally:
        booking.release.set()
    await alone.audited_entries(3)
    await alone.pipeline.end()
    assert await running == "ended"
    timed_out, refused, late = alone.audit
    assert timed_out["outcome"] == "timeout" and late["outcome"] == "finished-after-timeout"
    error = (
        "tool 'book' cannot run: all 1 tool threads are taken by sync tools still running ('book'; a thread cannot "
        "be stopped, so one that hangs keeps its thread)"
    )
    assert refused["outcome"] == "error" and refused["error"] == error, "refused at once, not queued to time out"
    assert booking.made == ["Rossi"], "the refused call never ran"
    assert [result.error for result in alone.results()] == [timed_out["error"], error], "the model heard why"


@pytest.mark.timeout(20)
async def test_a_sync_tool_still_running_when_the_call_ends_does_not_hang_its_end():
    booking = BlockingBooking()
    reply = ScriptedReply("Sorry, {result}.", tool="book", arguments={"name": "Rossi"})
    alone = ReasonerAlone(reply, Tool.of(booking.book, timeout_s=0.05), thread_grace_s=0.1)
    try:
        running = await alone.start("Book for Rossi.")
        await alone.audited_entries(1)
        await alone.pipeline.end()
        assert await running == "ended"
        assert booking.made == [], "the call ended while the thread was still booking"
    finally:
        booking.release.set()
    timed_out, abandoned = alone.audit
    assert timed_out["outcome"] == "timeout"
    assert abandoned["outcome"] == "abandoned" and abandoned["call_id"] == timed_out["call_id"]
    assert abandoned["error"] == (
        "tool 'book' was still running when the call ended: its thread is left to run (what it did is not known)"
    )


HUNG_TOOL_CALL = """
import sys, threading
from voxpipe.call import run_call
from voxpipe.stages.tools import Tool
from voxpipe.testing import Say, ScriptedReply

def book_table(name: str) -> str:
    '''Book a table.'''
    threading.Event().wait()  # a booking service that never answers, called without a timeout

reply = ScriptedReply("Done: {result}.", tool="book_table", arguments={"name": "Rossi"})
tools = {"book_table": Tool.of(book_table, timeout_s=0.2)}
result = run_call([Say("Book for Rossi.", pause=0.4)], sys.argv[1], replies=[reply], tools=tools)
print("call ended:", result.outcome, flush=True)
"""


@pytest.mark.timeout(120)
def test_a_process_whose_call_left_a_sync_tool_hung_still_exits(tmp_path):
    # A thread cannot be stopped, and ThreadPoolExecutor's threads are joined at the interpreter's exit: a hung
    # tool's would keep `voxpipe call` from ever exiting after its call had ended.
    done = subprocess.run(
        [sys.executable, "-c", HUNG_TOOL_CALL, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "call ended: ended" in done.stdout
    assert [entry["outcome"] for entry in _audit(tmp_path)] == ["timeout", "abandoned"]


def test_a_name_the_model_api_refuses_is_an_error_naming_the_tool_and_the_rule():
    # The Messages API takes only ^[a-zA-Z0-9_-]{1,64}$ and refuses every request declaring another name (HTTP 400).
    def check(day: str) -> str:
        """Check a day."""
        return day

    rule = r"a tool's name must be 1 to 64 letters, digits, '_' or '-'"
    for bad in ("book table", "a" * 65, "book_table\n", "réserver"):
        with pytest.raises(ToolError, match=f"tool {re.escape(repr(bad))}: {rule}"):
            Tool.of(check, name=bad)
    with pytest.raises(ToolError, match=f"tool '<lambda>': {rule}"):
        Tool.of(lambda day: day)
    with pytest.raises(ToolError, match=f"tool 'book table': {rule}"):
        tools_by_name({"book table": check})  # a mapping's key is the name
    with pytest.raises(ToolError, match=f"tool 'book table': {rule}"):
        tools_by_name({"book table": Tool.of(check)})  # a Tool renamed by its key
    for good in ("a" * 64, "get-weather_2"):
        assert Tool.of(check, name=good).name == good
        assert list(tools_by_name({good: check})) == [good]


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_tool_that_calls_sys_exit_fails_as_a_tool_and_the_call_goes_on(tmp_path, kind):
    """argparse and click exit on input they refuse: SystemExit out of a task would stop the event loop."""

    def lookup(code: str) -> str:
        """Look a booking up.

        Args:
            code: the booking code
        """
        raise SystemExit(2)

    async def lookup_async(code: str) -> str:
        """Look a booking up.

        Args:
            code: the booking code
        """
        raise SystemExit(2)

    tool = Tool.of(lookup if kind == "sync" else lookup_async, name="lookup")
    reply = ScriptedReply("Hmm, {result}.", tool="lookup", arguments={"code": "A12"})
    result = run_call(BOOKING, tmp_path, replies=[reply, "Bye."], tools=[tool])
    error = "tool 'lookup' raised SystemExit(2) (it called sys.exit)"
    assert result.outcome == "ended" and len(result.turns) == 2
    assert result.turns[0].data["bot_text"] == f"Hmm, an error ({error})."
    [entry] = _audit(tmp_path)
    assert entry["outcome"] == "error" and entry["error"] == error


@pytest.mark.asyncio
async def test_results_json_cannot_carry_exactly_are_named_not_reported_as_the_tool_raising():
    def photo() -> bytes:
        return b"\x89PNG\r\n"

    def ratio() -> float:
        return float("nan")

    def looped() -> list:
        again: list = []
        again.append(again)
        return again

    for function, kind in ((photo, "bytes"), (ratio, "float"), (looped, "list")):
        with pytest.raises(ToolError) as caught:
            await Tool.of(function).invoke({})
        message = str(caught.value)
        assert message.startswith(f"tool {function.__name__!r} returned a {kind}, which cannot be sent to the model")
        assert "raised" not in message


@pytest.mark.asyncio
async def test_arguments_pydantic_reserves_and_positional_only_ones_reach_the_function():
    def query(model_config: str, _table: str, /, model_dump: int = 1) -> list:
        """Run a query.

        Args:
            model_config: which model's configuration
            _table: the table
            model_dump: how many
        """
        return [model_config, _table, model_dump]

    tool = Tool.of(query)
    schema = tool.input_schema()
    assert list(schema["properties"]) == ["model_config", "_table", "model_dump"]
    assert schema["required"] == ["model_config", "_table"]
    assert schema["properties"]["_table"]["description"] == "the table"
    assert await tool.invoke({"model_config": "a", "_table": "b"}) == ["a", "b", 1]
    with pytest.raises(ToolError, match="bad arguments: model_dump: Input should be a valid integer"):
        await tool.invoke({"model_config": "a", "_table": "b", "model_dump": "many"})


def test_a_tool_whose_arguments_cannot_be_described_or_whose_policy_is_mistyped_is_refused_at_once():
    def later(then: Callable[[], None]) -> None:
        """Call back later."""

    with pytest.raises(ToolError, match=r"tool 'later': its arguments cannot be described to a model \(Cannot gen"):
        Tool.of(later)
    with pytest.raises(ToolError, match="tool 'book_table': on_barge_in must be 'cancel' or 'finish', got 'finsh'"):
        Tool.of(book_table, on_barge_in="finsh")  # type: ignore[arg-type]


def test_a_tool_module_that_fails_at_import_or_a_relative_path_is_a_config_error(tmp_path, monkeypatch):
    (tmp_path / "broken_tools.py").write_text("raise RuntimeError('DB_URL is not set')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for path, problem in (
        ("broken_tools:book", "(RuntimeError: DB_URL is not set)"),
        (".relative:book", "(TypeError: the 'package' argument is required"),
    ):
        with pytest.raises(ConfigError) as caught:
            tools = [{"function": path}]
            parse_config({**{k: {"provider": "scripted"} for k in ("vad", "stt", "llm", "tts")}, "tools": tools})
        assert f"tools[0].function: tool path {path!r}: cannot import module" in str(caught.value)
        assert problem in str(caught.value)


def test_a_tool_given_both_in_config_and_in_code_is_an_error_not_a_silent_replacement(tmp_path):
    raw = {
        **{kind: {"provider": "scripted"} for kind in ("vad", "stt", "llm", "tts")},
        "tools": [{"function": "voxpipe.demo:check_availability", "timeout_s": 2, "filler": "One moment."}],
    }
    config, settings = parse_config(raw)

    def check_availability(time: str) -> str:
        """Whether a table is free."""
        return "yes"

    with pytest.raises(ConfigError, match=r"tools\[0\]: a tool named 'check_availability' is also given in code"):
        run_configured_call(config, settings, BOOKING, tmp_path, tools={"check_availability": check_availability})


@pytest.mark.timeout(20)
async def test_an_audit_log_that_cannot_be_written_is_reported_and_the_tools_result_still_reaches_the_model():
    booked: list[str] = []

    async def book(name: str) -> str:
        """Book a table.

        Args:
            name: who for
        """
        booked.append(name)
        return "booked"

    def full_disk(entry: Any) -> None:
        raise OSError(28, "No space left on device")

    reply = ScriptedReply("Done: {result}.", tool="book", arguments={"name": "Rossi"})
    llm = ScriptedLLM([reply], ttft_s=0.0, tools=[Tool.of(book)], audit=full_disk)
    sink = Collect()
    pipeline = Pipeline([Tap("head"), llm, sink], clock=RealClock())
    running = asyncio.create_task(pipeline.run())
    await asyncio.sleep(0)
    turn = EndOfTurn(epoch=pipeline.next_epoch(), text="Rossi.", at=0.0, context=(Message("user", "Rossi."),))
    await llm.receive(turn, DOWNSTREAM)
    await pipeline.end()  # after the reply: the end waits in the reasoner's queue behind the turn
    assert await running == "ended"
    assert [frame.text for frame in sink.frames if isinstance(frame, SpeakableChunk)] == ["Done: booked."]
    assert booked == ["Rossi"] and llm.results["call_1"].result == "booked"
    problem = "llm: tool audit log: could not record the call of 'book' (OSError: [Errno 28] No space left on device)"
    assert [error.error for error in pipeline.errors] == [problem]
