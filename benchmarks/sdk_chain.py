"""The floor under the cloud benchmark: the same turns through the same three official SDKs, against the same fakes,
with no framework — one asyncio program that does only what the cascade needs and nothing else.

``benchmarks/cloud_overhead.py`` runs a call of this next to each voxpipe call. Its "runtime" is the SDKs' own
client-side work plus the loopback sockets and the event loop, so what voxpipe adds is voxpipe's runtime minus this
one, both measured in the same run on the same machine.

Per turn, like voxpipe's call: the caller's audio goes to Deepgram in real-time 20 ms frames (speech, then
silence, and silence while the bot talks); on the frame that completes ``STOP_MS`` of silence, ``Finalize``; the
final transcript becomes the last user message of the conversation, streamed to Claude with ``messages.stream``;
Claude's first text is pushed to a Cartesia context; the turn's figure ends at the context's first audio. The rest
of the reply is played out in real time (its audio's length) before the caller's pause and next line. Everything
that can be open before the turn is (Deepgram's and Cartesia's sockets, Claude's pooled connection, one request
through the SDK so its first use is paid), as voxpipe does with ``prewarm``.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import statistics
from typing import Any

import numpy as np

RATE = 16000
FRAME = RATE // 50  # samples in a 20 ms frame
SECONDS_PER_WORD = 0.3


def speech(line: str, rate: int = RATE) -> bytes:
    """Noise loud enough for FakeDeepgram's energy detector, as long as the line would take to say."""
    samples = int(len(line.split()) * SECONDS_PER_WORD * rate)
    noise = np.random.default_rng(len(line)).normal(0, 3000, samples).clip(-32767, 32767)
    return noise.astype(np.int16).tobytes()


def run_sdk_only_call(urls: dict[str, tuple[str, str]], lines: list[str], stop_ms: int) -> list[dict[str, float]]:
    """One call of ``lines`` against the fakes at ``urls``; each turn's marks (see :class:`SdkOnlyCall`)."""
    return asyncio.run(SdkOnlyCall(lines, stop_ms, turn_timeout_s=30.0).run(urls))


class SdkOnlyCall:
    """One call through Deepgram → Claude → Cartesia with the SDKs alone; :meth:`run` returns each turn's marks
    (``asyncio`` loop time, which is ``time.monotonic()``, the clock the fakes record)."""

    def __init__(self, lines: list[str], stop_ms: int, turn_timeout_s: float):
        self.lines = lines
        self.stop_frames = stop_ms * RATE // 1000 // FRAME
        self.timeout = turn_timeout_s
        self.outbox: asyncio.Queue[bytes] = asyncio.Queue()  # the caller's frames, one per tick
        self.finals: asyncio.Queue[tuple[str, float]] = asyncio.Queue()
        # per turn, the tick that completed the silence: when it was due, and when the ticker really woke for it
        self.turn_ends: asyncio.Queue[tuple[float, float]] = asyncio.Queue()
        self.tick_lateness: list[float] = []  # how late the ticker woke, every tick

    async def run(self, urls: dict[str, tuple[str, str]]) -> list[dict[str, float]]:
        import anthropic
        import cartesia
        import deepgram

        llm_url, _ = urls["llm"]
        stt_http, stt_ws = urls["stt"]
        tts_http, tts_ws = urls["tts"]
        production = deepgram.DeepgramClientEnvironment.PRODUCTION
        environment = deepgram.DeepgramClientEnvironment(
            base=stt_http, production=stt_ws, agent=production.agent, agent_rest=production.agent_rest
        )
        stt = deepgram.AsyncDeepgramClient(api_key="test-key", environment=environment)
        llm = anthropic.AsyncAnthropic(
            api_key="test-key", base_url=llm_url, max_retries=0, http_client=anthropic.DefaultAioHttpClient()
        )
        tts = cartesia.AsyncCartesia(api_key="test-key", base_url=tts_http, websocket_base_url=tts_ws)
        query = {
            "model": "nova-3",
            "language": "en",
            "encoding": "linear16",
            "sample_rate": RATE,
            "channels": 1,
            "interim_results": True,
            "smart_format": True,
            "punctuate": True,
            "vad_events": True,
            "endpointing": False,
        }
        async with (
            stt.listen.v1.connect(**query) as stt_socket,
            tts.tts.websocket_connect() as tts_socket,
            asyncio.TaskGroup() as tasks,
        ):
            await self._warm_up(llm)
            gc.freeze()  # as a voxpipe pipeline does once its stages are ready (pipeline/heap.py)
            ticker = tasks.create_task(self._tick(stt_socket))
            listener = tasks.create_task(self._listen(stt_socket))
            try:
                turns = await self._converse(llm, tts_socket)
                typical = statistics.median(self.tick_lateness)
                return [{**marks, "call.typical_tick_late": typical} for marks in turns]
            finally:
                gc.unfreeze()
                ticker.cancel()
                listener.cancel()
                await llm.close()

    async def _warm_up(self, llm: Any) -> None:
        async with llm.messages.stream(
            model="claude-opus-4-7", max_tokens=100, messages=[{"role": "user", "content": "Hi"}], system="x"
        ) as stream:
            await stream.get_final_text()

    async def _tick(self, socket: Any) -> None:
        """The caller's microphone: a frame every 20 ms (silence when there is nothing to say), and ``Finalize``
        right after the frame that completes the silence."""
        loop = asyncio.get_running_loop()
        silence = bytes(2 * FRAME)
        due = loop.time()
        quiet = None  # frames of silence since the caller's last speech, while a turn is open
        while True:
            due += FRAME / RATE
            await asyncio.sleep(max(0.0, due - loop.time()))
            woke = loop.time()
            self.tick_lateness.append(woke - due)
            frame = self.outbox.get_nowait() if not self.outbox.empty() else silence
            await socket.send_media(frame)
            if frame is not silence:
                quiet = 0
            elif quiet is not None:
                quiet += 1
                if quiet == self.stop_frames:
                    await socket.send_finalize()
                    self.turn_ends.put_nowait((due, woke))
                    quiet = None

    async def _listen(self, socket: Any) -> None:
        from deepgram.listen.v1.types import ListenV1Results

        while True:
            message = await socket.recv()
            if isinstance(message, ListenV1Results) and message.is_final and message.from_finalize:
                loop = asyncio.get_running_loop()
                self.finals.put_nowait((message.channel.alternatives[0].transcript, loop.time()))

    async def _converse(self, llm: Any, tts_socket: Any) -> list[dict[str, float]]:
        loop = asyncio.get_running_loop()
        messages: list[dict[str, Any]] = []
        turns = []
        for line in self.lines:
            pcm = speech(line)
            for start in range(0, len(pcm), 2 * FRAME):
                self.outbox.put_nowait(pcm[start : start + 2 * FRAME].ljust(2 * FRAME, b"\0"))
            async with asyncio.timeout(self.timeout):
                due, woke = await self.turn_ends.get()
                marks = {"turn.end_tick": due, "turn.end_woke": woke}
                text, marks["stt.final"] = await self.finals.get()
                messages.append({"role": "user", "content": text})
                reply, played_s = await self._reply(llm, tts_socket, messages, marks)
            messages.append({"role": "assistant", "content": reply})
            turns.append(marks)
            await asyncio.sleep(max(0.0, marks["tts.first_audio"] + played_s - loop.time()) + 0.3)
        return turns

    async def _reply(
        self, llm: Any, tts_socket: Any, messages: list[dict[str, Any]], marks: dict[str, float]
    ) -> tuple[str, float]:
        """Claude's reply streamed into a Cartesia context; its text and its audio's length in seconds."""
        loop = asyncio.get_running_loop()
        context = tts_socket.context(
            model_id="sonic-3",
            voice="bench-voice",
            output_format={"container": "raw", "encoding": "pcm_s16le", "sample_rate": RATE},
            language="en",
            add_timestamps=True,
        )
        samples = 0

        async def play() -> None:
            nonlocal samples
            async for event in context.receive():
                if event.type == "chunk":
                    marks.setdefault("tts.first_audio", loop.time())
                    samples += len(base64.b64decode(event.data)) // 2
                elif event.type == "done":
                    return

        async with asyncio.TaskGroup() as tasks:
            player = tasks.create_task(play())
            marks["llm.request"] = loop.time()
            parts = []
            async with llm.messages.stream(
                model="claude-opus-4-7", max_tokens=100, messages=messages, system="You answer the phone."
            ) as stream:
                async for event in stream:
                    if event.type == "text" and event.text:
                        marks.setdefault("llm.first_token", loop.time())
                        marks.setdefault("llm.first_chunk", marks["llm.first_token"])
                        parts.append(event.text)
                        await context.push(event.text)
            await context.no_more_inputs()
            await player
        return "".join(parts), samples / RATE
