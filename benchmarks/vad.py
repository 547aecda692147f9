"""VAD and end-of-turn figures: what Silero costs, whether batching it across calls pays, what Smart-Turn saves.

    python benchmarks/vad.py [--repeats 7] [--quick] [--batched-model PATH] [--smart-turn-model PATH]

Prints, with the median and p95 over repeats (each repeat is the mean over many back-to-back runs):

1. Silero v6 (faster-whisper's single-stream graph): µs per 32 ms window, run on the calling thread;
2. pipecat-ai's batchable Silero graph: µs per window *per stream* at batch 1…64 — what a process-wide batcher
   would cost per call (interleaved with 1., so both see the same machine load);
3. the thread hop: one window through ``loop.run_in_executor`` vs inline — wall time per window and CPU time the
   event loop's own thread spends on it;
4. ``SileroVAD.analyse`` per 20 ms frame: speech, and digital silence;
5. Smart-Turn v3: feature and inference time, P(turn complete) on Piper-spoken complete/incomplete pairs, and the
   endpointing time (``UserSpeechStopped.at - last_voiced_at``) with and without it, through a real pipeline on
   the real clock — so the inference's own time counts.

2. and 5. need pipecat-ai's model files: from the installed pipecat-ai (``pip install 'voxpipe[bench]'``), or
given by path. Nothing here is a pass/fail test; the figures go into ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from voxpipe.pipeline import (
    AudioFormat,
    AudioFrame,
    Direction,
    Frame,
    Pipeline,
    RealClock,
    Stage,
    UserSpeechStopped,
)
from voxpipe.pipeline.trace import percentile
from voxpipe.stages.silero_vad import CONTEXT, WINDOW, SileroModel, SileroVAD, SileroVADSettings, load_model
from voxpipe.stages.silero_vad import default_model_path as default_vad_path
from voxpipe.stages.smart_turn import SmartTurn, SmartTurnSettings, default_model_path, fit_to_model_window
from voxpipe.stages.smart_turn import log_mel_features as smart_turn_features
from voxpipe.testing.clip import ClipCaller
from voxpipe.testing.speech import speak
from voxpipe.transports.simulated import SimulatedInput

RATE = 16000
PAIRS = [  # (incomplete, complete)
    ("I'd like to book a table for", "I'd like to book a table for two."),
    ("Can you tell me the weather in", "Can you tell me the weather in Paris?"),
    ("I want to fly to", "I want to fly to Boston on Friday."),
    ("I was wondering if", "I was wondering if you are open tomorrow."),
    ("My phone number is five five five", "My phone number is five five five, one two three four."),
]
SYNTHESES = 3  # Piper samples its prosody: each line is spoken this many times


def summary(values: list[float]) -> str:
    return f"median {statistics.median(values):8.1f}   p95 {percentile(values, 95):8.1f}"


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def pipecat_file(relative: str) -> Path | None:
    spec = importlib.util.find_spec("pipecat")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    return path if path.is_file() else None


# ------------------------------------------------------------------------------- 1-2: window cost, batching


def window_runner(model: SileroModel, batch: int) -> Callable[[], object]:
    rng = np.random.default_rng(0)
    windows = (rng.standard_normal((batch, CONTEXT + WINDOW)) * 0.05).astype(np.float32)
    if model.split_state:
        h = np.zeros((1, batch, 128), np.float32)
        return lambda: model.session.run(None, {"input": windows, "h": h, "c": h})
    state = np.zeros((2, batch, 128), np.float32)
    rate = np.array(RATE, dtype=np.int64)
    return lambda: model.session.run(None, {"input": windows, "state": state, "sr": rate})


def bench_windows(batched_model: Path | None, repeats: int, windows: int) -> None:
    single = load_model(str(default_vad_path().resolve()))  # the default graph, the session SileroVAD shares
    runs: dict[str, list[float]] = {"single-stream graph (faster-whisper), 1 window": []}
    batched = load_model(str(batched_model)) if batched_model else None
    batches = (1, 8, 16, 32, 64)
    for batch in batches if batched else ():
        runs[f"batchable graph (pipecat-ai), batch {batch:2d}, per stream"] = []
    per_call_us(window_runner(single, 1), 200)  # onnxruntime's first runs allocate: not what a call sees
    for batch in batches if batched else ():
        assert batched is not None
        per_call_us(window_runner(batched, batch), 20)
    for _ in range(repeats):  # interleaved: every variant sees the same load in each repeat
        runs["single-stream graph (faster-whisper), 1 window"].append(per_call_us(window_runner(single, 1), windows))
        for batch in batches if batched else ():
            assert batched is not None
            calls = max(20, windows // batch)
            runs[f"batchable graph (pipecat-ai), batch {batch:2d}, per stream"].append(
                per_call_us(window_runner(batched, batch), calls) / batch
            )
    print(f"\n1-2. Silero: µs per 32 ms window per stream ({repeats} repeats x ~{windows} windows)")
    for label, values in runs.items():
        print(f"   {label:55s} {summary(values)}")
    if batched is None:
        print("   batchable graph: skipped (pipecat-ai not installed; pass --batched-model PATH)")


# ------------------------------------------------------------------------------------------- 3: thread hop


def bench_thread_hop(repeats: int, windows: int) -> None:
    run = window_runner(load_model(str(default_vad_path().resolve())), 1)
    executor = ThreadPoolExecutor(max_workers=1)

    async def inline() -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.thread_time()
        for _ in range(windows):
            run()
            await asyncio.sleep(0)  # the same loop iteration the threaded variant needs
        return (time.perf_counter() - wall) / windows * 1e6, (time.thread_time() - cpu) / windows * 1e6

    async def threaded() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        wall, cpu = time.perf_counter(), time.thread_time()
        for _ in range(windows):
            await loop.run_in_executor(executor, run)
        return (time.perf_counter() - wall) / windows * 1e6, (time.thread_time() - cpu) / windows * 1e6

    results: dict[str, list[tuple[float, float]]] = {"inline": [], "run_in_executor": []}
    for _ in range(repeats):
        results["inline"].append(asyncio.run(inline()))
        results["run_in_executor"].append(asyncio.run(threaded()))
    executor.shutdown()
    print(f"\n3. One window inline vs through a worker thread, µs ({repeats} repeats x {windows} windows)")
    for label, values in results.items():
        print(f"   {label:16s} wall   {summary([w for w, _ in values])}")
        print(f"   {'':16s} loop CPU {summary([c for _, c in values])}")


# ---------------------------------------------------------------------------------------- 4: per frame


def bench_frames(speech: np.ndarray, repeats: int) -> None:
    frame_samples = RATE // 50
    clip = speech[: speech.size // frame_samples * frame_samples]
    frames = [
        AudioFrame(pcm=clip[i : i + frame_samples].tobytes(), sample_rate=RATE, pts=i)
        for i in range(0, clip.size, frame_samples)
    ]
    silence = [AudioFrame(pcm=bytes(2 * frame_samples), sample_rate=RATE, pts=i * frame_samples) for i in range(500)]
    results: dict[str, list[float]] = {"speech": [], "digital silence": []}
    for frame in frames:
        SileroVAD().analyse(frame)  # warm-up
    for _ in range(repeats):
        for label, stream in (("speech", frames), ("digital silence", silence)):
            vad = SileroVAD()
            start = time.perf_counter()
            for frame in stream:
                vad.analyse(frame)
            results[label].append((time.perf_counter() - start) / len(stream) * 1e6)
    print(f"\n4. SileroVAD.analyse, µs per 20 ms frame ({repeats} repeats; {len(frames)} speech frames)")
    for label, values in results.items():
        print(f"   {label:16s} {summary(values)}")


# ------------------------------------------------------------------------------------------ 5: Smart-Turn


class Stops(Stage):
    def __init__(self) -> None:
        super().__init__(name="stops")
        self.stopped: list[UserSpeechStopped] = []

    async def process(self, frame: Frame, direction: Direction) -> None:
        if isinstance(frame, UserSpeechStopped):
            self.stopped.append(frame)
        await self.push(frame, direction)


async def endpointing_s(clip: np.ndarray, stop_ms: float, end_of_turn: SmartTurn | None) -> float:
    """Seconds from the last voiced sample to the VAD's stop, on the real clock (the model's time counts)."""
    stops = Stops()
    vad = SileroVAD(SileroVADSettings(stop_ms=stop_ms), end_of_turn=end_of_turn)
    pipeline = Pipeline([SimulatedInput(ClipCaller(clip), AudioFormat(RATE)), vad, stops], clock=RealClock())
    await pipeline.run()
    if len(stops.stopped) != 1:
        raise RuntimeError(f"expected one stop, got {stops.stopped}")
    return stops.stopped[0].at - stops.stopped[0].last_voiced_at


def p_complete(model: SmartTurn, speech: np.ndarray) -> float:
    """P(turn complete) as the VAD asks it: the utterance to its last voiced sample, then 200 ms of silence."""
    voiced = np.flatnonzero(np.abs(speech.astype(np.int32)) > 327)
    return model.probability(np.concatenate([speech[: voiced[-1] + 1], np.zeros(RATE // 5, np.int16)]))


def bench_smart_turn(model_path: Path | None, repeats: int, pairs: list[tuple[str, str]]) -> None:
    if model_path is None:
        print("\n5. Smart-Turn: skipped (pipecat-ai not installed; pass --smart-turn-model PATH)")
        return
    model = SmartTurn(SmartTurnSettings(model_path=model_path))
    probe = fit_to_model_window(speak(pairs[0][1]))
    model.probability_from_features(smart_turn_features(probe))  # warm-up
    features, inference = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        x = smart_turn_features(probe)
        features.append((time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
        model.probability_from_features(x)
        inference.append((time.perf_counter() - start) * 1e3)
    print(f"\n5. Smart-Turn v3, ms per question ({repeats} repeats)")
    print(f"   features (numpy log-mel)  {summary(features)}")
    print(f"   inference (onnxruntime)   {summary(inference)}")
    print(
        f"\n   P(complete) after 200 ms of silence ({SYNTHESES} syntheses: min/median/max), and endpointing in s from"
        "\n   the last voiced sample to the stop, on the real clock: Silero alone (stop_ms 500) and with Smart-Turn"
        "\n   (stop_ms 500, and 1000 as the fallback for turns it judges incomplete)"
    )
    print(f"   {'utterance':56s} {'P min/med/max':>17s} {'500':>6s} {'ST+500':>7s} {'ST+1000':>8s}")

    async def without_and_with(clip: np.ndarray) -> tuple[float, float]:
        without, with_model = await asyncio.gather(endpointing_s(clip, 500, None), endpointing_s(clip, 500, model))
        return without, with_model

    for pair in pairs:
        for text in pair:
            spoken = [speak(text) for _ in range(SYNTHESES)]
            probabilities = sorted(p_complete(model, speech) for speech in spoken)
            clip = np.concatenate([np.zeros(RATE // 2, np.int16), spoken[0], np.zeros(RATE * 3 // 2, np.int16)])
            without, with_model = asyncio.run(without_and_with(clip))
            with_long_fallback = asyncio.run(endpointing_s(clip, 1000, model))
            p = "/".join(f"{x:.2f}" for x in (probabilities[0], statistics.median(probabilities), probabilities[-1]))
            print(f"   {text:56s} {p:>17s} {without:6.3f} {with_model:7.3f} {with_long_fallback:8.3f}")
    model.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="fewer windows per repeat (a smoke run)")
    parser.add_argument("--batched-model", type=Path, default=pipecat_file("audio/vad/data/silero_vad.onnx"))
    parser.add_argument("--smart-turn-model", type=Path, default=None)
    args = parser.parse_args()
    smart_turn_model = args.smart_turn_model
    if smart_turn_model is None:
        try:
            smart_turn_model = default_model_path()
        except FileNotFoundError:
            smart_turn_model = None
    windows = 300 if args.quick else 3000
    print(f"nproc {os.cpu_count()}, load average at start {os.getloadavg()[0]:.2f}")
    bench_windows(args.batched_model, args.repeats, windows)
    bench_thread_hop(args.repeats, windows // 3)
    bench_frames(speak(PAIRS[1][1]), args.repeats)
    bench_smart_turn(smart_turn_model, args.repeats, PAIRS[:2] if args.quick else PAIRS)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
