"""`voxpipe call --fake-providers`: the cloud example configs run end to end — official SDKs, loopback fakes, tools,
usage and cost — with no keys and no network."""

import json
import textwrap

import pytest

from voxpipe.cli import main

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
    printed = capsys.readouterr().out
    assert "usage and cost" in printed and "cloud providers faked on 127.0.0.1" in printed


def test_without_keys_the_call_names_every_missing_one_before_anything_connects(tmp_path, monkeypatch, capsys):
    for variable in ("DEEPGRAM_API_KEY", "ANTHROPIC_API_KEY", "CARTESIA_API_KEY"):
        monkeypatch.delenv(variable, raising=False)
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
    import asyncio

    from voxpipe.testing.fakes.anthropic import FakeAnthropic

    fake = FakeAnthropic()  # not started: records alone
    first = asyncio.ensure_future(fake.wait_for("request", within_s=5))
    second = asyncio.ensure_future(fake.wait_for("disconnect", within_s=5))
    await asyncio.sleep(0.01)  # both are waiting
    fake.record("request")
    fake.record("disconnect")
    seen = await asyncio.wait_for(asyncio.gather(first, second), 1)
    assert [s.kind for s in seen] == ["request", "disconnect"]
