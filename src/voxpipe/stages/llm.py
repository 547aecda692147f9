"""The reasoner stage: turns an :class:`EndOfTurn` into streamed text, speakable chunks and tool calls.

Providers implement :meth:`LLMStage.generate`, an async iterator of text deltas and :class:`ToolCall` frames; the
stage does the rest the same way for every provider: trace marks, chunking for the TTS, running tools, and — by
being a :class:`QueuedStage` — cancellation of the whole generation when the caller barges in.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from voxpipe.pipeline import (
    Direction,
    EndOfTurn,
    Frame,
    LLMRequest,
    QueuedStage,
    ResponseEnd,
    SpeakableChunk,
    TextDelta,
    ToolCall,
    ToolResult,
)
from voxpipe.stages.text import SpeakableChunker

Tool = Callable[..., Any]


class LLMStage(QueuedStage):
    """Base of reasoner stages."""

    def __init__(
        self,
        *,
        tools: Mapping[str, Tool] | None = None,
        tool_timeout_s: float = 10.0,
        chunker: Callable[[], SpeakableChunker] = SpeakableChunker,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        self.tools = dict(tools or {})
        self.tool_timeout_s = tool_timeout_s
        self._new_chunker = chunker
        self.results: dict[str, ToolResult] = {}

    def generate(self, turn: EndOfTurn) -> AsyncIterator[str | ToolCall]:
        """Stream the reply to ``turn``: text deltas, and tool calls whose results appear in ``self.results``."""
        raise NotImplementedError

    async def process(self, frame: Frame, direction: Direction) -> None:
        if isinstance(frame, EndOfTurn):
            await self._respond(frame)
        else:
            await self.push(frame, direction)

    async def _respond(self, turn: EndOfTurn) -> None:
        epoch = turn.epoch
        self.mark("llm.request", epoch)
        await self.push(LLMRequest(epoch=epoch))
        chunker = self._new_chunker()
        text: list[str] = []
        try:
            # aclosing: a cancellation landing outside the generator (in a push) still closes it here, now,
            # instead of leaving it to the garbage collector and an unowned task.
            async with contextlib.aclosing(self.generate(turn)) as stream:
                async for item in stream:
                    if isinstance(item, ToolCall):
                        await self.push(item)
                        await self._run_tool(item)
                        continue
                    if not text:
                        self.mark("llm.first_token", epoch)
                    text.append(item)
                    await self.push(TextDelta(epoch=epoch, text=item))
                    for chunk in chunker.feed(item):
                        self.pipeline.trace.annotate(epoch, bot_text="".join(text).strip())
                        await self._speak(epoch, chunk)
                rest = chunker.flush()
                if rest:
                    await self._speak(epoch, rest)
        finally:
            # Also when cancelled by a barge-in: the trace keeps what the model had produced by then.
            self.pipeline.trace.annotate(epoch, bot_text="".join(text).strip())
        await self.push(ResponseEnd(epoch=epoch, text="".join(text).strip()))

    async def _speak(self, epoch: int, chunk: str) -> None:
        self.mark("llm.first_chunk", epoch)  # first value wins: only the first chunk counts
        await self.push(SpeakableChunk(epoch=epoch, text=chunk))

    async def _run_tool(self, call: ToolCall) -> None:
        epoch = call.epoch
        tool = self.tools.get(call.name)
        self.mark(f"tool.start:{call.call_id}", epoch, tool=call.name)
        started = self.clock.now()
        try:
            if tool is None:
                raise LookupError(
                    f"{self.name}: the model called unknown tool {call.name!r}; known: {sorted(self.tools)}"
                )
            outcome = tool(**call.arguments)
            if inspect.isawaitable(outcome):
                outcome = await asyncio.wait_for(outcome, self.tool_timeout_s)
            result = ToolResult(epoch=epoch, call_id=call.call_id, name=call.name, result=outcome)
        except (TimeoutError, Exception) as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            result = ToolResult(epoch=epoch, call_id=call.call_id, name=call.name, error=error)
        self.mark(f"tool.end:{call.call_id}", epoch, duration_s=self.clock.now() - started)
        self.results[call.call_id] = result
        await self.push(result)
