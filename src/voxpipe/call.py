"""A simulated call, end to end: a scripted caller talks to a pipeline; the call's artefacts are written out.

``run_call`` is what ``voxpipe call`` runs. It writes, into the output directory:

* ``recording.wav`` — stereo, caller left, bot right, as the transport saw them;
* ``trace.jsonl`` — one record per turn, written as each turn finishes;
* ``transcript.json`` — the turns, who spoke, interrupted flags and the words the caller heard (also written as
  each turn finishes, ``"status": "running"``, so a killed call keeps its turns);
* ``report.html`` — the per-turn report;
* ``tools.jsonl`` — one line per tool invocation, as it finishes (only when the reasoner has tools).

Usage of metered services (tokens, characters, audio seconds) and its cost under the config's price table are in
each turn's trace record and, for the whole call, in ``transcript.json`` and :class:`CallResult`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from voxpipe.config import KINDS, BuildContext, ConfigError, PipelineConfig, Registry, build_pipeline
from voxpipe.config.build import config_tools, missing_packages
from voxpipe.config.prices import price_table, unpriced
from voxpipe.pipeline import (
    AudioFormat,
    Clock,
    Conversation,
    JsonlTraceWriter,
    Message,
    Pipeline,
    Stage,
    Summary,
    Tracer,
    TurnPolicy,
    TurnRecord,
    VirtualClock,
)
from voxpipe.pipeline.usage import Prices, cost
from voxpipe.snapshots import SnapshotWriter
from voxpipe.stages.llm import AuditSink
from voxpipe.stages.tools import ToolAuditLog
from voxpipe.stages.turn import TurnTaker
from voxpipe.testing import ScriptedCaller, ScriptedLLM, ScriptedSTT, ScriptedTTS, ScriptedVAD
from voxpipe.testing.caller import Step, Voice
from voxpipe.transports.playout import PlayoutOutput
from voxpipe.transports.recorder import StereoRecorder
from voxpipe.transports.simulated import SimulatedInput

ARTEFACTS = ("recording.wav", "trace.jsonl", "transcript.json", "report.html")

log = logging.getLogger("voxpipe.call")


@dataclass
class CallResult:
    """What a finished call left behind."""

    out_dir: Path
    turns: list[TurnRecord]
    summary: Summary
    conversation: Conversation
    transcript: list[dict[str, Any]]
    outcome: str
    usage: dict[str, dict[str, float]] = field(default_factory=dict)
    cost_usd: dict[str, float] = field(default_factory=dict)
    unwritten: dict[str, str] = field(default_factory=dict)  # artefact -> why it could not be written
    unpriced: dict[str, str] = field(default_factory=dict)  # stage kind -> why its usage has no price
    services: dict[str, str] = field(default_factory=dict)  # stage kind -> "anthropic claude-opus-4-7" (configured)
    tool_log: Path | None = None  # tools.jsonl, when the reasoner had tools


def scripted_pipeline(
    caller: ScriptedCaller,
    recorder: StereoRecorder,
    tracer: Tracer,
    *,
    replies: Any,
    system: str = "You are a helpful booking assistant.",
    policy: TurnPolicy | None = None,
    clock: Clock,
    audio: AudioFormat = AudioFormat(16000),
    tools: dict[str, Any] | None = None,
    tool_audit: AuditSink | None = None,
    llm_ttft_s: float = 0.2,
    tts_ttfa_s: float = 0.12,
) -> tuple[Pipeline, Conversation]:
    """The scripted cascade: input → VAD → STT → turn-taker → LLM → TTS → output."""
    conversation = Conversation(system)
    stages: list[Stage] = [
        SimulatedInput(caller, audio, recorder=recorder),
        ScriptedVAD(audio),
        ScriptedSTT(caller),
        TurnTaker(conversation, policy),
        ScriptedLLM(replies, tools=tools, audit=tool_audit, ttft_s=llm_ttft_s),
        ScriptedTTS(audio, ttfa_s=tts_ttfa_s),
        PlayoutOutput(audio, recorder),
    ]
    return Pipeline(stages, clock=clock, tracer=tracer, name="call"), conversation


def transcript_of(turns: list[TurnRecord]) -> list[dict[str, Any]]:
    """Caller and bot lines in order, from the finished turns."""
    lines: list[dict[str, Any]] = []
    for record in sorted(turns, key=lambda r: r.turn):
        marks = record.marks
        if "user_text" in record.data:
            lines.append(
                {
                    "turn": record.turn,
                    "speaker": "caller",
                    "text": record.data["user_text"],
                    "start": marks.get("user.speech_start"),
                    "end": marks.get("user.speech_end"),
                    "barge_in": bool(record.data.get("barge_in", False)),
                    "resumed": bool(record.data.get("resumed", False)),  # cut the bot off, said nothing
                }
            )
        if "bot_text" in record.data or "out.first_play" in marks:
            lines.append(
                {
                    "turn": record.turn,
                    "speaker": "bot",
                    "text": record.data.get("bot_text", ""),
                    "heard": " ".join(record.heard),
                    "interrupted": record.interrupted,  # cut off: by the caller, or by the error below
                    **({"error": record.data["error"]} if "error" in record.data else {}),
                    "start": marks.get("out.first_play"),
                    "end": marks.get("out.interrupted", marks.get("out.done")),
                    "played_s": record.played_s,
                }
            )
    return lines


def run_call(
    script: list[Step],
    out_dir: str | Path,
    *,
    replies: Any,
    clock: Clock | None = None,
    policy: TurnPolicy | None = None,
    tools: dict[str, Any] | None = None,
    on_turn: Callable[[TurnRecord], None] | None = None,
    on_start: Callable[[], None] | None = None,
    sample_rate: int = 16000,
) -> CallResult:
    """Run a scripted call (providers scripted in code) to the end and write its artefacts into ``out_dir``;
    ``on_turn`` and ``on_start`` as for :func:`run_pipeline_call`."""
    clock = clock or VirtualClock()
    caller = ScriptedCaller(script, sample_rate)
    recorder = StereoRecorder(sample_rate)
    tracer = Tracer()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    audit = ToolAuditLog(out / "tools.jsonl") if tools else None
    try:
        pipeline, conversation = scripted_pipeline(
            caller,
            recorder,
            tracer,
            replies=replies,
            policy=policy,
            clock=clock,
            tools=tools,
            tool_audit=audit,
            audio=AudioFormat(sample_rate),
        )
        starting = _opening(audit, on_start)
        result = run_pipeline_call(pipeline, conversation, tracer, recorder, out, on_turn=on_turn, on_start=starting)
        result.tool_log = audit.path if audit is not None else None
        return result
    finally:
        if audit is not None:
            audit.close()


def run_configured_call(
    config: PipelineConfig,
    settings: dict[str, Any],
    script: list[Step],
    out_dir: str | Path,
    *,
    clock: Clock | None = None,
    caller_voice: Voice | None = None,
    on_turn: Callable[[TurnRecord], None] | None = None,
    on_start: Callable[[], None] | None = None,
    registry: Registry | None = None,
    tools: dict[str, Any] | None = None,
    reply_timeout_s: float = 10.0,
    fake_providers: bool = False,
) -> CallResult:
    """Run a call against the pipeline a config describes, with a scripted caller on the other end; ``tools`` are
    added to the config's; ``reply_timeout_s`` is how long the caller waits for a reply that does not come
    (a turn the pipeline skipped after an error) before going on with the script. With ``fake_providers`` the
    config's cloud providers talk to loopback fakes of their services (``voxpipe.testing.fakes.launch``)."""
    audio = AudioFormat(config.audio.sample_rate)
    caller = ScriptedCaller(script, audio.sample_rate, voice=caller_voice, reply_timeout=reply_timeout_s)
    recorder = StereoRecorder(audio.sample_rate)
    tracer = Tracer()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    registry = registry or Registry.discover()
    providers = config.providers()
    if fake_providers:
        # Before the fakes start: they need their server's package, and the faked providers their real SDKs. Without
        # fakes, building the pipeline names the missing packages, with the missing keys.
        from voxpipe.testing.fakes.launch import unfaked_cloud_stages

        problems = missing_packages(config, registry, fake_providers=True) + unfaked_cloud_stages(providers, settings)
        if problems:
            raise ConfigError.many(problems)
    audit = ToolAuditLog(out / "tools.jsonl") if config.tools or tools else None
    # Priced by the model the config chose (before the fakes take the settings over).
    priced = {kind: (providers[kind], getattr(settings.get(kind), "model", None)) for kind in KINDS}
    with contextlib.ExitStack() as stack:
        if fake_providers:
            from voxpipe.testing.fakes.launch import fake_providers as faked

            tool_names = [*config_tools(config), *(tools or {})]
            settings = stack.enter_context(faked(providers, settings, caller, tool_names))
        if audit is not None:
            stack.callback(audit.close)
        pipeline, conversation = build_pipeline(
            config,
            settings,
            input_stage=SimulatedInput(caller, audio, recorder=recorder),
            output_stage=PlayoutOutput(audio, recorder),
            context=BuildContext(audio=audio, caller=caller, tools=tools or {}, tool_audit=audit),
            clock=clock or VirtualClock(),
            tracer=tracer,
            registry=registry,
        )
        prices = price_table(priced, config.pricing)
        no_price = unpriced(priced, config.pricing)
        for problem in no_price.values():
            log.warning("%s", problem)
        starting = _opening(audit, on_start)
        result = run_pipeline_call(
            pipeline, conversation, tracer, recorder, out, on_turn=on_turn, on_start=starting, prices=prices
        )
    result.unpriced = no_price
    result.tool_log = audit.path if audit is not None else None
    result.services = {kind: " ".join(filter(None, provider_and_model)) for kind, provider_and_model in priced.items()}
    return result


def _opening(audit: ToolAuditLog | None, on_start: Callable[[], None] | None) -> Callable[[], None]:
    """``on_start``, opening the tool audit log first: tools.jsonl is this call's once the call starts, and a call
    that never starts (a missing key) leaves the last call's alone."""

    def starting() -> None:
        if audit is not None:
            audit.open()
        if on_start is not None:
            on_start()

    return starting


def run_pipeline_call(
    pipeline: Pipeline,
    conversation: Conversation,
    tracer: Tracer,
    recorder: StereoRecorder,
    out_dir: str | Path,
    *,
    on_turn: Callable[[TurnRecord], None] | None = None,
    on_start: Callable[[], None] | None = None,
    prices: Prices | None = None,
) -> CallResult:
    """Run ``pipeline`` to the end on its clock and write the four artefacts; ``prices`` (USD per unit, by stage)
    put a cost on each turn's usage and on the call's. ``on_turn(record)`` is called as each turn finishes (an
    exception from it is logged; it never fails the call), ``on_start()`` once the call is about to start: from then
    on, the output directory holds this call, whatever happens.

    The trace and the transcript (``"status": "running"``) are written turn by turn as the call goes, and again as a
    finished turn's record is amended (the trace gets an amendment line, see :class:`JsonlTraceWriter`), so a
    process killed outright keeps the turns it finished (the transcript from a thread of its own: the loop takes a
    snapshot, the thread serialises and writes the newest one waiting); both are rewritten with the settled records
    at the end, once that thread is done. If the call fails (or is interrupted: Ctrl-C, or SIGTERM in the CLI), the
    recording, transcript and report of what happened so far are still written, ``transcript.json`` says ``"status":
    "failed"`` with the error, and the exception is re-raised — the directory is never silently half-written. Each
    artefact is written on its own: one that cannot be written is logged and named in :attr:`CallResult.unwritten`,
    and neither stops the others nor changes the call's outcome.
    """
    from voxpipe.report import write_report  # the report pulls in more than a call needs to run

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prices = prices or {}

    def price_turn(record: TurnRecord) -> None:
        if "usage" in record.data:
            record.data["cost_usd"] = cost(record.data["usage"], prices)

    def transcript_document(status: dict[str, Any]) -> dict[str, Any]:
        turns = sorted(tracer.turns, key=lambda r: r.turn)
        return _transcript_document(status, turns, conversation, pipeline, prices)

    def write_running(snapshot: tuple[int, dict[str, Any]]) -> None:
        turn, document = snapshot
        try:
            _write_json(out / "transcript.json", document)
        except Exception:
            log.exception("writing transcript.json failed on turn %d; the call goes on", turn)

    def snapshot_transcript(record: TurnRecord) -> None:
        # The document is taken here, on the loop, where nothing changes under it; the writer's thread serialises
        # and writes it (about a millisecond at 60 turns, growing with the call) while the loop carries the audio.
        running.submit((record.turn, transcript_document({"status": "running"})))

    writer = JsonlTraceWriter(out / "trace.jsonl")
    # A finished turn's record amended later (a cut reply's usage, counted as its stream closed; an error from its
    # work) is priced and written again as it happens: the trace gets an amendment line, the transcript a snapshot.
    for observe in (tracer.on_turn, tracer.on_late):
        observe(_logged(price_turn, "pricing the turn"))  # before the writer, so the trace line carries it
        observe(_logged(writer, "writing trace.jsonl"))
        observe(_logged(snapshot_transcript, "writing transcript.json"))
    if on_turn is not None:
        tracer.on_turn(_logged(on_turn, "the on_turn observer"))
    clock = pipeline.clock
    outcome, error = "failed", None
    running = SnapshotWriter(write_running, name="transcript.json writer")  # its thread is closed below
    try:
        if on_start is not None:
            on_start()
        run = clock.run if isinstance(clock, VirtualClock) else asyncio.run
        outcome = run(pipeline.run())
    except BaseException as exc:
        error = _error_text(exc)
        raise
    finally:
        running.close()  # before the final transcript: no turn's write can land after it
        unwritten: dict[str, str] = {}

        def attempt(name: str, write: Callable[[], Any]) -> None:
            try:
                write()
            except Exception as exc:
                unwritten[name] = f"{type(exc).__name__}: {exc}"
                log.exception("could not write %s", out / name)

        attempt("recording.wav", lambda: recorder.write(out / "recording.wav"))
        turns = sorted(tracer.turns, key=lambda r: r.turn)
        attempt("trace.jsonl", lambda: writer.rewrite(turns))
        status = {"status": "failed", "error": error} if error else {"status": outcome}
        attempt("transcript.json", lambda: _write_json(out / "transcript.json", transcript_document(status)))
        transcript = transcript_of(turns)
        summary = Summary.of(turns)
        report, recording = out / "report.html", out / "recording.wav"
        usage = _usage_of(pipeline)
        cost_usd = cost(usage, prices)
        attempt(
            "report.html",
            lambda: write_report(
                report,
                turns,
                summary,
                transcript,
                recording=recording,
                usage=usage,
                cost_usd=cost_usd,
                status=status,
                errors=_errors_of(pipeline),
            ),
        )
    return CallResult(out, turns, summary, conversation, transcript, outcome, usage, cost_usd, unwritten)


def _errors_of(pipeline: Pipeline) -> list[dict[str, Any]]:
    """The errors the call reported, as transcript.json and the report list them."""
    return [{"turn": e.epoch, "stage": e.stage, "error": e.error, "fatal": e.fatal} for e in pipeline.errors]


def _logged(observer: Callable[[TurnRecord], Any], what: str) -> Callable[[TurnRecord], None]:
    """``observer``, with an exception from it logged instead of raised: it runs inside the pipeline, where an
    exception would end the call."""

    def observe(record: TurnRecord) -> None:
        try:
            observer(record)
        except Exception:
            log.exception("%s failed on turn %d; the call goes on", what, record.turn)

    return observe


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "KeyboardInterrupt: the call was interrupted (Ctrl-C, or SIGTERM in the voxpipe command)"
    return f"{type(exc).__name__}: {exc}"


def _usage_of(pipeline: Pipeline) -> dict[str, dict[str, float]]:
    return {stage: dict(counts) for stage, counts in pipeline.usage.totals.items()}


def _transcript_document(
    status: dict[str, Any],
    turns: list[TurnRecord],
    conversation: Conversation,
    pipeline: Pipeline,
    prices: Prices,
) -> dict[str, Any]:
    """What ``transcript.json`` holds: the call's status, turns, conversation, errors, usage and cost."""
    usage = _usage_of(pipeline)
    return {
        **status,
        "system": conversation.system,
        "turns": transcript_of(turns),
        "conversation": [_message_json(m) for m in conversation.messages],
        "errors": _errors_of(pipeline),
        "usage": usage,
        "cost_usd": cost(usage, prices),
        # Counted for no turn (the audio after the last utterance): the turns' usage adds up to usage less this.
        "usage_unassigned": {stage: dict(counts) for stage, counts in pipeline.usage.unassigned.items()},
    }


def _write_json(path: Path, document: dict[str, Any]) -> None:
    _replace_file(path, json.dumps(document, indent=2))


def _replace_file(path: Path, text: str) -> None:
    """Write ``path`` atomically: a reader (or a kill mid-write) sees the old content or the new, never half."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)


def _message_json(message: Message) -> dict[str, Any]:
    entry: dict[str, Any] = {"role": message.role, "text": message.text, "interrupted": message.interrupted}
    if message.tool is not None:
        entry["tool"] = dataclasses.asdict(message.tool)
    return entry
