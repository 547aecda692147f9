"""A scripted call end to end: artefacts, trace against audio, barge-in, cough, CLI."""

import asyncio
import json
import threading
import wave

import numpy as np
import pytest

import voxpipe.call
from voxpipe import demo
from voxpipe.call import ARTEFACTS, run_call
from voxpipe.cli import main
from voxpipe.measure import measure_voice_to_voice
from voxpipe.testing import Noise, Say


@pytest.fixture(scope="module")
def demo_call(tmp_path_factory):
    out = tmp_path_factory.mktemp("call")
    return run_call(demo.SCRIPT, out, replies=demo.REPLIES, tools=demo.TOOLS)


def test_artefacts_are_written(demo_call):
    for name in ARTEFACTS:
        assert (demo_call.out_dir / name).stat().st_size > 0
    with wave.open(str(demo_call.out_dir / "recording.wav")) as wav:
        assert wav.getnchannels() == 2 and wav.getframerate() == 16000
    lines = (demo_call.out_dir / "trace.jsonl").read_text().splitlines()
    assert len(lines) == len(demo_call.turns) == 5
    record = json.loads(lines[0])
    assert record["voice_to_voice_ms"] == pytest.approx(sum(record["segments_ms"].values()))
    page = (demo_call.out_dir / "report.html").read_text()
    assert "<svg" in page and "Percentiles" in page and "interrupted" in page
    assert 'aria-label="latency percentiles"' in page and "1000 ms" in page
    assert "<p>The call ended.</p>" in page and "Errors reported" not in page


def test_trace_agrees_with_the_recording_within_20_ms(demo_call):
    measured = measure_voice_to_voice(demo_call.out_dir / "recording.wav")
    traced = [t.voice_to_voice_ms for t in demo_call.turns if t.voice_to_voice_ms is not None]
    assert len(measured) == len(traced) == 5
    for trace_ms, audio in zip(traced, measured, strict=True):
        assert abs(trace_ms - audio.voice_to_voice_ms) <= 20


def test_barge_in_cuts_the_reply_and_the_context_keeps_only_heard_words(demo_call):
    cut = [t for t in demo_call.turns if t.interrupted]
    assert len(cut) == 1
    turn = cut[0]
    full = turn.data["bot_text"].split()
    assert 0 < len(turn.heard) < len(full)
    assert turn.heard == full[: len(turn.heard)], "heard words are a prefix of the reply, in order"
    assistant = [m for m in demo_call.conversation.messages if m.role == "assistant"]
    interrupted = [m for m in assistant if m.interrupted]
    assert [m.text for m in interrupted] == [" ".join(turn.heard)]
    transcript = json.loads((demo_call.out_dir / "transcript.json").read_text())
    bot_lines = [line for line in transcript["turns"] if line["speaker"] == "bot" and line["interrupted"]]
    assert bot_lines[0]["heard"] == " ".join(turn.heard)


def test_output_is_silent_from_the_interrupt_on(demo_call):
    turn = next(t for t in demo_call.turns if t.interrupted)
    cut_at = turn.marks["out.interrupted"]
    following = min(t.marks["out.first_play"] for t in demo_call.turns if t.turn > turn.turn)
    with wave.open(str(demo_call.out_dir / "recording.wav")) as wav:
        data = np.frombuffer(wav.readframes(wav.getnframes()), dtype=np.int16).reshape(-1, 2)
    bot = data[:, 1]
    assert np.any(bot[round((cut_at - 0.02) * 16000) : round(cut_at * 16000)]), "the bot was speaking before"
    assert not np.any(bot[round(cut_at * 16000) : round(following * 16000)]), "silent from the interrupt on"


def test_a_cough_over_the_bot_neither_interrupts_nor_starts_a_turn(tmp_path):
    script = [Say("Tell me about your opening hours."), Noise(during_reply=0.8), Say("Thanks.", pause=0.5)]
    replies = ["We are open every day from noon until eleven at night, and on Sundays we close at ten."]
    result = run_call(script, tmp_path, replies=replies)
    assert [t.interrupted for t in result.turns] == [False, False]
    assert [m.role for m in result.conversation.messages] == ["user", "assistant", "user", "assistant"]


def test_backchannel_over_the_bot_does_not_interrupt(tmp_path):
    script = [Say("What do you recommend?"), Say("uh-huh", barge_in=1.0), Say("Great, thanks.", pause=0.5)]
    replies = ["Our lasagne is very popular, and the tiramisu is made here every morning by the chef."]
    result = run_call(script, tmp_path, replies=replies)
    assert not any(t.interrupted for t in result.turns)
    assert [m.text for m in result.conversation.messages if m.role == "user"] == [
        "What do you recommend?",
        "Great, thanks.",
    ]


def test_a_tool_call_runs_and_its_result_is_spoken(demo_call):
    turn = next(t for t in demo_call.turns if "check_availability" in str(t.marks) or t.turn == 2)
    assert any(name.startswith("tool.start") for name in turn.marks)
    assert "a table for 2 at 7:30 pm is free" in turn.data["bot_text"]


def test_cli_call_writes_artefacts_and_prints_the_table(tmp_path, capsys):
    assert main(["call", "--scripted", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "per-turn latency" in printed and "p95" in printed
    for name in ARTEFACTS:
        assert (tmp_path / "out" / name).exists()


def test_cli_refuses_an_out_path_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["call", "--scripted", "--out", str(target)]) == 2
    assert "not a directory" in capsys.readouterr().out


def test_empty_script_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="script is empty"):
        run_call([], tmp_path, replies=["hi"])


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--scripted", "--config", "examples/configs/cloud.yaml"], "--scripted and --config: give one"),
        (["--scripted", "--realtime", "--virtual-time"], "--realtime and --virtual-time: give one"),
        (["--config", "examples/configs/cloud.yaml", "--virtual-time"], "stt.provider: Deepgram is a network service"),
        (
            ["--scenario", "examples/scenarios/booking.yaml", "--caller", "caller.wav"],
            "--caller and --scenario: give one",
        ),
        (["--scripted", "--caller", "caller.wav"], "--caller: the scripted STT does not listen to audio"),
        (
            ["--config", "examples/configs/cloud.yaml", "--fake-providers", "--caller", "caller.wav"],
            "--caller: the faked deepgram STT does not listen to audio",
        ),
    ],
)
def test_cli_call_refuses_flags_that_cannot_go_together(tmp_path, capsys, flags, says):
    assert main(["call", *flags, "--out", str(tmp_path / "out")]) == 2
    assert says in " ".join(capsys.readouterr().out.split())
    assert not (tmp_path / "out" / "transcript.json").exists()


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


@pytest.mark.timeout(60)
def test_transcript_json_is_written_off_the_loop_newest_snapshot_first_and_the_final_one_last(tmp_path, monkeypatch):
    """Each turn's transcript.json is serialised and written by a thread, not the loop carrying the audio; snapshots
    that pile up behind a slow write are coalesced into the newest; the final transcript comes after every per-turn
    write, never alongside one, and is what the file holds."""
    replace_file = voxpipe.call._replace_file
    steps: list[tuple[str, int]] = []  # ("start" | "end", write number): the order the writes ran in
    writes: list[dict] = []  # what each write wrote, and where it ran
    first_may_finish, loop_threads = threading.Event(), set()

    def observed_replace_file(path, text):
        if path.name != "transcript.json":
            return replace_file(path, text)
        document = json.loads(text)
        number = len(writes)
        writes.append(
            {
                "status": document["status"],
                "last_turn": max(line["turn"] for line in document["turns"]),
                "thread": threading.current_thread(),
                "on_a_loop": _loop_running(),
            }
        )
        steps.append(("start", number))
        if number == 0:
            # Turn 1's write lasts until turn 3 has ended: turns 2 and 3 pile up behind it. Bounded, since the old
            # code wrote on the loop itself, where turn 3 never comes while this waits.
            first_may_finish.wait(timeout=5)
        replace_file(path, text)
        steps.append(("end", number))

    def on_turn(record):
        loop_threads.add(threading.current_thread())
        if record.turn == 3:
            first_may_finish.set()

    monkeypatch.setattr(voxpipe.call, "_replace_file", observed_replace_file)
    result = run_call(demo.SCRIPT, tmp_path, replies=demo.REPLIES, tools=demo.TOOLS, on_turn=on_turn)

    assert result.outcome == "ended" and len(result.turns) == 5
    *per_turn, final = writes
    assert [w["status"] for w in per_turn] == ["running"] * len(per_turn) and final["status"] == "ended"
    turns_written = [w["last_turn"] for w in per_turn]
    assert turns_written[0] == 1 and turns_written[1] >= 3, "turn 2's snapshot waited, and turn 3's replaced it"
    assert turns_written == sorted(set(turns_written)), "never an older snapshot after a newer one"
    for write in per_turn:
        assert not write["on_a_loop"] and write["thread"] not in loop_threads
    assert steps == [(step, n) for n in range(len(writes)) for step in ("start", "end")], "one write at a time"
    transcript = json.loads((tmp_path / "transcript.json").read_text())
    assert transcript["status"] == "ended" and {line["turn"] for line in transcript["turns"]} == {1, 2, 3, 4, 5}
    assert not (tmp_path / "transcript.json.partial").exists()


@pytest.mark.timeout(30)
def test_the_snapshot_writer_keeps_only_the_newest_waiting_snapshot_and_close_waits_for_the_write_under_way(caplog):
    from voxpipe.snapshots import SnapshotWriter

    written: list[int] = []
    writing, may_finish, wrote_3, failed = threading.Event(), threading.Event(), threading.Event(), threading.Event()

    def write(snapshot: int) -> None:
        if snapshot in (1, 4):
            writing.set()
            may_finish.wait(timeout=10)
        if snapshot == 0:
            failed.set()
            raise OSError("disk full")
        written.append(snapshot)
        if snapshot == 3:
            wrote_3.set()

    writer = SnapshotWriter(write, name="test writer")
    try:
        writer.submit(1)
        assert writing.wait(timeout=10)
        writer.submit(2)
        writer.submit(3)  # replaces 2, which never gets written
        may_finish.set()
        assert wrote_3.wait(timeout=10)
        assert written == [1, 3]
        writer.submit(0)
        assert failed.wait(timeout=10)  # logged, and the writer goes on
        writing.clear()
        may_finish.clear()
        writer.submit(4)
        assert writing.wait(timeout=10)
        closing = threading.Thread(target=writer.close)
        closing.start()
        closing.join(timeout=0.2)
        assert closing.is_alive(), "close() returned while a write was under way"
        may_finish.set()
        closing.join(timeout=10)
        assert not closing.is_alive()
        assert written == [1, 3, 4]
        writer.submit(5)  # after close: ignored, it would overwrite what the owner wrote last
        assert written == [1, 3, 4]
    finally:
        may_finish.set()
        writer.close()
    assert "test writer: writing a snapshot failed" in caplog.text and "disk full" in caplog.text
