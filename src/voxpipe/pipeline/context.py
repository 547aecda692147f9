"""The conversation: what the reasoner sees of the call.

It records only what was really said: the caller's final transcripts, and of each bot reply only the words whose
audio the caller heard, with interrupted replies marked as such — and what really happened: the tools the reasoner
ran and their results, which stay true even when the reply that asked for them was cut off.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

Role = Literal["user", "assistant", "tool"]


@dataclass(frozen=True, slots=True)
class ToolUse:
    """A tool the reasoner ran: its call, and its JSON-ready result or its error."""

    call_id: str
    name: str
    arguments: dict[str, Any]
    result: Any = None
    error: str | None = None


# Kana and ideographs: Chinese and Japanese are written without spaces between words.
CJK_LETTERS = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK_WRITTEN = rf"[{CJK_LETTERS}\u3000-\u303f\uff01-\uff60]"  # and their punctuation, ideographic and full-width
_CJK_JUNCTION = re.compile(rf"(?<={_CJK_WRITTEN}) (?={_CJK_WRITTEN})")


def written_unspaced(char: str) -> bool:
    """Whether ``char`` is Chinese or Japanese, a letter or a mark: no space goes after it in running text."""
    return _CJK_CHAR.fullmatch(char) is not None


_CJK_CHAR = re.compile(_CJK_WRITTEN)


def join_words(words: Sequence[str]) -> str:
    """Heard words as text: with spaces between them, except where Chinese or Japanese meets Chinese or Japanese
    (a TTS marks those in units of a character or two, which were written together)."""
    return _CJK_JUNCTION.sub("", " ".join(words))


@dataclass(frozen=True, slots=True)
class Message:
    """One turn of the conversation; a ``"tool"`` message carries its :class:`ToolUse` (``text`` summarises it)."""

    role: Role
    text: str
    interrupted: bool = False
    tool: ToolUse | None = None


class Conversation:
    """An append-only list of messages plus the system prompt. :meth:`snapshot` is what a request carries."""

    def __init__(self, system: str = "", messages: tuple[Message, ...] = ()) -> None:
        self.system = system
        self._messages: list[Message] = list(messages)

    @property
    def messages(self) -> tuple[Message, ...]:
        return tuple(self._messages)

    def add_user(self, text: str) -> None:
        self._messages.append(Message("user", text))

    def add_assistant(self, heard: tuple[str, ...], interrupted: bool) -> None:
        """Record a bot reply as the caller heard it; nothing heard records nothing."""
        if heard:
            self._messages.append(Message("assistant", join_words(heard), interrupted))

    def add_tool(self, use: ToolUse) -> None:
        outcome = f"error: {use.error}" if use.error is not None else f"result: {use.result!r}"
        self._messages.append(Message("tool", f"{use.name}({use.arguments!r}) {outcome}", tool=use))

    def snapshot(self) -> tuple[Message, ...]:
        return tuple(self._messages)
