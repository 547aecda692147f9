"""Voice-to-voice of the embedded offline stack over the example scenarios (issue 3, DESIGN §11).

    python benchmarks/embedded.py [--config examples/configs/offline.yaml ...] [--repeats 1]

For each config and each scenario in examples/scenarios/, runs a real-time call (real VAD, STT, LLM and TTS on
this machine's CPU, the caller spoken by Piper at a slower rate), then reports voice-to-voice p50/p95 and each
segment's p50 over all answered turns, and how far the trace is from the voice-to-voice measured on the
recording's audio. Results go to benchmarks/results/embedded.json and a markdown table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console

from voxpipe.call import run_configured_call
from voxpipe.config import load_config
from voxpipe.measure import measure_voice_to_voice
from voxpipe.pipeline import RealClock, TurnRecord
from voxpipe.pipeline.trace import SEGMENTS, percentile
from voxpipe.scenario import load_scenario
from voxpipe.testing.speech import piper_caller_voice

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "embedded.json"


def run_scenario(
    config_path: Path, scenario_path: Path, out: Path, console: Console
) -> tuple[list[dict[str, Any]], int]:
    """The call's answered turns, and how many playout ticks were a whole frame late (an audible glitch)."""
    config, settings = load_config(config_path)
    scenario = load_scenario(scenario_path)
    voice = piper_caller_voice(scenario.caller.length_scale)

    def progress(record: TurnRecord) -> None:
        v2v = record.voice_to_voice_ms
        console.print(f"    turn {record.turn}: {'no reply' if v2v is None else f'{v2v:.0f} ms'}")

    clock = RealClock()  # one per call: its metronome's lateness belongs to this call alone
    result = run_configured_call(
        config,
        settings,
        scenario.script(scenario_path.parent),
        out,
        clock=clock,
        caller_voice=voice,
        on_turn=progress,
    )
    # Pauses inside a Piper line can reach ~0.4 s; a turn ends after stop_ms (0.5 s) of silence.
    measured = measure_voice_to_voice(out / "recording.wav", min_gap_s=0.45)
    answered = [t for t in result.turns if t.voice_to_voice_ms is not None]
    rows = []
    for turn in answered:
        # Pair by the caller's last voiced sample, not by position: a cough or an unanswered line shifts positions.
        speech_end = turn.marks["user.speech_end"]
        near = [m for m in measured if abs(m.caller_end - speech_end) < 0.05]
        rows.append(
            {
                "scenario": scenario_path.stem,
                "turn": turn.turn,
                "voice_to_voice_ms": turn.voice_to_voice_ms,
                "audio_ms": near[0].voice_to_voice_ms if near else None,
                "segments_ms": turn.segments_ms,
                "interrupted": turn.interrupted,
                "user_text": turn.data.get("user_text", ""),
                "bot_text": turn.data.get("bot_text", ""),
            }
        )
    return rows, clock.metronome(0.02).late_ticks


def summarise(rows: list[dict[str, Any]], late_ticks: int) -> dict[str, Any]:
    v2v = [r["voice_to_voice_ms"] for r in rows]
    gaps = [abs(r["voice_to_voice_ms"] - r["audio_ms"]) for r in rows if r["audio_ms"] is not None]
    return {
        "turns": len(rows),
        "v2v_p50": percentile(v2v, 50),
        "v2v_p95": percentile(v2v, 95),
        "segments_p50": {name: percentile([r["segments_ms"][name] for r in rows], 50) for name in SEGMENTS},
        "trace_vs_audio_max_ms": max(gaps, default=float("nan")),
        "trace_vs_audio_median_ms": statistics.median(gaps) if gaps else float("nan"),
        # Unpaired turns have no silent gap on the recording: the caller went on speaking (a turn ended mid-line).
        "turns_paired_with_audio": len(gaps),
        "late_ticks": late_ticks,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", action="append", help="config file(s); default: offline.yaml")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    configs = [Path(c) for c in (args.config or [ROOT / "examples/configs/offline.yaml"])]
    scenarios = sorted((ROOT / "examples" / "scenarios").glob("*.yaml"))
    console = Console()
    report: dict[str, Any] = {}
    load_before = os.getloadavg()
    for config in configs:
        rows: list[dict[str, Any]] = []
        late_ticks = 0
        for repeat in range(args.repeats):
            for scenario in scenarios:
                console.print(f"[bold]{config.name}[/] · {scenario.stem} · run {repeat + 1}/{args.repeats}")
                with tempfile.TemporaryDirectory() as tmp:
                    call_rows, call_late_ticks = run_scenario(config, scenario, Path(tmp), console)
                rows += call_rows
                late_ticks += call_late_ticks
        report[config.name] = {"summary": summarise(rows, late_ticks), "rows": rows}
    report["machine"] = {
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2))
    header = (
        "| config | turns | v2v p50 | v2v p95 | "
        + " | ".join(f"{s} p50" for s in SEGMENTS)
        + " | trace vs audio max | late ticks |"
    )
    print(header)
    print("|" + "---|" * (6 + len(SEGMENTS)))
    for name, data in report.items():
        if name == "machine":
            continue
        s = data["summary"]
        cells = " | ".join(f"{s['segments_p50'][seg]:.0f}" for seg in SEGMENTS)
        print(
            f"| {name} | {s['turns']} | {s['v2v_p50']:.0f} | {s['v2v_p95']:.0f} | {cells} | "
            f"{s['trace_vs_audio_max_ms']:.1f} | {s['late_ticks']} |"
        )
    before, after = (
        ", ".join(f"{x:.2f}" for x in report["machine"][k]) for k in ("load_average_before", "load_average_after")
    )
    print(f"\n{report['machine']['cpus']} CPUs; load average before the run: {before}; after: {after}")


if __name__ == "__main__":
    main()
