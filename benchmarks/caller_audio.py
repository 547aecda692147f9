"""What taking a decode's audio costs WhisperSTT's event loop in a long utterance (``CallerAudio.between``).

    python benchmarks/caller_audio.py [--repeats 21] [--minutes 1 5 10]

WhisperSTT keeps the caller's audio since the utterance began and, on the event loop that carries the call's
audio, takes from it the whole utterance for a final and the last 28 s for a partial. This times both for
utterances of several minutes of 20 ms frames at 16 kHz, for ``CallerAudio`` (one buffer, sliced) and, side by
side in the same run, for the list of frames it replaced (each frame copied to its place), and prints the median
and p95 of each.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from voxpipe.stages.whisper_stt import CallerAudio

RATE = 16000
FRAME = 320  # 20 ms
PARTIAL_WINDOW = 28 * RATE


class FramesJoinedOneByOne:
    """The store CallerAudio replaced: frames kept as they came, each copied to its place when audio is taken."""

    def __init__(self) -> None:
        self.frames: deque[tuple[int, bytes]] = deque()

    def append(self, pts: int, pcm: bytes) -> None:
        self.frames.append((pts, pcm))

    def between(self, start: int, end: int) -> np.ndarray:
        out = np.zeros(max(0, end - start), dtype=np.int16)
        for pts, pcm in self.frames:
            lo, hi = max(pts, start), min(pts + len(pcm) // 2, end)
            if lo < hi:
                out[lo - start : hi - start] = np.frombuffer(pcm, dtype=np.int16, count=hi - lo, offset=2 * (lo - pts))
        return out


def timed(take: Callable[[], np.ndarray], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        take()
        times.append(time.perf_counter() - started)
    return times


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--minutes", type=float, nargs="+", default=[1, 5, 10])
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    print("| utterance | audio taken | frames joined one by one (median / p95) | CallerAudio (median / p95) |")
    print("|---:|---|---:|---:|")
    for minutes in args.minutes:
        frames = round(minutes * 60 * RATE / FRAME)
        stores = (FramesJoinedOneByOne(), CallerAudio())
        for i in range(frames):
            pcm = rng.integers(-3000, 3000, FRAME, dtype=np.int16).tobytes()
            for store in stores:
                store.append(i * FRAME, pcm)
        end = frames * FRAME
        for what, start in (("final: all of it", 0), ("partial: last 28 s", max(0, end - PARTIAL_WINDOW))):
            old, new = (timed(functools.partial(store.between, start, end), args.repeats) for store in stores)
            assert np.array_equal(stores[0].between(start, end), stores[1].between(start, end))
            cells = [f"{statistics.median(t) * 1e3:.2f} / {p95(t) * 1e3:.2f} ms" for t in (old, new)]
            print(f"| {minutes:g} min | {what} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
