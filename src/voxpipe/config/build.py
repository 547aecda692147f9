"""Building a pipeline from a validated config: the cascade between the transport's input and output."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from voxpipe.config.errors import ConfigError
from voxpipe.config.registry import KINDS, Registry
from voxpipe.config.schema import PipelineConfig
from voxpipe.pipeline import AudioFormat, Clock, Conversation, Pipeline, Stage, Tracer, TurnPolicy
from voxpipe.stages.turn import TurnTaker


@dataclass
class BuildContext:
    """What a provider may need beyond its settings: the call's audio format and, for scripted providers, the
    scripted caller (its words are what ScriptedSTT "recognises"); tools for the reasoner."""

    audio: AudioFormat
    caller: Any = None
    tools: Mapping[str, Any] = field(default_factory=dict)


def construct(provider: type, settings: Any, context: BuildContext, name: str) -> Stage:
    """Build a stage: ``provider.from_settings(settings, context, name)`` if it has one, else the convention
    ``provider(settings, audio=..., tools=..., name=...)`` with whichever of those keywords it takes."""
    factory = getattr(provider, "from_settings", None)
    if factory is not None:
        stage: Stage = factory(settings, context, name)
        return stage
    parameters = inspect.signature(provider).parameters
    extras: dict[str, Any] = {"name": name}
    if "audio" in parameters:
        extras["audio"] = context.audio
    if context.tools and name == "llm":
        if "tools" not in parameters:
            raise ConfigError("llm.provider", f"provider {provider.__name__} does not support tools")
        extras["tools"] = dict(context.tools)
    built: Stage = provider(settings, **extras)
    return built


def build_pipeline(
    config: PipelineConfig,
    settings: Mapping[str, Any],
    *,
    input_stage: Stage,
    output_stage: Stage,
    context: BuildContext,
    clock: Clock | None = None,
    tracer: Tracer | None = None,
    registry: Registry | None = None,
) -> tuple[Pipeline, Conversation]:
    """input → vad → stt → turn-taker → llm → tts → output, from the config."""
    registry = registry or Registry.discover()
    conversation = Conversation(config.system_prompt)
    policy = TurnPolicy(
        min_speech_ms=config.turn.min_speech_ms,
        min_words=config.turn.min_words,
        backchannels=frozenset(word.lower() for word in config.turn.backchannels),
    )
    cascade: dict[str, Stage] = {}
    for kind in KINDS:
        provider = registry.get(kind, config.stage(kind).provider).load()
        cascade[kind] = construct(provider, settings[kind], context, kind)
    stages = [
        input_stage,
        cascade["vad"],
        cascade["stt"],
        TurnTaker(conversation, policy, name="turn"),
        cascade["llm"],
        cascade["tts"],
        output_stage,
    ]
    return Pipeline(stages, clock=clock, tracer=tracer, name="call"), conversation
