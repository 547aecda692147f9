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

A tool may also be a ``functools.partial`` (arguments it binds are not described to the model) or an object with a
``__call__`` method; hints and docstring are then read from the function underneath. Constraints and descriptions
given with ``Annotated[int, Field(ge=1, description=...)]`` reach the schema and the argument check.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import importlib
import inspect
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, get_type_hints

import docstring_parser
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic_core import PydanticSerializationError, to_jsonable_python

BargeInPolicy = Literal["cancel", "finish"]


class ToolError(Exception):
    """A tool could not be run or its result cannot be used; the message names the tool and the problem."""


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
    ) -> Tool:
        """Describe ``function`` from its signature, type hints and docstring (Google, NumPy or reST style). An
        argument's description in the docstring wins over one in its ``Annotated[..., Field(...)]``."""
        described, default_name = _described_by(function)
        name = name or default_name
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
            fields[parameter.name] = (hints[parameter.name], _field(default, params.get(parameter.name)))
        model = create_model(f"{name}_arguments", __config__=ConfigDict(extra="forbid"), **fields)
        summary = "\n\n".join(part for part in (doc.short_description, doc.long_description) if part)
        if timeout_s <= 0 or filler_after_s < 0:
            raise ToolError(f"tool {name!r}: timeout_s must be > 0 and filler_after_s >= 0")
        return cls(
            function, name, description or summary or name, model, timeout_s, on_barge_in, filler, filler_after_s
        )

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

    async def invoke(self, arguments: Mapping[str, Any]) -> Any:
        """Check ``arguments`` against the signature, run the function (sync ones in a thread) and return its
        result as JSON-ready data. Raises :class:`ToolError` for bad arguments or a result JSON cannot carry."""
        try:
            parsed = self.arguments.model_validate(dict(arguments))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(all)'}: {e['msg']}" for e in exc.errors())
            raise ToolError(f"tool {self.name!r} was called with bad arguments: {problems}") from None
        kwargs = {key: getattr(parsed, key) for key in type(parsed).model_fields}
        if self.runs_in_thread:
            outcome = await asyncio.to_thread(self.function, **kwargs)
            if inspect.isawaitable(outcome):
                outcome = await outcome
        else:
            outcome = await self.function(**kwargs)
        try:
            return to_jsonable_python(outcome)
        except PydanticSerializationError:
            raise ToolError(
                f"tool {self.name!r} returned a {type(outcome).__name__}, which cannot be sent to the model as "
                "JSON; return str, numbers, lists, dicts, dataclasses or pydantic models"
            ) from None


def _field(default: Any, description: str | None) -> Any:
    # No description=None: it would erase the one an Annotated[..., Field(description=...)] gives.
    return Field(default, description=description) if description else Field(default)


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
    except ImportError as exc:
        raise ToolError(f"tool path {path!r}: cannot import module {module_name!r} ({exc})") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ToolError(f"tool path {path!r}: module {module_name!r} has no function {attribute!r}")
    return function  # type: ignore[no-any-return]


class ToolAuditLog:
    """Writes one JSON line per finished tool invocation — arguments, result or error, duration, epoch, outcome
    (``ok``, ``error``, ``timeout``, ``cancelled``, ``finished-after-barge-in``; and ``finished-after-timeout``, a
    second entry for a sync tool whose thread ran past its timeout) — and flushes it at once.

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
