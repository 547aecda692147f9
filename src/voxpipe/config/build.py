"""Building a pipeline from a validated config: the cascade between the transport's input and output."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from voxpipe.config.errors import ConfigError
from voxpipe.config.registry import FAKE_SERVER_PACKAGES, KINDS, Package, Registry, required_packages
from voxpipe.config.schema import PipelineConfig
from voxpipe.pipeline import AudioFormat, Clock, Conversation, ErrorPolicy, Pipeline, Stage, Tracer, TurnPolicy
from voxpipe.stages.llm import AuditSink, LLMStage
from voxpipe.stages.tools import Tool, import_function, tools_by_name
from voxpipe.stages.turn import TurnTaker


@dataclass
class BuildContext:
    """What a provider may need beyond its settings: the call's audio format and, for scripted providers, the
    scripted caller (its words are what ScriptedSTT "recognises"); tools for the reasoner (given in code, added to
    the config's) and where their invocations are audited."""

    audio: AudioFormat
    caller: Any = None
    tools: Mapping[str, Any] = field(default_factory=dict)
    tool_audit: AuditSink | None = None
    system_prompt: str = ""


def config_tools(config: PipelineConfig) -> dict[str, Tool]:
    """The config's ``tools:`` as :class:`Tool` objects (imports each function)."""
    tools = [
        Tool.of(
            import_function(item.function),
            name=item.name,
            description=item.description,
            timeout_s=item.timeout_s,
            on_barge_in=item.on_barge_in,
            filler=item.filler,
            filler_after_s=item.filler_after_s,
            max_result_chars=item.max_result_chars,
        )
        for item in config.tools
    ]
    return tools_by_name(tools)


def missing_packages(
    config: PipelineConfig, registry: Registry, *, fake_providers: bool = False
) -> list[tuple[str, str, str]]:
    """The config's providers whose SDK or model runtime is not installed, as :class:`ConfigError` problems naming
    the packages and the pip command that installs them; with ``fake_providers``, what the loopback fakes need too
    (the faked providers still run their real SDKs). Each provider says what it needs for its settings (its
    ``required_packages``); looked up, not imported: SDKs are imported once a call starts."""
    problems: list[tuple[str, str, str]] = []
    for kind in KINDS:
        stage = config.stage(kind)
        provider: Any = registry.get(kind, stage.provider).load()  # a class with a Settings model
        settings = provider.Settings.model_validate(stage.settings)  # valid: parse_config has checked them
        needed = dict.fromkeys(required_packages(provider, settings))  # each once, in the provider's order
        missing = [package for package in needed if not package.installed()]
        if missing:
            problems.append(_needs(f"{kind}.provider", f"provider {stage.provider!r} needs", missing))
    fakes_missing = [package for package in FAKE_SERVER_PACKAGES if not package.installed()]
    if fake_providers and fakes_missing:
        problems.append(_needs("--fake-providers", "the loopback fakes need", fakes_missing))
    return problems


def _needs(path: str, who_needs: str, packages: list[Package]) -> tuple[str, str, str]:
    names = " and ".join(package.distribution for package in packages)
    needs = f"the {names} package, which is" if len(packages) == 1 else f"the {names} packages, which are"
    return path, f"{who_needs} {needs} not installed: {_pip_install(packages)}", ""


def _pip_install(packages: list[Package]) -> str:
    """One command for them all: voxpipe's extras for its own providers' packages, the distribution for a
    third-party provider's (which voxpipe has no extra for)."""
    extras = ",".join(dict.fromkeys(package.extra for package in packages if package.extra is not None))
    requirements = [f"'voxpipe[{extras}]'"] if extras else []
    requirements += [package.distribution for package in packages if package.extra is None]
    return "pip install " + " ".join(requirements)


def turn_policy(config: PipelineConfig) -> TurnPolicy:
    """The turn-taker's policy, from the config's ``turn:``."""
    turn = config.turn
    return TurnPolicy(
        min_speech_ms=turn.min_speech_ms,
        min_words=turn.min_words,
        backchannels=frozenset(turn.backchannels),
        resume_prompt=turn.resume_prompt,
    )


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
    if context.tools and name == "llm" and "tools" in parameters:
        extras["tools"] = dict(context.tools)
    if context.system_prompt and "system_prompt" in parameters:
        extras["system_prompt"] = context.system_prompt  # a model may prepare its prompt before the first turn
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
    policy = turn_policy(config)
    tools = config_tools(config)
    in_code = tools_by_name(context.tools)
    for index, name in enumerate(tools):
        if name in in_code:  # neither silently wins: each may carry its own timeout, policy and filler
            raise ConfigError(f"tools[{index}]", f"a tool named {name!r} is also given in code; rename one")
    tools.update(in_code)
    context = dataclasses.replace(context, tools=tools, system_prompt=config.system_prompt)
    cascade: dict[str, Stage] = {}
    problems = missing_packages(config, registry)
    unbuildable = {path.partition(".")[0] for path, _, _ in problems}  # each would fail importing its SDK
    for kind in KINDS:
        stage_config = config.stage(kind)
        provider = registry.get(kind, stage_config.provider).load()
        if kind in unbuildable:
            continue  # the others are still built: every missing package and API key is named at once
        try:
            stage = construct(provider, settings[kind], context, kind)
        except ConfigError as exc:
            problems += exc.problems  # the other stages are still built: every missing API key is named at once
            continue
        if stage_config.on_error is not None:
            stage.error_policy = ErrorPolicy(stage_config.on_error)
        cascade[kind] = stage
    if problems:
        raise ConfigError.many(problems)
    _give_tools(cascade["llm"], context, config.stage("llm").provider)
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


def _give_tools(llm: Stage, context: BuildContext, provider: str) -> None:
    """The reasoner gets the tools and the audit log whichever way it was built; one that cannot call tools
    (it does not run the tool loop) is refused rather than silently ignoring them."""
    if not isinstance(llm, LLMStage) or not llm.supports_tools:
        if context.tools:
            raise ConfigError("llm.provider", f"provider {provider!r} does not support tools", "anthropic, scripted")
        return
    llm.tools = dict(context.tools)
    if context.tool_audit is not None:
        llm.audit = context.tool_audit
