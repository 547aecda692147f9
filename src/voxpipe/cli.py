"""The ``voxpipe`` command."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from voxpipe.pipeline import Clock, RealClock, Summary, TurnRecord, VirtualClock
from voxpipe.pipeline.usage import amounts_text

if TYPE_CHECKING:
    from voxpipe.call import CallResult
    from voxpipe.config import PipelineConfig

# Everything printed that voxpipe did not write itself (the caller's words, paths, error messages) goes through
# rich.markup.escape: Rich would read "[/]" in it as markup and fail, or drop "[cloud]" from "voxpipe[cloud]".


def _turn_line(record: TurnRecord) -> str:
    v2v = f"{record.voice_to_voice_ms:7.1f} ms" if record.voice_to_voice_ms is not None else "   no reply"
    flag = " [yellow]interrupted[/]" if record.interrupted else ""
    said = escape(record.data.get("user_text", ""))
    return f"turn {record.turn}: voice-to-voice {v2v}{flag}  [dim]{said}[/]"


SHORT = {
    "endpointing": "endp",
    "stt": "stt",
    "turn": "turn",
    "llm_ttft": "llm",
    "first_chunk": "chunk",
    "tts_ttfb": "tts",
    "playout": "play",
    "voice_to_voice": "v2v",
}


def latency_table(turns: list[TurnRecord], summary: Summary) -> Table:
    """Per-turn segments plus p50/p95/max rows."""
    from voxpipe.pipeline.trace import SEGMENTS

    legend = " · ".join(f"{SHORT[name]}={name}" for name in SEGMENTS)
    table = Table(title="per-turn latency, ms (critical path: the segments add up to v2v)", caption=legend)
    table.add_column("turn", justify="right")
    for name in (*SEGMENTS, "voice_to_voice"):
        table.add_column(SHORT[name], justify="right")
    table.add_column("reply")
    for record in turns:
        if record.voice_to_voice_us is None:
            continue
        cells = [f"{record.segments_ms[name]:.1f}" for name in SEGMENTS]
        state = "error" if "error" in record.data else "cut" if record.interrupted else "done"
        table.add_row(str(record.turn), *cells, f"{record.voice_to_voice_ms:.1f}", state)
    for label in ("p50", "p95", "max"):
        row = []
        for name in (*SEGMENTS, "voice_to_voice"):
            stat = summary.stats.get(name)
            row.append(f"{getattr(stat, label):.1f}" if stat else "-")
        table.add_row(label, *row, "", style="bold")
    return table


def usage_table(
    usage: dict[str, dict[str, float]], cost_usd: dict[str, float], services: dict[str, str] | None = None
) -> Table | None:
    """What the call used of metered services, by stage (with the service it called, from ``services``), and what
    that cost under the config's prices."""
    if not usage:
        return None
    table = Table(title="usage and cost (prices: the config's pricing, else list prices)")
    table.add_column("stage")
    table.add_column("usage")
    table.add_column("USD", justify="right")
    for stage, counts in usage.items():
        service = (services or {}).get(stage)
        label = f"{stage} ({escape(service)})" if service else stage
        table.add_row(label, amounts_text(counts), _usd(cost_usd.get(stage, 0.0)))
    table.add_row("total", "", _usd(cost_usd.get("total", 0.0)), style="bold")
    return table


def _usd(value: float) -> str:
    """A cost to 4 decimals, or to 3 significant figures below a tenth of a cent ("5.13e-06", never "0.00000")."""
    return f"{value:.4f}" if value == 0 or value >= 1e-3 else f"{value:.3g}"


def _script_and_voice(args: argparse.Namespace, scripted: bool) -> tuple[list, Any]:
    """The caller's side: a scenario file, a recorded caller, or the built-in booking call."""
    from voxpipe import demo
    from voxpipe.scenario import load_scenario
    from voxpipe.testing import Say
    from voxpipe.testing.speech import piper_caller_voice

    if args.caller:
        return [Say("", wav=args.caller, pause=0.3)], None
    if args.scenario:
        scenario = load_scenario(args.scenario)
        voice = None
        if scenario.caller.voice == "piper" and not scripted:
            voice = piper_caller_voice(scenario.caller.length_scale)
        return scenario.script(Path(args.scenario).parent), voice
    return demo.SCRIPT, None if scripted else piper_caller_voice(1.2)


def cmd_call(args: argparse.Namespace, console: Console) -> int:
    from voxpipe.call import ARTEFACTS
    from voxpipe.config import ConfigError

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        console.print(f"[red]error:[/] --out {escape(str(out))}: exists and is not a directory")
        return 2
    clash = _clashing_flags(args)
    if clash is not None:
        console.print(f"[red]error:[/] {clash}")
        return 2
    started = False  # whether the call itself began: from then on, out holds this call's artefacts

    def on_start() -> None:
        nonlocal started
        started = True

    def progress(record: TurnRecord) -> None:
        console.print(_turn_line(record))

    def holds_the_call_up_to(what: str) -> str:
        return f"[yellow]{escape(str(out))} holds the call up to the {what} (transcript.json says status: failed)[/]"

    try:
        with _sigterm_as_ctrl_c():
            result = _run_call(args, console, out, on_turn=progress, on_start=on_start)
    except KeyboardInterrupt:
        if started:
            console.print(f"[yellow]interrupted:[/] {holds_the_call_up_to('interrupt')}")
        else:
            console.print("[yellow]interrupted[/] before the call started")
        return 130
    except Exception as exc:
        problem = escape(f"{type(exc).__name__}: {exc}")
        if started:
            console.print(f"[red]error:[/] the call failed: {problem}")
            console.print(holds_the_call_up_to("failure"))
            return 1
        if isinstance(exc, ConfigError | FileNotFoundError | ValueError):  # the config or a file or flag given
            console.print(f"[red]error:[/] {escape(str(exc))}")
            return 2
        console.print(f"[red]error:[/] the call never started: {problem}")
        return 1
    console.print(latency_table(result.turns, result.summary))
    usage = usage_table(result.usage, result.cost_usd, result.services)
    if usage is not None:
        console.print(usage)
    for problem in result.unpriced.values():
        console.print(f"  [yellow]{escape(problem)}[/]")
    for name in ARTEFACTS:
        if name in result.unwritten:
            console.print(f"  [red]could not write[/] {escape(str(out / name))}: {escape(result.unwritten[name])}")
        else:
            console.print(f"  wrote {escape(str(out / name))}")
    if result.tool_log is not None:
        console.print(f"  wrote {escape(str(result.tool_log))}")
    if result.unwritten:
        console.print(f"[yellow]the call {escape(result.outcome)}, but not every artefact could be written[/]")
        return 1
    return 0


def _run_call(
    args: argparse.Namespace,
    console: Console,
    out: Path,
    *,
    on_turn: Callable[[TurnRecord], None],
    on_start: Callable[[], None],
) -> CallResult:
    """Prepare the call the flags describe (config, caller, clock), announce it and run it."""
    from voxpipe import demo
    from voxpipe.call import run_call, run_configured_call
    from voxpipe.config import load_config, parse_config

    clock: Clock
    if args.scripted and not args.config and not args.scenario and not args.caller:
        clock = RealClock() if args.realtime else VirtualClock()
        console.print(f"[bold]voxpipe call[/] — the built-in booking call, scripted providers, {_time_of(clock)}")
        return run_call(
            demo.SCRIPT, out, replies=demo.REPLIES, clock=clock, tools=demo.TOOLS, on_turn=on_turn, on_start=on_start
        )
    if args.config:
        config, settings = load_config(args.config)
    else:
        config, settings = parse_config(SCRIPTED_CONFIG if args.scripted else {})
    scripted = all(provider == "scripted" for provider in config.providers().values())
    if args.virtual_time:
        _check_no_network(settings)
    if args.caller:
        _check_stt_hears_recordings(config.stt.provider, args.fake_providers)
    _check_keys_and_packages(config, settings, args.fake_providers)
    # Fakes recognise the scripted caller's words, so speech-like tones do unless a local VAD must hear speech.
    tones = scripted or (args.fake_providers and config.vad.provider != "silero")
    script, voice = _script_and_voice(args, tones)
    virtual = (scripted and not args.realtime) or args.virtual_time
    clock = VirtualClock(thread_hold_s=VIRTUAL_THREAD_HOLD_S) if virtual else RealClock()
    stack = escape(", ".join(f"{kind}: {provider}" for kind, provider in config.providers().items()))
    where = ""
    if args.fake_providers:
        from voxpipe.testing.fakes.launch import faked_kinds

        faked = faked_kinds(config.providers())
        where = f"; faked on 127.0.0.1: {', '.join(faked)}" if faked else "; no cloud provider to fake"
    console.print(f"[bold]voxpipe call[/] — {stack}; {_time_of(clock)}{where}")
    with console.status("calling… (models load on the first turn)", spinner="dots"):
        return run_configured_call(
            config,
            settings,
            script,
            out,
            clock=clock,
            caller_voice=voice,
            on_turn=on_turn,
            on_start=on_start,
            fake_providers=args.fake_providers,
        )


def _time_of(clock: Clock) -> str:
    return "virtual time" if isinstance(clock, VirtualClock) else "real time"


def _check_keys_and_packages(config: PipelineConfig, settings: dict[str, Any], fake_providers: bool) -> None:
    """Every missing API key and provider package at once, before the caller's voice is made (a Piper caller takes
    seconds to load). Faked providers need no keys, but they still run their real SDKs."""
    from voxpipe.config import ConfigError, Registry
    from voxpipe.config.build import missing_packages
    from voxpipe.stages.cloud import CloudSettings

    problems = missing_packages(config, Registry.discover(), fake_providers=fake_providers)
    if fake_providers:  # faked stages need no keys; a cloud stage with no fake is refused, never sent out
        from voxpipe.testing.fakes.launch import unfaked_cloud_stages

        problems += unfaked_cloud_stages(config.providers(), settings)
    for kind, validated in settings.items():
        if isinstance(validated, CloudSettings) and not fake_providers:
            try:
                validated.require_api_key(kind)
            except ConfigError as exc:
                problems += exc.problems
    if problems:
        raise ConfigError.many(problems)


def _check_stt_hears_recordings(stt: str, fake_providers: bool) -> None:
    """A recorded caller is heard only by an STT that recognises audio: the scripted STT, and the faked cloud ones,
    "recognise" the scripted caller's lines, and a recording has none — the call would have no turns at all."""
    faked = False
    if fake_providers:
        from voxpipe.testing.fakes.launch import FAKES

        faked = f"stt.{stt}" in FAKES
    if stt == "scripted" or faked:
        which = f"faked {stt}" if faked else "scripted"
        raise ValueError(
            f"--caller: the {which} STT does not listen to audio, so nothing in the recording would be heard; "
            "give --caller with a config whose STT recognises speech (whisper, or deepgram without --fake-providers)"
        )


@contextlib.contextmanager
def _sigterm_as_ctrl_c() -> Iterator[None]:
    """While inside, SIGTERM (kill, docker stop) ends the call as Ctrl-C does, so its artefacts are still written."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set signal handlers (and only it receives signals)
        return
    previous = signal.signal(signal.SIGTERM, _as_ctrl_c)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _as_ctrl_c(signum: int, frame: FrameType | None) -> None:
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)  # while a call runs, asyncio's: it cancels the call's task
    else:
        raise KeyboardInterrupt  # Ctrl-C is ignored or not Python's (a background job): stop all the same


def cmd_validate(args: argparse.Namespace, console: Console) -> int:
    from voxpipe.config import ConfigError, Registry, load_config
    from voxpipe.config.build import missing_packages
    from voxpipe.stages.cloud import CloudSettings

    try:
        config, settings = load_config(args.file)
    except ConfigError as exc:
        console.print(f"[red]{escape(str(exc))}[/]")
        return 1
    # A provider's SDK is imported only once a call starts: without this, a config whose SDK is missing would pass.
    uninstalled = missing_packages(config, Registry.discover())
    if uninstalled:
        console.print(f"[red]{escape(str(ConfigError.many(uninstalled, file=args.file)))}[/]")
    else:
        stack = ", ".join(f"{kind}: {provider}" for kind, provider in config.providers().items())
        console.print(f"[green]ok[/] {escape(args.file)} — {escape(stack)}")
    # Keys are read when a call builds its pipeline; a config checked where the keys are not (CI) is still valid.
    keyless = {k: s for k, s in settings.items() if isinstance(s, CloudSettings) and s.api_key_or_none() is None}
    for kind, missing in keyless.items():
        env = missing.key_variable()
        console.print(f"[yellow]no API key[/] for {missing.service_name}: a call needs ${env} (or {kind}.api_key)")
    return 1 if uninstalled or (keyless and args.require_keys) else 0


SCRIPTED_CONFIG = {kind: {"provider": "scripted"} for kind in ("vad", "stt", "llm", "tts")}

# On virtual time a model's job holds the clock still for up to this long of real time (VirtualClock): longer than
# a slow machine's longest reply, so model work never shows as time passing; a stuck job still times out after it.
VIRTUAL_THREAD_HOLD_S = 60.0


def _clashing_flags(args: argparse.Namespace) -> str | None:
    """Why these ``voxpipe call`` flags cannot go together, or None."""
    if args.scripted and args.config:
        return (
            "--scripted and --config: give one (--scripted replaces every provider; a config's providers are used "
            "as written, and --fake-providers runs its cloud providers against local fakes)"
        )
    if args.caller and args.scenario:
        return "--caller and --scenario: give one (--caller plays one recorded caller, --scenario a scripted one)"
    if args.realtime and args.virtual_time:
        return "--realtime and --virtual-time: give one"
    if args.scripted and args.fake_providers:
        return "--scripted and --fake-providers: scripted providers have nothing to fake (give a --config instead)"
    if args.virtual_time and args.fake_providers:
        return "--virtual-time and --fake-providers: cloud providers, faked or not, run on the real clock"
    return None


def _check_no_network(settings: dict[str, Any]) -> None:
    """Virtual time jumps over every wait, a network read's too: a cloud provider's timeouts would fire at once."""
    from voxpipe.config import ConfigError
    from voxpipe.stages.cloud import CloudSettings

    for kind, stage in settings.items():
        if isinstance(stage, CloudSettings):
            raise ConfigError(
                f"{kind}.provider",
                f"{stage.service_name} is a network service, and --virtual-time would race its timeouts",
                "scripted and embedded providers on virtual time; run this config without --virtual-time",
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voxpipe", description="Real-time cascaded voice agents.")
    sub = parser.add_subparsers(dest="command", required=True)
    call = sub.add_parser("call", help="run a simulated phone call against a pipeline and write its artefacts")
    call.add_argument("--config", help="pipeline config (YAML); default: the embedded offline stack")
    call.add_argument("--scenario", help="the caller's side (YAML); default: the built-in booking call")
    call.add_argument("--caller", help="a recorded caller (WAV) instead of a scenario")
    call.add_argument("--scripted", action="store_true", help="scripted providers (no models, no keys)")
    call.add_argument(
        "--out", required=True, help="directory for recording.wav, trace.jsonl, transcript.json, report.html"
    )
    call.add_argument("--realtime", action="store_true", help="run a scripted call on the wall clock")
    call.add_argument(
        "--virtual-time",
        action="store_true",
        help="run an embedded stack on virtual time: silences and model work take no time, so the call runs "
        "faster than real time (its latencies then show the pipeline's own waits, not the models')",
    )
    call.add_argument(
        "--fake-providers",
        action="store_true",
        help="point the config's cloud providers at loopback fakes of their services (no keys, no network)",
    )
    validate = sub.add_parser("validate", help="check a pipeline config without starting anything")
    validate.add_argument("file")
    validate.add_argument(
        "--require-keys",
        action="store_true",
        help="fail if a cloud provider's API key is in neither the config nor the environment",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    console = Console()
    args = build_parser().parse_args(argv)
    if args.command == "call":
        return cmd_call(args, console)
    if args.command == "validate":
        return cmd_validate(args, console)
    return 2


if __name__ == "__main__":
    sys.exit(main())
