"""Embedded reasoner latency: LlamaLLM (llama.cpp, Gemma 3 270M Q4_K_M) on this machine's CPU.

    python benchmarks/llm.py [--repeats 5] [--threads 1 2] [--turns 5]

Runs a five-turn phone conversation ``--repeats`` times per thread count, each time on a freshly loaded model (so
turn 1 starts with an empty KV cache, like the first call of a process), and prints per turn:

* prompt tokens, and how many of them the model evaluated (the rest came from the KV cache);
* time to first token (TTFT): from asking for the reply to the first text delta on the event loop, so it
  includes evaluating the prompt;
* decode rate: generated tokens per second after the first.

A last row per thread count (``5 cold``) asks turn 5 again on a fresh model, whose cache holds only the preamble:
the cost of evaluating the whole conversation, which the cache saves.

Turn 1 evaluates the whole prompt; later turns only their new lines, which is what keeps TTFT flat as the
conversation grows.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from dataclasses import dataclass

from voxpipe.pipeline import EndOfTurn, Message
from voxpipe.pipeline.trace import percentile
from voxpipe.stages.llama_llm import LlamaLLM, LlamaSettings

SYSTEM = "You are Sam, the receptionist of Luigi's, an Italian restaurant in Boston. You take table bookings."
CALLER_LINES = [
    "Hi, I'd like to book a table for this Friday, please.",
    "There will be four of us, around eight in the evening.",
    "Do you have anything by the window?",
    "Great. Can we bring a birthday cake?",
    "Perfect, the name is Rossi. Thank you!",
    "One more thing, is there parking nearby?",
    "And do you have vegetarian dishes?",
]


@dataclass
class TurnFigures:
    prompt_tokens: int
    evaluated: int
    ttft_s: float
    tokens: int
    decode_tokens_per_s: float | None


async def ask(llm: LlamaLLM, context: list[Message], epoch: int) -> tuple[TurnFigures, str]:
    """One turn: the reply to ``context`` (which ends with the caller's line), with its figures."""
    request = EndOfTurn(epoch=epoch, text=context[-1].text, at=0.0, system=SYSTEM, context=tuple(context))
    asked = time.perf_counter()
    ttft: float | None = None
    reply: list[str] = []
    async for delta in llm.generate(request):
        if ttft is None:
            ttft = time.perf_counter() - asked
        reply.append(str(delta))
    stats = llm.history[-1]
    decoding = stats.total_s - (stats.first_token_s or 0.0)
    rate = (stats.tokens_generated - 1) / decoding if stats.tokens_generated > 1 and decoding > 0 else None
    figures = TurnFigures(
        stats.prompt_tokens,
        stats.prompt_tokens_evaluated,
        ttft if ttft is not None else float("nan"),
        stats.tokens_generated,
        rate,
    )
    return figures, "".join(reply).strip()


async def one_conversation(settings: LlamaSettings, turns: int) -> list[TurnFigures]:
    """``turns`` turns on one model (the cache carries over), then the last turn again on a fresh model."""
    figures: list[TurnFigures] = []
    context: list[Message] = []
    async with LlamaLLM(settings) as llm:
        for epoch in range(1, turns + 1):
            context.append(Message("user", CALLER_LINES[(epoch - 1) % len(CALLER_LINES)]))
            turn_figures, reply = await ask(llm, context, epoch)
            figures.append(turn_figures)
            context.append(Message("assistant", reply or "Sorry?"))
    async with LlamaLLM(settings) as fresh:  # only the preamble is cached: the whole conversation is evaluated
        cold, _ = await ask(fresh, context[:-1], turns)
    figures.append(cold)
    return figures


def p50_p95(values: list[float]) -> str:
    if not values:
        return "—"
    return f"{statistics.median(values):7.1f} / {percentile(sorted(values), 95):7.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--turns", type=int, default=5)
    args = parser.parse_args()

    print(f"LlamaLLM, Gemma 3 270M Q4_K_M; {args.repeats} conversations of {args.turns} turns per thread count")
    print(f"load average before the run: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")
    header = (
        f"{'threads':>7} {'turn':>6} {'prompt':>6} {'evaluated':>9}   {'TTFT ms p50 / p95':>17}   "
        f"{'decode tok/s p50 / p95':>22}   {'tokens':>6}"
    )
    print(header)
    print("-" * len(header))
    for threads in args.threads:
        settings = LlamaSettings(n_threads=threads)
        runs = [asyncio.run(one_conversation(settings, args.turns)) for _ in range(args.repeats)]
        for turn in range(args.turns + 1):
            rows = [run[turn] for run in runs]
            ttft = [row.ttft_s * 1000 for row in rows]
            rates = [row.decode_tokens_per_s for row in rows if row.decode_tokens_per_s is not None]
            label = f"{turn + 1}" if turn < args.turns else f"{args.turns} cold"
            print(
                f"{threads:>7} {label:>6} {statistics.median(r.prompt_tokens for r in rows):>6.0f} "
                f"{statistics.median(r.evaluated for r in rows):>9.0f}   {p50_p95(ttft):>17}   "
                f"{p50_p95(rates):>22}   {statistics.median(r.tokens for r in rows):>6.0f}"
            )
    print(f"load average after the run: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
