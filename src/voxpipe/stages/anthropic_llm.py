"""AnthropicLLM: Claude as the reasoner, streamed with the official ``anthropic`` SDK (2.x, ``messages.stream``).

One caller turn is one or more requests: the conversation goes out, text deltas come back and are spoken as they
arrive; when the model asks for a tool, the stage runs it (``LLMStage``), and a follow-up request carries the
model's own content and the tool's result, up to ``max_tool_rounds`` times.

What makes it fit a voice call:

* Every wait has a deadline: connecting (``connect_timeout_s``), the first content of each request
  (``first_token_timeout_s``, including the time to the response's first byte) and each event after it
  (``read_timeout_s``). A missed one is a :class:`ProviderError`, never a hang.
* A barge-in cancels the stage's worker: the ``async with messages.stream(...)`` block exits and the SDK closes
  the HTTP response at once — the server sees the client go away mid-stream.
* Every failure is a ``ProviderError("Anthropic", …)`` that says what went wrong (``API key rejected (401)``,
  ``rate limited (429)``, ``stream stalled …``); the stage's error policy decides what the call does next. The
  text streamed before the failure has already been pushed, so it stays in the trace and, once played, in the
  conversation.
* Usage (input and output tokens, and prompt-cache writes — 5-minute and 1-hour apart — and reads, which are
  billed at their own rates) is counted per request, also for a request cut off by a barge-in (its output
  estimated from what arrived, as the API reports it only at the end).
* A reply the API's safety classifiers stop (``stop_reason: "refusal"``) is followed by ``refusal_line``, reported,
  and left out of later requests with the caller's lines that led to it, as Anthropic asks.

The module reads top to bottom: settings, connect, prompt, stream, errors, cancel/close.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, Field, SecretStr, field_validator

from voxpipe.config.registry import Package
from voxpipe.pipeline import EndOfTurn, Message, ToolCall
from voxpipe.pipeline.usage import (
    CACHE_READ_TOKENS,
    CACHE_WRITE_1H_TOKENS,
    CACHE_WRITE_TOKENS,
    INPUT_TOKENS,
    OUTPUT_TOKENS,
)
from voxpipe.stages.cloud import CloudSettings, ProviderError, require_sdk
from voxpipe.stages.llm import (
    DEFAULT_TOOL_THREADS,
    RUNNING_TOOLS_NOTE,
    AuditSink,
    LLMStage,
    check_running_tools_note,
)
from voxpipe.stages.tools import ToolsLike, result_text

if TYPE_CHECKING:
    from anthropic import AsyncAnthropic

PROVIDER = "Anthropic"
log = logging.getLogger("voxpipe.stages.anthropic_llm")
ENV_VAR = "ANTHROPIC_API_KEY"

_T = TypeVar("_T")

# ------------------------------------------------------------------------------------------------ settings


class AnthropicSettings(CloudSettings):
    """Settings of :class:`AnthropicLLM` (the ``llm:`` section of a config with ``provider: anthropic``)."""

    service_name: ClassVar[str] = PROVIDER
    api_key_env: ClassVar[str] = ENV_VAR

    model: str = Field("claude-opus-4-7", min_length=1, description="the Claude model to ask")
    max_tokens: int = Field(300, ge=1, le=64000, description="most tokens in one reply (voice replies are short)")
    api_key: SecretStr | None = Field(
        None, description=f"the API key; unset: the environment variable {ENV_VAR} (e.g. api_key: ${{{ENV_VAR}}})"
    )
    base_url: str | None = Field(
        None,
        pattern=r"^https?://",
        description="the API's address; unset: the SDK's default (https://api.anthropic.com, or $ANTHROPIC_BASE_URL)",
    )
    connect_timeout_s: float = Field(5.0, gt=0, le=120, description="longest wait to connect to the API")
    first_token_timeout_s: float = Field(
        10.0,
        gt=0,
        le=300,
        description="longest wait, per request, from sending it to the first text or tool call (includes the first "
        "byte of the response)",
    )
    read_timeout_s: float = Field(
        10.0, gt=0, le=300, description="longest wait between two stream events once the reply has started"
    )
    max_tool_rounds: int = Field(
        3, ge=0, le=20, description="most follow-up requests with tool results in one turn (0: tools are not offered)"
    )
    tool_threads: int = Field(
        DEFAULT_TOOL_THREADS,
        ge=1,
        le=64,
        description="how many sync tools may run at once, each on a thread of the reasoner's own; with all taken, a "
        "sync tool is refused at once, naming the tools holding them",
    )
    thread_grace_s: float = Field(
        5.0, ge=0, le=120, description="at the end of the call, longest wait for a sync tool still running"
    )
    interrupted_marker: str = Field(
        "[interrupted by the caller]",
        max_length=200,
        description="appended to a bot reply the caller cut off, so the model knows the rest was not heard; empty: "
        "no marker",
    )
    keepalive_s: float = Field(
        60.0,
        ge=0,
        le=600,
        description="how long an idle connection to the API is kept for the next turn (the SDK's default, 5 s, is "
        "shorter than a caller's turn, so every reply would pay a new TCP and TLS handshake)",
    )
    http_client: Literal["aiohttp", "httpx"] = Field(
        "aiohttp",
        description="the SDK's HTTP transport: aiohttp (the SDK's DefaultAioHttpClient) streams a request in 0.64 of "
        "the time httpx, its default, takes (docs/providers/anthropic.md)",
    )
    prewarm: bool = Field(
        True,
        description="when the call starts, open the connection (a free GET /v1/models) and stream a canned reply "
        "through the SDK in memory, so the first reply pays neither the handshake nor the SDK building its types",
    )
    refusal_line: str = Field(
        "Sorry, I can't help with that.",
        max_length=500,
        description="spoken when the API's safety classifiers stop a reply (stop_reason refusal), which then ends "
        "mid-sentence with nothing more from the API; empty: nothing is said",
    )
    running_tools_note: str = Field(
        RUNNING_TOOLS_NOTE,
        max_length=1000,
        description="added to the system prompt while tools called in an earlier turn still run (on_barge_in: "
        "finish tools whose reply the caller cut off), so the model does not call them again; {calls} is replaced "
        "by them, e.g. book_table(name='Rossi', people=2); empty: no note",
    )
    extra_body: dict[str, Any] = Field(
        default_factory=dict,
        description="extra request fields sent as they are, e.g. {temperature: 0.5} (the 2.x SDK has no such "
        "parameter) or {metadata: {user_id: ...}}",
    )

    _running_tools_note = field_validator("running_tools_note")(check_running_tools_note)


# ------------------------------------------------------------------------------------------------- connect


def _sdk() -> Any:
    return require_sdk(PROVIDER, "anthropic", "anthropic")


# The SDK builds its response types (pydantic schemas) the first time a stream uses them: 55 ms of the first reply's
# time to first text on this 2-core VM, 216 ms in a process that has not built any pydantic schema yet. A canned
# reply with a text and a tool call, streamed through the SDK's own code from an in-memory transport, pays that when
# the call starts, before any audio flows, once per process.
_WARM_UP_EVENTS: tuple[tuple[str, dict[str, Any]], ...] = (
    (
        "message_start",
        {
            "type": "message_start",
            "message": {
                "id": "msg_warm_up",
                "type": "message",
                "role": "assistant",
                "model": "warm-up",
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": 1, "output_tokens": 1},
            },
        },
    ),
    ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ("ping", {"type": "ping"}),
    (
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi."}},
    ),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    (
        "content_block_start",
        {
            "type": "content_block_start",
            "index": 1,
            "content_block": {"type": "tool_use", "id": "toolu_warm_up", "name": "warm_up", "input": {}},
        },
    ),
    (
        "content_block_delta",
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{}"}},
    ),
    ("content_block_stop", {"type": "content_block_stop", "index": 1}),
    (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use", "stop_sequence": None},
            "usage": {"output_tokens": 2},
        },
    ),
    ("message_stop", {"type": "message_stop"}),
)
_sdk_warm = False


async def _warm_up_sdk(model: str) -> None:
    """Stream the canned reply through the SDK once per process, on a thread of its own (building the types holds
    the interpreter, but the loop carrying other calls' audio still gets its turns). Never the call's failure."""
    global _sdk_warm
    if _sdk_warm:
        return
    try:
        await asyncio.to_thread(asyncio.run, _stream_canned_reply(model))
        _sdk_warm = True
    except Exception as exc:
        log.debug("warming up the anthropic SDK failed: %s", exc)


async def _stream_canned_reply(model: str) -> None:
    anthropic, httpx2 = _sdk(), _transport()
    body = "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in _WARM_UP_EVENTS).encode()

    def answer(request: Any) -> Any:
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    http_client = httpx2.AsyncClient(transport=httpx2.MockTransport(answer))
    client = anthropic.AsyncAnthropic(api_key="warm-up", base_url="http://warm-up.invalid", http_client=http_client)
    tool = {"name": "warm_up", "description": "", "input_schema": {"type": "object", "properties": {}}}
    messages = [{"role": "user", "content": "Hello."}]
    try:
        async with client.messages.stream(model=model, max_tokens=8, messages=messages, tools=[tool]) as stream:
            async for _event in stream:
                pass
            await stream.get_final_message()
    finally:
        await client.close()


class AnthropicLLM(LLMStage):
    """Claude via ``AsyncAnthropic.messages.stream``, with tools (see the module docstring)."""

    Settings: ClassVar[type[BaseModel]] = AnthropicSettings
    supports_tools: ClassVar[bool] = True

    @classmethod
    def required_packages(cls, settings: AnthropicSettings) -> tuple[Package, ...]:
        """The SDK, and aiohttp for its aiohttp transport (``http_client``); the extra installs both."""
        sdk = Package("anthropic", "anthropic", "anthropic")
        return (sdk, Package("aiohttp", "aiohttp", "anthropic")) if settings.http_client == "aiohttp" else (sdk,)

    @classmethod
    def from_settings(cls, settings: AnthropicSettings, context: Any, name: str) -> AnthropicLLM:
        # The key is resolved here, so a missing one is a config error before anything connects.
        key = settings.require_api_key("llm")
        tools = dict(getattr(context, "tools", None) or {})
        return cls(settings, api_key=key, tools=tools, audit=getattr(context, "tool_audit", None), name=name)

    def __init__(
        self,
        settings: AnthropicSettings | None = None,
        *,
        api_key: str | None = None,
        tools: ToolsLike | None = None,
        audit: AuditSink | None = None,
        name: str = "llm",
    ) -> None:
        settings = settings or AnthropicSettings.model_validate({})
        super().__init__(
            tools=tools,
            audit=audit,
            tool_threads=settings.tool_threads,
            thread_grace_s=settings.thread_grace_s,
            running_tools_note=settings.running_tools_note,
            name=name,
        )
        self.settings = settings
        self._api_key = (api_key or "").strip() or self.settings.require_api_key("llm")
        _sdk()  # a missing SDK is a clear error when the pipeline is built, not on the first turn
        self._client: AsyncAnthropic | None = None
        self._open_streams = 0
        self._stopping = False
        self._refused = _RefusedExchanges()

    async def start(self) -> None:
        await super().start()
        self._stopping = False
        self._refused = _RefusedExchanges()
        self._client = self._connect()
        if self.settings.prewarm:
            self.spawn(self._prewarm(self._client), name=f"{self.name}-prewarm")
            await _warm_up_sdk(self.settings.model)

    def _connect(self) -> AsyncAnthropic:
        """The SDK client. Nothing goes over the network until the first request."""
        anthropic = _sdk()
        s = self.settings
        # Our own deadlines (below) give the precise errors; the transport's are the same size, as a backstop.
        read = max(s.first_token_timeout_s, s.read_timeout_s)
        timeout = anthropic.Timeout(connect=s.connect_timeout_s, read=read, write=s.connect_timeout_s, pool=read)
        limits = _transport().Limits(max_connections=100, max_keepalive_connections=10, keepalive_expiry=s.keepalive_s)
        http_client_class = (
            anthropic.DefaultAioHttpClient if s.http_client == "aiohttp" else anthropic.DefaultAsyncHttpxClient
        )
        client: AsyncAnthropic = anthropic.AsyncAnthropic(
            api_key=self._api_key,
            base_url=s.base_url,
            timeout=timeout,
            max_retries=0,  # a retry costs the caller seconds of silence; the error policy decides instead
            http_client=http_client_class(limits=limits, timeout=timeout),
        )
        return client

    async def _prewarm(self, client: AsyncAnthropic) -> None:
        """Open the pooled connection while the caller is still speaking. A failure here is not the call's: the
        first real request reports it, with the same clear error, if it persists."""
        try:
            async with asyncio.timeout(self.settings.connect_timeout_s):
                await client.models.list(limit=1)
        except Exception as exc:
            log.debug("%s: pre-warming the connection failed: %s", self.name, exc)

    # ---------------------------------------------------------------------------------------------- prompt

    def build_request(self, messages: list[dict[str, Any]], system: str, *, offer_tools: bool) -> dict[str, Any]:
        """The keyword arguments of one ``messages.stream`` call."""
        s = self.settings
        request: dict[str, Any] = {"model": s.model, "max_tokens": s.max_tokens, "messages": messages}
        if system:
            request["system"] = system
        if self.tools:
            # Declared even when not offered: the API refuses tool blocks in a conversation without tool definitions.
            request["tools"] = [tool.spec() for tool in self.tools.values()]
            if not offer_tools:  # the last round (or max_tool_rounds = 0): the model must answer in words
                request["tool_choice"] = {"type": "none"}
        if s.extra_body:
            request["extra_body"] = dict(s.extra_body)
        return request

    # ---------------------------------------------------------------------------------------------- stream

    async def generate(self, turn: EndOfTurn) -> AsyncIterator[str | ToolCall | tuple[ToolCall, ...]]:
        context = self._refused.leave_out(turn.context)
        messages = render_messages(context, self.settings.interrupted_marker, fallback=turn.text)
        rounds = self.settings.max_tool_rounds
        for round_ in range(rounds + 1):
            reply = _Reply()
            offer_tools = round_ < rounds
            request = self.build_request(messages, turn.system, offer_tools=offer_tools)
            async with contextlib.aclosing(self._stream_reply(turn, request, reply, offer_tools)) as items:
                async for item in items:
                    yield item
            if reply.stop_reason == "refusal":
                self._refused.add(turn.context)
                return
            if not reply.tool_calls:
                # A text reply, or tool calls not run (the last round, or cut by max_tokens).
                if not reply.chars and reply.stop_reason in ("end_turn", "stop_sequence"):
                    after = " after the tool results" if round_ else ""
                    await self.report(f"{PROVIDER}: the model ended its reply{after} without a word")
                return
            # The follow-up request: the model's own content (text and tool_use blocks), then every result.
            messages = [
                *messages,
                {"role": "assistant", "content": reply.content},
                {"role": "user", "content": [self._tool_result(call) for call in reply.tool_calls]},
            ]

    async def _stream_reply(
        self, turn: EndOfTurn, request: dict[str, Any], reply: _Reply, offer_tools: bool
    ) -> AsyncGenerator[str | tuple[ToolCall, ...], None]:
        """One request: yields its text deltas as they come and, once the response is complete, its tool calls;
        fills ``reply`` with what the follow-up needs.

        Tool calls wait for ``message_stop``: a tool must not run on a call the token limit cut short (the SDK
        parses partial input leniently, and a booking for the wrong number of people is a real side effect), and
        the usage is final by then, also when a barge-in cuts the tool. Nor does a tool run that the request did
        not offer (``tool_choice: none``, the last round): no follow-up would carry its result. A response that
        ends without ``message_stop`` is a failure, not a short reply."""
        client = self._client
        if client is None:
            raise RuntimeError(f"{self.name}: the stage is not started")
        loop = asyncio.get_running_loop()
        progress = _Progress(deadline=loop.time() + self.settings.first_token_timeout_s)
        self._open_streams += 1
        try:
            async with contextlib.AsyncExitStack() as exits:
                # Entering sends the request and waits for the response's headers: within the first-token deadline.
                self.mark("llm.sdk_call", turn.epoch)  # the SDK boundary; a tool round's follow-up keeps the first
                stream = await self._read(exits.enter_async_context(client.messages.stream(**request)), progress)
                while True:
                    event: Any = await self._read(anext(stream, None), progress)  # the SDK's events, by .type
                    if event is None:
                        break
                    kind = event.type
                    try:
                        text = self._take_event(turn, event, kind, reply, progress)
                    except (AttributeError, TypeError, ValueError) as exc:  # valid JSON, not the API's shape
                        raise ProviderError(
                            PROVIDER, f"malformed {kind!r} event after {progress.chars} characters ({exc})"
                        ) from None
                    if text:
                        yield text
                    elif kind not in KNOWN_EVENTS and kind not in progress.skipped:
                        # The API may add event types; its documentation says to ignore unknown ones.
                        progress.skipped.add(kind)
                        await self.report(f"{PROVIDER}: skipped an unknown stream event {kind!r}")
                    if kind in CONTENT_EVENTS or progress.first_content:
                        # Measured from now, i.e. after the yield: time spent speaking is not the API's.
                        progress.started(loop.time() + self.settings.read_timeout_s)
                if not progress.complete:
                    raise ProviderError(
                        PROVIDER, f"the stream ended before message_stop, after {progress.chars} characters"
                    )
                reply.stop_reason, reply.chars = progress.stop_reason, progress.chars
                if progress.stop_reason in ("max_tokens", "model_context_window_exceeded"):
                    await self._report_cut(reply, progress.stop_reason)
                elif progress.stop_reason == "refusal":
                    line = await self._report_refusal(reply, progress)
                    if line:
                        yield f" {line}" if progress.chars else line
                elif progress.stop_reason == "pause_turn":
                    await self._report_paused(reply)
                elif reply.tool_calls and not offer_tools:
                    await self._report_not_offered(reply)
                elif reply.tool_calls:
                    final = await self._read(stream.get_final_message(), progress)
                    reply.content = [_content_block(block) for block in final.content if _worth_sending(block)]
            if reply.tool_calls:
                yield tuple(reply.tool_calls)  # asked for together: they run at once
        finally:
            self._open_streams -= 1
            # Counted also when a barge-in cut the stream: whatever the API had reported by then.
            usage = progress.usage()
            if usage:
                self.count(turn.epoch, **usage)
            if self._stopping and self._open_streams == 0:
                await self._close()

    def _take_event(self, turn: EndOfTurn, event: Any, kind: str, reply: _Reply, progress: _Progress) -> str:
        """Note one SDK event in ``reply`` and ``progress``; returns its text, if it carries any."""
        if kind == "text":
            if event.text and not progress.chars:
                self.mark("llm.sdk_answer", turn.epoch)  # the SDK handed over the first text
            progress.chars += len(event.text or "")
            return str(event.text or "")
        if kind == "content_block_stop" and event.content_block.type == "tool_use":
            block = event.content_block
            call = ToolCall(epoch=turn.epoch, call_id=block.id, name=block.name, arguments=block.input)
            reply.tool_calls.append(call)
        elif kind == "message_start":
            progress.take_usage(getattr(event.message, "usage", None))  # some compatible gateways leave it out
        elif kind == "content_block_delta":
            progress.generated_chars += _generated_chars(event.delta)
        elif kind == "message_delta":
            usage = getattr(event, "usage", None)
            progress.take_usage(usage)  # cumulative counts, where the delta has them
            progress.final_usage = progress.final_usage or bool(getattr(usage, "output_tokens", None))
            progress.stop_reason = getattr(event.delta, "stop_reason", None) or progress.stop_reason
            progress.stop_details = getattr(event.delta, "stop_details", None) or progress.stop_details
        elif kind == "message_stop":
            progress.complete = True
        return ""

    async def _report_cut(self, reply: _Reply, stop_reason: str) -> None:
        """The reply reached ``max_tokens`` or the model's context window: what was said stands; a tool call it cut
        is not run."""
        limit = f"max_tokens={self.settings.max_tokens}" if stop_reason == "max_tokens" else "the context window"
        if reply.tool_calls:
            names = ", ".join(repr(call.name) for call in reply.tool_calls)
            reply.tool_calls.clear()
            await self.report(f"{PROVIDER}: the reply reached {limit} inside a call of {names}; not run")
        else:
            await self.report(f"{PROVIDER}: the reply reached {limit} and was cut there")

    async def _report_refusal(self, reply: _Reply, progress: _Progress) -> str:
        """The API's safety classifiers stopped the reply (``stop_reason: "refusal"``): it ends mid-sentence and the
        API adds nothing, so the caller is told (``refusal_line``, returned to be spoken). Its tool calls are not
        run, and ``generate`` leaves the exchange out of later requests: the API refuses again while it is there."""
        names = ", ".join(repr(call.name) for call in reply.tool_calls)
        reply.tool_calls.clear()
        details = _stop_details(progress.stop_details)
        await self.report(
            f"{PROVIDER}: the API refused the reply{details} after {progress.chars} characters"
            + (f" (its call of {names} not run)" if names else "")
            + "; the exchange is left out of later requests"
        )
        return self.settings.refusal_line.strip()

    async def _report_paused(self, reply: _Reply) -> None:
        """``pause_turn`` comes from the API's own server tools, which this stage never declares (one given in
        ``extra_body`` is the only way): the turn ends where it paused, and says so."""
        reply.tool_calls.clear()
        await self.report(f"{PROVIDER}: the API paused the turn (pause_turn, a server tool's long run); not continued")

    async def _report_not_offered(self, reply: _Reply) -> None:
        """The model asked for tools the request did not offer (the last round): they are not run."""
        names = ", ".join(repr(call.name) for call in reply.tool_calls)
        reply.tool_calls.clear()
        rounds = self.settings.max_tool_rounds
        await self.report(
            f"{PROVIDER}: the model asked for {names} after the last tool round (max_tool_rounds={rounds}); not run"
        )

    async def _read(self, step: Awaitable[_T], progress: _Progress) -> _T:
        """Await one step of the SDK within the current deadline; every failure becomes a ProviderError."""
        try:
            async with asyncio.timeout_at(progress.deadline):
                return await step
        except TimeoutError:
            raise ProviderError(PROVIDER, self._timeout_problem(progress)) from None
        except ProviderError:
            raise
        except Exception as exc:
            raise ProviderError(PROVIDER, _problem(exc, progress, self.settings)) from exc

    def _timeout_problem(self, progress: _Progress) -> str:
        if not progress.first_content:
            return f"no first token within {self.settings.first_token_timeout_s:g} s"
        return f"stream stalled: no event for {self.settings.read_timeout_s:g} s after {progress.chars} characters"

    def _tool_result(self, call: ToolCall) -> dict[str, Any]:
        result = self.results.get(call.call_id)
        block: dict[str, Any] = {"type": "tool_result", "tool_use_id": call.call_id}
        if result is None:  # cannot happen through LLMStage; an honest answer if it ever does
            block.update(content=f"the tool {call.name!r} was not run", is_error=True)
        elif result.error is not None:
            block.update(content=result.error, is_error=True)
        else:
            block["content"] = result_text(result.result)
        return block

    # -------------------------------------------------------------------------------------- cancel / close
    #
    # Cancelling is structural: a barge-in cancels the worker running ``generate``, the ``async with`` around the
    # SDK stream exits, and the SDK closes the HTTP response. Nothing here needs an ``on_interrupt``.

    async def stop(self) -> None:
        # A stream still open (the call ended mid-reply) closes when its worker is cancelled, right after this;
        # closing the client under it would turn that into a spurious error, so the last stream closes the client.
        self._stopping = True
        if self._open_streams == 0:
            await self._close()
        await super().stop()

    async def _close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()


# ----------------------------------------------------------------------------------------------- helpers

# The events of ``AsyncMessageStream`` (raw ones and the SDK's helper events); anything else is new to this code.
KNOWN_EVENTS = frozenset(
    {
        "message_start",
        "message_delta",
        "message_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "text",
        "input_json",
        "citation",
        "thinking",
        "signature",
    }
)
# Events that show the reply has started: from then on, the per-event deadline applies.
CONTENT_EVENTS = frozenset({"content_block_delta", "text", "input_json", "thinking"})
# Output tokens of a stream cut before the API reported them are estimated from the characters that arrived; Claude's
# tokenizer averages about 3.5 to 4 characters a token in English.
CHARS_PER_TOKEN = 4


# The API's usage fields -> voxpipe's usage counters. Cache writes and reads are input tokens billed apart from
# input_tokens (which does not include them): 1.25x (5-minute cache writes), 2x (1-hour ones) and 0.1x its price.
# cache_creation_input_tokens counts the writes to both caches; usage.cache_creation splits them by lifetime, and
# _Progress.usage moves the 1-hour ones from CACHE_WRITE_TOKENS to CACHE_WRITE_1H_TOKENS.
USAGE_COUNTERS = {
    "input_tokens": INPUT_TOKENS,
    "output_tokens": OUTPUT_TOKENS,
    "cache_creation_input_tokens": CACHE_WRITE_TOKENS,
    "cache_read_input_tokens": CACHE_READ_TOKENS,
}


@dataclass
class _Progress:
    """How far one request got: the current deadline, what it streamed, the usage it reported."""

    deadline: float
    first_content: bool = False
    chars: int = 0  # of text
    generated_chars: int = 0  # of every delta the model generated: text, a tool call's input, thinking
    reported: dict[str, int] = field(default_factory=dict)  # the API's usage field -> its latest count
    cache_writes_1h: int = 0  # the latest usage.cache_creation.ephemeral_1h_input_tokens
    stop_reason: str | None = None
    stop_details: Any = None  # e.g. a refusal's category and explanation
    final_usage: bool = False  # a message_delta reported the output tokens
    complete: bool = False  # message_stop arrived
    skipped: set[str] = field(default_factory=set)

    def started(self, deadline: float) -> None:
        self.first_content = True
        self.deadline = deadline

    def take_usage(self, usage: Any) -> None:
        """The counts of a ``message_start``'s or ``message_delta``'s usage. Both are totals so far, not
        increments: a field the event leaves out (or null) keeps the last count. So does the 1-hour cache writes'
        count, which a ``message_delta`` that updates the total may not carry (the SDK's type for it has no
        ``cache_creation``)."""
        for name in USAGE_COUNTERS:
            count = getattr(usage, name, None)
            if count:
                self.reported[name] = count
        cache_writes_1h = _cache_writes_1h(usage)
        if cache_writes_1h:
            self.cache_writes_1h = cache_writes_1h

    def usage(self) -> dict[str, int]:
        """What to count: each counter the API reported as more than 0, the cache writes split by lifetime (all
        5-minute ones when the API gave no breakdown).

        A stream cut before its ``message_delta`` (a barge-in, a failure) has only ``message_start``'s placeholder
        of 1 output token; the API bills what it generated up to the cut, so the output is estimated from what
        arrived, at ``CHARS_PER_TOKEN`` (a low estimate: the model may have generated more that never arrived)."""
        counts = {USAGE_COUNTERS[name]: count for name, count in self.reported.items()}
        if not self.final_usage and self.generated_chars:
            estimate = -(-self.generated_chars // CHARS_PER_TOKEN)
            counts[OUTPUT_TOKENS] = max(counts.get(OUTPUT_TOKENS, 0), estimate)
        cache_writes = counts.pop(CACHE_WRITE_TOKENS, 0)
        # The breakdown splits cache_creation_input_tokens, never adds to it: the two add up to what was written.
        cache_writes_1h = min(self.cache_writes_1h, cache_writes)
        if cache_writes - cache_writes_1h:
            counts[CACHE_WRITE_TOKENS] = cache_writes - cache_writes_1h
        if cache_writes_1h:
            counts[CACHE_WRITE_1H_TOKENS] = cache_writes_1h
        return counts


def _cache_writes_1h(usage: Any) -> int | None:
    """``usage.cache_creation.ephemeral_1h_input_tokens``, or None. It is a model in ``message_start``'s usage; in a
    ``message_delta``'s, whose SDK type has no such field, the SDK keeps one that comes as the plain dict it was."""
    breakdown = getattr(usage, "cache_creation", None)
    if isinstance(breakdown, dict):
        return breakdown.get("ephemeral_1h_input_tokens")
    return getattr(breakdown, "ephemeral_1h_input_tokens", None)


@dataclass
class _Reply:
    """What a request leaves for ``generate``: why it stopped, how much it said and, when it asked for tools, the
    model's content and its tool calls for the follow-up."""

    content: list[dict[str, Any]] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    stop_reason: str | None = None
    chars: int = 0  # of text


def _generated_chars(delta: Any) -> int:
    """Characters of one ``content_block_delta`` that the model generated (and the API bills as output)."""
    for name in ("text", "partial_json", "thinking"):
        value = getattr(delta, name, None)
        if isinstance(value, str):
            return len(value)
    return 0


def _stop_details(details: Any) -> str:
    """``" (cyber: This request was declined ...)"`` from a refusal's ``stop_details``, a dict or an SDK model."""
    if details is None:
        return ""
    fields = details if isinstance(details, dict) else vars(details)
    said = ": ".join(str(fields[name]) for name in ("category", "explanation") if fields.get(name))
    return f" ({said})" if said else ""


class _RefusedExchanges:
    """The exchanges the API refused, left out of later requests: the API's guidance is to remove the refused turn,
    or it refuses again. The conversation is append-only, so an exchange is a span of its positions: from the
    caller's lines that the refused request ended with, through the bot's reply to them (as heard, and any tool
    uses), up to the caller's next line."""

    def __init__(self) -> None:
        self._spans: list[tuple[int, int]] = []  # (first caller line, end of the refused request's context)

    def add(self, context: Sequence[Message]) -> None:
        start = len(context)
        while start and context[start - 1].role == "user":
            start -= 1
        self._spans.append((start, len(context)))

    def leave_out(self, context: Sequence[Message]) -> Sequence[Message]:
        if not self._spans:
            return context
        left_out: set[int] = set()
        for start, end in self._spans:
            # After the refused request's context: the bot's reply as heard, up to the caller's next line.
            stop = next((i for i in range(end, len(context)) if context[i].role == "user"), len(context))
            left_out.update(range(start, stop))
        return [message for position, message in enumerate(context) if position not in left_out]


def _problem(exc: Exception, progress: _Progress, settings: AnthropicSettings) -> str:
    """A clear sentence for an SDK or transport failure."""
    anthropic = _sdk()
    if isinstance(exc, anthropic.APIStatusError):
        detail = _error_detail(exc)
        status = exc.status_code
        if status == 200:  # an ``event: error`` inside a stream that had started fine
            return f"stream error: {detail} (after {progress.chars} characters)"
        if isinstance(exc, anthropic.AuthenticationError):
            return f"API key rejected (401): {detail}; check {settings.key_source('llm')}"
        if isinstance(exc, anthropic.PermissionDeniedError):
            return f"permission denied (403): {detail}"
        if isinstance(exc, anthropic.RateLimitError):
            retry = exc.response.headers.get("retry-after")
            return f"rate limited (429): {detail}" + (f"; retry after {retry} s" if retry else "")
        if status >= 500:
            return f"server error ({status}): {detail}"
        return f"request rejected ({status}): {detail}"
    if isinstance(exc, anthropic.APITimeoutError):
        return f"the request timed out before a response (connect_timeout_s={settings.connect_timeout_s:g})"
    if isinstance(exc, anthropic.APIConnectionError):
        cause = exc.__cause__ or exc
        return f"cannot connect to {settings.base_url or 'the API'}: {type(cause).__name__}: {cause}"
    if isinstance(exc, json.JSONDecodeError):
        return f"malformed stream event (not JSON: {exc.msg}) after {progress.chars} characters"
    httpx2 = _transport()
    if httpx2 is not None and isinstance(exc, httpx2.TransportError):
        return f"stream disconnected after {progress.chars} characters ({type(exc).__name__}: {exc})"
    return f"unusable stream after {progress.chars} characters ({type(exc).__name__}: {exc})"


def _transport() -> Any:
    try:
        import httpx2  # the SDK's HTTP stack; its errors surface as they are once a stream is being read
    except ImportError:
        return None
    return httpx2


def _error_detail(exc: Any) -> str:
    """``"overloaded_error: Overloaded"`` from Anthropic's error body, or the SDK's message."""
    body = exc.body
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("type"):
        return f"{error['type']}: {error.get('message', '')}".rstrip(": ")
    return str(exc.message)


def _content_block(block: Any) -> dict[str, Any]:
    """A block of the model's reply as a request block: text and tool_use rebuilt with only the fields the API
    takes back; anything else (e.g. thinking, with its signature) as the SDK serialises it."""
    if block.type == "text":
        return {"type": "text", "text": block.text}
    if block.type == "tool_use":
        return {"type": "tool_use", "id": block.id, "name": block.name, "input": block.input}
    return dict(block.to_dict())


def _worth_sending(block: Any) -> bool:
    return block.type != "text" or bool(block.text.strip())  # the API rejects empty text blocks


def render_messages(
    context: Sequence[Message], interrupted_marker: str = "", *, fallback: str = ""
) -> list[dict[str, Any]]:
    """The conversation as Anthropic ``messages``: alternating roles, starting with the caller.

    * an assistant message is what the caller *heard*; if they cut it off, ``interrupted_marker`` is appended;
    * a tool message becomes the assistant's ``tool_use`` block followed by the caller-side ``tool_result`` block
      with the same id (``is_error`` for a failed tool);
    * consecutive messages of one role are merged into one message of several blocks; empty texts are left out
      (the API rejects them); a conversation that starts with the bot gets a short caller line before it.
    """
    turns: list[tuple[str, dict[str, Any]]] = []
    for message in context:
        if message.role == "tool" and message.tool is not None:
            use = message.tool
            turns.append(
                ("assistant", {"type": "tool_use", "id": use.call_id, "name": use.name, "input": use.arguments})
            )
            result: dict[str, Any] = {"type": "tool_result", "tool_use_id": use.call_id}
            if use.error is not None:
                result.update(content=use.error, is_error=True)
            else:
                result["content"] = result_text(use.result)
            turns.append(("user", result))
            continue
        text = message.text.strip()
        if message.role == "assistant" and message.interrupted and interrupted_marker:
            text = f"{text} {interrupted_marker}".strip()
        if text:
            turns.append(("assistant" if message.role == "assistant" else "user", {"type": "text", "text": text}))
    if not turns and fallback.strip():
        turns.append(("user", {"type": "text", "text": fallback.strip()}))
    if turns and turns[0][0] != "user":
        turns.insert(0, ("user", {"type": "text", "text": "(the call connected)"}))
    messages: list[dict[str, Any]] = []
    for role, block in turns:
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"].append(block)
        else:
            messages.append({"role": role, "content": [block]})
    for rendered in messages:
        _tool_results_first(rendered)
    return messages


def _tool_results_first(message: dict[str, Any]) -> None:
    # The API wants a user message's tool_result blocks before its text.
    if message["role"] == "user":
        message["content"].sort(key=lambda block: block["type"] != "tool_result")
