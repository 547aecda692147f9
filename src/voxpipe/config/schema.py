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
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from voxpipe.config.env import interpolate
from voxpipe.config.errors import ConfigError
from voxpipe.config.registry import KINDS, Registry
from voxpipe.pipeline.turns import DEFAULT_BACKCHANNELS


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


class StageConfig(BaseModel):
    """``provider`` plus that provider's settings (kept as extra keys, validated by the provider's model)."""

    model_config = ConfigDict(extra="allow")

    provider: str = Field(description="registered provider name")

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


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

    def stage(self, kind: str) -> StageConfig:
        config: StageConfig = getattr(self, kind)
        return config


def _path(location: tuple[int | str, ...]) -> str:
    out = ""
    for part in location:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _problems(error: ValidationError, prefix: str = "") -> list[tuple[str, str, str]]:
    problems = []
    for item in error.errors():
        path = _path(tuple(item["loc"]))
        if prefix:
            path = f"{prefix}.{path}" if path else prefix
        allowed = ""
        context = item.get("ctx") or {}
        if "expected" in context:
            allowed = str(context["expected"])
        if item["type"] == "extra_forbidden":
            problems.append((path, "is not a known key", ""))
            continue
        problems.append((path, item["msg"].lower(), allowed))
    return problems


def parse_config(data: Any, registry: Registry | None = None) -> tuple[PipelineConfig, dict[str, Any]]:
    """Validate a config mapping; returns the config and each stage's validated provider settings."""
    if not isinstance(data, dict):
        raise ConfigError("", f"the file must hold a mapping of keys, not {type(data).__name__}")
    data = interpolate(data)
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError.many(_problems(exc)) from None
    registry = registry or Registry.discover()
    settings: dict[str, Any] = {}
    problems: list[tuple[str, str, str]] = []
    for kind in KINDS:
        stage = config.stage(kind)
        try:
            provider = registry.get(kind, stage.provider).load()
            settings[kind] = provider.Settings.model_validate(stage.settings)
        except ConfigError as exc:
            problems += exc.problems
        except ValidationError as exc:
            problems += [
                (
                    path,
                    problem,
                    allowed or _allowed_keys(provider.Settings) if "not a known key" in problem else allowed,
                )
                for path, problem, allowed in _problems(exc, kind)
            ]
    for kind, validated in settings.items():
        problems += _missing_model_files(kind, validated)
    if problems:
        raise ConfigError.many(problems)
    return config, settings


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


def _allowed_keys(model: type[BaseModel]) -> str:
    return ", ".join(["provider", *model.model_fields])


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
