"""ScriptedLLM: replies from a script, streamed token by token with a set time to first token and rate."""

from __future__ import annotations

import itertools
import re
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from voxpipe.pipeline import EndOfTurn, ToolCall
from voxpipe.stages.llm import DEFAULT_TOOL_THREADS, AuditSink, LLMStage
from voxpipe.stages.tools import ToolsLike

_TOKEN = re.compile(r"\s*\S+")


@dataclass(frozen=True)
class ScriptedReply:
    """A reply; with ``tool`` set, the tool is called first (after ``preamble``, if any: what a model says
    before it calls a tool) and ``text`` may use ``{result}``."""

    text: str
    tool: str | None = None
    arguments: dict[str, Any] = field(default_factory=dict)
    preamble: str = ""


Replies = Sequence[str | ScriptedReply] | Callable[[EndOfTurn], str | ScriptedReply]


class ScriptedToolReply(BaseModel):
    """A reply that calls ``tool`` with ``arguments`` first; ``text`` may use ``{result}``."""

    model_config = ConfigDict(extra="forbid")

    text: str
    tool: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    preamble: str = ""


class ScriptedLLMSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    replies: list[str | ScriptedToolReply] = Field(
        default_factory=lambda: ["Sure, I can help with that. What else would you like to know?"],
        min_length=1,
        description="reply n answers caller turn n (cycling)",
    )
    ttft_s: float = Field(0.2, ge=0, le=30, description="time to first token")
    tokens_per_s: float = Field(40.0, gt=0, le=10000, description="streaming rate")


class ScriptedLLM(LLMStage):
    """Answers turn ``n`` with ``replies[n]`` (cycling), or with ``replies(turn)`` if it is a function."""

    Settings: ClassVar[type[BaseModel]] = ScriptedLLMSettings
    supports_tools: ClassVar[bool] = True

    @classmethod
    def from_settings(cls, settings: ScriptedLLMSettings, context: Any, name: str) -> ScriptedLLM:
        replies: list[str | ScriptedReply] = [
            r
            if isinstance(r, str)
            else ScriptedReply(r.text, tool=r.tool, arguments=dict(r.arguments), preamble=r.preamble)
            for r in settings.replies
        ]
        return cls(
            replies, ttft_s=settings.ttft_s, tokens_per_s=settings.tokens_per_s, tools=dict(context.tools), name=name
        )

    def __init__(
        self,
        replies: Replies,
        *,
        ttft_s: float = 0.2,
        tokens_per_s: float = 40.0,
        tools: ToolsLike | None = None,
        audit: AuditSink | None = None,
        tool_threads: int = DEFAULT_TOOL_THREADS,
        thread_grace_s: float = 5.0,
        name: str = "llm",
    ) -> None:
        super().__init__(tools=tools, audit=audit, tool_threads=tool_threads, thread_grace_s=thread_grace_s, name=name)
        if tokens_per_s <= 0:
            raise ValueError(f"{name}: tokens_per_s must be positive, got {tokens_per_s}")
        self.replies = replies
        self.ttft_s = ttft_s
        self.tokens_per_s = tokens_per_s
        self._turns = 0
        self._call_ids = itertools.count(1)

    def _reply_for(self, turn: EndOfTurn) -> ScriptedReply:
        if callable(self.replies):
            reply = self.replies(turn)
        else:
            if not self.replies:
                raise ValueError(f"{self.name}: no scripted replies")
            reply = self.replies[self._turns % len(self.replies)]
        self._turns += 1
        return reply if isinstance(reply, ScriptedReply) else ScriptedReply(reply)

    async def generate(self, turn: EndOfTurn) -> AsyncIterator[str | ToolCall]:
        reply = self._reply_for(turn)
        await self.clock.sleep(self.ttft_s)
        text = reply.text
        if reply.tool is not None:
            async for token in self._stream(reply.preamble):
                yield token
            call_id = f"call_{next(self._call_ids)}"
            yield ToolCall(epoch=turn.epoch, call_id=call_id, name=reply.tool, arguments=reply.arguments)
            result = self.results[call_id]
            text = text.format(result=result.result if result.error is None else f"an error ({result.error})")
            await self.clock.sleep(self.ttft_s)
        async for token in self._stream(text):
            yield token

    async def _stream(self, text: str) -> AsyncIterator[str]:
        interval = 1.0 / self.tokens_per_s
        for i, token in enumerate(_TOKEN.findall(text)):
            if i:
                await self.clock.sleep(interval)
            yield token
