"""STT figures: what a Whisper decode costs, and how soon the final transcript follows the VAD's stop.

    python benchmarks/stt.py [--repeats 5] [--threads 1 2] [--quick] [--skip-accuracy]

Prints, with the median and p95 over repeats, for utterances of about 1, 3 and 6 s of Piper speech:

1. decode time — one decode of the utterance plus 0.3 s of pre-roll, as ``WhisperSTT`` runs it (short-context
   encoding, greedy, int8): what each partial costs, and what a final costs when it needs a decode of its own;
   with ``word_timestamps`` on; and faster-whisper's own ``transcribe()`` (a full 30 s window) for comparison;
2. final latency — clock time from ``UserSpeechStopped`` leaving the STT to the final ``Transcript`` leaving it,
   through a real pipeline on the real clock (simulated caller in real time → Silero VAD, stop_ms 500 →
   WhisperSTT), with the decode in the pause on (the default) and off; ``reused`` counts finals that needed no
   decode of their own; ``busy`` is decode time per second of caller speech (the share of a core, per thread);
3. accuracy against ``min_context_s``: word error rate and decode time over short answers and sentences (each
   spoken three times, Piper varies), with 0.3 s of silence before and after, as the stage gives it.

for each ``cpu_threads`` asked for. The machine is shared (other processes may run): the load average is printed
with each table. Nothing here is a pass/fail test; the figures go into ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import numpy as np

from voxpipe.pipeline import (
    AudioFormat,
    Direction,
    Frame,
    Pipeline,
    RealClock,
    Stage,
    Transcript,
    UserSpeechStopped,
)
from voxpipe.pipeline.trace import percentile
from voxpipe.stages.silero_vad import SileroVAD
from voxpipe.stages.whisper_stt import DecodeOptions, WhisperSTT, WhisperSTTSettings, default_model_path, load_decoder
from voxpipe.testing.clip import ClipCaller
from voxpipe.testing.speech import speak
from voxpipe.testing.wer import word_error_rate
from voxpipe.transports.simulated import SimulatedInput

RATE = 16000
PRE_ROLL_S = 0.3
UTTERANCES = {  # nominal length → what the caller says (Piper's joe voice, at its own pace)
    "1 s": "Table for two, please.",
    "3 s": "I would like to book a table for two people tomorrow evening.",
    "6 s": "Hello, I would like to book a table for two people tomorrow evening. Do you also have any vegetarian "
    "options on the menu?",
}
GAP_S = 1.5  # silence after each utterance: the VAD's stop_ms and the final fit in it
ACCURACY_SET = [
    "Yes.",
    "No.",
    "Hi.",
    "Sure.",
    "Great.",
    "Nope.",
    "Goodbye.",
    "Yes, please.",
    "Okay, thanks.",
    "That's right.",
    "Thank you very much.",
    "Table for two, please.",
    "Hmm, let me think.",
    "Book a table for the weekend.",
    "Could you check the weather in Paris?",
    "Please send the confirmation to my email address.",
    "I need to change my flight to Boston from Tuesday to Thursday morning.",
    UTTERANCES["6 s"],
]


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):6.3f} {percentile(values, 95):6.3f}"


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def trimmed(clip: np.ndarray) -> np.ndarray:
    """``clip`` without Piper's leading and trailing near-silence, so its length is the speech's."""
    loud = np.flatnonzero(np.abs(clip.astype(np.int32)) > 0.01 * 32767)
    return clip[loud[0] : loud[-1] + 1]


# ----------------------------------------------------------------------------------------- 1. decode time


def bench_decodes(clips: dict[str, np.ndarray], threads: list[int], repeats: int, full_window: bool) -> None:
    print(f"\n1. decode time, s (median p95 over {repeats}); audio = utterance + {PRE_ROLL_S} s pre-roll   [{load()}]")
    header = f"{'threads':>7} {'utterance':>9} {'speech s':>8}  {'decode':>13}  {'+word times':>13}"
    print(header + (f"  {'transcribe()':>13}" if full_window else ""))
    for n in threads:
        decoder = load_decoder(default_model_path(), n)
        for label, clip in clips.items():
            audio = np.concatenate([np.zeros(round(PRE_ROLL_S * RATE), np.int16), clip]).astype(np.float32) / 32768
            plain = [decoder.decode(audio, DecodeOptions()).seconds for _ in range(repeats)]
            timed = [decoder.decode(audio, DecodeOptions(word_timestamps=True)).seconds for _ in range(repeats)]
            row = f"{n:>7} {label:>9} {clip.size / RATE:8.2f}  {summary(plain)}  {summary(timed)}"
            if full_window:
                row += f"  {summary([transcribe_s(decoder, audio) for _ in range(max(2, repeats // 2))])}"
            print(row)


def transcribe_s(decoder: object, audio: np.ndarray) -> float:
    """faster-whisper's own path: every input padded to a 30 s window."""
    model = decoder.model  # type: ignore[attr-defined]
    started = time.perf_counter()
    segments, _ = model.transcribe(
        audio, language="en", beam_size=1, temperature=0.0, vad_filter=False, condition_on_previous_text=False
    )
    list(segments)
    return time.perf_counter() - started


# -------------------------------------------------------------------------------------- 2. final latency


class FinalProbe(Stage):
    """After the STT: the clock time each stop and each final passed, and whether the final was a reused decode."""

    def __init__(self, stt: WhisperSTT) -> None:
        super().__init__(name="probe")
        self.stt = stt
        self.stops: list[float] = []
        self.finals: list[tuple[float, bool, str]] = []

    async def process(self, frame: Frame, direction: Direction) -> None:
        if isinstance(frame, UserSpeechStopped):
            self.stops.append(self.clock.now())
        elif isinstance(frame, Transcript) and frame.final:
            reused = self.stt.stats.finals_reused > sum(reused for _, reused, _ in self.finals)
            self.finals.append((self.clock.now(), reused, frame.text))
        await self.push(frame, direction)


async def final_latencies(
    clips: dict[str, np.ndarray], settings: WhisperSTTSettings, repeats: int
) -> tuple[dict[str, list[tuple[float, bool]]], float]:
    """Play every clip ``repeats`` times; returns latencies (and reuse) per clip, and decode s per speech s."""
    order = [label for _ in range(repeats) for label in clips]
    gap = np.zeros(round(GAP_S * RATE), np.int16)
    stream = np.concatenate([np.zeros(RATE // 2, np.int16)] + [part for label in order for part in (clips[label], gap)])
    stt = WhisperSTT(settings)
    probe = FinalProbe(stt)
    pipeline = Pipeline(
        [SimulatedInput(ClipCaller(stream), AudioFormat(RATE)), SileroVAD(), stt, probe], clock=RealClock()
    )
    await pipeline.run()
    if len(probe.stops) != len(order) or len(probe.finals) != len(order):
        raise RuntimeError(
            f"the VAD found {len(probe.stops)} utterances and the STT gave {len(probe.finals)} finals for "
            f"{len(order)} spoken: {[text for *_, text in probe.finals]}"
        )
    results: dict[str, list[tuple[float, bool]]] = {label: [] for label in clips}
    for label, stop, (final, reused, _) in zip(order, probe.stops, probe.finals, strict=True):
        results[label].append((final - stop, reused))
    speech_s = sum(clips[label].size for label in order) / RATE
    return results, stt.stats.decode_seconds / speech_s


def bench_finals(clips: dict[str, np.ndarray], threads: list[int], repeats: int) -> None:
    print(f"\n2. final latency, s: UserSpeechStopped → final Transcript (median p95 max over {repeats}), real time")
    print(
        f"{'threads':>7} {'pause decode':>12} {'utterance':>9}  {'latency':>13} {'max':>6}  {'reused':>6}  {'busy':>5}"
    )
    for n in threads:
        for pause in (0.15, None):
            settings = WhisperSTTSettings(cpu_threads=n, decode_on_pause_s=pause)
            results, busy = asyncio.run(final_latencies(clips, settings, repeats))
            for label, rows in results.items():
                latencies = [latency for latency, _ in rows]
                reused = sum(r for _, r in rows)
                print(
                    f"{n:>7} {'on' if pause else 'off':>12} {label:>9}  {summary(latencies)} {max(latencies):6.3f}  "
                    f"{reused:>3}/{len(rows):<2}  {busy:5.2f}"
                )
        print(f"{'':>7} [{load()}]")


# -------------------------------------------------------------------------------------------- 3. accuracy


def bench_accuracy(contexts: list[float], takes: int) -> None:
    decoder = load_decoder(default_model_path(), 1)
    pad = np.zeros(round(PRE_ROLL_S * RATE), np.int16)
    clips = [(text, trimmed(speak(text, sample_rate=RATE))) for text in ACCURACY_SET for _ in range(takes)]
    print(f"\n3. accuracy vs min_context_s: {len(clips)} clips, 1 thread   [{load()}]")
    print(f"{'context s':>9}  {'WER':>6}  {'WER>0.5':>7}  {'decode s':>13}")
    for context in contexts:
        errors, seconds = [], []
        for text, clip in clips:
            audio = np.concatenate([pad, clip, pad]).astype(np.float32) / 32768
            recognition = decoder.decode(audio, DecodeOptions(min_context_s=context))
            errors.append(min(1.0, word_error_rate(text, recognition.text)))  # a loop would count hundreds
            seconds.append(recognition.seconds)
        wrong = sum(e > 0.5 for e in errors)
        print(f"{context:9.0f}  {statistics.mean(errors):6.3f}  {wrong:>3}/{len(errors):<3}  {summary(seconds)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--quick", action="store_true", help="2 repeats, 1 thread, no transcribe() comparison")
    parser.add_argument("--skip-accuracy", action="store_true", help="leave out 3. (about two minutes)")
    args = parser.parse_args()
    repeats, threads = (2, [1]) if args.quick else (args.repeats, args.threads)
    clips = {label: trimmed(speak(text, sample_rate=RATE)) for label, text in UTTERANCES.items()}
    print(f"Whisper tiny.en int8 ({default_model_path()}), {os.cpu_count()} CPUs")
    bench_decodes(clips, threads, repeats, full_window=not args.quick)
    bench_finals(clips, threads, repeats)
    if not args.skip_accuracy:
        bench_accuracy([1, 6, 10, 15, 30], takes=1 if args.quick else 3)


if __name__ == "__main__":
    main()
