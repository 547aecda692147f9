"""What Resample's continuity check (a gap in the input restarts the stream) costs per frame on the audio path.

    python benchmarks/resample.py [--frames 3000] [--repeats 21]

Every caller and bot frame that is resampled first goes through ``Resample._cut_at_discontinuity``, which compares
its pts with where its stream's input ended. This feeds 20 ms frames of contiguous caller audio (8 -> 16 kHz and
24 -> 16 kHz) and times, per frame and side by side in the same run, the check alone and the conversion
(``convert``: soxr), and prints the median and p95 over repeats of each run's mean per frame.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from voxpipe.pipeline import AudioFrame
from voxpipe.stages.resample import Resample


def frames(rate: int, count: int) -> list[AudioFrame]:
    samples = rate // 50  # 20 ms
    rng = np.random.default_rng(0)
    pcm = (rng.standard_normal(samples) * 3000).astype(np.int16).tobytes()
    return [AudioFrame(pcm=pcm, sample_rate=rate, pts=i * samples) for i in range(count)]


def per_frame_us(rate: int, count: int) -> tuple[float, float]:
    """(check, convert) mean microseconds per frame over one run of ``count`` frames through a fresh stage."""
    stage = Resample(16000)
    check = convert = 0.0
    for frame in frames(rate, count):
        started = time.perf_counter()
        tail = stage._cut_at_discontinuity(frame)
        checked = time.perf_counter()
        stage.convert(frame)
        converted = time.perf_counter()
        assert tail is None, "contiguous input must never cut the stream"
        check += checked - started
        convert += converted - checked
    return check / count * 1e6, convert / count * 1e6


def p95(values: list[float]) -> float:
    return sorted(values)[max(0, round(0.95 * len(values)) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    print(f"{'from':>8} {'check us (median / p95)':>26} {'convert us (median / p95)':>28} {'share':>7}")
    for rate in (8000, 24000):
        runs = [per_frame_us(rate, args.frames) for _ in range(args.repeats)]
        check, convert = [r[0] for r in runs], [r[1] for r in runs]
        share = statistics.median(check) / statistics.median(convert) * 100
        print(
            f"{rate:>8} {statistics.median(check):>13.2f} / {p95(check):<10.2f} "
            f"{statistics.median(convert):>15.2f} / {p95(convert):<10.2f} {share:>6.1f}%"
        )


if __name__ == "__main__":
    main()
