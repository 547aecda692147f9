"""``voxpipe call --fake-providers``: a config's cloud providers pointed at loopback fakes, so the cloud pipeline's
wiring — settings, SDKs, protocols, barge-in, tools, usage — can be tried with no keys and no network.

Each cloud stage of the config gets its fake, served from a thread of its own (:func:`serving`), and its settings
get the fake's URL and key. Deepgram's fake "recognises" the scripted caller's own words; Claude's fake plays a
booking conversation (calling a tool of the config's when it has one); the TTS fakes speak speech-like audio with
word timings. Providers without a fake (local ones) are left as they are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from voxpipe.testing.fakes.server import FakeServer, serving

FAKE_KEY = "fake-key"  # the key every fake accepts, and every faked stage is given


@dataclass(frozen=True)
class FakeFor:
    """How to fake one provider: make the fake (from the stage's settings, the caller and the tools' names), and
    which settings point the provider at it once it listens."""

    make: Callable[[BaseModel, Any, list[str]], FakeServer]
    point: Callable[[FakeServer], dict[str, Any]]


def _deepgram(settings: BaseModel, caller: Any, tools: list[str]) -> FakeServer:
    from voxpipe.testing.fakes.deepgram import FakeDeepgram

    return FakeDeepgram(words=caller, latency_s=0.08, api_key=FAKE_KEY)


def _anthropic(settings: BaseModel, caller: Any, tools: list[str]) -> FakeServer:
    from voxpipe.testing.fakes.anthropic import FakeAnthropic

    return FakeAnthropic(booking_replies(tools), ttft_s=0.35, tokens_per_s=60, words_per_delta=1, api_key=FAKE_KEY)


def _elevenlabs(settings: BaseModel, caller: Any, tools: list[str]) -> FakeServer:
    from voxpipe.testing.fakes.elevenlabs import FakeElevenLabs

    return FakeElevenLabs(ttfa_s=0.15, api_key=FAKE_KEY)


def _cartesia(settings: BaseModel, caller: Any, tools: list[str]) -> FakeServer:
    from voxpipe.testing.fakes.cartesia import FakeCartesia

    return FakeCartesia(ttfa_s=0.12, api_key=FAKE_KEY)


FAKES: dict[str, FakeFor] = {
    "stt.deepgram": FakeFor(_deepgram, lambda fake: {"base_url": fake.ws_url}),
    "llm.anthropic": FakeFor(_anthropic, lambda fake: {"base_url": fake.url}),
    "tts.elevenlabs": FakeFor(_elevenlabs, lambda fake: {"base_url": fake.ws_url}),
    "tts.cartesia": FakeFor(_cartesia, lambda fake: {"base_url": fake.url, "websocket_url": fake.ws_url}),
}


def booking_replies(tools: list[str]) -> Callable[[dict[str, Any]], Any]:
    """A restaurant's side of a booking call, one line per caller turn; with a ``check_availability`` or
    ``book_table`` tool it calls that tool on the second turn and answers with its result."""
    from voxpipe.testing.fakes.anthropic import ToolUseReply

    lines = [
        "Of course. What time would you like to come in tonight?",
        "Seven thirty works. Shall I put the booking under your name?",
        "No problem at all, eight o'clock works too. What name should I put the booking under?",
        "Thank you, you're booked for two at eight tonight. Anything else I can do for you?",
        "You're welcome. See you tonight, goodbye!",
    ]

    def reply(body: dict[str, Any]) -> Any:
        messages = body.get("messages", [])
        last = messages[-1]["content"] if messages else ""
        if isinstance(last, list) and any(block.get("type") == "tool_result" for block in last):
            return "Good news, we have a table then. Shall I put it under your name?"
        turn = sum(1 for m in messages if m["role"] == "user" and _has_caller_text(m["content"])) - 1
        if turn == 1 and "check_availability" in tools:
            return ToolUseReply("check_availability", {"time": "7:30 pm", "people": 2}, text="Let me check.")
        if turn == 1 and "book_table" in tools:
            arguments = {"name": "the caller", "people": 2, "time": "7:30 pm"}
            return ToolUseReply("book_table", arguments, text="Let me book that.")
        return lines[min(max(turn, 0), len(lines) - 1)]

    return reply


def _has_caller_text(content: Any) -> bool:
    if isinstance(content, str):
        return bool(content.strip())
    return any(block.get("type") == "text" for block in content)


@contextlib.contextmanager
def fake_providers(
    providers: Mapping[str, str], settings: Mapping[str, BaseModel], caller: Any, tools: list[str]
) -> Iterator[dict[str, BaseModel]]:
    """Serve a fake for every faked provider in ``providers`` (kind → provider name) while the block runs; yields
    the settings with those stages pointed at their fakes."""
    chosen = {kind: FAKES[f"{kind}.{name}"] for kind, name in providers.items() if f"{kind}.{name}" in FAKES}
    fakes = {kind: spec.make(settings[kind], caller, tools) for kind, spec in chosen.items()}
    with serving(*fakes.values()):
        pointed = dict(settings)
        for kind, fake in fakes.items():
            current = settings[kind]
            updates = {**chosen[kind].point(fake), "api_key": FAKE_KEY}
            pointed[kind] = type(current).model_validate({**current.model_dump(), **updates})
        yield pointed
