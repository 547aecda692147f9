"""The runtime's own contribution to voice-to-voice in the cloud cascade (issue 4): voice-to-voice measured through
Deepgram → Claude → Cartesia, each played by its loopback fake with a known, injected latency, minus those
latencies. The official SDKs run for real (HTTP, SSE, WebSockets on 127.0.0.1); the fakes run in a process of their
own, so their work does not share the pipeline's interpreter (a process per fake: one fake's work never
delays another's reads), on the cores the client does not use (the client has one to itself).

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

Each turn is also split where the provider modules call their SDKs (the trace's ``<kind>.sdk_call`` /
``<kind>.sdk_answer`` marks): ``voxpipe_own`` is voxpipe's code outside those calls, per turn — what the runtime
adds to the providers' latencies as a client sees them (DESIGN §11) — and ``sdks`` the time inside them beyond the
fakes' waits. The fakes' own lateness and the simulated caller's usual timer lateness are taken out of the client's
figures: they are the servers' and the caller's.

Next to each voxpipe call the same call runs through the three SDKs alone (benchmarks/sdk_chain.py, its own fakes),
so the SDKs' own client-side work is measured on the same machine in the same run: voxpipe's runtime minus that
floor is what voxpipe adds. Results: benchmarks/results/cloud_overhead.json, markdown tables on stdout, and a plot
in docs/img/cloud_overhead.svg.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress

from voxpipe.pipeline import RealClock
from voxpipe.testing.fakes.server import Wait

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


RIGHT_TOP_MS = 30  # the plot's right panel
FAKE_NICE = -10  # the fakes' niceness: raised above the client's (see serve_fake)
CLIENT_CPU = 0  # the client (voxpipe's call, or the SDK-only program) runs on this core, the fakes on the others


def server_cpus() -> set[int]:
    """The cores the fakes run on: all but the client's (none to pin to on a single core)."""
    return set(range(os.cpu_count() or 1)) - {CLIENT_CPU}


def pin_client() -> None:
    """Give the client a core of its own, the fakes the rest (each fake pins itself, see serve_fake): a real
    service's servers do not share the client's CPU. Unpinned, a fake woken by the client's write often took the
    client's core (it runs at a raised priority), and its time was counted as the client's."""
    if server_cpus():
        os.sched_setaffinity(0, {CLIENT_CPU})


@dataclass(frozen=True)
class FakeRecords:
    """What one fake served in a call: its waits (``voxpipe.testing.fakes.server.Wait``: when each request that
    starts an injected wait arrived, when the answer ending it was written), in the loop's time (time.monotonic())
    or shifted to the call's clock; and the fake process's niceness."""

    waits: list[Wait]
    nice: int

    def shifted(self, origin: float) -> FakeRecords:
        return FakeRecords([Wait(w.arrived - origin, w.answered - origin) for w in self.waits], self.nice)

    def after(self, at: float) -> Wait:
        """The first wait whose request arrived at or after ``at``: the request made at that mark."""
        return next(w for w in self.waits if w.arrived >= at - 1e-4)


Fakes = dict[str, FakeRecords]  # by kind: "stt", "llm", "tts"


# --------------------------------------------------------------------------------------------- the fakes


def serve_fake(kind: str, lines: list[str], ports: Any, stop: Any) -> None:
    """Child process: one fake (``stt``, ``llm`` or ``tts``) on 127.0.0.1 until ``stop`` is set. Each fake has a
    process of its own, as each service has its own servers: one fake's work never delays another's reads.

    A real service's CPU is not the client's, so the fake runs on the cores the client does not (see pin_client),
    at a raised scheduling priority where the OS allows (root or CAP_SYS_NICE): a fake woken by a request while its
    core was busy waited for the scheduler's time slice — 2-4 ms in a few turns in 20, counted as the client's."""
    with contextlib.suppress(PermissionError):
        os.nice(FAKE_NICE)
    if server_cpus():
        os.sched_setaffinity(0, server_cpus())
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
        ports.put((kind, (fake.waits(), os.getpriority(os.PRIO_PROCESS, 0))))

    asyncio.run(main())


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


@dataclass(frozen=True)
class CallTimes:
    """What a voxpipe call gives the figures: each answered turn's marks (clock time); the clock's origin (clock
    time + origin = the loop's time, time.monotonic(), which the fakes record); the clock time of the call's first
    tick (its frames' phase); and when the metronome really woke for each tick, by its due time in µs."""

    turns: list[dict[str, float]]
    origin: float
    tick: float
    woke: dict[int, float]

    def woke_for(self, due: float) -> float:
        return self.woke[round(due * 1e6)]

    @property
    def typical_late(self) -> float:
        """How late the metronome usually woke in this call (the median over its ticks): asyncio's timer rounds up
        to whole milliseconds, and the VM takes a while to wake an idle process."""
        return statistics.median(woke - due / 1e6 for due, woke in self.woke.items())


class WakeRecordingClock(RealClock):
    """A real clock that records when each wait really ended, by its due time in µs: asyncio's timers wake up to
    1 ms late (epoll counts whole milliseconds), and the metronome's ticks are such waits."""

    def __init__(self) -> None:
        super().__init__()
        self.woke: dict[int, float] = {}

    async def sleep_until(self, when: float) -> None:
        await super().sleep_until(when)
        self.woke[round(when * 1e6)] = self.now()


def run_call(urls: dict[str, tuple[str, str]], lines: list[str], out: Path) -> CallTimes:
    from voxpipe.call import run_configured_call
    from voxpipe.config import parse_config
    from voxpipe.testing import Say

    config, settings = parse_config(config_for(urls))
    script = [Say(line, pause=0.3) for line in lines]
    clock = WakeRecordingClock()
    result = run_configured_call(config, settings, script, out, clock=clock, reply_timeout_s=5.0)
    if result.outcome != "ended":
        raise RuntimeError(f"the call did not end cleanly: {result.outcome}")
    tick = clock.metronome(FRAME_S).origin
    assert clock.origin is not None and tick is not None
    answered = [dict(t.marks) for t in result.turns if t.voice_to_voice_ms is not None]
    return CallTimes(answered, clock.origin, tick, clock.woke)


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


def _legs(marks: dict[str, float], end: float, fakes: Fakes) -> tuple[dict[str, float], dict[str, float]]:
    """A turn whose end was decided at ``end``, in seconds: its six SDK legs — to the fake (the stage's mark → the
    fake's arrival record) and back (the fake's answer written → the stage's mark) — and, per fake, how much longer
    than the injected latency it took from arrival to answer."""
    stt = fakes["stt"].after(end)  # the Finalize
    llm = fakes["llm"].after(marks["llm.request"])
    tts = fakes["tts"].after(marks["llm.first_chunk"])  # the reply's first text
    legs = {
        "stt_send": stt.arrived - end,
        "stt_receive": marks["stt.final"] - stt.answered,
        "llm_send": llm.arrived - marks["llm.request"],
        "llm_receive": marks["llm.first_token"] - llm.answered,
        "tts_send": tts.arrived - marks["llm.first_chunk"],
        "tts_receive": marks["tts.first_audio"] - tts.answered,
    }
    late = {"stt": stt.served_s - STT_S, "llm": llm.served_s - LLM_S, "tts": tts.served_s - TTS_S}
    return legs, late


def turn_figures(marks: dict[str, float], call: CallTimes, fakes: Fakes) -> dict[str, float]:
    """One turn of ``call``, in ms: voice-to-voice, the injected sum, the frame-clock alignment, and the runtime's
    share — the whole of it, by segment, and split two ways: between voxpipe's own time and its SDK calls (the
    SDK-boundary marks), and between voxpipe's stages, the SDKs' client legs (to the fake and back, timed by the
    fakes' records, in the loop's time: clock time + ``call.origin``) and the fakes' own lateness."""
    speech_end = marks["user.speech_end"]
    v2v = marks["out.first_play"] - speech_end
    injected = STOP_MS / 1000 + STT_S + LLM_S + TTS_S
    decision_tick = _decision_tick(speech_end, call.tick)
    input_frame = decision_tick - (speech_end + STOP_MS / 1000)
    output_frame = marks["out.first_play"] - marks["tts.first_audio"]  # a tick's wait, unless it started at once
    legs, late = _legs(marks, marks["turn.end_detected"], {k: f.shifted(call.origin) for k, f in fakes.items()})
    # The simulated caller's frame came as late as the metronome woke for its tick. Up to the call's usual lateness
    # that is the timer's, the caller's as the fakes' lateness is the server's (a real transport's frames come from
    # the network); beyond it, the loop was busy or the process was not running when the frame was due: voxpipe's.
    woke = call.woke_for(decision_tick)
    caller_late = min(woke - decision_tick, call.typical_late)
    stages = {
        "tick": woke - decision_tick - caller_late,
        "vad": marks["turn.end_detected"] - woke,
        "turn": marks["llm.request"] - marks["stt.final"],
        "chunk": marks["llm.first_chunk"] - marks["llm.first_token"],
    }
    # Each provider module marks where it hands a request to its SDK and where the SDK hands back the answer; between
    # them is the SDK's and the socket's time (and the fake's), outside them voxpipe's own.
    providers = {  # voxpipe's own time in each provider module, on both sides of its SDK call
        "stt": marks["stt.sdk_call"] - marks["turn.end_detected"] + marks["stt.final"] - marks["stt.sdk_answer"],
        "llm": marks["llm.sdk_call"] - marks["llm.request"] + marks["llm.first_token"] - marks["llm.sdk_answer"],
        "tts": marks["tts.sdk_call"] - marks["llm.first_chunk"] + marks["tts.first_audio"] - marks["tts.sdk_answer"],
    }
    injected_by = {"stt": STT_S, "llm": LLM_S, "tts": TTS_S}
    sdks = {  # between the SDK boundary marks: beyond the injected latency and the fake's own lateness
        kind: marks[f"{kind}.sdk_answer"] - marks[f"{kind}.sdk_call"] - injected_by[kind] - late[kind]
        for kind in injected_by
    }
    runtime = v2v - injected - input_frame - output_frame
    figures = {
        "v2v": v2v,
        "injected": injected,
        "frame_alignment": input_frame + output_frame,
        "runtime_with_frames": v2v - injected,
        "runtime": runtime,
        "client_side": runtime - sum(late.values()) - caller_late,
        "voxpipe_own": sum(stages.values()) + sum(providers.values()),
        "sdks": sum(sdks.values()),
        "voxpipe_stages": sum(stages.values()),
        "sdk_and_sockets": sum(legs.values()),
        "fakes_late": sum(late.values()),
        "caller_late": caller_late,
        **{f"stage.{name}": value for name, value in stages.items()},
        **{f"provider.{name}": value for name, value in providers.items()},
        **{f"sdk.{name}": value for name, value in sdks.items()},
        **{f"leg.{name}": value for name, value in legs.items()},
        **{f"late.{name}": value for name, value in late.items()},
    }
    return {name: round(value * 1000, 3) for name, value in figures.items()}


def sdk_only_figures(marks: dict[str, float], fakes: Fakes) -> dict[str, float]:
    """One turn of the SDK-only program (benchmarks/sdk_chain.py), in ms, on the same terms as
    :func:`turn_figures`' ``runtime``: from the tick of the frame that completed the silence to the reply's first
    audio, minus the injected STT, LLM and TTS latencies; and the same six legs and fakes' lateness. Its marks are
    where it calls each SDK and where each SDK answers, so its SDKs' time is its legs (``sdk.*``)."""
    end, woke = marks["turn.end_tick"], marks["turn.end_woke"]
    caller_late = min(woke - end, marks["call.typical_tick_late"])  # as for voxpipe (see turn_figures)
    legs, late = _legs(marks, woke, fakes)
    glue = {"tick": woke - end - caller_late, "turn": marks["llm.request"] - marks["stt.final"]}  # its own steps
    sdks = {kind: legs[f"{kind}_send"] + legs[f"{kind}_receive"] for kind in ("stt", "llm", "tts")}
    runtime = marks["tts.first_audio"] - end - (STT_S + LLM_S + TTS_S)
    figures = {
        "runtime": runtime,
        "client_side": runtime - sum(late.values()) - caller_late,
        "program": sum(glue.values()),
        "sdks": sum(sdks.values()),
        "sdk_and_sockets": sum(legs.values()),
        "fakes_late": sum(late.values()),
        "caller_late": caller_late,
        **{f"sdk.{name}": value for name, value in sdks.items()},
        **{f"leg.{name}": value for name, value in legs.items()},
        **{f"late.{name}": value for name, value in late.items()},
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

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    curves = (
        ("voxpipe's own (outside the SDK calls)", turns, "voxpipe_own", "#2da44e", "-"),
        ("voxpipe, client side", turns, "client_side", "#1f6feb", "-"),
        ("voxpipe, with the fakes' lateness", turns, "runtime", "#1f6feb", ":"),
        ("the SDKs alone, client side", floor, "client_side", "#8250df", "-"),
        ("the SDKs alone, with the fakes' lateness", floor, "runtime", "#8250df", ":"),
    )
    for label, rows, figure, colour, style in curves:
        values = sorted(t[figure] for t in rows)
        cumulative = [100 * (i + 1) / len(values) for i in range(len(values))]
        left.plot(values, cumulative, color=colour, linestyle=style, label=label)
    left.axvline(5, color="#d73a49", linestyle="--", label="target p95 < 5 ms")
    left.set_xlim(0, 40)
    left.set_xlabel("contribution to voice-to-voice beyond the injected, ms")
    left.set_ylabel("turns, cumulative %")
    left.legend(loc="lower right", fontsize="small")
    left.grid(alpha=0.3)
    names = [name for name in turns[0] if name.startswith(("stage.", "provider.", "sdk.", "late."))]
    right.boxplot([[t[n] for t in turns] for n in names], tick_labels=[n.replace(".", " ") for n in names])
    right.tick_params(axis="x", labelrotation=45)
    right.set_ylabel("ms beyond the injected latency")
    right.set_ylim(-1, RIGHT_TOP_MS)  # one VM stall of hundreds of ms would flatten every box
    right.set_title(f"voxpipe's turns, by part (cut at {RIGHT_TOP_MS} ms)", fontsize="medium")
    right.grid(alpha=0.3)
    fig.suptitle(
        f"Cloud cascade on loopback fakes: {len(turns)} turns through voxpipe, {len(floor)} through the SDKs alone"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def with_fakes(lines: list[str], context: Any, run: Any) -> tuple[Any, Fakes]:
    """``run(urls)`` against a fresh set of fakes, each in a process of its own; its result and the fakes'
    records."""
    kinds = ("stt", "llm", "tts")
    ports, stop = context.Queue(), context.Event()
    servers = [context.Process(target=serve_fake, args=(kind, lines, ports, stop), daemon=True) for kind in kinds]
    for server in servers:
        server.start()
    try:
        result = run(dict(ports.get(timeout=30) for _ in kinds))
    finally:
        stop.set()
    records = {kind: FakeRecords(*seen) for kind, seen in (ports.get(timeout=30) for _ in kinds)}
    for server in servers:
        server.join(timeout=10)
    return result, records


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
    niceness: set[int] = set()
    pin_client()
    load_before = os.getloadavg()
    started = time.perf_counter()
    # No auto-refresh: its thread would take the GIL from the call's event loop ten times a second.
    with Progress(console=console, auto_refresh=False) as progress, tempfile.TemporaryDirectory() as scratch:
        task = progress.add_task("turns, voxpipe and the SDKs alone", total=2 * args.turns)
        for call in range(args.calls):  # a voxpipe call, then the same call through the SDKs alone, and again
            lines = [LINES[i % len(LINES)] for i in range(per_call)]
            out = Path(scratch) / f"call{call}"
            times, fakes = with_fakes(lines, context, partial(run_call, lines=lines, out=out))
            turns += [turn_figures(marks, times, fakes) for marks in times.turns]
            niceness |= {f.nice for f in fakes.values()}
            progress.update(task, advance=len(times.turns), refresh=True)
            marked, fakes = with_fakes(lines, context, partial(run_sdk_only_call, lines=lines, stop_ms=STOP_MS))
            floor += [sdk_only_figures(marks, fakes) for marks in marked]
            progress.update(task, advance=len(marked), refresh=True)
    turns, floor = turns[: args.turns], floor[: args.turns]
    summary, floor_summary = summarise(turns), summarise(floor)
    added = {  # voxpipe's beyond the SDKs' own, by percentile (the calls are different, so no per-turn pairing)
        name: {q: round(summary[name][q] - floor_summary[name][q], 3) for q in ("p50", "p95")}
        for name in ("runtime", "client_side")
    }
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": f"{platform.machine()}, nproc {os.cpu_count()}, Python {platform.python_version()}",
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "wall_s": round(time.perf_counter() - started, 1),
        "fakes_nice": sorted(niceness),
        "cpus": {"client": sorted(os.sched_getaffinity(0)), "fakes": sorted(server_cpus())},
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
    contributions = (
        ("runtime", "beyond the injected latencies"),
        ("client_side", "beyond the fakes' own time"),
        ("voxpipe_own", "outside the SDK calls (voxpipe's own, per turn)"),
    )
    for name, what in contributions:
        p95 = summary[name]["p95"]
        print(f"\nruntime's contribution {what}: p95 {p95:.2f} ms, {'met' if p95 < 5 else 'NOT met'} (< 5 ms)")
    for name, by in added.items():
        print(f"{name} beyond the SDKs alone: p50 {by['p50']:+.2f} ms, p95 {by['p95']:+.2f} ms")
    print(f"median of voice-to-voice {statistics.median(t['v2v'] for t in turns):.1f} ms")


def table(summary: dict[str, dict[str, float]]) -> None:
    print("| figure (ms) | p50 | p95 | max |")
    print("|---|---:|---:|---:|")
    for name, stat in summary.items():
        print(f"| {name} | {stat['p50']:.2f} | {stat['p95']:.2f} | {stat['max']:.2f} |")


if __name__ == "__main__":
    main()
