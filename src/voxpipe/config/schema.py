"""The config file's schema (pydantic) and loading it from YAML, with every error named by its key path.

    system_prompt: You answer the phone at Luigi's.
    audio: {sample_rate: 16000}
    turn: {min_speech_ms: 300, min_words: 1}
    vad: {provider: silero, stop_ms: 500}
    stt: {provider: whisper}
    llm: {provider: llama, max_tokens: 60}
    tts: {provider: piper}

Each stage names its ``provider``; the other keys of that mapping are the provider's own settings, checked
against the provider's ``Settings`` model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from voxpipe.config.env import interpolate
from voxpipe.config.errors import ConfigError
from voxpipe.config.registry import KINDS, Registry
from voxpipe.pipeline.turns import DEFAULT_BACKCHANNELS, DEFAULT_RESUME_PROMPT, backchannel_word
from voxpipe.stages.tools import DEFAULT_MAX_RESULT_CHARS, TOOL_NAME, TOOL_NAME_RULE, ToolError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AudioConfig(Strict):
    sample_rate: Literal[8000, 16000, 24000, 48000] = Field(16000, description="the call's audio rate, Hz")


class TurnConfig(Strict):
    min_speech_ms: float = Field(300.0, ge=0, le=5000, description="caller speech needed before a barge-in")
    min_words: int = Field(1, ge=0, le=20, description="non-backchannel words needed before a barge-in")
    backchannels: list[str] = Field(
        default_factory=lambda: sorted(DEFAULT_BACKCHANNELS), description="words that alone never interrupt"
    )
    resume_prompt: str | None = Field(
        DEFAULT_RESUME_PROMPT,
        min_length=1,
        description="after a barge-in whose utterance held no words, the bot is asked to carry on with this note "
        "as the caller's side (not kept in the conversation); null: stay silent until the caller speaks",
    )

    @field_validator("backchannels")
    @classmethod
    def _one_word_each(cls, entries: list[str]) -> list[str]:
        return [backchannel_word(entry) for entry in entries]


OnError = Literal["stop", "skip-turn", "skip-frame"]


class StageConfig(BaseModel):
    """``provider`` plus that provider's settings (kept as extra keys, validated by the provider's model)."""

    model_config = ConfigDict(extra="allow")

    provider: str = Field(description="registered provider name")
    on_error: OnError | None = Field(
        None,
        description="when the provider fails: stop the call, skip the turn (abandon the reply, carry on) or skip "
        "the frame; unset keeps the provider's own default (stop)",
    )

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ToolConfig(Strict):
    """A tool the reasoner may call: a Python function named by import path, and how it is run."""

    function: str = Field(description="import path, 'package.module:function'")
    name: str | None = Field(
        None,
        json_schema_extra={"pattern": TOOL_NAME.pattern},  # checked by _a_name_the_model_can_take, in words
        description="name the model sees (default: the function's name): 1 to 64 letters, digits, '_' or '-', as "
        "the model's API refuses any other name on every request",
    )
    description: str | None = Field(None, description="what the model is told (default: the docstring)")
    timeout_s: float = Field(10.0, gt=0, le=600, description="the model gets an error result after this long")
    on_barge_in: Literal["cancel", "finish"] = Field(
        "cancel", description="cancel the call with the reply, or finish it and keep the result"
    )
    filler: str | None = Field(None, description="a line spoken if the tool is slow")
    filler_after_s: float = Field(1.5, ge=0, le=60, description="how slow is slow")
    max_result_chars: int = Field(
        DEFAULT_MAX_RESULT_CHARS,
        ge=1,
        le=1_000_000,
        description="longest result sent to the model (characters of its text, or of its JSON); a longer one is an "
        "error result naming the tool, the size and the limit",
    )

    @field_validator("name")
    @classmethod
    def _a_name_the_model_can_take(cls, name: str | None) -> str | None:
        # Not Field(pattern=...): its message quotes the regex, which says less to a user than the rule in words.
        if name is not None and not TOOL_NAME.fullmatch(name):
            raise ValueError(f"{name!r}: a tool's name must be {TOOL_NAME_RULE} (the model's API refuses any other)")
        return name


def _not_a_boolean(value: Any) -> Any:
    # YAML reads yes/no/on/off/true as booleans, which a float field would take as $1 and $0 a unit.
    if isinstance(value, bool):
        raise ValueError("a price is a number of USD per unit, not a boolean (YAML reads yes, no, on and off as ones)")
    return value


# USD per unit: finite, since a cost of inf is no number in transcript.json.
Price = Annotated[float, Field(ge=0, allow_inf_nan=False), BeforeValidator(_not_a_boolean)]

# The usage counters a price can be set for: voxpipe.pipeline.usage's, spelled out so a misspelled one is an error
# rather than a price that never applies.
Counter = Literal[
    "input_tokens",
    "output_tokens",
    "characters",
    "audio_seconds",
    "cache_write_tokens",
    "cache_read_tokens",
    "cache_write_1h_tokens",
]


class TransportConfig(Strict):
    kind: Literal["simulated"] = Field("simulated", description="where the call's audio comes from and goes")


class PipelineConfig(Strict):
    version: Literal[1] = 1
    system_prompt: str = Field("You are a helpful voice assistant. Keep answers short.", min_length=1)
    audio: AudioConfig = Field(default_factory=AudioConfig)
    turn: TurnConfig = Field(default_factory=TurnConfig)
    # The defaults are the embedded, offline stack (DESIGN §9).
    vad: StageConfig = Field(default_factory=lambda: StageConfig(provider="silero"))
    stt: StageConfig = Field(default_factory=lambda: StageConfig(provider="whisper"))
    llm: StageConfig = Field(default_factory=lambda: StageConfig(provider="llama"))
    tts: StageConfig = Field(default_factory=lambda: StageConfig(provider="piper"))
    transport: TransportConfig = Field(default_factory=TransportConfig)
    tools: list[ToolConfig] = Field(default_factory=list)
    pricing: dict[Literal["vad", "stt", "llm", "tts"], dict[Counter, Price]] = Field(
        default_factory=dict,
        description="USD per unit of each usage counter, by stage (input_tokens, output_tokens, characters, "
        "audio_seconds, cache_write_tokens, cache_read_tokens, cache_write_1h_tokens); overrides the provider's list "
        "prices in voxpipe.config.prices",
    )

    def stage(self, kind: str) -> StageConfig:
        config: StageConfig = getattr(self, kind)
        return config

    def providers(self) -> dict[str, str]:
        """Each stage kind's provider name: ``{"vad": "silero", "stt": "deepgram", …}``."""
        return {kind: self.stage(kind).provider for kind in KINDS}


def _path(location: tuple[int | str, ...]) -> str:
    out = ""
    for part in location:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _problems(
    error: ValidationError, prefix: str = "", model: type[BaseModel] | None = None
) -> list[tuple[str, str, str]]:
    """Each error as (key path, problem, what is allowed); ``model`` (the one validated) names the keys allowed
    where an unknown one was given."""
    problems = []
    for item in error.errors():
        location = tuple(item["loc"])
        bad_key = location[-1:] == ("[key]",)  # a mapping's key outside its choices (pricing's)
        if bad_key:
            location = location[:-1]
        path = _path(location)
        if prefix:
            path = f"{prefix}.{path}" if path else prefix
        context = item.get("ctx") or {}
        if bad_key:
            problems.append((path, "is not a known key", str(context.get("expected", ""))))
        elif item["type"] == "extra_forbidden":
            fields = _fields_of(_annotation_at(model, location[:-1])) if model is not None else []
            problems.append((path, "is not a known key", ", ".join(fields)))
        elif item["type"] == "model_type":
            problems.append((path, *_not_a_mapping(location, item["input"], model)))
        elif item["type"] == "value_error":  # a validator's own words, as it wrote them
            problems.append((path, str(context.get("error", item["msg"])), ""))
        else:
            # Only the first letter: the rest may quote the user's own text ("Book Table") or a pattern.
            message = item["msg"][:1].lower() + item["msg"][1:]
            allowed = str(context.get("expected", ""))
            problems.append((path, message, "" if allowed.lower() in message else allowed))
    return problems


def _annotation_at(model: Any, location: tuple[int | str, ...]) -> Any:
    """The type expected at ``location`` inside ``model`` (None where the schema does not say)."""
    annotation = model
    for part in location:
        if isinstance(part, int):
            annotation = next(iter(get_args(annotation)), None)  # list[X] -> X
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel) and part in annotation.model_fields:
            annotation = annotation.model_fields[part].annotation
        else:
            return None
    return annotation


def _fields_of(annotation: Any) -> list[str]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return list(annotation.model_fields)
    return []


def _not_a_mapping(location: tuple[int | str, ...], given: Any, model: type[BaseModel] | None) -> tuple[str, str]:
    """(problem, allowed) for a value given where a mapping of keys is expected."""
    kind = {str: "a string", int: "a number", float: "a number", bool: "true or false", list: "a list"}
    problem = f"should be a mapping of keys, not {kind.get(type(given), 'empty' if given is None else 'a value')}"
    expected = _annotation_at(model, location)
    if expected is StageConfig:
        name = given if isinstance(given, str) and given else "NAME"
        return problem, f"{{provider: {name}}}, with that provider's settings"
    return problem, ", ".join(_fields_of(expected))


def parse_config(data: Any, registry: Registry | None = None) -> tuple[PipelineConfig, dict[str, Any]]:
    """Validate a config mapping; returns the config and each stage's validated provider settings. Every problem
    is reported at once: a top-level one does not hide those of the stages and tools that parsed."""
    if data is None:  # an empty file, or one of comments only: every default (the embedded stack)
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("", f"the file must hold a mapping of keys, not {type(data).__name__}")
    data = interpolate(data)
    problems: list[tuple[str, str, str]] = []
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        problems += _problems(exc, model=PipelineConfig)
        config = _without_failed_keys(data, exc, problems)
    registry = registry or Registry.discover()
    settings: dict[str, Any] = {}
    for kind in KINDS:
        stage = config.stage(kind)
        try:
            provider = registry.get(kind, stage.provider).load()
            settings[kind] = provider.Settings.model_validate(stage.settings)
        except ConfigError as exc:
            problems += exc.problems
            continue
        except ValidationError as exc:
            problems += [
                (
                    path,
                    problem,
                    allowed or _allowed_keys(provider.Settings) if "not a known key" in problem else allowed,
                )
                for path, problem, allowed in _problems(exc, kind)
            ]
            continue
        if kind == "llm" and config.tools and not _supports_tools(provider):
            problems.append(
                (
                    "llm.provider",
                    f"provider {stage.provider!r} cannot call tools, and the config gives it {len(config.tools)}",
                    "a reasoner that can, such as anthropic or scripted; or no tools",
                )
            )
    if config.stage("vad").provider == "none" and "stt" in settings and not _stt_reports_speech(settings["stt"]):
        problems.append(
            (
                "vad.provider",
                f"'none' leaves nothing to start and end the caller's turns: stt provider "
                f"{config.stage('stt').provider!r} does not report speech itself as configured",
                "a VAD such as silero; or an STT that reports speech, e.g. deepgram with speech_events: true",
            )
        )
    for kind, validated in settings.items():
        problems += _missing_model_files(kind, validated)
    problems += _tool_problems(config)
    if problems:
        raise ConfigError.many(problems)
    return config, settings


def _without_failed_keys(
    data: dict[str, Any], error: ValidationError, problems: list[tuple[str, str, str]]
) -> PipelineConfig:
    """The config without the top-level keys that failed (their defaults instead), so the stages and tools that
    parsed are still checked; the failures are already in ``problems``."""
    failed = {item["loc"][0] for item in error.errors() if item["loc"]}
    try:
        return PipelineConfig.model_validate({key: value for key, value in data.items() if key not in failed})
    except ValidationError:  # not expected: top-level keys are checked independently
        raise ConfigError.many(problems) from None


def _stt_reports_speech(settings: BaseModel) -> bool:
    """Whether an STT so configured sends the caller's speech start and end itself (Deepgram's ``speech_events``),
    the events a pipeline without a VAD needs."""
    return bool(getattr(settings, "speech_events", False))


def _supports_tools(provider: type) -> bool:
    from voxpipe.stages.llm import LLMStage  # the stages are imported only when a config needs them

    return issubclass(provider, LLMStage) and provider.supports_tools


MODEL_FILE_KEYS = ("model", "model_path", "voice")


def _missing_model_files(kind: str, settings: BaseModel) -> list[tuple[str, str, str]]:
    """Model settings given as paths must exist: caught here, before a call loads anything. A bare name (such as a
    faster-whisper model name) is left to its provider."""
    problems = []
    for key in MODEL_FILE_KEYS:
        value = getattr(settings, key, None)
        if isinstance(value, str | Path) and ("/" in str(value) or str(value).startswith((".", "~"))):
            path = Path(value).expanduser()
            if not path.exists():
                problems.append((f"{kind}.{key}", f"model file {path} does not exist", "an existing path"))
    return problems


def _tool_problems(config: PipelineConfig) -> list[tuple[str, str, str]]:
    """Each configured tool must import and be describable to a model (type hints on every argument), and no two
    may have the same name (the model calls a tool by its name)."""
    from voxpipe.config.build import config_tools  # build imports the stages; keep the schema light

    problems = []
    named: dict[str, int] = {}  # tool name -> index of the first tool with it
    for index, tool in enumerate(config.tools):
        try:
            (name,) = config_tools(PipelineConfig(tools=[tool]))
        except ToolError as exc:
            problems.append((f"tools[{index}].function", str(exc), "'package.module:function' with type hints"))
            continue
        if name in named:
            problems.append(
                (
                    f"tools[{index}]",
                    f"has the name {name!r}, as tools[{named[name]}] does: the model calls tools by name",
                    "a name of its own, given with name:",
                )
            )
        named.setdefault(name, index)
    return problems


def _allowed_keys(model: type[BaseModel]) -> str:
    return ", ".join(["provider", "on_error", *model.model_fields])


def load_config(path: str | Path, registry: Registry | None = None) -> tuple[PipelineConfig, dict[str, Any]]:
    """Read and validate a YAML config file; every error names the file and the key path."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("", "file not found", file=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("", f"cannot be read ({exc})", file=str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError("", f"not valid YAML: {where}{getattr(exc, 'problem', exc)}", file=str(path)) from None
    try:
        return parse_config(data, registry)
    except ConfigError as exc:
        raise exc.with_file(str(path)) from None
