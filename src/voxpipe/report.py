"""The per-turn report: one self-contained HTML page (inline SVG, no scripts, no network).

Per turn, a waterfall of the critical-path segments from the caller's last voiced sample to the first bot sample
played; then the percentile table; then the transcript with interrupted replies and the words the caller heard.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from voxpipe.measure import MeasuredTurn, measure_voice_to_voice
from voxpipe.pipeline.trace import SEGMENTS, Summary, TurnRecord
from voxpipe.pipeline.usage import amounts_text

COLOURS = {
    "voice_to_voice": "#333333",
    "endpointing": "#8e9aaf",
    "stt": "#4e79a7",
    "turn": "#b07aa1",
    "llm_ttft": "#f28e2b",
    "first_chunk": "#edc948",
    "tts_ttfb": "#59a14f",
    "playout": "#e15759",
}


def _waterfall(turns: list[TurnRecord]) -> str:
    answered = [t for t in turns if t.voice_to_voice_us is not None]
    if not answered:
        return "<p>No turn was answered.</p>"
    longest = max(t.voice_to_voice_us or 0 for t in answered) or 1
    row, label_w, width = 26, 90, 760
    scale = (width - label_w - 70) / longest
    parts = [f'<svg width="{width}" height="{row * len(answered) + 56}" role="img" aria-label="latency waterfall">']
    parts.append(_axis(label_w, row * len(answered) + 4, longest / 1000, scale * 1000))
    for i, record in enumerate(answered):
        y = i * row + 4
        parts.append(f'<text x="0" y="{y + 15}" font-size="12">turn {record.turn}</text>')
        x = float(label_w)
        for name in SEGMENTS:
            us = record.segments_us.get(name, 0)
            w = us * scale
            if w > 0:
                tip = f"{name}: {us / 1000:.1f} ms"
                parts.append(
                    f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row - 8}" fill="{COLOURS[name]}">'
                    f"<title>{html.escape(tip)}</title></rect>"
                )
            x += w
        v2v = record.voice_to_voice_ms or 0.0
        parts.append(f'<text x="{x + 4:.1f}" y="{y + 15}" font-size="12">{v2v:.0f} ms</text>')
    y = len(answered) * row + 46
    x = float(label_w)
    for name in SEGMENTS:
        parts.append(f'<rect x="{x}" y="{y - 9}" width="10" height="10" fill="{COLOURS[name]}"/>')
        parts.append(f'<text x="{x + 13}" y="{y}" font-size="11">{name}</text>')
        x += 13 + 7.5 * len(name) + 10
    parts.append("</svg>")
    return "".join(parts)


def _tick_step(longest_ms: float) -> int:
    """The smallest of 100, 250, 500, 1000, 2500, 5000, 10000, … ms that puts at most 8 ticks on the axis."""
    if not math.isfinite(longest_ms):
        return 100  # no length to scale to; never loop forever
    decade = 1
    while True:
        for base in (100, 250, 500):
            if longest_ms / (base * decade) <= 8:
                return base * decade
        decade *= 10


def _axis(x0: float, y: float, longest_ms: float, px_per_ms: float) -> str:
    """A millisecond axis under a chart, with a tick every 100, 250, 500 or 1000 ms (or more, for a long one)."""
    step = _tick_step(longest_ms)
    parts = [f'<line x1="{x0}" x2="{x0 + longest_ms * px_per_ms:.1f}" y1="{y}" y2="{y}" stroke="#999"/>']
    tick = 0
    while tick <= longest_ms:
        x = x0 + tick * px_per_ms
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y}" y2="{y + 4}" stroke="#999"/>')
        parts.append(f'<text x="{x:.1f}" y="{y + 15}" font-size="10" text-anchor="middle">{tick} ms</text>')
        tick += step
    return "".join(parts)


def _percentile_chart(summary: Summary) -> str:
    """Horizontal bars: p50 solid, p95 as a lighter extension, max as a tick — per segment and voice-to-voice."""
    rows = summary.rows()
    if not rows:
        return ""
    longest = max(mx for *_, mx in rows) or 1.0
    row, label_w, width = 24, 120, 760
    scale = (width - label_w - 210) / longest
    parts = [f'<svg width="{width}" height="{row * len(rows) + 30}" role="img" aria-label="latency percentiles">']
    parts.append(_axis(label_w, row * len(rows) + 4, longest, scale))
    for i, (name, _n, p50, p95, mx) in enumerate(rows):
        y = i * row + 4
        colour = COLOURS.get(name, "#555")
        parts.append(f'<text x="0" y="{y + 14}" font-size="12">{html.escape(name)}</text>')
        parts.append(
            f'<rect x="{label_w}" y="{y}" width="{p95 * scale:.1f}" height="{row - 8}" fill="{colour}" opacity="0.35">'
            f"<title>p95 {p95:.1f} ms</title></rect>"
        )
        parts.append(
            f'<rect x="{label_w}" y="{y}" width="{p50 * scale:.1f}" height="{row - 8}" fill="{colour}">'
            f"<title>p50 {p50:.1f} ms</title></rect>"
        )
        x_max = label_w + mx * scale
        parts.append(f'<line x1="{x_max:.1f}" x2="{x_max:.1f}" y1="{y}" y2="{y + row - 8}" stroke="#222"/>')
        label = f"p50 {p50:.0f} · p95 {p95:.0f} · max {mx:.0f} ms"
        parts.append(f'<text x="{x_max + 6:.1f}" y="{y + 13}" font-size="11">{label}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _percentiles(summary: Summary) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{n}</td><td>{p50:.1f}</td><td>{p95:.1f}</td><td>{mx:.1f}</td></tr>"
        for name, n, p50, p95, mx in summary.rows()
    )
    return f"<table><tr><th>segment</th><th>n</th><th>p50 ms</th><th>p95 ms</th><th>max ms</th></tr>{rows}</table>"


def _transcript(lines: list[dict[str, Any]]) -> str:
    items = []
    for line in lines:
        if line["speaker"] == "caller":
            if line.get("resumed"):  # it cut the bot off, then held no words: the bot carried on
                items.append('<li class="caller"><b>caller (barge-in):</b> <i>no words; the bot carried on</i></li>')
                continue
            tag = " (barge-in)" if line.get("barge_in") else ""
            items.append(f'<li class="caller"><b>caller{tag}:</b> {html.escape(line["text"])}</li>')
        else:
            said = html.escape(line.get("text", ""))
            if line.get("interrupted"):
                heard = html.escape(line.get("heard", ""))
                cut = f'<span class="cut">of «{said}»</span>'
                items.append(f'<li class="bot"><b>bot (interrupted):</b> heard «{heard}» {cut}</li>')
            else:
                items.append(f'<li class="bot"><b>bot:</b> {said}</li>')
    return f"<ul>{''.join(items)}</ul>"


_MATCH_S = 0.25  # a trace turn and a turn found in the audio are the same turn if both ends are this close


def _agreement(turns: list[TurnRecord], recording: Path | None) -> str:
    if recording is None or not recording.exists():
        return ""
    measured = measure_voice_to_voice(recording)
    rows = ""
    for turn in turns:
        if turn.voice_to_voice_ms is None:
            continue
        audio = _same_turn(turn, measured)
        if audio is None:
            rows += f"<tr><td>{turn.turn}</td><td>{turn.voice_to_voice_ms:.1f}</td><td>—</td><td>not found</td></tr>"
            continue
        diff = round(turn.voice_to_voice_ms - audio.voice_to_voice_ms, 1) + 0.0
        rows += (
            f"<tr><td>{turn.turn}</td><td>{turn.voice_to_voice_ms:.1f}</td><td>{audio.voice_to_voice_ms:.1f}</td>"
            f"<td>{diff:+.1f}</td></tr>"
        )
    return (
        "<h2>Trace against the recording</h2><p>Voice-to-voice from the trace, and measured from the stereo "
        "recording's audio energy (the turn whose caller end and bot start are within "
        f"{_MATCH_S * 1000:.0f} ms of the trace's).</p><table><tr><th>turn</th><th>trace ms</th><th>audio ms</th>"
        f"<th>diff</th></tr>{rows}</table>"
    )


def _same_turn(turn: TurnRecord, measured: list[MeasuredTurn]) -> MeasuredTurn | None:
    """The turn found in the audio that is ``turn``: matched by time, not by position, since the audio may hold a
    turn the trace has not (a cough the bot's next sentence followed) or miss one (a reply too quiet to detect)."""
    caller_end, bot_start = turn.marks.get("user.speech_end"), turn.marks.get("out.first_play")
    if caller_end is None or bot_start is None:
        return None
    close = [
        m for m in measured if abs(m.caller_end - caller_end) <= _MATCH_S and abs(m.bot_start - bot_start) <= _MATCH_S
    ]
    return min(close, key=lambda m: abs(m.caller_end - caller_end) + abs(m.bot_start - bot_start), default=None)


def _usage(turns: list[TurnRecord], usage: dict[str, dict[str, float]], cost_usd: dict[str, float]) -> str:
    """The call's usage and cost by stage, then each turn's; the turns add up to the call less what no turn took
    (the audio after the last utterance)."""
    if not usage:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(stage)}</td><td>{html.escape(amounts_text(counts))}</td>"
        f"<td>{cost_usd.get(stage, 0.0):.6f}</td></tr>"
        for stage, counts in usage.items()
    )
    rows += f"<tr><th>call</th><td></td><th>{cost_usd.get('total', 0.0):.6f}</th></tr>"
    per_turn = "".join(
        f"<tr><td>{turn.turn}</td><td>"
        + html.escape("; ".join(f"{stage}: {amounts_text(counts)}" for stage, counts in turn.data["usage"].items()))
        + f"</td><td>{turn.data.get('cost_usd', {}).get('total', 0.0):.6f}</td></tr>"
        for turn in turns
        if turn.data.get("usage")
    )
    return (
        "<h2>Usage and cost</h2><p>Prices: the config's <code>pricing</code>, else the providers' list prices. A "
        "turn's usage is what its work used; the audio after the last utterance belongs to no turn.</p>"
        f"<table><tr><th>stage</th><th>usage</th><th>USD</th></tr>{rows}</table>"
        f"<table><tr><th>turn</th><th>usage</th><th>USD</th></tr>{per_turn}</table>"
    )


def _status(status: dict[str, Any] | None, errors: list[dict[str, Any]]) -> str:
    """How the call ended, and every error reported during it (a turn cut by a failure looks like a barge-in in the
    waterfall: this says which it was)."""
    if status is None:
        return ""
    if status.get("status") == "failed":
        head = f'<p class="failed">The call failed: {html.escape(str(status.get("error", "")))}</p>'
    else:
        head = f"<p>The call {html.escape(str(status.get('status', '')))}.</p>"
    items = "".join(
        f"<li>turn {e['turn']}, {html.escape(str(e['stage']))}{' (fatal)' if e['fatal'] else ''}: "
        f"{html.escape(str(e['error']))}</li>"
        for e in errors
    )
    return head + (f"<p>Errors reported during the call:</p><ul>{items}</ul>" if items else "")


def write_report(
    path: str | Path,
    turns: list[TurnRecord],
    summary: Summary,
    transcript: list[dict[str, Any]],
    *,
    recording: Path | None = None,
    usage: dict[str, dict[str, float]] | None = None,
    cost_usd: dict[str, float] | None = None,
    status: dict[str, Any] | None = None,
    errors: list[dict[str, Any]] | None = None,
    title: str = "voxpipe call report",
) -> Path:
    """``status`` and ``errors`` as ``transcript.json`` has them (``{"status": "failed", "error": …}``, and one
    ``{"turn", "stage", "error", "fatal"}`` per error)."""
    path = Path(path)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 60em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }} li.caller {{ color: #1f4e79; }} li.bot {{ color: #5a3d00; }}
.cut {{ color: #999; text-decoration: line-through; }} .failed {{ color: #b00020; font-weight: bold; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
{_status(status, errors or [])}
<h2>Voice-to-voice per turn</h2>
<p>From the caller's last voiced sample to the first bot sample played; segments are the critical path and add up
exactly to the total.</p>
{_waterfall(turns)}
<h2>Percentiles</h2>
<p>Bars: p50 (solid) and p95 (light); the tick is the maximum.</p>
{_percentile_chart(summary)}
{_percentiles(summary)}
{_agreement(turns, recording)}
{_usage(turns, usage or {}, cost_usd or {})}
<h2>Transcript</h2>
{_transcript(transcript)}
</body></html>
"""
    path.write_text(page, encoding="utf-8")
    return path
