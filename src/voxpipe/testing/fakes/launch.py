"""``voxpipe call --fake-providers``: a config's cloud providers pointed at loopback fakes, so the cloud pipeline's
wiring — settings, SDKs, protocols, barge-in, tools, usage — can be tried with no keys and no network.

Each cloud stage of the config gets its fake, served from a thread of its own (:func:`serving`), and its settings
get the fake's URL and key. Deepgram's fake "recognises" the scripted caller's own words; Claude's fake plays a
booking conversation (calling a tool of the config's when it has one); the TTS fakes speak speech-like audio with
word timings. Local providers are left as they are; a cloud provider with no fake (a plugin's) is refused
(:func:`unfaked_cloud_stages`), since it would call its real service.
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


def faked_kinds(providers: Mapping[str, str]) -> list[str]:
    """The stage kinds (of ``providers``, kind → provider name) that ``--fake-providers`` points at a fake."""
    return [kind for kind, name in providers.items() if f"{kind}.{name}" in FAKES]


def unfaked_cloud_stages(providers: Mapping[str, str], settings: Mapping[str, BaseModel]) -> list[tuple[str, str, str]]:
    """Config problems (key path, problem, what is allowed) for cloud stages with no fake: ``--fake-providers``
    promises no keys and no network, and such a stage (a plugin's) would call its real service with a real key."""
    from voxpipe.stages.cloud import CloudSettings

    faked = faked_kinds(providers)
    return [
        (
            f"{kind}.provider",
            f"{name} is a cloud service with no loopback fake: under --fake-providers it would call the real one "
            "(run without --fake-providers, or choose a provider that has a fake)",
            ", ".join(sorted(FAKES)),
        )
        for kind, name in providers.items()
        if isinstance(settings.get(kind), CloudSettings) and kind not in faked
    ]


def booking_replies(tools: list[str]) -> Callable[[dict[str, Any]], Any]:
    """A restaurant's side of a booking call, answering what the caller just said — the lines of the built-in call
    and of ``examples/scenarios/booking.yaml``; anything else gets the conversation's next line. Given a time it calls
    the config's ``check_availability``, given a name its ``book_table`` (when it has them), and answers with their
    result."""
    from voxpipe.testing.fakes.anthropic import ToolUseReply

    lines = [
        "Of course. What time would you like to come in tonight?",
        "Seven thirty works. Shall I put the booking under your name?",
        "No problem at all, eight o'clock works too. What name should I put the booking under?",
        "Thank you, you're booked for two tonight. Anything else I can do for you?",
        "You're welcome. See you tonight, goodbye!",
    ]

    def reply(body: dict[str, Any]) -> Any:
        messages = body.get("messages", [])
        last = messages[-1]["content"] if messages else ""
        if isinstance(last, list) and any(block.get("type") == "tool_result" for block in last):
            if _last_tool(messages) == "book_table":
                return lines[3]
            return "Good news, we have a table then. Shall I put it under your name?"
        caller = [_caller_text(m["content"]) for m in messages if m["role"] == "user" and _caller_text(m["content"])]
        said = caller[-1].lower() if caller else ""
        time = "8 pm" if any("eight" in line.lower() for line in caller) else "7:30 pm"
        if "bye" in said or "that's all" in said:
            return lines[4]
        if "name is" in said:
            name = caller[-1][said.index("name is") + len("name is") :].strip(" .!")
            if "book_table" in tools:
                arguments = {"name": name, "people": 2, "time": time}
                return ToolUseReply("book_table", arguments, text="Let me book that.")
            return lines[3]
        if "eight" in said:
            return lines[2]
        if "seven thirty" in said:
            if "check_availability" in tools:
                return ToolUseReply("check_availability", {"time": time, "people": 2}, text="Let me check.")
            return lines[1]
        if "book" in said or "table" in said:
            return lines[0]
        return lines[min(max(len(caller) - 1, 0), len(lines) - 1)]

    return reply


def _caller_text(content: Any) -> str:
    """The caller's words in a user message (none in one that only carries tool results)."""
    if isinstance(content, str):
        return content.strip()
    return " ".join(block.get("text", "") for block in content if block.get("type") == "text").strip()


def _last_tool(messages: list[dict[str, Any]]) -> str | None:
    """The name of the tool the model called last."""
    for message in reversed(messages):
        if message["role"] == "assistant" and isinstance(message["content"], list):
            for block in reversed(message["content"]):
                if block.get("type") == "tool_use":
                    return str(block.get("name"))
    return None


@contextlib.contextmanager
def fake_providers(
    providers: Mapping[str, str], settings: Mapping[str, BaseModel], caller: Any, tools: list[str]
) -> Iterator[dict[str, BaseModel]]:
    """Serve a fake for every faked provider in ``providers`` (kind → provider name) while the block runs; yields
    the settings with those stages pointed at their fakes."""
    chosen = {kind: FAKES[f"{kind}.{providers[kind]}"] for kind in faked_kinds(providers)}
    fakes = {kind: spec.make(settings[kind], caller, tools) for kind, spec in chosen.items()}
    with serving(*fakes.values()):
        pointed = dict(settings)
        for kind, fake in fakes.items():
            current = settings[kind]
            updates = {**chosen[kind].point(fake), "api_key": FAKE_KEY}
            pointed[kind] = type(current).model_validate({**current.model_dump(), **updates})
        yield pointed
