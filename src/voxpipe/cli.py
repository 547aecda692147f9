"""The ``voxpipe`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from voxpipe.pipeline import RealClock, Summary, TurnRecord, VirtualClock


def _turn_line(record: TurnRecord) -> str:
    v2v = f"{record.voice_to_voice_ms:7.1f} ms" if record.voice_to_voice_ms is not None else "   no reply"
    flag = " [yellow]interrupted[/]" if record.interrupted else ""
    said = record.data.get("user_text", "")
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
        state = "cut" if record.interrupted else "done"
        table.add_row(str(record.turn), *cells, f"{record.voice_to_voice_ms:.1f}", state)
    for label in ("p50", "p95", "max"):
        row = []
        for name in (*SEGMENTS, "voice_to_voice"):
            stat = summary.stats.get(name)
            row.append(f"{getattr(stat, label):.1f}" if stat else "-")
        table.add_row(label, *row, "", style="bold")
    return table


def usage_table(usage: dict[str, dict[str, float]], cost_usd: dict[str, float]) -> Table | None:
    """What the call used of metered services, by stage, and what that cost under the config's prices."""
    if not usage:
        return None
    table = Table(title="usage and cost (prices: the config's pricing, else list prices)")
    table.add_column("stage")
    table.add_column("usage")
    table.add_column("USD", justify="right")
    for stage, counts in usage.items():
        amounts = ", ".join(f"{_amount(value)} {counter.replace('_', ' ')}" for counter, value in counts.items())
        table.add_row(stage, amounts, f"{cost_usd.get(stage, 0.0):.5f}")
    table.add_row("total", "", f"{cost_usd.get('total', 0.0):.5f}", style="bold")
    return table


def _amount(value: float) -> str:
    return f"{value:.1f}" if value != int(value) else str(int(value))


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
    from voxpipe import demo
    from voxpipe.call import ARTEFACTS, run_call, run_configured_call
    from voxpipe.config import ConfigError, load_config, parse_config

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        console.print(f"[red]error:[/] --out {out}: exists and is not a directory")
        return 2
    clash = _clashing_flags(args)
    if clash is not None:
        console.print(f"[red]error:[/] {clash}")
        return 2
    turns_done: list[TurnRecord] = []

    def progress(record: TurnRecord) -> None:
        turns_done.append(record)
        console.print(_turn_line(record))

    try:
        if args.scripted and not args.config and not args.scenario and not args.caller:
            console.print("[bold]voxpipe call[/] — the built-in booking call, scripted providers, virtual time")
            clock = RealClock() if args.realtime else VirtualClock()
            result = run_call(demo.SCRIPT, out, replies=demo.REPLIES, clock=clock, tools=demo.TOOLS, on_turn=progress)
        else:
            if args.config:
                config, settings = load_config(args.config)
            else:
                config, settings = parse_config(SCRIPTED_CONFIG if args.scripted else {})
            scripted = all(config.stage(kind).provider == "scripted" for kind in ("vad", "stt", "llm", "tts"))
            if args.virtual_time:
                _check_no_network(settings)
            # Fakes recognise the scripted caller's words, so speech-like tones do unless a local VAD must hear speech.
            tones = scripted or (args.fake_providers and config.vad.provider != "silero")
            script, voice = _script_and_voice(args, tones)
            virtual = (scripted and not args.realtime) or args.virtual_time
            clock = VirtualClock(thread_hold_s=VIRTUAL_THREAD_HOLD_S) if virtual else RealClock()
            stack = ", ".join(f"{kind}: {config.stage(kind).provider}" for kind in ("vad", "stt", "llm", "tts"))
            where = "; cloud providers faked on 127.0.0.1" if args.fake_providers else ""
            console.print(f"[bold]voxpipe call[/] — {stack}; {'virtual' if virtual else 'real'} time{where}")
            with console.status("calling… (models load on the first turn)", spinner="dots"):
                result = run_configured_call(
                    config,
                    settings,
                    script,
                    out,
                    clock=clock,
                    caller_voice=voice,
                    on_turn=progress,
                    fake_providers=args.fake_providers,
                )
    except ConfigError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    except (FileNotFoundError, ValueError) as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    except Exception as exc:
        console.print(f"[red]error:[/] the call failed: {type(exc).__name__}: {exc}")
        console.print(f"[yellow]{out} holds the call up to the failure (transcript.json says status: failed)[/]")
        return 1
    console.print(latency_table(result.turns, result.summary))
    usage = usage_table(result.usage, result.cost_usd)
    if usage is not None:
        console.print(usage)
    for name in ARTEFACTS:
        console.print(f"  wrote {out / name}")
    return 0


def cmd_validate(args: argparse.Namespace, console: Console) -> int:
    from voxpipe.config import ConfigError, load_config
    from voxpipe.stages.cloud import CloudSettings

    try:
        config, settings = load_config(args.file)
    except ConfigError as exc:
        console.print(f"[red]{exc}[/]")
        return 1
    stack = ", ".join(f"{kind}: {config.stage(kind).provider}" for kind in ("vad", "stt", "llm", "tts"))
    console.print(f"[green]ok[/] {args.file} — {stack}")
    # Keys are read when a call builds its pipeline; a config checked where the keys are not (CI) is still valid.
    keyless = {k: s for k, s in settings.items() if isinstance(s, CloudSettings) and s.api_key_or_none() is None}
    for kind, missing in keyless.items():
        env = missing.api_key_env
        console.print(f"[yellow]no API key[/] for {missing.service_name}: a call needs ${env} (or {kind}.api_key)")
    return 1 if keyless and args.require_keys else 0


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
    if args.realtime and args.virtual_time:
        return "--realtime and --virtual-time: give one"
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
