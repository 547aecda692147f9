"""The conversation: what the reasoner sees of the call.

It records only what was really said: the caller's final transcripts, and of each bot reply only the words whose
audio the caller heard, with interrupted replies marked as such.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["user", "assistant", "tool"]


@dataclass(frozen=True, slots=True)
class Message:
    """One turn of the conversation."""

    role: Role
    text: str
    interrupted: bool = False


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
            self._messages.append(Message("assistant", " ".join(heard), interrupted))

    def snapshot(self) -> tuple[Message, ...]:
        return tuple(self._messages)
