"""Claude's client-side cost per request with the SDK's two HTTP transports, side by side in one run: httpx (the
SDK's default) and aiohttp (``DefaultAioHttpClient``, AnthropicLLM's default, ``http_client`` in its settings).

    python benchmarks/anthropic_transport.py [--requests 200]

FakeAnthropic runs in a process of its own and answers at once (no injected latency); the requests alternate
between two clients, one per transport, so both see the same machine at the same time. Each request streams a
21-message conversation, like the tenth turn of a call. Measured per request, in ms:

* ``send`` — from ``messages.stream(...)`` to the fake's arrival record (the SDK building and writing the request,
  the loopback socket, the fake's parsing);
* ``first_text`` — from the fake's arrival record to the first ``text`` event out of the SDK (the fake's answer,
  then the SDK parsing ``message_start``, ``content_block_start``, ``ping`` and the first delta).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import platform
import time
from typing import Any

from rich.console import Console
from rich.progress import Progress

REPLY = "Sure thing, I can help with that. What else would you like to know?"
TRANSPORTS = ("httpx", "aiohttp")


def serve_fake(ports: Any, stop: Any) -> None:
    """Child process: FakeAnthropic on 127.0.0.1 until ``stop`` is set; then its arrival times."""
    from voxpipe.testing.fakes.anthropic import FakeAnthropic

    async def main() -> None:
        fake = FakeAnthropic([REPLY])
        await fake.start()
        ports.put(fake.url)
        await asyncio.to_thread(stop.wait)
        await fake.stop()
        ports.put([seen.at for seen in fake.of("request")])

    asyncio.run(main())


def conversation(turns: int = 10) -> list[dict[str, str]]:
    messages = []
    for _ in range(turns):
        messages += [
            {"role": "user", "content": "Hello, is the restaurant open tonight?"},
            {"role": "assistant", "content": REPLY},
        ]
    return [*messages, {"role": "user", "content": "Could I book a table for two?"}]


async def measure(url: str, requests: int, progress: Progress) -> dict[str, list[tuple[float, float]]]:
    """Per transport: (when the request was started, when its first text came out), monotonic seconds."""
    import anthropic

    clients = {
        "httpx": anthropic.AsyncAnthropic(
            api_key="test-key", base_url=url, max_retries=0, http_client=anthropic.DefaultAsyncHttpxClient()
        ),
        "aiohttp": anthropic.AsyncAnthropic(
            api_key="test-key", base_url=url, max_retries=0, http_client=anthropic.DefaultAioHttpClient()
        ),
    }
    task = progress.add_task("requests", total=requests * len(clients))
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in clients}
    for client in clients.values():
        await client.models.list(limit=1)  # connected: the comparison is per request, not per handshake
    messages = conversation()
    for _ in range(requests):
        for name, client in clients.items():
            started = time.monotonic()
            async with client.messages.stream(
                model="claude-opus-4-7", max_tokens=100, messages=messages, system="You answer the phone."
            ) as stream:
                async for event in stream:
                    if event.type == "text":
                        times[name].append((started, time.monotonic()))
                        break
            progress.advance(task)
    for client in clients.values():
        await client.close()
    return times


def main() -> None:
    from voxpipe.pipeline.trace import percentile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="requests per transport")
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    ports, stop = context.Queue(), context.Event()
    server = context.Process(target=serve_fake, args=(ports, stop), daemon=True)
    server.start()
    try:
        url = ports.get(timeout=30)
        with Progress(console=Console()) as progress:
            times = asyncio.run(measure(url, args.requests, progress))
    finally:
        stop.set()
    arrivals = sorted(ports.get(timeout=30))  # the messages requests, in order (the warm-up GETs are not in it)
    server.join(timeout=10)
    started = sorted((start, name, first) for name, pairs in times.items() for start, first in pairs)
    figures: dict[str, dict[str, list[float]]] = {name: {"send": [], "first_text": []} for name in TRANSPORTS}
    for (start, name, first), arrived in zip(started, arrivals, strict=True):
        figures[name]["send"].append((arrived - start) * 1000)
        figures[name]["first_text"].append((first - arrived) * 1000)
    skip = 10  # the first requests of each client: cold code paths
    print(f"\n{platform.machine()}, nproc {os.cpu_count()}, Python {platform.python_version()}; {args.requests} each\n")
    print("| transport | send p50 | send p95 | first_text p50 | first_text p95 | total p50 |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, figure in figures.items():
        send, first = figure["send"][skip:], figure["first_text"][skip:]
        total = [a + b for a, b in zip(send, first, strict=True)]
        print(
            f"| {name} | {percentile(send, 50):.2f} | {percentile(send, 95):.2f} | {percentile(first, 50):.2f} | "
            f"{percentile(first, 95):.2f} | {percentile(total, 50):.2f} |"
        )


if __name__ == "__main__":
    main()
