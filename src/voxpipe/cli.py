"""The ``voxpipe`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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


def cmd_call(args: argparse.Namespace, console: Console) -> int:
    from voxpipe import demo
    from voxpipe.call import ARTEFACTS, run_call

    if not args.scripted:
        console.print(
            "[red]error:[/] only the scripted stack is available in this version: run "
            "[bold]voxpipe call --scripted --out DIR[/]"
        )
        return 2
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        console.print(f"[red]error:[/] --out {out}: exists and is not a directory")
        return 2
    clock = RealClock() if args.realtime else VirtualClock()
    console.print(f"[bold]voxpipe call[/] — scripted providers, {'real' if args.realtime else 'virtual'} time")

    def progress(record: TurnRecord) -> None:
        console.print(_turn_line(record))

    try:
        result = run_call(demo.SCRIPT, out, replies=demo.REPLIES, clock=clock, tools=demo.TOOLS, on_turn=progress)
    except Exception as exc:
        console.print(f"[red]error:[/] the call failed: {type(exc).__name__}: {exc}")
        console.print(f"[yellow]the files in {out} may be incomplete[/]")
        return 1
    console.print(latency_table(result.turns, result.summary))
    for name in ARTEFACTS:
        console.print(f"  wrote {out / name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voxpipe", description="Real-time cascaded voice agents.")
    sub = parser.add_subparsers(dest="command", required=True)
    call = sub.add_parser("call", help="run a simulated phone call against a pipeline and write its artefacts")
    call.add_argument("--scripted", action="store_true", help="use the scripted providers (no models, no keys)")
    call.add_argument(
        "--out", required=True, help="directory for recording.wav, trace.jsonl, transcript.json, report.html"
    )
    call.add_argument("--realtime", action="store_true", help="run on the wall clock instead of virtual time")
    return parser


def main(argv: list[str] | None = None) -> int:
    console = Console()
    args = build_parser().parse_args(argv)
    if args.command == "call":
        return cmd_call(args, console)
    return 2


if __name__ == "__main__":
    sys.exit(main())
