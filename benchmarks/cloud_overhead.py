"""The runtime's own contribution to voice-to-voice in the cloud cascade (issue 4): voice-to-voice measured through
Deepgram → Claude → Cartesia, each played by its loopback fake with a known, injected latency, minus those
latencies. The official SDKs run for real (HTTP, SSE, WebSockets on 127.0.0.1); the fakes run in a process of their
own, so their work does not share the pipeline's interpreter (a process per fake: one fake's work never
delays another's reads).

    python benchmarks/cloud_overhead.py [--turns 100] [--calls 4]

What is injected, per turn:

* endpointing — the VAD's ``stop_ms`` of silence (a turn-taking choice, not work);
* the STT — the fake answers ``Finalize`` ``STT_S`` after it arrives (Deepgram's own endpointing is off, so the
  final transcript always waits for that answer);
* the LLM — the fake's first text delta ``LLM_S`` after the request; the delta holds the whole first clause, so the
  first speakable chunk is complete with it;
* the TTS — the fake's first audio ``TTS_S`` after a context's first text.

The rest is the runtime's: frames through the stages, the SDKs' request/parse work, the loopback sockets, the event
loop. One thing is neither: audio moves in 20 ms frames, so the VAD decides at the end of the frame that completes
``stop_ms`` — up to 20 ms after the silence was enough, by design of the framing (a phone or WebRTC transport has
the same clock) — and the output waits for its next tick if a reply starts while a frame is still playing (when it
is idle it starts at once). Both are computed exactly per turn and reported apart: the contribution with them, and
without them (the target, < 5 ms p95).

Next to each voxpipe call the same call runs through the three SDKs alone (benchmarks/sdk_chain.py, its own fakes),
so the SDKs' own client-side work is measured on the same machine in the same run: voxpipe's runtime minus that
floor is what voxpipe adds. Results: benchmarks/results/cloud_overhead.json, markdown tables on stdout, and a plot
in docs/img/cloud_overhead.svg.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "cloud_overhead.json"
PLOT = ROOT / "docs" / "img" / "cloud_overhead.svg"

STOP_MS = 300  # the VAD's silence that ends a turn
STT_S = 0.060  # Deepgram: Finalize → final result
LLM_S = 0.250  # Claude: request → first text delta
TTS_S = 0.120  # Cartesia: first text → first audio
FRAME_S = 0.020
RATE = 16000  # the call's audio rate (the config's default)
REPLY = "Sure thing, I can help with that. What else would you like to know?"
LINES = [
    "Hello, is the restaurant open tonight?",
    "Could I book a table for two?",
    "Around eight would be great.",
    "The name is Rossi.",
    "Do you have a vegetarian menu?",
]


# --------------------------------------------------------------------------------------------- the fakes


def serve_fake(kind: str, lines: list[str], ports: Any, stop: Any) -> None:
    """Child process: one fake (``stt``, ``llm`` or ``tts``) on 127.0.0.1 until ``stop`` is set. Each fake has a
    process of its own, as each service has its own servers: one fake's work never delays another's reads."""
    from voxpipe.testing.fakes.anthropic import FakeAnthropic
    from voxpipe.testing.fakes.cartesia import FakeCartesia
    from voxpipe.testing.fakes.deepgram import FakeDeepgram

    async def main() -> None:
        if kind == "stt":
            fake: Any = FakeDeepgram(utterances=lines, latency_s=STT_S, interim_every_s=0.25)
        elif kind == "llm":
            fake = FakeAnthropic([REPLY], ttft_s=LLM_S, tokens_per_s=50, words_per_delta=20)
        else:
            fake = FakeCartesia(ttfa_s=TTS_S, rtf=0.5)
        await fake.start()
        ports.put((kind, (fake.url, fake.ws_url)))
        await asyncio.to_thread(stop.wait)  # until the parent's call is over
        await fake.stop()
        ports.put((kind, arrivals(fake)))

    asyncio.run(main())


def arrivals(fake: Any) -> list[float]:
    """When (monotonic clock, the same in every process) each request that starts an injected wait arrived: a
    Finalize (Deepgram), a messages request (Claude), a context's first text (Cartesia)."""
    if fake.provider == "Deepgram":
        return [s.at for s in fake.of("message") if s.data.get("type") == "Finalize"]
    if fake.provider == "Anthropic":
        return [s.at for s in fake.of("request")]
    return [s.at for s in fake.of("context")]


# ------------------------------------------------------------------------------------------------ a call


def config_for(urls: dict[str, tuple[str, str]]) -> dict[str, Any]:
    return {
        "system_prompt": "You answer the phone at Luigi's.",
        "vad": {"provider": "scripted", "stop_ms": STOP_MS},
        "stt": {
            "provider": "deepgram",
            "base_url": urls["stt"][1],
            "api_key": "test-key",
            "endpointing": None,  # the final waits for Finalize: a known latency
            "utterance_end_ms": None,
        },
        "llm": {"provider": "anthropic", "base_url": urls["llm"][0], "api_key": "test-key", "max_tokens": 100},
        "tts": {
            "provider": "cartesia",
            "base_url": urls["tts"][0],
            "websocket_url": urls["tts"][1],
            "api_key": "test-key",
            "voice": "bench-voice",
        },
    }


def run_call(
    urls: dict[str, tuple[str, str]], lines: list[str], out: Path
) -> tuple[list[dict[str, float]], float, float]:
    """The answered turns' marks (clock time); the clock's origin (clock time + origin = the loop's time,
    time.monotonic(), which the fakes record); and the clock time of the call's first tick (its frames' phase)."""
    from voxpipe.call import run_configured_call
    from voxpipe.config import parse_config
    from voxpipe.pipeline import RealClock
    from voxpipe.testing import Say

    config, settings = parse_config(config_for(urls))
    script = [Say(line, pause=0.3) for line in lines]
    clock = RealClock()
    result = run_configured_call(config, settings, script, out, clock=clock, reply_timeout_s=5.0)
    if result.outcome != "ended":
        raise RuntimeError(f"the call did not end cleanly: {result.outcome}")
    tick = clock.metronome(FRAME_S).origin
    assert clock.origin is not None and tick is not None
    answered = [t for t in result.turns if t.voice_to_voice_ms is not None]
    return [dict(t.marks) for t in answered], clock.origin, tick


def _decision_tick(speech_end: float, tick: float) -> float:
    """The clock time of the input tick that delivers the frame completing ``STOP_MS`` of silence after the last
    voiced sample at ``speech_end``. Decided in samples, as the VAD does: a frame delivered at tick ``t`` holds the
    samples from ``round((t - 20 ms) * rate)`` on, and ``tick`` is any tick of the call (input and output tick
    together)."""
    last_voiced = round(speech_end * RATE)
    complete = last_voiced + round(STOP_MS / 1000 * RATE)  # the first sample index at which the silence is enough
    k = math.floor((complete / RATE - tick) / FRAME_S) - 1  # a tick or two early, then walk to the exact one
    while round((tick + k * FRAME_S - FRAME_S) * RATE) + FRAME_S * RATE < complete:
        k += 1
    return tick + k * FRAME_S


def _arrival(times: list[float], after: float) -> float:
    """The first arrival at the fake at or after ``after`` (the request the stage made at that mark)."""
    return next(t for t in times if t >= after - 1e-4)


def _legs(marks: dict[str, float], end: float, arrived: dict[str, list[float]]) -> dict[str, float]:
    """The six SDK legs of a turn whose end was decided at ``end``, in seconds beyond the injected latencies: to the
    fake (the stage's mark → the fake's arrival record) and back (the fake's answer → the stage's mark)."""
    finalize = _arrival(arrived["stt"], end)
    request = _arrival(arrived["llm"], marks["llm.request"])
    text = _arrival(arrived["tts"], marks["llm.first_chunk"])
    return {
        "stt_send": finalize - end,
        "stt_receive": marks["stt.final"] - finalize - STT_S,
        "llm_send": request - marks["llm.request"],
        "llm_receive": marks["llm.first_token"] - request - LLM_S,
        "tts_send": text - marks["llm.first_chunk"],
        "tts_receive": marks["tts.first_audio"] - text - TTS_S,
    }


def turn_figures(
    marks: dict[str, float], origin: float, tick: float, arrived: dict[str, list[float]]
) -> dict[str, float]:
    """One turn, in ms: voice-to-voice, the injected sum, the frame-clock alignment, and the runtime's share — the
    whole of it, by segment, and split between voxpipe's stages and the SDKs' client legs (to the fake and back,
    timed by the fakes' arrival records, in the loop's time: clock time + ``origin``). ``tick``: any tick of the
    call's metronome."""
    speech_end = marks["user.speech_end"]
    v2v = marks["out.first_play"] - speech_end
    injected = STOP_MS / 1000 + STT_S + LLM_S + TTS_S
    decision_tick = _decision_tick(speech_end, tick)
    input_frame = decision_tick - (speech_end + STOP_MS / 1000)
    output_frame = marks["out.first_play"] - marks["tts.first_audio"]  # a tick's wait, unless it started at once
    arrived = {kind: [t - origin for t in times] for kind, times in arrived.items()}
    legs = _legs(marks, marks["turn.end_detected"], arrived)
    stages = {
        "vad": marks["turn.end_detected"] - decision_tick,
        "turn": marks["llm.request"] - marks["stt.final"],
        "chunk": marks["llm.first_chunk"] - marks["llm.first_token"],
    }
    figures = {
        "v2v": v2v,
        "injected": injected,
        "frame_alignment": input_frame + output_frame,
        "runtime_with_frames": v2v - injected,
        "runtime": v2v - injected - input_frame - output_frame,
        "voxpipe_stages": sum(stages.values()),
        "sdk_and_sockets": sum(legs.values()),
        **{f"stage.{name}": value for name, value in stages.items()},
        **{f"leg.{name}": value for name, value in legs.items()},
    }
    return {name: round(value * 1000, 3) for name, value in figures.items()}


def sdk_only_figures(marks: dict[str, float], arrived: dict[str, list[float]]) -> dict[str, float]:
    """One turn of the SDK-only program (benchmarks/sdk_chain.py), in ms, on the same terms as
    :func:`turn_figures`' ``runtime``: from the tick of the frame that completed the silence to the reply's first
    audio, minus the injected STT, LLM and TTS latencies; and the same six legs."""
    end = marks["turn.end_tick"]
    legs = _legs(marks, end, arrived)
    glue = {"turn": marks["llm.request"] - marks["stt.final"], "chunk": 0.0}  # the program's own steps
    figures = {
        "runtime": marks["tts.first_audio"] - end - (STT_S + LLM_S + TTS_S),
        "program": sum(glue.values()),
        "sdk_and_sockets": sum(legs.values()),
        **{f"leg.{name}": value for name, value in legs.items()},
    }
    return {name: round(value * 1000, 3) for name, value in figures.items()}


# ------------------------------------------------------------------------------------------------- report


def summarise(turns: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    from voxpipe.pipeline.trace import percentile

    return {
        name: {
            "p50": percentile([t[name] for t in turns], 50),
            "p95": percentile([t[name] for t in turns], 95),
            "max": max(t[name] for t in turns),
        }
        for name in turns[0]
    }


def plot(turns: list[dict[str, float]], floor: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, rows, colour in (("voxpipe", turns, "#1f6feb"), ("the SDKs alone", floor, "#8250df")):
        runtime = sorted(t["runtime"] for t in rows)
        left.plot(runtime, [100 * (i + 1) / len(runtime) for i in range(len(runtime))], color=colour, label=label)
    left.axvline(5, color="#d73a49", linestyle="--", label="target p95 < 5 ms")
    left.set_xlabel("contribution to voice-to-voice beyond the injected, ms")
    left.set_ylabel("turns, cumulative %")
    left.legend(loc="lower right")
    left.grid(alpha=0.3)
    names = [name for name in turns[0] if name.startswith(("stage.", "leg."))]
    right.boxplot([[t[n] for t in turns] for n in names], tick_labels=[n.split(".")[1] for n in names])
    right.tick_params(axis="x", labelrotation=45)
    right.set_ylabel("ms beyond the injected latency")
    right.set_title("voxpipe: its stages, and the SDKs' legs to the fake and back")
    right.grid(alpha=0.3)
    fig.suptitle(
        f"Cloud cascade on loopback fakes: {len(turns)} turns through voxpipe, {len(floor)} through the SDKs alone"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def with_fakes(lines: list[str], context: Any, run: Any) -> tuple[Any, dict[str, list[float]]]:
    """``run(urls)`` against a fresh set of fakes, each in a process of its own; its result and the fakes' arrival
    times."""
    kinds = ("stt", "llm", "tts")
    ports, stop = context.Queue(), context.Event()
    servers = [context.Process(target=serve_fake, args=(kind, lines, ports, stop), daemon=True) for kind in kinds]
    for server in servers:
        server.start()
    try:
        result = run(dict(ports.get(timeout=30) for _ in kinds))
    finally:
        stop.set()
    arrived = dict(ports.get(timeout=30) for _ in kinds)
    for server in servers:
        server.join(timeout=10)
    return result, arrived


def main() -> None:
    from sdk_chain import run_sdk_only_call

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=100)
    parser.add_argument("--calls", type=int, default=4, help="the turns are spread over this many calls")
    args = parser.parse_args()
    console = Console()
    per_call = math.ceil(args.turns / args.calls)
    turns: list[dict[str, float]] = []
    floor: list[dict[str, float]] = []
    context = multiprocessing.get_context("spawn")
    load_before = os.getloadavg()
    started = time.perf_counter()
    with Progress(console=console) as progress, tempfile.TemporaryDirectory() as scratch:
        task = progress.add_task("turns, voxpipe and the SDKs alone", total=2 * args.turns)
        for call in range(args.calls):  # a voxpipe call, then the same call through the SDKs alone, and again
            lines = [LINES[i % len(LINES)] for i in range(per_call)]
            out = Path(scratch) / f"call{call}"
            (answered, origin, tick), arrived = with_fakes(lines, context, partial(run_call, lines=lines, out=out))
            turns += [turn_figures(marks, origin, tick, arrived) for marks in answered]
            progress.update(task, advance=len(answered))
            marked, arrived = with_fakes(lines, context, partial(run_sdk_only_call, lines=lines, stop_ms=STOP_MS))
            floor += [sdk_only_figures(marks, arrived) for marks in marked]
            progress.update(task, advance=len(marked))
    turns, floor = turns[: args.turns], floor[: args.turns]
    summary, floor_summary = summarise(turns), summarise(floor)
    added = {
        q: round(summary["runtime"][q] - floor_summary["runtime"][q], 3) for q in ("p50", "p95")
    }  # voxpipe's runtime beyond the SDKs' own, by percentile (the calls are different, so no per-turn pairing)
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": f"{platform.machine()}, nproc {os.cpu_count()}, Python {platform.python_version()}",
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "wall_s": round(time.perf_counter() - started, 1),
        "injected_ms": {"stop_ms": STOP_MS, "stt": STT_S * 1000, "llm": LLM_S * 1000, "tts": TTS_S * 1000},
        "summary": summary,
        "sdk_only_summary": floor_summary,
        "added_by_voxpipe": added,
        "turns": turns,
        "sdk_only_turns": floor,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=1))
    plot(turns, floor, PLOT)
    console.print(
        f"\n{len(turns)} turns each, injected {STOP_MS} + {STT_S * 1000:.0f} + {LLM_S * 1000:.0f} + "
        f"{TTS_S * 1000:.0f} ms; load {load_before[0]:.2f} → {os.getloadavg()[0]:.2f}\n"
    )
    print("voxpipe:\n")
    table(summary)
    print("\nthe same turns through the SDKs alone (benchmarks/sdk_chain.py):\n")
    table(floor_summary)
    met = summary["runtime"]["p95"] < 5
    print(f"\nruntime's contribution p95 {summary['runtime']['p95']:.2f} ms: {'met' if met else 'NOT met'} (< 5 ms)")
    print(f"beyond the SDKs alone: p50 {added['p50']:+.2f} ms, p95 {added['p95']:+.2f} ms")
    print(f"median of voice-to-voice {statistics.median(t['v2v'] for t in turns):.1f} ms")


def table(summary: dict[str, dict[str, float]]) -> None:
    print("| figure (ms) | p50 | p95 | max |")
    print("|---|---:|---:|---:|")
    for name, stat in summary.items():
        print(f"| {name} | {stat['p50']:.2f} | {stat['p95']:.2f} | {stat['max']:.2f} |")


if __name__ == "__main__":
    main()
