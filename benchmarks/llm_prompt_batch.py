"""What evaluating a prompt in small batches costs LlamaLLM (llama.cpp, Gemma 3 270M Q4_K_M, one thread).

    python benchmarks/llm_prompt_batch.py [--repeats 3] [--tokens 1000] [--batches 512 64 32]

LlamaLLM evaluates a new prompt ``PROMPT_BATCH_TOKENS`` at a time, checking its stop flag between batches, because
llama.cpp cannot be stopped inside a decode. This times the evaluation of one uncached prompt per batch size
(llama.cpp's own default is 512), the batch sizes interleaved in each repeat, and prints the medians: the whole
prompt's time, its cost against the largest batch, and one batch's time — the longest an interrupt waits.
"""

from __future__ import annotations

import argparse
import statistics
import time

from llama_cpp import Llama

from voxpipe.stages.llama_llm import packaged_model_path

LINE = "Could you tell me whether the table by the window is free on day {} at half past seven? Yes, it is."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=1000, help="prompt length")
    parser.add_argument("--batches", type=int, nargs="+", default=[512, 64, 32])
    args = parser.parse_args()

    llama = Llama(str(packaged_model_path()), n_ctx=2048, n_threads=1, verbose=False)
    text = " ".join(LINE.format(day) for day in range(60))
    tokens = llama.tokenize(text.encode())[: args.tokens]
    times: dict[int, list[float]] = {batch: [] for batch in args.batches}
    for repeat in range(args.repeats):
        for batch in args.batches:
            llama.n_tokens = 0  # nothing cached: eval() drops the KV cache beyond n_tokens
            started = time.perf_counter()
            for start in range(0, len(tokens), batch):
                llama.eval(tokens[start : start + batch])
            times[batch].append(time.perf_counter() - started)
        print(f"repeat {repeat + 1}/{args.repeats} done", flush=True)

    base = statistics.median(times[max(args.batches)])
    print(f"\n{len(tokens)} prompt tokens, one thread, median of {args.repeats}\n")
    print("| batch | prompt evaluation | vs largest batch | one batch (an interrupt's wait) |")
    print("|---:|---:|---:|---:|")
    for batch, measured in times.items():
        whole = statistics.median(measured)
        per_batch = whole / -(-len(tokens) // batch)
        print(f"| {batch} | {whole:.2f} s | {100 * (whole / base - 1):+.1f} % | {per_batch * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
