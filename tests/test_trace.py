import asyncio
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voxpipe.pipeline import (
    Direction,
    ErrorPolicy,
    Frame,
    JsonlTraceWriter,
    Pipeline,
    Stage,
    TextDelta,
    Tracer,
    TurnRecord,
    VirtualClock,
)
from voxpipe.pipeline.trace import CRITICAL_PATH, SEGMENTS, breakdown, percentile
from voxpipe.pipeline.usage import UsageMeter, cost

MARKS = ["user.speech_end", *(m for m, _ in CRITICAL_PATH)]


def test_segments_add_up_exactly_to_voice_to_voice():
    marks = {name: 10 + i * 0.1234567 for i, name in enumerate(MARKS)}
    segments, v2v, missing = breakdown(marks)
    assert missing == []
    assert sum(segments.values()) == v2v
    assert v2v == round((marks["out.first_play"] - marks["user.speech_end"]) * 1e6)
    assert list(segments) == list(SEGMENTS)


@given(
    st.lists(st.floats(0, 100, allow_nan=False), min_size=len(MARKS), max_size=len(MARKS)),
    st.sets(st.sampled_from(MARKS[1:-1])),
)
def test_breakdown_clamps_out_of_order_and_missing_marks(times, dropped):
    marks = {name: t for name, t in zip(MARKS, times, strict=True) if name not in dropped}
    segments, v2v, missing = breakdown(marks)
    assert set(missing) == dropped
    assert all(us >= 0 for us in segments.values())
    assert (
        sum(segments.values())
        == v2v
        == max(0, round(marks["out.first_play"] * 1e6) - round(marks["user.speech_end"] * 1e6))
    )


def test_turn_without_playout_has_no_voice_to_voice():
    _segments, v2v, missing = breakdown({"user.speech_end": 1.0})
    assert v2v is None and "out.first_play" in missing


def test_tracer_finishes_turns_notifies_observers_and_writes_jsonl(tmp_path):
    tracer = Tracer()
    marks_seen, turns_seen = [], []
    tracer.on_mark(lambda turn, name, at, data: marks_seen.append((turn, name)))
    tracer.on_turn(turns_seen.append)
    writer = JsonlTraceWriter(tmp_path / "trace.jsonl")
    tracer.on_turn(writer)
    for i, name in enumerate(MARKS):
        tracer.mark(1, name, 1.0 + i * 0.1)
    tracer.annotate(1, user_text="hello")
    tracer.mark(1, "out.interrupted", 3.0, heard=["Hi", "there"], played_s=0.5)
    writer.close()
    assert len(marks_seen) == len(MARKS) + 1
    assert [t.turn for t in turns_seen] == [1]
    record = json.loads((tmp_path / "trace.jsonl").read_text())
    assert record["interrupted"] is True
    assert record["heard"] == ["Hi", "there"]
    assert record["voice_to_voice_ms"] == pytest.approx(700.0)
    assert sum(record["segments_ms"].values()) == pytest.approx(700.0)
    assert record["data"]["user_text"] == "hello"


def test_summary_percentiles():
    tracer = Tracer()
    for turn in range(1, 21):
        for i, name in enumerate(MARKS):
            tracer.mark(turn, name, turn * 100 + (turn / 1000 if name == "out.first_play" else 0) + i * 0)
        tracer.finish(turn)
    stat = tracer.summary().stats["voice_to_voice"]
    assert stat.n == 20
    assert stat.p50 == pytest.approx(10.5)
    assert stat.max == pytest.approx(20.0)
    assert percentile([1, 2, 3, 4], 50) == 2.5


def test_usage_counted_for_the_next_turn_is_that_turns_once_it_opens():
    tracer = Tracer()
    meter = UsageMeter(tracer)
    meter.add_for_next_turn("stt", audio_seconds=2.5)  # the caller speaking before turn 1 opens
    meter.open_turn(1)
    meter.add("llm", 1, input_tokens=100, output_tokens=20)
    meter.add_for_next_turn("stt", audio_seconds=1.5)  # after turn 1 opened: turn 2's, which never opens
    tracer.mark(1, "turn.end_detected", 0.0)
    record = tracer.finish(1)
    assert record is not None
    assert record.data["usage"] == {"stt": {"audio_seconds": 2.5}, "llm": {"input_tokens": 100, "output_tokens": 20}}
    assert meter.unassigned == {"stt": {"audio_seconds": 1.5}}
    assert meter.totals["stt"] == {"audio_seconds": 4.0}
    prices = {"stt": {"audio_seconds": 0.01}, "llm": {"input_tokens": 1e-6}}
    assert cost(record.data["usage"], prices) == pytest.approx({"stt": 0.025, "llm": 1e-4, "total": 0.0251})
    with pytest.raises(ValueError, match="stage 'tts' counted a negative characters"):
        meter.add("tts", 1, characters=-3)


def test_usage_for_the_next_turn_taken_by_an_epoch_that_is_no_turn_goes_back_to_unassigned():
    """A cough's STT audio is counted for the next turn; the next epoch to open is a skip-turn error's, which has
    no marks and is no turn. At the end of the call that usage is in `unassigned`, not lost."""
    clock = VirtualClock()

    class FailsOnBad(Stage):
        error_policy = ErrorPolicy.SKIP_TURN

        async def process(self, frame: Frame, direction: Direction) -> None:
            if isinstance(frame, TextDelta) and frame.text == "bad":
                raise RuntimeError("provider said 500")
            await self.push(frame, direction)

    head = Stage(name="turn")
    pipeline = Pipeline([head, FailsOnBad(name="tts"), Stage(name="out")], clock=clock, freeze_heap=False)

    def a_turn(epoch: int, audio_seconds: float) -> None:
        pipeline.usage.add("stt", epoch, audio_seconds=audio_seconds)
        for mark in ("user.speech_end", "out.first_play", "out.done"):
            head.mark(mark, epoch)

    async def main() -> None:
        run = asyncio.create_task(pipeline.run())
        await asyncio.sleep(0)
        a_turn(pipeline.next_epoch(), 1.0)
        pipeline.usage.add_for_next_turn("stt", audio_seconds=2.0)  # a cough over the bot: no turn
        await head.push(TextDelta(epoch=pipeline.epoch, text="bad"))  # skip-turn: opens an epoch with no marks
        a_turn(pipeline.next_epoch(), 3.0)
        await pipeline.end()
        await asyncio.wait_for(run, 5)

    clock.run(main())
    per_turn = [t.data["usage"]["stt"]["audio_seconds"] for t in pipeline.trace.turns]
    assert per_turn == [1.0, 3.0]
    assert pipeline.usage.unassigned == {"stt": {"audio_seconds": 2.0}}
    assert pipeline.usage.totals == {"stt": {"audio_seconds": 6.0}}


def test_a_mark_after_its_turn_finished_amends_that_turns_record_and_breakdown():
    """The LLM's first-token mark of a turn reaches the tracer after the turn finished (the stage unwinding): the
    turn's breakdown counts it, the record names it as late, and no other turn gets it."""
    tracer = Tracer()
    marks_seen: list[tuple[int, str]] = []
    tracer.on_mark(lambda turn, name, at, data: marks_seen.append((turn, name)))
    for name, at in (("user.speech_end", 1.0), ("out.first_play", 2.0), ("out.done", 3.0)):
        tracer.mark(1, name, at)
    [first] = tracer.turns
    assert first.segments_ms["playout"] == pytest.approx(1000.0)
    tracer.mark(2, "user.speech_end", 5.0)  # the next turn is in progress
    tracer.mark(1, "llm.first_token", 1.5)
    tracer.mark(1, "tool.end:call_1", 3.5, duration_s=2.0)
    assert first.segments_ms["llm_ttft"] == first.segments_ms["playout"] == pytest.approx(500.0)
    assert sum(first.segments_us.values()) == first.voice_to_voice_us == 1_000_000
    assert "llm.first_token" not in first.missing
    assert list(first.marks) == ["user.speech_end", "llm.first_token", "out.first_play", "out.done", "tool.end:call_1"]
    assert first.late == ["llm.first_token", "tool.end:call_1", "duration_s"]
    assert marks_seen[-2:] == [(1, "llm.first_token"), (1, "tool.end:call_1")], "observers see late marks too"
    tracer.close()
    second = tracer.turns[1]
    assert second.marks == {"user.speech_end": 5.0} and second.late == [] and "duration_s" not in second.data


def test_a_late_change_reaches_the_trace_file_as_an_amendment_line(tmp_path):
    """A writer that also observes late changes appends the amended record: the last line of a turn is its settled
    record, and the line written as it finished stays as it was."""
    tracer = Tracer()
    writer = JsonlTraceWriter(tmp_path / "trace.jsonl")
    amended: list[TurnRecord] = []
    tracer.on_turn(writer)
    tracer.on_late(writer)
    tracer.on_late(amended.append)
    tracer.mark(1, "user.speech_end", 1.0)
    tracer.mark(1, "out.interrupted", 2.0, heard=[], played_s=0.0)
    tracer.annotate(1, error="ConnectionError: refused", error_stage="tts")
    tracer.mark(1, "user.speech_end", 9.0)  # a mark it has: the first value wins, nothing changed, no line
    writer.close()
    assert amended == tracer.turns, "told once, with the turn's own record"
    first, second = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert first["turn"] == second["turn"] == 1
    assert "error" not in first["data"] and first["late"] == []
    assert second["data"]["error"] == "ConnectionError: refused" and second["late"] == ["error", "error_stage"]
