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
so they never block the event loop that carries audio (a thread cannot be cancelled: give it its own timeout).
"""

from __future__ import annotations

import asyncio
import dataclasses
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
        """Describe ``function`` from its signature, type hints and docstring (Google, NumPy or reST style)."""
        name = name or function.__name__
        doc = docstring_parser.parse(inspect.getdoc(function) or "")
        params = {p.arg_name: (p.description or "").strip() for p in doc.params}
        hints = get_type_hints(function)
        fields: dict[str, Any] = {}
        for parameter in inspect.signature(function).parameters.values():
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

    def input_schema(self) -> dict[str, Any]:
        """The JSON schema of the arguments (what providers send as ``input_schema`` / ``parameters``)."""
        schema = self.arguments.model_json_schema()
        schema.pop("title", None)
        for prop in schema.get("properties", {}).values():
            prop.pop("title", None)
        return schema

    def spec(self) -> dict[str, Any]:
        """``{"name", "description", "input_schema"}`` — the shape the Anthropic Messages API takes."""
        return {"name": self.name, "description": self.description, "input_schema": self.input_schema()}

    async def invoke(self, arguments: Mapping[str, Any]) -> Any:
        """Check ``arguments`` against the signature, run the function (sync ones in a thread) and return its
        result as JSON-ready data. Raises :class:`ToolError` for bad arguments or a result JSON cannot carry."""
        try:
            parsed = self.arguments.model_validate(dict(arguments))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(all)'}: {e['msg']}" for e in exc.errors())
            raise ToolError(f"tool {self.name!r} was called with bad arguments: {problems}") from None
        kwargs = {key: getattr(parsed, key) for key in type(parsed).model_fields}
        if inspect.iscoroutinefunction(self.function):
            outcome = await self.function(**kwargs)
        else:
            outcome = await asyncio.to_thread(self.function, **kwargs)
            if inspect.isawaitable(outcome):
                outcome = await outcome
        try:
            return to_jsonable_python(outcome)
        except PydanticSerializationError:
            raise ToolError(
                f"tool {self.name!r} returned a {type(outcome).__name__}, which cannot be sent to the model as "
                "JSON; return str, numbers, lists, dicts, dataclasses or pydantic models"
            ) from None


def _field(default: Any, description: str | None) -> Any:
    return Field(default, description=description or None)


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
    """Appends one JSON line per finished tool invocation — arguments, result or error, duration, epoch, outcome
    (``ok``, ``error``, ``timeout``, ``cancelled``, ``finished-after-barge-in``) — and flushes it at once."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: IO[str] = self.path.open("a", encoding="utf-8")

    def __call__(self, entry: Mapping[str, Any]) -> None:
        self._file.write(json.dumps(entry, default=repr, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
