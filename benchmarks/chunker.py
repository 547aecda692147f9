"""What the speakable-chunk splitter costs per LLM token, on the event loop that carries the call's audio.

    python benchmarks/chunker.py [--repeats 21] [--against 3f405f5]

``SpeakableChunker.feed`` runs on every text delta the reasoner streams. This streams three long replies token by
token (words with their leading space, punctuation often a token of its own, as LLM tokenizers split it): plain
English, English full of the cases the splitter must get right (abbreviations, decimals, lists, initials), and
Chinese (one character per token). It prints the median and p95, over repeats, of each run's mean per token. With
``--against REV`` the chunker of that git revision is timed side by side in the same run.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

from voxpipe.stages import text as current

TRICKY = (
    "Of course, I can help you with that. Your table for four is booked at 7.30 p.m. tonight, and Dr. Smith "
    "asked for the quiet corner, e.g. near the window. The total is about 1,000 dollars for the whole group, which "
    "includes wine; is that okay? Steps: 1. Open the app now. 2. Tap settings. 3. Pick your account. She has a "
    "Ph.D. in physics, and the U.S. office at room No. 5 is open until 8 p.m. Then we went home. "
) * 20
PLAIN = (
    "Of course, I can help you with that. Your table for four is booked for tonight, and the chef asked for the "
    "quiet corner near the window. We have pasta with tomatoes and basil, risotto with mushrooms, grilled fish "
    "with lemon and capers, and a tiramisu that people drive across town for! Is that okay? "
) * 20
CHINESE = (
    "好的，我可以帮你预订。你想要几点的桌子？"  # noqa: RUF001 (Chinese punctuation is the point)
    "我们今晚七点有空位。请告诉我你的名字和电话号码，我马上为你确认。"  # noqa: RUF001
) * 20
REPLIES = {
    "plain English": re.findall(r" ?[A-Za-z]+|[^\sA-Za-z]+| ", PLAIN),
    "English, tricky": re.findall(r" ?[A-Za-z]+|[^\sA-Za-z]+| ", TRICKY),
    "Chinese": list(CHINESE),
}


def chunker_at(revision: str) -> ModuleType:
    """The chunker module as it was at ``revision`` (loaded from a temporary file, not installed)."""
    source = subprocess.run(
        ["git", "show", f"{revision}:src/voxpipe/stages/text.py"], capture_output=True, text=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "text_at_revision.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("text_at_revision", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def per_token_us(module: ModuleType, tokens: list[str]) -> float:
    chunker = module.SpeakableChunker()
    started = time.perf_counter()
    for token in tokens:
        chunker.feed(token)
    chunker.flush()
    return (time.perf_counter() - started) / len(tokens) * 1e6


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--against", help="a git revision whose chunker is timed side by side")
    args = parser.parse_args()
    chunkers = {"now": current}
    if args.against:
        chunkers[args.against] = chunker_at(args.against)
    print(f"python {sys.version.split()[0]}, {args.repeats} repeats; µs per token, median / p95")
    print("| reply | tokens | " + " | ".join(chunkers) + " |")
    print("|---|---:|" + "---:|" * len(chunkers))
    for name, tokens in REPLIES.items():
        times: dict[str, list[float]] = {label: [] for label in chunkers}
        for _ in range(args.repeats):
            for label, module in chunkers.items():  # interleaved: both see the same machine state
                times[label].append(per_token_us(module, tokens))
        cells = [f"{statistics.median(t):.2f} / {p95(t):.2f}" for t in times.values()]
        print(f"| {name} | {len(tokens)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
