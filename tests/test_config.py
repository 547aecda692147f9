"""Config files: schema, provider registry, ${VAR} interpolation, clear errors naming the key path."""

import textwrap

import pytest
import yaml

from voxpipe.cli import main
from voxpipe.config import ConfigError, Package, Registry, load_config, parse_config
from voxpipe.config.env import interpolate
from voxpipe.scenario import load_scenario

SCRIPTED = {kind: {"provider": "scripted"} for kind in ("vad", "stt", "llm", "tts")}


def printed(capsys) -> str:
    """What a command printed, with Rich's line wrapping undone."""
    return " ".join(capsys.readouterr().out.split())


def write(tmp_path, text: str, name: str = "pipeline.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_example_configs_validate():
    config, settings = load_config("examples/configs/scripted.yaml")
    assert config.llm.provider == "scripted"
    assert settings["llm"].replies[0].startswith("Of course")
    assert settings["vad"].stop_ms == 500


def test_defaults_are_the_embedded_stack():
    from voxpipe.config.schema import PipelineConfig

    defaults = PipelineConfig()
    assert [defaults.stage(k).provider for k in ("vad", "stt", "llm", "tts")] == ["silero", "whisper", "llama", "piper"]


def test_unknown_provider_names_the_key_and_the_choices():
    with pytest.raises(ConfigError) as caught:
        parse_config({**SCRIPTED, "llm": {"provider": "lama"}})
    message = str(caught.value)
    assert "llm.provider: unknown llm provider 'lama'" in message
    assert "allowed: anthropic, llama, scripted" in message


def test_bad_values_and_unknown_keys_are_named_by_key_path(tmp_path):
    path = write(
        tmp_path,
        """
        audio: {sample_rate: 44100}
        turn: {min_words: -1}
        vad: {provider: scripted}
        stt: {provider: scripted}
        llm: {provider: scripted}
        tts: {provider: scripted}
        """,
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert str(path) in message
    assert "audio.sample_rate" in message and "8000, 16000, 24000 or 48000" in message
    assert "turn.min_words" in message


def test_a_backchannel_of_more_than_one_word_is_named(tmp_path):
    path = write(tmp_path, "turn: {backchannels: [yeah, got it]}")
    with pytest.raises(ConfigError, match=r"turn.backchannels: .*backchannel 'got it' is not one word"):
        load_config(path)


def test_provider_settings_errors_name_the_stage_key(tmp_path):
    path = write(
        tmp_path,
        """
        vad: {provider: scripted, stop_ms: -5}
        stt: {provider: scripted}
        llm: {provider: scripted, temprature: 0.5}
        tts: {provider: scripted}
        """,
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "vad.stop_ms: input should be greater than 0" in message
    assert "llm.temprature: is not a known key" in message
    assert "replies" in message, "the allowed keys are listed"


def test_env_interpolation_and_missing_variable():
    assert interpolate({"a": "key-${VOX_KEY}", "b": ["${NOPE:-fallback}"]}, {"VOX_KEY": "s3cret"}) == {
        "a": "key-s3cret",
        "b": ["fallback"],
    }
    with pytest.raises(ConfigError, match=r"llm\.model: refers to the environment variable MODEL_DIR"):
        interpolate({"llm": {"model": "${MODEL_DIR}/gemma.gguf"}}, {})


def test_an_unset_variable_in_an_api_key_is_a_missing_key_naming_it(monkeypatch):
    """The form the missing-key message recommends (api_key: ${VAR}) must not fail where the key is not set:
    validate needs no keys, and the provider's own check names the variable when a call needs it — never taking
    another key in its place."""
    assert interpolate({"stt": {"api_key": "${DEEPGRAM_API_KEY}"}}, {}) == {"stt": {"api_key": "${DEEPGRAM_API_KEY}"}}
    assert interpolate({"stt": {"api_key": "${DEEPGRAM_API_KEY}"}}, {"DEEPGRAM_API_KEY": "k"}) == {
        "stt": {"api_key": "k"}
    }
    monkeypatch.delenv("DEEPGRAM_API_KEY", raising=False)
    _, settings = parse_config({**SCRIPTED, "stt": {"provider": "deepgram", "api_key": "${DEEPGRAM_API_KEY}"}})
    assert settings["stt"].api_key_or_none() is None
    with pytest.raises(ConfigError, match=r"stt\.api_key: no API key for Deepgram: set the environment variable"):
        settings["stt"].require_api_key("stt")
    monkeypatch.setenv("DEEPGRAM_API_KEY", "the usual key, maybe another account's")
    _, settings = parse_config({**SCRIPTED, "stt": {"provider": "deepgram", "api_key": "${MY_DEEPGRAM_KEY}"}})
    assert settings["stt"].api_key_or_none() is None
    with pytest.raises(ConfigError, match=r"stt\.api_key refers to \$MY_DEEPGRAM_KEY, which is not set"):
        settings["stt"].require_api_key("stt")


def test_yaml_errors_and_missing_files_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: invalid config\n  \(top level\): file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = write(tmp_path, "vad: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML: line 2"):
        load_config(bad)
    listy = write(tmp_path, "- just\n- a list\n", "list.yaml")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listy)


def test_a_provider_registered_in_code_is_usable_from_config():
    from voxpipe.testing.llm import ScriptedLLM

    class MyLLM(ScriptedLLM):
        pass

    registry = Registry.discover()
    registry.register("llm", "mine", MyLLM)
    config, _ = parse_config({**SCRIPTED, "llm": {"provider": "mine", "ttft_s": 0.1}}, registry)
    assert config.llm.provider == "mine"


def test_a_package_is_named_by_its_top_level_module():
    """find_spec("a.b") imports a: a dotted name would import the SDK that looking it up is meant to spare."""
    assert Package("voxpipe_tests_absent_sdk", "absent-sdk").extra is None
    assert not Package("voxpipe_tests_absent_sdk", "absent-sdk").installed()
    with pytest.raises(ValueError, match="must be a top-level module name"):
        Package("websockets.asyncio", "websockets", "cartesia")


def test_validate_command(tmp_path, capsys):
    assert main(["validate", "examples/configs/scripted.yaml"]) == 0
    assert "ok" in capsys.readouterr().out
    bad = write(tmp_path, "vad: {provider: nope}\n")
    assert main(["validate", str(bad)]) == 1
    assert "unknown vad provider 'nope'" in capsys.readouterr().out


def test_validate_names_the_api_keys_a_call_would_miss(capsys, monkeypatch):
    keys = ("DEEPGRAM_API_KEY", "ANTHROPIC_API_KEY", "CARTESIA_API_KEY")
    for key in keys:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    assert main(["validate", "examples/configs/cloud.yaml"]) == 0, "a config is valid without its keys"
    out = capsys.readouterr().out
    assert "no API key for Deepgram: a call needs $DEEPGRAM_API_KEY (or stt.api_key)" in out
    assert "no API key for Cartesia: a call needs $CARTESIA_API_KEY (or tts.api_key)" in out
    assert "Anthropic" not in out.replace("llm: anthropic", ""), "the key in the environment counts"
    assert main(["validate", "--require-keys", "examples/configs/cloud.yaml"]) == 1
    capsys.readouterr()
    for key in keys:
        monkeypatch.setenv(key, "k")
    assert main(["validate", "--require-keys", "examples/configs/cloud.yaml"]) == 0
    assert "no API key" not in capsys.readouterr().out


def test_scenarios_load_and_bad_ones_are_clear(tmp_path):
    for name in ("booking", "two-barge-ins", "pauses-and-cough"):
        assert load_scenario(f"examples/scenarios/{name}.yaml").steps
    empty = write(tmp_path, "steps: []\n", "empty.yaml")
    with pytest.raises(ConfigError, match="the scenario is empty"):
        load_scenario(empty)
    long = write(tmp_path, "steps:\n  - say: " + "word " * 100 + "\n", "long.yaml")
    with pytest.raises(ConfigError, match=r"steps\[0\]\.say: is 100 words, longer than caller.max_words"):
        load_scenario(long)
    two = write(tmp_path, "steps:\n  - {say: hi, noise: 0.2}\n", "two.yaml")
    with pytest.raises(ConfigError, match="exactly one of say, wav, noise, silence"):
        load_scenario(two)
    missing = write(tmp_path, "steps:\n  - {wav: gone.wav, text: hi}\n", "wav.yaml")
    with pytest.raises(ConfigError, match=r"gone\.wav does not exist"):
        load_scenario(missing)


def test_scripted_config_call_with_scenario(tmp_path, capsys):
    code = main(
        [
            "call",
            "--config",
            "examples/configs/scripted.yaml",
            "--scenario",
            "examples/scenarios/two-barge-ins.yaml",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    import json

    transcript = json.loads((tmp_path / "transcript.json").read_text())
    assert transcript["status"] == "ended"
    assert sum(1 for line in transcript["turns"] if line["speaker"] == "bot" and line["interrupted"]) == 2


def test_a_missing_model_file_is_named_before_anything_loads(tmp_path, capsys):
    path = write(
        tmp_path,
        """
        vad: {provider: scripted}
        stt: {provider: scripted}
        llm: {provider: llama, model: /models/missing.gguf}
        tts: {provider: scripted}
        """,
    )
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert "llm.model: model file /models/missing.gguf does not exist" in out


def test_every_example_config_validates(capsys):
    from pathlib import Path

    for path in sorted(Path("examples/configs").glob("*.yaml")):
        assert main(["validate", str(path)]) == 0, capsys.readouterr().out
    _, settings = load_config("examples/configs/offline-smart-turn.yaml")
    assert settings["vad"].end_of_turn is not None


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_an_empty_file_is_the_embedded_stack(tmp_path, text):
    config, _ = load_config(write(tmp_path, text))
    assert [config.stage(k).provider for k in ("vad", "stt", "llm", "tts")] == ["silero", "whisper", "llama", "piper"]


def test_tools_need_a_reasoner_that_can_call_them(tmp_path, capsys):
    path = write(tmp_path, "llm: {provider: llama}\ntools: [{function: 'voxpipe.demo:check_availability'}]\n")
    assert main(["validate", str(path)]) == 1
    assert "llm.provider: provider 'llama' cannot call tools, and the config gives it 1" in printed(capsys)


def test_two_tools_with_the_same_name_are_refused(capsys):
    tools = [{"function": "voxpipe.demo:check_availability"}, {"function": "voxpipe.demo:book_table"}]
    with pytest.raises(ConfigError, match=r"tools\[2\]: has the name 'check_availability', as tools\[0\] does"):
        parse_config({**SCRIPTED, "tools": [*tools, {"function": "voxpipe.demo:check_availability"}]})
    renamed = {"function": "voxpipe.demo:check_availability", "name": "check_again"}
    config, _ = parse_config({**SCRIPTED, "tools": [*tools, renamed]})
    assert len(config.tools) == 3


def test_a_top_level_error_does_not_hide_the_stages_errors(tmp_path):
    """The example in docs/configuration.md, Errors: every problem at once, "allowed" only where it adds."""
    path = write(
        tmp_path,
        """
        audio: {sample_rate: 44100}
        vad: {provider: silero, stop_ms: 0}
        llm: {provider: scripted, temprature: 0.5}
        tts: {provider: pipr}
        """,
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).splitlines()[1:] == [
        "  audio.sample_rate: input should be 8000, 16000, 24000 or 48000",
        "  vad.stop_ms: input should be greater than 0",
        "  llm.temprature: is not a known key (allowed: provider, on_error, replies, ttft_s, tokens_per_s)",
        "  tts.provider: unknown tts provider 'pipr' (allowed: cartesia, elevenlabs, piper, scripted)",
    ]


def test_unknown_keys_name_the_allowed_ones_and_a_bare_provider_says_what_is_expected():
    with pytest.raises(ConfigError) as caught:
        parse_config({**SCRIPTED, "turn": {"min_speech": 300}, "vad": "silero", "tool": [], "tools": [{"fn": 1}]})
    message = str(caught.value)
    allowed = "min_speech_ms, min_words, backchannels, resume_prompt"
    assert f"turn.min_speech: is not a known key (allowed: {allowed})" in message
    assert "vad: should be a mapping of keys, not a string (allowed: {provider: silero}" in message
    assert "stageconfig" not in message.lower()
    assert "  tool: is not a known key (allowed: version, system_prompt, audio, turn, vad" in message
    assert "tools[0].fn: is not a known key (allowed: function, name, description, timeout_s" in message


def test_pricing_counters_must_be_real_ones():
    from typing import get_args

    from voxpipe.config.schema import Counter
    from voxpipe.pipeline.usage import BUILT_IN_COUNTERS

    assert set(get_args(Counter)) == set(BUILT_IN_COUNTERS)
    with pytest.raises(ConfigError) as caught:
        parse_config({**SCRIPTED, "pricing": {"tts": {"character": 1.0}, "llmm": {}}})
    message = str(caught.value)
    assert (
        "pricing.tts.character: is not a known key (allowed: 'input_tokens', 'output_tokens', 'characters'" in message
    )
    assert "pricing.llmm: is not a known key (allowed: 'vad', 'stt', 'llm' or 'tts')" in message
    config, _ = parse_config({**SCRIPTED, "pricing": {"tts": {"characters": 1.0}}})
    assert config.pricing == {"tts": {"characters": 1.0}}
    for price in ("inf", "nan"):  # YAML's .inf and .nan; a cost of inf is no JSON number in transcript.json
        with pytest.raises(ConfigError, match=r"pricing\.tts\.characters: input should be a finite number"):
            parse_config({**SCRIPTED, "pricing": {"tts": {"characters": float(price)}}})


def test_validate_prints_values_that_look_like_markup_as_they_are(tmp_path, capsys):
    for provider in ("pipr[bold]x", "pipr[/]"):
        path = write(tmp_path, f"tts: {{provider: '{provider}'}}\n")
        assert main(["validate", str(path)]) == 1
        assert f"unknown tts provider '{provider}'" in printed(capsys)


def test_validate_needs_no_key_given_as_an_unset_variable(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DEEPGRAM_API_KEY", raising=False)
    path = write(
        tmp_path,
        """
        vad: {provider: none}
        stt: {provider: deepgram, api_key: "${DEEPGRAM_API_KEY}", speech_events: true}
        llm: {provider: scripted}
        tts: {provider: scripted}
        """,
    )
    assert main(["validate", str(path)]) == 0
    assert "no API key for Deepgram: a call needs $DEEPGRAM_API_KEY (or stt.api_key)" in printed(capsys)
    assert main(["validate", "--require-keys", str(path)]) == 1


def test_scenario_keys_that_do_not_apply_to_the_step_are_refused(tmp_path):
    path = write(
        tmp_path,
        """
        steps:
          - {say: Hello there., during_reply: 0.5, text: ignored}
          - {noise: 0.2, barge_in: 0.8}
          - {silence: 2.0, pause: 5.0}
          - {wav: a.wav, text: My name is Rossi., pause: 0.5}
        """,
        "scenario.yaml",
    )
    (tmp_path / "a.wav").write_bytes(b"")
    with pytest.raises(ConfigError) as caught:
        load_scenario(path)
    assert str(caught.value).splitlines()[1:] == [
        "  steps[0].during_reply: does not apply to a say step (allowed: pause, barge_in)",
        "  steps[0].text: does not apply to a say step (allowed: pause, barge_in)",
        "  steps[1].barge_in: does not apply to a noise step (allowed: pause, during_reply)",
        "  steps[2].pause: does not apply to a silence step, which takes no other key",
    ]


def test_an_unreadable_scenario_names_the_file(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("steps:\n  - say: café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml: invalid config\n  \(top level\): cannot be read"):
        load_scenario(latin1)
    with pytest.raises(ConfigError, match=r"cannot be read"):
        load_scenario(tmp_path)


def test_prompt_cache_tokens_can_be_priced():
    pricing = {"llm": {"cache_write_tokens": 6.25e-6, "cache_read_tokens": 0.5e-6}}
    config, _ = parse_config({**SCRIPTED, "pricing": pricing})
    assert config.pricing == pricing


def test_a_tools_result_limit_must_be_a_positive_number_of_characters():
    tool = {"function": "voxpipe.demo:check_availability"}
    config, _ = parse_config({**SCRIPTED, "tools": [tool]})
    assert config.tools[0].max_result_chars == 20_000
    with pytest.raises(ConfigError) as caught:
        parse_config({**SCRIPTED, "tools": [{**tool, "max_result_chars": 0}]})
    assert "tools[0].max_result_chars: input should be greater than or equal to 1" in str(caught.value)


def test_one_hour_cache_writes_can_be_priced_over_their_list_price():
    from voxpipe.config.prices import LIST_PRICES, price_table

    pricing = {"llm": {"cache_write_1h_tokens": 12.0e-6}}
    config, _ = parse_config({**SCRIPTED, "pricing": pricing})
    assert config.pricing == pricing
    table = price_table({"llm": ("anthropic", "claude-opus-4-7")}, config.pricing)  # as voxpipe.call prices a call
    assert table["llm"]["cache_write_1h_tokens"] == 12.0e-6
    assert table["llm"]["cache_write_tokens"] == LIST_PRICES["llm.anthropic"]["claude-opus-4-7"]["cache_write_tokens"]


def test_list_prices_follow_the_model_and_a_model_without_one_is_named_not_priced_as_another():
    from voxpipe.config.prices import list_price, price_table, unpriced

    opus, haiku = list_price("llm", "anthropic", "claude-opus-4-7"), list_price("llm", "anthropic", "claude-haiku-4-5")
    assert opus is not None and haiku is not None and haiku["output_tokens"] == opus["output_tokens"] / 5
    assert list_price("llm", "anthropic", "claude-haiku-4-5-20251001") == haiku, "a dated snapshot: its model's"
    older_opus = list_price("llm", "anthropic", "claude-opus-4-1")
    assert older_opus is not None and older_opus["input_tokens"] == pytest.approx(15e-6)
    assert list_price("stt", "deepgram", "nova-2") != list_price("stt", "deepgram", "nova-3")
    assert list_price("tts", "piper", None) == {}, "a local provider is not metered"
    stages = {"llm": ("anthropic", "no-such-model"), "tts": ("piper", None), "stt": ("deepgram", "nova-3")}
    assert price_table(stages, {})["llm"] == {}
    assert unpriced(stages, {}) == {
        "llm": "llm: no list price for anthropic model 'no-such-model'; its usage is counted at no cost (set "
        "pricing.llm in the config)"
    }
    partial = unpriced(stages, {"llm": {"input_tokens": 1e-6, "output_tokens": 5e-6}})
    assert partial == {
        "llm": "llm: no list price for anthropic model 'no-such-model', and pricing.llm sets no price for "
        "cache_read_tokens, cache_write_1h_tokens, cache_write_tokens: counted at no cost"
    }, "a price for some counters leaves the others free: said, not hidden"
    every = {counter: 1e-6 for counter in opus}
    assert unpriced(stages, {"llm": every}) == {}, "the config's own prices are enough"


def test_only_a_snapshot_or_alias_of_a_listed_model_takes_its_price():
    from voxpipe.config.prices import list_price

    assert list_price("llm", "anthropic", "claude-opus-4-7-20261101") == list_price(
        "llm", "anthropic", "claude-opus-4-7"
    )
    assert list_price("tts", "cartesia", "sonic-2-2025-03-07") == list_price("tts", "cartesia", "sonic-2")
    assert list_price("stt", "deepgram", "nova-3-general") == list_price("stt", "deepgram", "nova-3")
    for kind, provider, other_model in (
        ("llm", "anthropic", "claude-opus-4-8"),  # not claude-opus-4 at three times the price
        ("llm", "anthropic", "claude-sonnet-4-7"),
        ("llm", "anthropic", "claude-opus-4-9-20270101"),
        ("stt", "deepgram", "nova-3-medical"),
        ("tts", "elevenlabs", "eleven_v3_preview"),
    ):
        assert list_price(kind, provider, other_model) is None, other_model


@pytest.mark.parametrize("word", ["yes", "on", "true", "no"])
def test_a_yaml_boolean_is_not_taken_as_a_price(tmp_path, word):
    path = tmp_path / "priced.yaml"
    path.write_text(yaml.safe_dump(SCRIPTED) + f"pricing:\n  tts:\n    characters: {word}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "pricing.tts.characters: a price is a number of USD per unit, not a boolean" in str(caught.value)


def test_the_resume_prompt_can_be_turned_off_but_not_left_empty():
    from voxpipe.config.build import turn_policy
    from voxpipe.pipeline.turns import DEFAULT_RESUME_PROMPT

    assert turn_policy(parse_config(SCRIPTED)[0]).resume_prompt == DEFAULT_RESUME_PROMPT
    assert turn_policy(parse_config({**SCRIPTED, "turn": {"resume_prompt": None}})[0]).resume_prompt is None
    with pytest.raises(ConfigError) as caught:
        parse_config({**SCRIPTED, "turn": {"resume_prompt": ""}})
    assert "turn.resume_prompt: " in str(caught.value)


def test_a_tool_name_the_model_api_refuses_is_named_by_its_key_path():
    tool = {"function": "voxpipe.demo:check_availability"}
    for bad in ("Book Table", "a" * 65):  # quoted as given, capitals and all
        with pytest.raises(ConfigError) as caught:
            parse_config({**SCRIPTED, "tools": [{**tool, "name": bad}]})
        message = str(caught.value)
        assert f"tools[0].name: {bad!r}: a tool's name must be 1 to 64 letters, digits" in message
    for good in ("a" * 64, "get-weather_2"):
        config, _ = parse_config({**SCRIPTED, "tools": [{**tool, "name": good}]})
        assert config.tools[0].name == good


def test_the_running_tools_note_must_name_the_calls_and_nothing_else():
    llm = {"provider": "anthropic", "api_key": "sk-test"}
    with pytest.raises(ConfigError) as caught:
        parse_config({**SCRIPTED, "llm": {**llm, "running_tools_note": "Still booking {tool} for {name}."}})
    assert (
        "llm.running_tools_note: must hold {calls} (where the running tools are named) and no "
        "other {field}; it holds {tool}, {name}"
    ) in str(caught.value)
    config, _ = parse_config({**SCRIPTED, "llm": {**llm, "running_tools_note": "Noch in Arbeit: {calls}."}})
    assert config.llm.settings["running_tools_note"] == "Noch in Arbeit: {calls}."


@pytest.mark.parametrize(
    ("kind", "provider", "key", "scheme"),
    [
        ("stt", "deepgram", "base_url", "wss"),
        ("llm", "anthropic", "base_url", "https"),
        ("tts", "cartesia", "base_url", "https"),
        ("tts", "cartesia", "websocket_url", "wss"),
        ("tts", "elevenlabs", "base_url", "https"),
    ],
)
def test_a_cloud_url_with_a_bad_port_or_no_host_is_a_config_error_naming_the_key(kind, provider, key, scheme):
    service = {"deepgram": "Deepgram", "anthropic": "Anthropic", "cartesia": "Cartesia", "elevenlabs": "ElevenLabs"}
    for url, problem in (
        (f"{scheme}://api.example.com:443x", "Port could not be cast to integer value as '443x'"),
        (f"{scheme}://api.example.com:99999", "Port out of range 0-65535"),
        (f"{scheme}://:443", "it has no host"),
    ):
        stage = {"provider": provider, key: url, **({"voice": "a-voice"} if provider == "cartesia" else {})}
        with pytest.raises(ConfigError) as caught:
            parse_config({**SCRIPTED, kind: stage})
        assert f"{kind}.{key}: not a URL {service[provider]} can be reached at: {problem}" in str(caught.value)
    extra = {"voice": "a-voice"} if provider == "cartesia" else {}
    with pytest.raises(ConfigError, match=rf"{kind}\.{key}: a base URL for {service[provider]} takes no query"):
        parse_config({**SCRIPTED, kind: {"provider": provider, key: f"{scheme}://api.example.com?x=1", **extra}})
    _, settings = parse_config({**SCRIPTED, kind: {"provider": provider, key: f"{scheme}://h.example/", **extra}})
    assert getattr(settings[kind], key) == f"{scheme}://h.example", "no '//v1/…' once the SDK appends its path"


def test_no_vad_with_an_stt_that_does_not_report_speech_is_an_error_not_a_call_with_no_turns():
    with pytest.raises(ConfigError) as caught:
        parse_config({**SCRIPTED, "vad": {"provider": "none"}, "stt": {"provider": "deepgram"}})
    assert (
        "vad.provider: 'none' leaves nothing to start and end the caller's turns: stt provider 'deepgram' does not "
        "report speech itself as configured (allowed: a VAD such as silero; or an STT that reports speech, e.g. "
        "deepgram with speech_events: true)"
    ) in str(caught.value)
    with pytest.raises(ConfigError, match=r"vad\.provider: 'none' leaves nothing"):
        parse_config({**SCRIPTED, "vad": {"provider": "none"}})
    parse_config({**SCRIPTED, "vad": {"provider": "none"}, "stt": {"provider": "deepgram", "speech_events": True}})


def test_a_rejected_keys_hint_names_where_the_call_took_it(monkeypatch):
    from voxpipe.stages.deepgram_stt import DeepgramSTTSettings

    monkeypatch.setenv("MY_DG_KEY", "from-a-variable")
    assert DeepgramSTTSettings(api_key="k").key_source("stt") == "stt.api_key"
    assert DeepgramSTTSettings().key_source("stt") == "DEEPGRAM_API_KEY"
    assert DeepgramSTTSettings(api_key="  ").key_source("stt") == "DEEPGRAM_API_KEY", "a blank key is no key"
    _, settings = parse_config({**SCRIPTED, "stt": {"provider": "deepgram", "api_key": "${MY_DG_KEY}"}})
    assert settings["stt"].key_source("stt") == "stt.api_key", "a ${VAR} the config names is the config's key"
