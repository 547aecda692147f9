"""FakeAnthropic: a loopback Anthropic Messages API that the official ``anthropic`` SDK streams from, unmodified.

It answers ``POST /v1/messages`` with the server-sent events the real API sends (every event with its ``event:``
line): ``message_start``, ``content_block_start``, ``ping``, ``content_block_delta`` (``text_delta`` /
``input_json_delta``), ``content_block_stop``, ``message_delta`` (stop reason and usage), ``message_stop``.

    replies = [ToolUseReply("get_weather", {"city": "Paris"}, text="Let me check."), "It is 18 degrees in Paris."]
    async with FakeAnthropic(replies=replies) as fake:
        client = AsyncAnthropic(api_key=fake.api_key, base_url=fake.url, max_retries=0)
        ...
        fake.of("request")[1].data["body"]["messages"]   # what the SDK sent: the tool_result is in there

Request ``n`` gets ``replies[n]`` (cycling), or ``replies(body)`` when ``replies`` is a function of the request's
JSON body. Like the real API, a request is refused with a 400 ``invalid_request_error`` when a ``tool_use`` in its
messages has no ``tool_result`` in the next message, when a ``tool_result`` answers no ``tool_use`` of the message
before it, when a user message has other content before a ``tool_result``, when two ``tool_use`` blocks share an id,
when it carries tool blocks but declares no ``tools``, when it gives a ``tool_choice`` but no ``tools``, when a tool's
name does not match ``^[a-zA-Z0-9_-]{1,64}$``, when more than 4 blocks (system, tools and messages) carry
``cache_control``, when a text block is empty, when the first message is not the user's, when the final message is
the assistant's and its text ends in whitespace, or when ``anthropic-version`` is missing or not a version the API
knows. (The fake does not play the model: ``tool_choice`` is recorded, not obeyed.)

Records (``fake.seen``): ``request`` (``body``, ``headers``, and ``arrived``, the time before the body was parsed),
``connect`` and ``refused`` (from the base), ``stall``, ``corrupted``, ``stream-error``, ``dropped``, ``first-text``
(``arrived``, ``due``; recorded as the reply's first text delta is written: :meth:`waits`), ``reply`` (what was sent in
full: ``text``, ``tool`` (the first call's name), ``tools`` (every call's), ``input_tokens``, ``output_tokens``,
``cache_creation_input_tokens``, ``ephemeral_1h_input_tokens``, ``cache_read_input_tokens``, ``stop_reason``),
``eof`` (``eof_after``), and
``disconnect`` (``events`` and ``text`` sent) when the client goes away mid-stream, or during a stall (at once: the
stall watches the connection) — which is what a barge-in looks like from the provider's side. Like the API, a reply
longer than the request's ``max_tokens`` (a token per word, four characters of a tool's input per token) stops there
with ``stop_reason: "max_tokens"``, inside the tool's input if that is where the limit falls.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from voxpipe.testing.fakes.server import FakeServer, Faults, Wait, client_left

# The error ``type`` Anthropic's API puts in the body for each HTTP status.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
ERROR_MESSAGES = {
    401: "invalid x-api-key",
    429: "Number of requests has exceeded your rate limit",
    500: "Internal server error",
    529: "Overloaded",
}

_WORD = re.compile(r"\s*\S+")


@dataclass(frozen=True)
class ToolUseReply:
    """A reply that says ``text`` (may be empty) and then asks for the tool ``name`` with ``input``, and for the
    tools in ``also`` in the same message (Claude's parallel tool use; their own ``text`` and ``also`` are unused).

    The client's follow-up request (carrying the tools' results) gets the next reply of the script."""

    name: str
    input: dict[str, Any] = field(default_factory=dict)
    text: str = ""
    id: str | None = None  # default: toolu_fake_<n>
    also: tuple[ToolUseReply, ...] = ()


@dataclass(frozen=True)
class TextReply:
    """A reply that says ``text`` (may be empty: a reply of no content) and ends with ``stop_reason``, e.g.
    ``"refusal"`` (the API's safety classifiers stopping it; ``stop_details`` is sent with it, as the API does),
    ``"pause_turn"``, ``"model_context_window_exceeded"`` or ``"stop_sequence"``. A plain string is a
    ``TextReply`` ending with ``"end_turn"``."""

    text: str
    stop_reason: str = "end_turn"
    stop_details: dict[str, Any] | None = None


Reply = str | TextReply | ToolUseReply
Replies = Sequence[Reply] | Callable[[dict[str, Any]], Reply]


class _Disconnected(Exception):
    """The client went away while the fake was writing."""


class FakeAnthropic(FakeServer):
    """A fake Anthropic Messages API on 127.0.0.1 (see the module docstring).

    * ``replies`` — the script (strings, :class:`TextReply`, :class:`ToolUseReply`), or a function of the request body;
    * ``ttft_s`` — delay before the first content delta (after ``message_start``, like the real API);
    * ``tokens_per_s`` — delta rate; ``words_per_delta`` words go in each text delta;
    * ``input_tokens`` — the input usage reported (default: a rough estimate from the request's size);
    * ``cache_creation_input_tokens``, ``cache_read_input_tokens`` — prompt-cache usage to report, as the API does:
      in ``message_start`` and again, the cumulative counts, in ``message_delta``; None (the default): left out;
    * ``ephemeral_1h_input_tokens`` — how many of ``cache_creation_input_tokens`` went to the 1-hour cache: reported
      as the API does, in ``message_start``'s ``usage.cache_creation`` breakdown (``ephemeral_5m_input_tokens`` the
      rest), which ``message_delta``'s usage does not carry (the SDK's type for it has no such field); None (the
      default): no breakdown;
    * ``stream_error_after`` — after this many text deltas, send ``event: error`` (``overloaded_error``) and end
      the response, as the API does when it fails mid-stream;
    * ``eof_after`` — after this many text deltas, end the response body cleanly with no ``message_delta`` or
      ``message_stop`` (a proxy or gateway cutting the stream);
    * ``corrupt_after`` — how many text deltas go before an injected corruption (``faults.corrupt``): a data line
      that is not JSON, or an event type the API does not have (sent in addition to the reply's own events). A reply
      with fewer text deltas (a tool call with no text) goes uncorrupted; ``bad-audio`` is refused (no audio here);
    * ``faults`` — from the base: ``refuse`` (status, with Anthropic's error body), ``stall_s`` (before the first
      byte of each response; cut short, recorded ``disconnect``, when the client leaves), ``drop_after`` (abort
      the connection after that many events of a response);
    * ``faulty_requests`` — the faults and ``stream_error_after`` apply to this many requests, then the fake is
      healthy again (None: to every request), so a test can show a call recovering on the next turn.
    """

    provider = "Anthropic"

    def __init__(
        self,
        replies: Replies = ("Hello! How can I help?",),
        *,
        ttft_s: float = 0.0,
        tokens_per_s: float = 200.0,
        words_per_delta: int = 1,
        input_tokens: int | None = None,
        cache_creation_input_tokens: int | None = None,
        ephemeral_1h_input_tokens: int | None = None,
        cache_read_input_tokens: int | None = None,
        stream_error_after: int | None = None,
        eof_after: int | None = None,
        corrupt_after: int = 1,
        faults: Faults | None = None,
        faulty_requests: int | None = None,
        api_key: str = "test-key",
    ) -> None:
        super().__init__(faults=faults, api_key=api_key)
        if tokens_per_s <= 0 or words_per_delta < 1:
            raise ValueError("FakeAnthropic: tokens_per_s must be > 0 and words_per_delta >= 1")
        if self.faults.corrupt == "bad-audio":  # else a test asking for it would pass on a fake that did nothing
            raise ValueError("FakeAnthropic: Faults(corrupt='bad-audio') does not apply: the API sends no audio")
        cache_writes = cache_creation_input_tokens or 0
        if ephemeral_1h_input_tokens is not None and not 0 <= ephemeral_1h_input_tokens <= cache_writes:
            raise ValueError("FakeAnthropic: ephemeral_1h_input_tokens must be part of cache_creation_input_tokens")
        self.replies = replies
        self.ttft_s = ttft_s
        self.tokens_per_s = tokens_per_s
        self.words_per_delta = words_per_delta
        self.input_tokens = input_tokens
        self.cache_creation_input_tokens = cache_creation_input_tokens
        self.ephemeral_1h_input_tokens = ephemeral_1h_input_tokens
        self.cache_read_input_tokens = cache_read_input_tokens
        self.stream_error_after = stream_error_after
        self.eof_after = eof_after
        self.corrupt_after = corrupt_after
        self.faulty_requests = faulty_requests
        self._served = 0  # requests answered, refused or not
        self._requests = 0
        self._ids = itertools.count(1)

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_get("/v1/models", self._models)

    # ------------------------------------------------------------------------------------ checks

    def authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.api_key}"

    def waits(self) -> list[Wait]:
        """Each messages request whose text began: its arrival (before its body was read) and the write of its first
        text delta."""
        return [Wait(s.data["arrived"], s.at) for s in self.of("first-text")]

    def error_body(self, status: int) -> dict[str, Any]:
        kind = ERROR_TYPES.get(status, "api_error")
        message = ERROR_MESSAGES.get(status, f"fake Anthropic: HTTP {status}")
        return {"type": "error", "error": {"type": kind, "message": message}}

    def refusal(self, request: web.Request) -> web.Response | None:
        response = super().refusal(request)
        if response is not None and response.status == 429:
            response.headers["retry-after"] = "1"
        return response

    def _invalid(self, message: str) -> web.Response:
        self.record("refused", status=400, message=message)
        body = {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
        return web.json_response(body, status=400)

    def _problem(self, body: dict[str, Any]) -> str | None:
        """What the real API would reject this request for (the checks a client can get wrong), or None."""
        for key in ("model", "max_tokens", "messages"):
            if key not in body:
                return f"{key}: Field required"
        messages = body["messages"]
        if not messages:
            return "messages: at least one message is required"
        tools = body.get("tools") or []
        tool_name = r"^[a-zA-Z0-9_-]{1,64}$"
        for i, tool in enumerate(tools):
            name = tool.get("name") if isinstance(tool, dict) else None
            if not isinstance(name, str) or not re.fullmatch(tool_name, name):
                return f"tools.{i}.name: String should match pattern '{tool_name}'"
        if "tool_choice" in body and not tools:
            return "tool_choice may only be specified while providing tools."
        system = body.get("system")
        cached = [b for b in (system if isinstance(system, list) else []) + tools if isinstance(b, dict)]
        for message in messages:
            for block in _blocks(message):
                cached.append(block)
                nested = block.get("content") if block.get("type") == "tool_result" else None
                cached += [b for b in nested if isinstance(b, dict)] if isinstance(nested, list) else []
        breakpoints = sum(1 for block in cached if block.get("cache_control"))
        if breakpoints > 4:
            return f"A maximum of 4 blocks with cache_control may be provided. Found {breakpoints}."
        if messages[0].get("role") != "user":
            return 'messages: first message must use the "user" role'
        blocks_of = [_blocks(message) for message in messages]
        tool_blocks = any(b.get("type") in ("tool_use", "tool_result") for blocks in blocks_of for b in blocks)
        if tool_blocks and not body.get("tools"):
            return "Requests which include `tool_use` or `tool_result` blocks must define tools."
        use_ids: set[Any] = set()
        for i, blocks in enumerate(blocks_of):
            if not blocks:
                return f"messages.{i}: content must be non-empty"
            other_content = False  # a block before which no tool_result may come
            for j, block in enumerate(blocks):
                if block.get("type") == "tool_use":
                    if block.get("id") in use_ids:
                        return f"messages.{i}.content.{j}: `tool_use` ids must be unique"
                    use_ids.add(block.get("id"))
                if block.get("type") == "tool_result" and other_content:
                    return f"messages.{i}: `tool_result` blocks must come before any other content in a user message"
                other_content = other_content or block.get("type") != "tool_result"
            for block in blocks:
                if block.get("type") == "text" and not block.get("text", "").strip():
                    return f"messages.{i}: text content blocks must contain non-whitespace text"
            uses = [b["id"] for b in blocks if b.get("type") == "tool_use"]
            if uses:
                following = blocks_of[i + 1] if i + 1 < len(messages) else []
                answered = {b.get("tool_use_id") for b in following}
                missing = [u for u in uses if u not in answered]
                if missing:
                    return (
                        f"messages.{i + 1}: `tool_use` ids were found without `tool_result` blocks immediately "
                        f"after: {', '.join(missing)}"
                    )
            asked = {b.get("id") for b in blocks_of[i - 1] if b.get("type") == "tool_use"} if i else set()
            for j, block in enumerate(blocks):
                if block.get("type") == "tool_result" and block.get("tool_use_id") not in asked:
                    return (
                        f"messages.{i}.content.{j}: unexpected `tool_use_id` found in `tool_result` blocks: "
                        f"{block.get('tool_use_id')}. Each `tool_result` block must have a corresponding `tool_use` "
                        "block in the previous message."
                    )
        texts = [b.get("text", "") for b in blocks_of[-1] if b.get("type") == "text"]
        if messages[-1].get("role") == "assistant" and texts and texts[-1] != texts[-1].rstrip():
            return "messages: final assistant content cannot end with trailing whitespace"
        return None

    async def _models(self, request: web.Request) -> web.Response:
        """``GET /v1/models``: the model list (clients use it to open a connection ahead of the first request)."""
        refused = self.refusal(request)
        if refused is not None:
            return refused
        self.record("models", peer=_peer(request))
        model = {
            "type": "model",
            "id": "claude-opus-4-7",
            "display_name": "Claude Opus",
            "created_at": "2026-01-01T00:00:00Z",
        }
        return web.json_response({"data": [model], "has_more": False, "first_id": model["id"], "last_id": model["id"]})

    # --------------------------------------------------------------------------------- responses

    def _reply_for(self, body: dict[str, Any]) -> Reply:
        if callable(self.replies):
            return self.replies(body)
        if not self.replies:
            raise ValueError("FakeAnthropic: no scripted replies")
        reply = self.replies[self._requests % len(self.replies)]
        self._requests += 1
        return reply

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        # ttft_s counts from the request's arrival, so the fake's own parsing and checks are inside it, not added.
        arrived = asyncio.get_running_loop().time()
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return self._invalid("request body is not valid JSON")
        self.record("request", body=body, headers=dict(request.headers), peer=_peer(request), arrived=arrived)
        if self.faulty_requests is not None and self._served >= self.faulty_requests:
            self.faults, self.stream_error_after = Faults(), None  # healthy from now on
        self._served += 1
        refused = self.refusal(request)
        if refused is not None:
            return refused
        version = request.headers.get("anthropic-version")
        if not version:
            return self._invalid("anthropic-version: header is required")
        # The API's versions, and the one the installed SDK sends (anthropic 2.12's ANTHROPIC_API_VERSION).
        if version not in ("2023-01-01", "2023-06-01", "2026-10-21"):
            return self._invalid(f"anthropic-version: unknown version {version!r}")
        problem = self._problem(body)
        if problem is not None:
            return self._invalid(problem)
        reply = self._reply_for(body)
        if not await self.stall(request):  # the client left during the stall (a barge-in before the first byte)
            self.record("disconnect", events=0, text="")
            return client_left()
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
        )
        response.headers["request-id"] = f"req_fake_{next(self._ids)}"
        sent = _Sent()
        try:
            try:
                await response.prepare(request)
            except ConnectionResetError:  # the client left during the stall (a barge-in before the first byte)
                raise _Disconnected from None
            await self._stream(request, response, body, reply, sent, arrived)
        except _Disconnected:
            self.record("disconnect", events=sent.events, text=sent.text)
        except asyncio.CancelledError:
            self.record("disconnect", events=sent.events, text=sent.text)
            raise
        return response

    async def _stream(
        self,
        request: web.Request,
        response: web.StreamResponse,
        body: dict[str, Any],
        reply: Reply,
        sent: _Sent,
        arrived: float,
    ) -> None:
        text = reply if isinstance(reply, str) else reply.text
        asked = [reply, *reply.also] if isinstance(reply, ToolUseReply) else []
        ending = reply if isinstance(reply, TextReply) else TextReply(text)
        input_tokens = self.input_tokens if self.input_tokens is not None else max(1, len(json.dumps(body)) // 4)
        # One token per word, a tool's input ~4 characters a token (+1 a call); past the request's max_tokens the
        # API stops, mid-word-list or mid-input, with stop_reason "max_tokens".
        limit = int(body["max_tokens"])
        words = _WORD.findall(text)
        cut = len(words) > limit
        words = words[:limit]
        budget = limit - len(words)
        calls: list[tuple[ToolUseReply, str]] = []  # each call sent, and its input (JSON text) as sent
        for tool in asked:
            arguments = json.dumps(tool.input)
            cost = len(arguments) // 4 + 1
            if cost > budget:
                cut = True
                if budget > 0:  # what room there is: the input starts and stops there
                    calls.append((tool, arguments[: budget * 4]))
                    budget = 0
                break
            calls.append((tool, arguments))
            budget -= cost
        output_tokens = limit - budget
        cache = self._cache_usage()

        async def send(event: str, data: dict[str, Any] | str) -> bool:
            """Send one event; False when the connection was dropped on purpose (stop streaming)."""
            if self.should_drop(sent.events):
                await self.drop(request)
                return False
            payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
            try:
                await response.write(f"event: {event}\ndata: {payload}\n\n".encode())
            except ConnectionResetError:  # aiohttp's ClientConnectionResetError: the client closed the stream
                raise _Disconnected from None
            sent.events += 1
            return True

        message = {
            "id": f"msg_fake_{next(self._ids)}",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": body["model"],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": 1, **cache, **self._cache_breakdown()},
        }
        if not await send("message_start", {"type": "message_start", "message": message}):
            return
        index = 0
        interval = self.words_per_delta / self.tokens_per_s
        first_token_due = arrived + self.ttft_s
        wait = first_token_due - asyncio.get_running_loop().time()
        if wait > 0:
            await asyncio.sleep(wait)
        if words:
            block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
            if not await send("content_block_start", block) or not await send("ping", {"type": "ping"}):
                return
            for n, start in enumerate(range(0, len(words), self.words_per_delta)):
                if n:
                    await asyncio.sleep(interval)
                if not await self._interject(send, n):
                    return
                piece = "".join(words[start : start + self.words_per_delta])
                delta = {"type": "text_delta", "text": piece}
                if not n:  # as the first text is written: the time to first token as served, for benchmarks
                    self.record("first-text", arrived=arrived, due=first_token_due)
                if not await send("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}):
                    return
                sent.text += piece
                if n + 1 == self.eof_after:
                    self.record("eof", after=n + 1)
                    await response.write_eof()
                    return
            if not await self._interject(send, len(words)):
                return
            if not await send("content_block_stop", {"type": "content_block_stop", "index": 0}):
                return
            index = 1
        stop_reason = ending.stop_reason
        for tool, arguments in calls:
            tool_id = tool.id or f"toolu_fake_{next(self._ids)}"
            start_block = {"type": "tool_use", "id": tool_id, "name": tool.name, "input": {}}
            if not await send(
                "content_block_start", {"type": "content_block_start", "index": index, "content_block": start_block}
            ):
                return
            half = len(arguments) // 2
            for part in (arguments[:half], arguments[half:]):  # fragments, as the API streams them
                delta = {"type": "input_json_delta", "partial_json": part}
                if not await send(
                    "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
                ):
                    return
            if not await send("content_block_stop", {"type": "content_block_stop", "index": index}):
                return
            index += 1
            stop_reason = "tool_use"
        if cut:
            stop_reason = "max_tokens"
        finish: dict[str, Any] = {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": output_tokens, **cache},
        }
        if ending.stop_details is not None and not cut:
            finish["delta"]["stop_details"] = ending.stop_details
        if not await send("message_delta", finish) or not await send("message_stop", {"type": "message_stop"}):
            return
        try:
            await response.write_eof()
        except ConnectionResetError:  # the client had all it wanted and left before the end of the body
            raise _Disconnected from None
        self.record(
            "reply",
            text="".join(words),
            tool=calls[0][0].name if calls else None,
            tools=[tool.name for tool, _ in calls],
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cache_creation_input_tokens=cache.get("cache_creation_input_tokens", 0),
            ephemeral_1h_input_tokens=self.ephemeral_1h_input_tokens or 0,
            cache_read_input_tokens=cache.get("cache_read_input_tokens", 0),
            stop_reason=stop_reason,
        )

    def _cache_usage(self) -> dict[str, int]:
        """The prompt-cache fields of the usage, as scripted (none unless scripted)."""
        fields = {
            "cache_creation_input_tokens": self.cache_creation_input_tokens,
            "cache_read_input_tokens": self.cache_read_input_tokens,
        }
        return {name: count for name, count in fields.items() if count is not None}

    def _cache_breakdown(self) -> dict[str, Any]:
        """``message_start``'s split of the cache writes by lifetime, as scripted (none unless scripted)."""
        if self.ephemeral_1h_input_tokens is None:
            return {}
        one_hour = self.ephemeral_1h_input_tokens
        five_minutes = (self.cache_creation_input_tokens or 0) - one_hour
        return {"cache_creation": {"ephemeral_5m_input_tokens": five_minutes, "ephemeral_1h_input_tokens": one_hour}}

    async def _interject(self, send: Callable[[str, Any], Any], deltas_sent: int) -> bool:
        """Before the text delta number ``deltas_sent``: the injected corruption or mid-stream error, if due.
        False when the response must end here."""
        if deltas_sent == self.corrupt_after and self.faults.corrupt in ("malformed-json", "unknown-event"):
            how = self.take_corruption()
            if how == "malformed-json":
                return bool(await send("content_block_delta", '{"type": "content_block_delta", "index": 0, "delta'))
            unknown = {"type": "content_block_flourish", "index": 0}
            if how == "unknown-event" and not await send("content_block_flourish", unknown):
                return False
        if deltas_sent == self.stream_error_after:
            self.record("stream-error", after=deltas_sent)
            error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
            await send("error", error)
            return False
        return True


def _blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    """A message's content as blocks (a string is one text block)."""
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [block for block in content or [] if isinstance(block, dict)]


@dataclass
class _Sent:
    events: int = 0
    text: str = ""


def _peer(request: web.Request) -> Any:
    """The client's address and port: requests from one pooled connection share it."""
    transport = request.transport
    return transport.get_extra_info("peername") if transport is not None else None
