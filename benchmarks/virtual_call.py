"""How fast a scripted call runs under the virtual clock (DESIGN §7: a five-minute call in under a second).

    python benchmarks/virtual_call.py [--repeats 7]

Runs a scripted call of about five minutes of call time (28 caller lines, each answered), first the pipeline
alone and then the whole ``run_call`` (which also writes the recording, trace, transcript and report), and
prints the median and p95 wall time of each, plus whether the traces of all runs are byte-identical.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from pathlib import Path

from voxpipe.call import run_call, scripted_pipeline
from voxpipe.pipeline import Tracer, VirtualClock
from voxpipe.pipeline.trace import percentile
from voxpipe.testing import Say, ScriptedCaller
from voxpipe.transports.recorder import StereoRecorder

LINES = [
    "I would like to change my booking please",
    "It is under the name Rossi",
    "Can we move it to Friday at eight",
    "Four people instead of two",
    "Do you have a table outside",
]
REPLY = ["Sure, let me look at that for you. One moment please, I am checking the book now."]


def script() -> list[Say]:
    return [Say(LINES[i % len(LINES)], pause=1.5) for i in range(28)]  # just over five minutes of call


def pipeline_only() -> tuple[float, float]:
    clock = VirtualClock()
    caller = ScriptedCaller(script())
    tracer = Tracer()
    pipeline, _ = scripted_pipeline(caller, StereoRecorder(16000), tracer, replies=REPLY, clock=clock)
    start = time.perf_counter()
    clock.run(pipeline.run())
    wall = time.perf_counter() - start
    call_seconds = max(max(t.marks.values()) for t in tracer.turns)
    return wall, call_seconds


def whole_call(out: Path) -> tuple[float, str]:
    start = time.perf_counter()
    run_call(script(), out, replies=REPLY)
    wall = time.perf_counter() - start
    return wall, hashlib.sha256((out / "trace.jsonl").read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    walls, calls, totals, digests = [], [], [], set()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            wall, call_seconds = pipeline_only()
            walls.append(wall)
            calls.append(call_seconds)
            total, digest = whole_call(Path(tmp) / str(i))
            totals.append(total)
            digests.add(digest)
            print(f"run {i + 1}/{args.repeats}: pipeline {wall:.3f} s, whole call {total:.3f} s", flush=True)
    print(f"call length: {statistics.median(calls):.1f} s of call time")
    print(f"pipeline only: median {statistics.median(walls):.3f} s, p95 {percentile(walls, 95):.3f} s wall")
    total_p50, total_p95 = statistics.median(totals), percentile(totals, 95)
    print(f"whole run_call (with artefacts): median {total_p50:.3f} s, p95 {total_p95:.3f} s")
    print(f"traces identical across runs: {len(digests) == 1}")


if __name__ == "__main__":
    main()
