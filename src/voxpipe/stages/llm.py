"""The reasoner stage: turns an :class:`EndOfTurn` into streamed text, speakable chunks and tool calls.

Providers implement :meth:`LLMStage.generate`, an async iterator of text deltas and :class:`ToolCall` frames; the
stage does the rest the same way for every provider: trace marks, chunking for the TTS, running tools, and — by
being a :class:`QueuedStage` — cancellation of the whole generation when the caller barges in.

The tool loop. When ``generate`` yields a :class:`ToolCall`, the stage runs the tool (see ``tools.py``) before it
asks the generator for more; the provider then finds the result in ``self.results[call_id]`` and continues (for a
cloud model: a follow-up request carrying the result). A tuple of calls (what the model asked for in one message)
runs all at once, with one filler at most. Per tool:

* a timeout — the model gets an error result saying so, and the call goes on;
* a barge-in policy — ``"cancel"``: the invocation is cancelled with the reply; ``"finish"``: it runs on in a task
  the pipeline owns, and its result is kept in the conversation (a booking made is a booking made);
* a filler line, spoken if the tool has not answered after ``filler_after_s``.

A sync tool runs in a thread, which nothing can stop. So its barge-in policy is ``"finish"`` whatever it says (a
"cancelled" booking would still be made, with no record of it), and its timeout ends only the wait: the model hears
that it timed out, and when the thread ends, a second audit entry (``finished-after-timeout``) records what it did.
The threads are the stage's own (``tool_threads`` of them, :class:`ToolThreads`), never the event loop's default
executor, which resolves the providers' host names: hung tools take only their own threads, and with all of them
taken a sync tool gets an error at once. At the end of the call, a thread still running past its tool's timeout is
waited for ``thread_grace_s`` at most, then left running (audit outcome ``abandoned``): a hung tool does not hang the
call's end.

A result over the tool's ``max_result_chars`` is not sent: the model gets an error naming the tool, the size and the
limit, and the audit entry records that error and the size (``result_chars``), not the result.

A "finish" tool still running when the caller's next turn goes to the model (the caller cut the reply off while it
ran) is named in that request's system prompt (``running_tools_note``, by default :data:`RUNNING_TOOLS_NOTE`): its
result is not in the conversation
yet, and a model that knows nothing of it would book the table a second time. The result reaches the conversation
when the tool ends, and the next request carries it.

Every invocation is appended to the audit log (``audit``, e.g. :class:`ToolAuditLog`) as it finishes, and every
result travels upstream to the turn-taker, which records it in the conversation. A log that cannot take an entry
(a full disk) is reported; the tool's outcome still reaches the model and the conversation.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import string
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, ClassVar

from voxpipe.pipeline import (
    UPSTREAM,
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
    being_cancelled,
)
from voxpipe.stages.text import SpeakableChunker
from voxpipe.stages.tools import ResultTooLarge, Tool, ToolError, ToolsLike, ToolThreads, tools_by_name

AuditSink = Callable[[Mapping[str, Any]], None]

log = logging.getLogger("voxpipe.llm")

# A reply's sync tools take a thread each while they run (several when the model asks for them together); more are
# busy only with tools that outlive their reply (hung past their timeout, or finishing after a barge-in). A thread
# is made per call, so the bound costs nothing until used.
DEFAULT_TOOL_THREADS = 8

# Added to the system prompt of a turn while tools called in an earlier turn still run ("finish" tools the caller cut
# the reply of): the model would otherwise know nothing of them and may call them again.
RUNNING_TOOLS_NOTE = (
    "Still running, called earlier in this call: {calls}. Their results will follow; do not call them again for the "
    "same request."
)


def check_running_tools_note(note: str) -> str:
    """``note`` if it is a usable :data:`RUNNING_TOOLS_NOTE`: empty (no note), or text with ``{calls}`` and no other
    field; else a ValueError saying what is wrong."""
    if not note.strip():
        return ""
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(note) if field is not None]
    except ValueError as exc:
        raise ValueError(f"is not a format string ({exc}); write a literal brace as {{{{ or }}}}") from None
    if set(fields) != {"calls"}:
        raise ValueError(
            f"must hold {{calls}} (where the running tools are named) and no other "
            f"{{field}}; it holds {', '.join('{' + f + '}' for f in fields) or 'none'}"
        )
    return note


class LLMStage(QueuedStage):
    """Base of reasoner stages. ``supports_tools``: whether the provider's model can ask for tools (the stage runs
    them either way; a config that gives tools to a provider without it is refused). ``tool_threads``: how many
    threads sync tools may hold at once; ``thread_grace_s``: how long :meth:`stop` waits for a sync tool's thread
    that ran past its timeout before it leaves it running. ``running_tools_note``: the system prompt's note naming
    "finish" tools still running from an earlier turn (``{calls}`` is replaced by them; empty: no note)."""

    supports_tools: ClassVar[bool] = False

    def __init__(
        self,
        *,
        tools: ToolsLike | None = None,
        chunker: Callable[[], SpeakableChunker] = SpeakableChunker,
        audit: AuditSink | None = None,
        tool_threads: int = DEFAULT_TOOL_THREADS,
        thread_grace_s: float = 5.0,
        running_tools_note: str = RUNNING_TOOLS_NOTE,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        if tool_threads < 1 or thread_grace_s < 0:
            raise ValueError(f"{self.name}: tool_threads must be >= 1 and thread_grace_s >= 0")
        try:
            self.running_tools_note = check_running_tools_note(running_tools_note)
        except ValueError as exc:
            raise ValueError(f"{self.name}: running_tools_note {exc}") from None
        self.tools: dict[str, Tool] = tools_by_name(tools)
        self.audit = audit
        self.tool_threads = tool_threads
        self.thread_grace_s = thread_grace_s
        self._new_chunker = chunker
        self.results: dict[str, ToolResult] = {}
        # "finish" tools (and sync ones) still running, and the call each is running.
        self._finishing: dict[asyncio.Task[None], ToolCall] = {}
        self._late_threads: set[asyncio.Task[None]] = set()  # sync tools' threads running past their timeout
        self._threads: ToolThreads | None = None  # while the stage runs

    def generate(self, turn: EndOfTurn) -> AsyncIterator[str | ToolCall | tuple[ToolCall, ...]]:
        """Stream the reply to ``turn``: text deltas, and tool calls whose results appear in ``self.results`` — one
        at a time, or a tuple of the calls the model asked for together, which run at once."""
        raise NotImplementedError

    async def process(self, frame: Frame, direction: Direction) -> None:
        if isinstance(frame, EndOfTurn):
            await self._respond(frame)
        else:
            await self.push(frame, direction)

    async def _respond(self, turn: EndOfTurn) -> None:
        epoch = turn.epoch
        earlier = [call for call in self._finishing.values() if call.epoch < epoch]
        if earlier and self.running_tools_note:
            note = self.running_tools_note.format(calls=", ".join(_call_text(call) for call in earlier))
            turn = dataclasses.replace(turn, system=f"{turn.system}\n\n{note}".strip())
        self.mark("llm.request", epoch)
        await self.push(LLMRequest(epoch=epoch))
        chunker = self._new_chunker()
        text: list[str] = []
        try:
            # aclosing: a cancellation landing outside the generator (in a push) still closes it here, now,
            # instead of leaving it to the garbage collector and an unowned task.
            async with contextlib.aclosing(self.generate(turn)) as stream:
                after_tool = False
                async for item in stream:
                    if not isinstance(item, str):
                        # What the model said before the call is spoken now, while the tool runs, not after it.
                        rest = chunker.flush()
                        if rest:
                            await self._speak(epoch, rest)
                        await self._run_tools((item,) if isinstance(item, ToolCall) else item)
                        after_tool = True
                        continue
                    if after_tool and text and not text[-1][-1:].isspace() and not item[:1].isspace():
                        item = " " + item  # the next round's text starts a new sentence, not a new word
                    after_tool = False
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
        except Exception:
            # The reply ends here, short: without its end the output would wait for more, and under a policy that
            # goes on (skip-frame) count what it played in full as cut off by the caller's next words.
            await self.push(ResponseEnd(epoch=epoch, text="".join(text).strip()))
            raise
        finally:
            # Also when cancelled by a barge-in: the trace keeps what the model had produced by then.
            self.pipeline.trace.annotate(epoch, bot_text="".join(text).strip())
        await self.push(ResponseEnd(epoch=epoch, text="".join(text).strip()))

    async def start(self) -> None:
        self._threads = ToolThreads(self.tool_threads, name=f"{self.name}-tool")
        await super().start()

    async def stop(self) -> None:
        """A tool whose policy is "finish" is waited for (its own timeout bounds the wait): the call ending right
        after a barge-in must not cut a booking in half. A reply still under way is cancelled first: a tool
        finishing during the wait would resume it into a follow-up request as the call shuts down. A sync tool's
        thread past its timeout is waited for ``thread_grace_s`` at most (it may never end), then abandoned."""
        try:
            reply = self._worker
            if reply is not None and not reply.done():
                reply.cancel()
                await asyncio.wait({reply})
            if self._finishing:
                await asyncio.wait(set(self._finishing))
            if self._late_threads:
                _, hung = await asyncio.wait(set(self._late_threads), timeout=self.thread_grace_s)
                for waiting in hung:
                    waiting.cancel()  # audits it as abandoned; the thread itself runs on
                if hung:
                    await asyncio.wait(hung)
        finally:
            threads, self._threads = self._threads, None
            if threads is not None:
                threads.shutdown()
        await super().stop()

    async def _speak(self, epoch: int, chunk: str) -> None:
        self.mark("llm.first_chunk", epoch)  # first value wins: only the first chunk counts
        await self.push(SpeakableChunk(epoch=epoch, text=chunk))
        # Let the TTS take the chunk now: the SDK may hold more of the reply, already received, and parsing it
        # would not give the event loop back before the TTS worker had waited for all of it (~1 ms measured).
        await asyncio.sleep(0)

    # ------------------------------------------------------------------------------------ tools

    async def _run_tools(self, calls: tuple[ToolCall, ...]) -> None:
        """Run the tools the model asked for in one message, all at once (the model asked for them together: none
        waits for another's result), with at most one filler line for them."""
        waits: list[tuple[Tool, Awaitable[None]]] = []
        with_the_reply: list[asyncio.Task[None]] = []  # "cancel" tools: a barge-in cancels them with the reply
        try:
            for call in calls:
                await self.push(call)
                tool = self.tools.get(call.name)
                if tool is None:
                    known = ", ".join(sorted(self.tools)) or "none"
                    unknown = f"unknown tool {call.name!r} (known: {known})"
                    await self._finish_tool(call, self.clock.now(), error=unknown)
                elif tool.on_barge_in == "finish" or tool.runs_in_thread:
                    # Owned by the pipeline, not by this reply: a barge-in cancels the reply, and the tool runs on. A
                    # sync tool always does: its thread cannot be stopped, and "cancel" would only lose the record of
                    # what it did.
                    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                    running = self.spawn(self._invoke(tool, call, done), name=f"{self.name}-tool-{call.name}")
                    self._finishing[running] = call
                    running.add_done_callback(self._finishing.pop)
                    waits.append((tool, asyncio.shield(done)))
                else:
                    invocation = asyncio.create_task(
                        self._invoke(tool, call, None), name=f"{self.name}-tool-{call.name}"
                    )
                    with_the_reply.append(invocation)
                    waits.append((tool, invocation))
            if waits:
                await self._await_tools(calls[0].epoch, waits)
        finally:
            for invocation in with_the_reply:
                invocation.cancel()  # a barge-in landed in the wait: the tool goes with the reply,
            if with_the_reply:
                await asyncio.wait(with_the_reply)  # and has ended (its audit entry written) before the reply has

    async def _await_tools(self, epoch: int, waits: list[tuple[Tool, Awaitable[None]]]) -> None:
        """Wait for every tool; if they are still running at the first ``filler_after_s`` of those that have a
        filler, speak that filler."""
        outcomes = [asyncio.ensure_future(outcome) for _, outcome in waits]
        fillers = sorted((tool.filler_after_s, i, tool.filler) for i, (tool, _) in enumerate(waits) if tool.filler)
        if fillers:
            after, _, filler = fillers[0]
            _, running = await asyncio.wait(outcomes, timeout=after)
            if running:
                await self._speak(epoch, filler)
        for outcome in outcomes:
            await outcome

    async def _invoke(self, tool: Tool, call: ToolCall, done: asyncio.Future[None] | None) -> None:
        started = self.clock.now()
        self.mark(f"tool.start:{call.call_id}", call.epoch, tool=call.name)
        deadline = asyncio.timeout(tool.timeout_s)
        invocation = asyncio.ensure_future(tool.invoke(call.arguments, threads=self._threads))
        try:
            async with deadline:
                # A sync tool's thread cannot be stopped: the shield keeps its outcome for when it ends.
                result = await (asyncio.shield(invocation) if tool.runs_in_thread else invocation)
        except asyncio.CancelledError:
            if not being_cancelled():
                # Not this invocation being cancelled: the tool awaited something someone else cancelled. Its error.
                stray = f"tool {tool.name!r} raised CancelledError (it awaited something that was cancelled)"
                await self._finish_tool(call, started, error=stray)
                return
            invocation.cancel()
            why = "cancelled by a barge-in" if call.epoch < self.epoch else "cancelled: the call ended"
            if tool.runs_in_thread:  # only when the run itself is cancelled: stop() waits for a sync tool's thread
                why += " (its thread could not be stopped: what it did is not known)"
            _log_unrecorded(self.name, self._audit(call, started, outcome="cancelled", error=why))
            raise
        except TimeoutError as exc:
            if deadline.expired():
                timed_out = f"tool {tool.name!r} timed out after {tool.timeout_s:g} s"
                if tool.runs_in_thread:
                    timed_out += " (its thread runs on)"
                await self._finish_tool(call, started, error=timed_out, outcome="timeout")
                if tool.runs_in_thread:  # the thread is awaited for the audit only, in a task stop() may give up on
                    late = self.spawn(self._audit_late_outcome(call, started, invocation), name=f"{self.name}-late")
                    self._late_threads.add(late)
                    late.add_done_callback(self._late_threads.discard)
            else:  # the tool's own deadline (an HTTP client's, say) expired: its failure, not the per-tool timeout
                await self._finish_tool(call, started, error=f"tool {tool.name!r} raised TimeoutError: {exc}")
        except ToolError as exc:
            await self._finish_tool(call, started, error=str(exc), result_chars=_result_chars(exc))
        except Exception as exc:
            await self._finish_tool(call, started, error=f"tool {tool.name!r} raised {type(exc).__name__}: {exc}")
        else:
            await self._finish_tool(call, started, result=result)
        finally:
            _resolve(done)

    async def _audit_late_outcome(self, call: ToolCall, started: float, invocation: asyncio.Future[Any]) -> None:
        """A sync tool's thread ran past the tool's timeout: what it did in the end goes to the audit log (the model
        was told it timed out). :meth:`stop` waits for it a while; cancelled, it audits the thread as abandoned."""
        try:
            result = await invocation
        except asyncio.CancelledError:
            if not being_cancelled():  # the tool awaited something someone else cancelled: its error
                stray = f"tool {call.name!r} raised CancelledError (it awaited something that was cancelled)"
                unlogged = self._audit(call, started, outcome="finished-after-timeout", error=stray)
                if unlogged is not None:
                    await self.report(unlogged, epoch=call.epoch)
                return
            left = f"tool {call.name!r} was still running when the call ended: its thread is left to run"
            unlogged = self._audit(call, started, outcome="abandoned", error=f"{left} (what it did is not known)")
            _log_unrecorded(self.name, unlogged)
            raise
        except ToolError as exc:
            outcome = "finished-after-timeout"
            unlogged = self._audit(call, started, outcome=outcome, error=str(exc), result_chars=_result_chars(exc))
        except Exception as exc:
            error = f"tool {call.name!r} raised {type(exc).__name__}: {exc}"
            unlogged = self._audit(call, started, outcome="finished-after-timeout", error=error)
        else:
            unlogged = self._audit(call, started, outcome="finished-after-timeout", result=result)
        if unlogged is not None:
            await self.report(unlogged, epoch=call.epoch)

    async def _finish_tool(
        self,
        call: ToolCall,
        started: float,
        *,
        result: Any = None,
        error: str | None = None,
        outcome: str | None = None,
        result_chars: int | None = None,
    ) -> None:
        if outcome is None:
            late = call.epoch < self.epoch  # the reply was cut off while the tool ran (policy "finish")
            outcome = "error" if error is not None else ("finished-after-barge-in" if late else "ok")
        unlogged = self._audit(call, started, outcome=outcome, result=result, error=error, result_chars=result_chars)
        self.mark(f"tool.end:{call.call_id}", call.epoch, duration_s=self.clock.now() - started)
        frame = ToolResult(
            epoch=call.epoch, call_id=call.call_id, name=call.name, arguments=call.arguments, result=result, error=error
        )
        self.results[call.call_id] = frame
        if unlogged is not None:
            await self.report(unlogged, epoch=call.epoch)
        if error is not None:
            await self.report(error, epoch=call.epoch)  # its own turn, which a barge-in may have ended
        await self.push(frame, UPSTREAM)  # to the turn-taker, which keeps it in the conversation
        await self.push(frame)

    def _audit(
        self,
        call: ToolCall,
        started: float,
        *,
        outcome: str,
        result: Any = None,
        error: str | None = None,
        result_chars: int | None = None,
    ) -> str | None:
        """Append the invocation's entry to the audit log; if the log cannot take it, the problem, returned for the
        caller to report (or log, when cancelled): the tool's outcome stands (a booking made is made) and still
        reaches the model and the conversation."""
        if self.audit is None:
            return None
        entry: dict[str, Any] = {
            "at": started,
            "epoch": call.epoch,
            "call_id": call.call_id,
            "tool": call.name,
            "arguments": call.arguments,
            "outcome": outcome,
            "duration_s": round(self.clock.now() - started, 6),
        }
        if error is None and outcome != "cancelled":
            entry["result"] = result
        else:
            entry["error"] = error
        if result_chars is not None:
            entry["result_chars"] = result_chars  # the size of a result too large to send (or to keep here)
        try:
            self.audit(entry)
        except Exception as exc:
            return f"tool audit log: could not record the call of {call.name!r} ({type(exc).__name__}: {exc})"
        return None


def _log_unrecorded(stage: str, problem: str | None) -> None:
    """An audit entry lost while its tool is being cancelled: logged, as there is no turn left to report it on."""
    if problem is not None:
        log.error("%s: %s", stage, problem)


def _result_chars(error: ToolError) -> int | None:
    return error.chars if isinstance(error, ResultTooLarge) else None


def _resolve(done: asyncio.Future[None] | None) -> None:
    if done is not None and not done.done():
        done.set_result(None)


def _call_text(call: ToolCall) -> str:
    """``book_table(name='Rossi', people=2)``: a tool call as the model is reminded of it."""
    arguments = ", ".join(f"{name}={value!r}" for name, value in call.arguments.items())
    return f"{call.name}({arguments})"
