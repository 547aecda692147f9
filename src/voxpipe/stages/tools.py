"""Tools the reasoner can call: plain Python functions, described to the model by their type hints and docstring.

    async def book_table(name: str, people: int, time: str) -> dict:
        \"\"\"Book a table.

        Args:
            name: who the booking is for
            people: how many people
            time: when, e.g. "19:30"
        \"\"\"

    tools = [Tool.of(book_table, timeout_s=5, on_barge_in="finish", filler="One moment, I'm booking that.")]

Each :class:`Tool` carries the policy the reasoner applies when running it (see ``LLMStage``): a timeout; what a
barge-in does to a call in flight (``"cancel"`` it, or ``"finish"`` it and keep the result for the conversation);
and a filler line spoken when the tool takes longer than ``filler_after_s``. Sync functions run in a worker thread
so they never block the event loop that carries audio; a thread cannot be stopped, so a barge-in lets a sync tool
finish whatever its policy, and a timeout stops only the wait for it (``LLMStage`` records what the thread did).
The reasoner runs them on threads of its own (:class:`ToolThreads`), not the event loop's default executor, which
also resolves every provider's host names: a tool that hangs must not stall the process's DNS.

A result longer than ``max_result_chars`` as the model would get it (:func:`result_text`) is not sent: the model
gets an error naming the tool, the size and the limit. Not a truncation, because a cut result reads as a whole one
(half a list of bookings, JSON cut mid-value), and the model would answer from it as if it were all there.

A tool may also be a ``functools.partial`` (arguments it binds are not described to the model) or an object with a
``__call__`` method; hints and docstring are then read from the function underneath. Constraints and descriptions
given with ``Annotated[int, Field(ge=1, description=...)]`` reach the schema and the argument check.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
import importlib
import inspect
import itertools
import json
import re
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, get_type_hints

import docstring_parser
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic_core import PydanticSerializationError, to_jsonable_python

BargeInPolicy = Literal["cancel", "finish"]

# Longest result sent to the model, in characters of result_text(): ~5,000 tokens, far more than a voice reply needs
# from a tool, far less than the megabytes a tool dumping a whole table or page would send on every later request.
DEFAULT_MAX_RESULT_CHARS = 20_000

# The names a model can be given for a tool: the Anthropic Messages API refuses any other name with HTTP 400 on
# every request (OpenAI's rule is the same), so "book table", a lambda's "<lambda>" or a 65-character name is an
# error when the tool is described, not on the first call.
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
TOOL_NAME_RULE = "1 to 64 letters, digits, '_' or '-'"


class ToolError(Exception):
    """A tool could not be run or its result cannot be used; the message names the tool and the problem."""


class ResultTooLarge(ToolError):
    """A tool's result is longer than its ``max_result_chars``: ``chars`` is its size, as the model would get it."""

    def __init__(self, tool: str, chars: int, limit: int) -> None:
        super().__init__(
            f"tool {tool!r} returned {chars:,} characters, over its limit of {limit:,} (max_result_chars); the "
            "result was not sent"
        )
        self.chars = chars
        self.limit = limit


@dataclass(frozen=True)
class Tool:
    """A callable the model may use, its description for the model, and how the reasoner runs it."""

    function: Callable[..., Any]
    name: str
    description: str
    arguments: type[BaseModel] = field(repr=False)
    timeout_s: float = 10.0
    on_barge_in: BargeInPolicy = "cancel"
    filler: str | None = None
    filler_after_s: float = 1.5
    max_result_chars: int = DEFAULT_MAX_RESULT_CHARS

    @classmethod
    def of(
        cls,
        function: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        timeout_s: float = 10.0,
        on_barge_in: BargeInPolicy = "cancel",
        filler: str | None = None,
        filler_after_s: float = 1.5,
        max_result_chars: int = DEFAULT_MAX_RESULT_CHARS,
    ) -> Tool:
        """Describe ``function`` from its signature, type hints and docstring (Google, NumPy or reST style). An
        argument's description in the docstring wins over one in its ``Annotated[..., Field(...)]``."""
        described, default_name = _described_by(function)
        name = name or default_name
        _check_name(name)
        doc = docstring_parser.parse(inspect.getdoc(described) or "")
        params = {p.arg_name: (p.description or "").strip() for p in doc.params}
        try:
            hints = get_type_hints(described, include_extras=True)  # extras: Annotated[int, Field(ge=1)] stays whole
            signature = inspect.signature(function)
        except (TypeError, ValueError, NameError) as exc:
            raise ToolError(f"tool {name!r}: cannot read its signature and type hints ({exc})") from None
        bound = _bound_by_partial(function)
        fields: dict[str, Any] = {}
        for parameter in signature.parameters.values():
            if parameter.name in bound:
                continue  # bound by the program (a dependency, say), not the model's to choose
            if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                raise ToolError(f"tool {name!r}: *args/**kwargs cannot be described to a model; name each argument")
            if parameter.name not in hints:
                raise ToolError(f"tool {name!r}: argument {parameter.name!r} needs a type hint (the model is told it)")
            default = ... if parameter.default is parameter.empty else parameter.default
            # Fields named p0, p1… with the argument's name as alias: pydantic reserves some names (model_config,
            # model_dump, _private) that are fine argument names.
            field_info = _field(default, parameter.name, params.get(parameter.name))
            fields[f"p{len(fields)}"] = (hints[parameter.name], field_info)
        if on_barge_in not in ("cancel", "finish"):
            raise ToolError(f"tool {name!r}: on_barge_in must be 'cancel' or 'finish', got {on_barge_in!r}")
        if timeout_s <= 0 or filler_after_s < 0 or max_result_chars < 1:
            raise ToolError(f"tool {name!r}: timeout_s must be > 0, filler_after_s >= 0 and max_result_chars >= 1")
        try:
            model = create_model(f"{name}_arguments", __config__=ConfigDict(extra="forbid"), **fields)
            model.model_json_schema()  # now, not at the first request: a type JSON Schema cannot describe is named here
        except Exception as exc:  # pydantic's PydanticUserError, PydanticSchemaGenerationError, …
            problem = str(exc).splitlines()[0]
            raise ToolError(f"tool {name!r}: its arguments cannot be described to a model ({problem})") from None
        summary = "\n\n".join(part for part in (doc.short_description, doc.long_description) if part)
        description = description or summary or name
        return cls(function, name, description, model, timeout_s, on_barge_in, filler, filler_after_s, max_result_chars)

    @property
    def runs_in_thread(self) -> bool:
        """Whether the function is sync, run in a worker thread (which cannot be stopped; see ``LLMStage``)."""
        return not inspect.iscoroutinefunction(_described_by(self.function)[0])

    def input_schema(self) -> dict[str, Any]:
        """The JSON schema of the arguments (what providers send as ``input_schema`` / ``parameters``). Built once
        (pydantic takes ~0.3 ms a tool, on the event loop, and a request declares every tool): the same dict every
        time, not to be changed."""
        schema: dict[str, Any] = self._spec["input_schema"]
        return schema

    def spec(self) -> dict[str, Any]:
        """``{"name", "description", "input_schema"}`` — the shape the Anthropic Messages API takes. Built once,
        like :meth:`input_schema`: the same dict every time, not to be changed."""
        return self._spec

    @functools.cached_property
    def _spec(self) -> dict[str, Any]:
        schema = self.arguments.model_json_schema()
        schema.pop("title", None)
        for prop in schema.get("properties", {}).values():
            prop.pop("title", None)
        return {"name": self.name, "description": self.description, "input_schema": schema}

    async def invoke(self, arguments: Mapping[str, Any], *, threads: ToolThreads | None = None) -> Any:
        """Check ``arguments`` against the signature, run the function and return its result as JSON-ready data.
        A sync function runs on ``threads`` (the reasoner's), or without them in ``asyncio.to_thread``. Raises
        :class:`ToolError` for bad arguments, a result JSON cannot carry, or one over ``max_result_chars``
        (:class:`ResultTooLarge`)."""
        try:
            parsed = self.arguments.model_validate(dict(arguments))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(all)'}: {e['msg']}" for e in exc.errors())
            raise ToolError(f"tool {self.name!r} was called with bad arguments: {problems}") from None
        values = {str(field.alias): getattr(parsed, key) for key, field in type(parsed).model_fields.items()}
        args = [values.pop(name) for name in self._positional_only]
        if not self.runs_in_thread:
            return self._checked(await self._exiting_as_error(self.function(*args, **values)))
        job = functools.partial(self._call_in_thread, args, values)
        outcome = await (threads.run(self.name, job) if threads is not None else asyncio.to_thread(job))
        if inspect.isawaitable(outcome):  # a sync callable that returned a coroutine
            return self._checked(await self._exiting_as_error(outcome))
        return outcome

    @functools.cached_property
    def _positional_only(self) -> list[str]:
        """The arguments the function takes by position only (``def f(people: int, /)``), in order."""
        parameters = inspect.signature(self.function).parameters.values()
        return [p.name for p in parameters if p.kind is p.POSITIONAL_ONLY]

    def _call_in_thread(self, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """The sync function and, in the same thread, the check of its result: serialising a large one to measure
        it would hold the event loop."""
        try:
            outcome = self.function(*args, **kwargs)
        except SystemExit as exc:
            raise self._exited(exc) from None
        return outcome if inspect.isawaitable(outcome) else self._checked(outcome)

    async def _exiting_as_error(self, outcome: Awaitable[Any]) -> Any:
        try:
            return await outcome
        except SystemExit as exc:  # a BaseException: out of a task, it would stop the event loop and the call
            raise self._exited(exc) from None

    def _exited(self, exc: SystemExit) -> ToolError:
        """A tool that called ``sys.exit`` (argparse or click refusing its input, say): its error, not the call's
        end."""
        return ToolError(f"tool {self.name!r} raised SystemExit({exc.code!r}) (it called sys.exit)")

    def _checked(self, outcome: Any) -> Any:
        """``outcome`` as JSON-ready data, if JSON can carry it and it fits ``max_result_chars``."""
        try:
            result = to_jsonable_python(outcome)
            text = result_text(result)
        except (PydanticSerializationError, ValueError, TypeError) as exc:  # bytes not UTF-8, NaN, a cycle, …
            raise ToolError(
                f"tool {self.name!r} returned a {type(outcome).__name__}, which cannot be sent to the model as "
                f"JSON ({str(exc).splitlines()[0]}); return str, numbers, lists, dicts, dataclasses or pydantic "
                "models"
            ) from None
        chars = len(text)
        if chars > self.max_result_chars:
            raise ResultTooLarge(self.name, chars, self.max_result_chars)
        return result


def result_text(result: Any) -> str:
    """A tool's JSON-ready result as the model gets it: a string as it is, anything else as JSON text."""
    return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, allow_nan=False)


class _DaemonThreadPerJob(Executor):
    """Runs each job on a new daemon thread. ``ThreadPoolExecutor``'s threads are joined when the interpreter
    exits, so one hung tool would keep the process from ever exiting after its call; a daemon thread is not waited
    for. ToolThreads bounds how many run at once, and a tool call is rare enough that a thread each costs nothing."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._numbers = itertools.count()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # the job's failure is its future's, as in ThreadPoolExecutor
                future.set_exception(exc)
            else:
                future.set_result(result)

        threading.Thread(target=run, name=f"{self._name}_{next(self._numbers)}", daemon=True).start()
        return future


class ToolThreads:
    """The threads a reasoner runs its sync tools on: at most ``size`` at once, one per call, never waited for at
    the stage's stop nor at the process's exit (a hung tool's thread is left to end when it ends, or with the
    process).

    Not the event loop's default executor: that one also runs ``getaddrinfo`` for every connection the process
    opens, and a thread cannot be stopped, so tools that hang would take its threads for good and stall every
    provider's DNS. Here they take only the tools' own threads; with all of them taken, a sync tool is refused at
    once with an error naming the tools holding them, instead of queueing behind them until its timeout."""

    def __init__(self, size: int, name: str) -> None:
        if size < 1:
            raise ValueError(f"{name}: a sync tool needs at least one thread, got {size}")
        self.size = size
        self._executor = _DaemonThreadPerJob(name)
        self._lock = threading.Lock()  # _running is changed by the loop (a job starts) and the threads (it ends)
        self._running: dict[object, str] = {}  # one entry per job on a thread: the tool's name
        self._shut_down = False

    async def run(self, tool: str, job: Callable[[], Any]) -> Any:
        """Run ``job`` on one of the threads, in a copy of the caller's context (as ``asyncio.to_thread`` does).
        Through ``loop.run_in_executor``, so a :class:`~voxpipe.pipeline.VirtualClock` holds time still for it."""
        token = object()
        with self._lock:
            if self._shut_down:
                raise ToolError(f"tool {tool!r} cannot run: the reasoner has stopped")
            if len(self._running) >= self.size:
                holding = ", ".join(sorted({repr(name) for name in self._running.values()}))
                raise ToolError(
                    f"tool {tool!r} cannot run: all {self.size} tool threads are taken by sync tools still running "
                    f"({holding}; a thread cannot be stopped, so one that hangs keeps its thread)"
                )
            self._running[token] = tool
        context = contextvars.copy_context()
        started = False

        def on_thread() -> Any:
            nonlocal started
            with self._lock:
                if token not in self._running:  # its wait was cancelled before a thread took it: not to run
                    return None
                started = True
            try:
                return context.run(job)
            finally:
                with self._lock:
                    del self._running[token]

        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, on_thread)
        except asyncio.CancelledError:
            with self._lock:
                if not started:  # never ran, never will: its place is free again
                    del self._running[token]
            raise

    def shutdown(self) -> None:
        """No new job; the threads end as their jobs do (not waited for: one may never end)."""
        with self._lock:
            self._shut_down = True


def _field(default: Any, alias: str, description: str | None) -> Any:
    # No description=None: it would erase the one an Annotated[..., Field(description=...)] gives.
    if description:
        return Field(default, alias=alias, description=description)
    return Field(default, alias=alias)


def _check_name(name: str) -> None:
    """Refuse a name the model's API would refuse on every request (:data:`TOOL_NAME`)."""
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):  # fullmatch: "$" would let "a\n" through
        raise ToolError(f"tool {name!r}: a tool's name must be {TOOL_NAME_RULE} (the model's API refuses any other)")


def _described_by(function: Callable[..., Any]) -> tuple[Callable[..., Any], str]:
    """The function whose type hints and docstring describe ``function``, and the tool's default name: a
    partial's function (and its name), a callable object's ``__call__`` method (and its class's name)."""
    while isinstance(function, functools.partial):
        function = function.func
    if inspect.isroutine(function):
        return function, function.__name__
    return type(function).__call__, type(function).__name__  # its hints and docstring; the signature is the object's


def _bound_by_partial(function: Callable[..., Any]) -> set[str]:
    """The keyword arguments ``functools.partial`` binds (nested partials included)."""
    bound: set[str] = set()
    while isinstance(function, functools.partial):
        bound.update(function.keywords)
        function = function.func
    return bound


ToolsLike = Iterable[Tool | Callable[..., Any]] | Mapping[str, Tool | Callable[..., Any]]


def tools_by_name(tools: ToolsLike | None) -> dict[str, Tool]:
    """Normalise what users pass as tools — Tool objects, plain functions, or a name → function mapping."""
    if tools is None:
        return {}
    items = tools.items() if isinstance(tools, Mapping) else ((None, t) for t in tools)
    out: dict[str, Tool] = {}
    for name, item in items:
        tool = item if isinstance(item, Tool) else Tool.of(item, name=name)
        if name is not None and tool.name != name:
            tool = dataclasses.replace(tool, name=name)
        _check_name(tool.name)  # a mapping's key, or a Tool built without Tool.of
        if tool.name in out:
            raise ToolError(f"two tools are named {tool.name!r}")
        out[tool.name] = tool
    return out


def import_function(path: str) -> Callable[..., Any]:
    """``"package.module:function"`` → the function (how a config names a tool)."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ToolError(f"tool path {path!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # not found, or the module itself fails (SyntaxError, its own errors at import)
        problem = f"{type(exc).__name__}: {exc}"
        raise ToolError(f"tool path {path!r}: cannot import module {module_name!r} ({problem})") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ToolError(f"tool path {path!r}: module {module_name!r} has no function {attribute!r}")
    return function  # type: ignore[no-any-return]


class ToolAuditLog:
    """Writes one JSON line per finished tool invocation — arguments, result or error, duration, epoch, outcome
    (``ok``, ``error``, ``timeout``, ``cancelled``, ``finished-after-barge-in``; and ``finished-after-timeout`` or
    ``abandoned``, a second entry for a sync tool whose thread ran past its timeout: what it did when it ended, or
    that it was still running when the call ended) — and flushes it at once. A result over the tool's
    ``max_result_chars`` is an error whose entry has its size (``result_chars``), not the result.

    The file is opened by :meth:`open` (a call opens it as it starts) or by the first entry. It starts empty, like
    the call's other outputs (a reused output directory mixed earlier calls' tool calls into this one's), and a call
    that never starts leaves the last one's alone; ``append=True`` keeps what it holds, for a log shared across
    calls."""

    def __init__(self, path: str | Path, *, append: bool = False) -> None:
        self.path = Path(path)
        self._mode = "a" if append else "w"
        self._file: IO[str] | None = None

    def open(self) -> None:
        if self._file is None:
            self._file = self.path.open(self._mode, encoding="utf-8")
            self._mode = "a"  # opened again after close(): what it wrote stays

    def __call__(self, entry: Mapping[str, Any]) -> None:
        self.open()
        assert self._file is not None
        self._file.write(json.dumps(entry, default=repr, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
