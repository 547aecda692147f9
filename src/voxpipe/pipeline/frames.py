"""Frames: the immutable, typed values that flow between stages.

Every frame carries the ``epoch`` (turn generation, see ``docs/architecture.md``) it belongs to. Frames are
``slots`` dataclasses: cheap to create, impossible to mutate by accident, and easy to pattern-match on.

Two families:

* data frames (audio, transcripts, LLM text, TTS audio …) travel in order and may be queued;
* control frames (:class:`ControlFrame`) overtake queued data wherever there is a queue.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar

from voxpipe.pipeline.context import Message


class Direction(enum.IntEnum):
    """Which way a frame travels through the pipeline."""

    DOWNSTREAM = 0
    UPSTREAM = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Frame:
    """Base of every frame. ``epoch`` is the turn generation the frame belongs to.

    ``interruptible`` frames belong to a bot reply: once an :class:`Interrupt` of a newer epoch has reached a stage,
    the stage drops them. Caller-side frames (caller audio, VAD events, transcripts) are never stale — they are the
    barge-in itself — and control frames are never dropped. ``urgent`` frames overtake queued data.
    """

    interruptible: ClassVar[bool] = False
    urgent: ClassVar[bool] = False

    epoch: int = 0


# --------------------------------------------------------------------------------------------- audio


@dataclass(frozen=True, slots=True, kw_only=True)
class AudioFrame(Frame):
    """PCM int16 little-endian audio.

    ``pts`` is the index of the first sample on the stream's own timeline (caller audio: samples since the call
    started; bot audio: samples since the start of the reply).
    """

    pcm: bytes
    sample_rate: int
    channels: int = 1
    pts: int = 0

    @property
    def samples(self) -> int:
        """Samples per channel in this frame."""
        return len(self.pcm) // (2 * self.channels)

    @property
    def duration(self) -> float:
        """Duration in seconds."""
        return len(self.pcm) / (2 * self.channels * self.sample_rate)


@dataclass(frozen=True, slots=True)
class WordMark:
    """A spoken word and where it lies in the reply's audio, in samples from the reply's start."""

    word: str
    start: int
    end: int


@dataclass(frozen=True, slots=True, kw_only=True)
class TTSAudioFrame(AudioFrame):
    """Bot speech. ``words`` holds the word marks that start inside this frame (may be empty)."""

    interruptible: ClassVar[bool] = True

    text: str = ""
    words: tuple[WordMark, ...] = ()


# -------------------------------------------------------------------------------------- VAD and turns


@dataclass(frozen=True, slots=True, kw_only=True)
class UserSpeechStarted(Frame):
    """The VAD heard the caller start speaking. ``at`` is the clock time of the first voiced sample."""

    at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class UserSpeechProgress(Frame):
    """The caller is still speaking: the VAD has heard voice up to ``voiced_until`` (the clock time just after the
    last voiced sample so far). Sent with every frame that holds speech, from :class:`UserSpeechStarted` on, so
    the turn-taker measures how long the caller has spoken without the silence that may yet end the utterance."""

    voiced_until: float


@dataclass(frozen=True, slots=True, kw_only=True)
class UserSpeechStopped(Frame):
    """The VAD decided the caller stopped. ``last_voiced_at`` is the clock time of the last voiced sample,
    ``at`` the time of the decision (``last_voiced_at`` + the VAD's hang-over)."""

    at: float
    last_voiced_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class EndOfTurn(Frame):
    """The caller's turn is over: ``text`` is what they said, ``context`` the conversation including it.

    ``resumed``: the caller cut the bot off but said nothing (a false interruption); ``text`` is empty and
    ``context`` ends with the policy's resume prompt as the caller's side, so any reasoner carries on unchanged.
    """

    interruptible: ClassVar[bool] = True

    text: str
    at: float
    system: str = ""
    context: tuple[Message, ...] = ()
    resumed: bool = False


# ----------------------------------------------------------------------------------------- transcripts


@dataclass(frozen=True, slots=True)
class TranscriptWord:
    """A recognised word with its time on the caller's timeline (clock seconds)."""

    word: str
    start: float
    end: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Transcript(Frame):
    """A transcript of the caller's current utterance. ``final`` marks the last one of the utterance.

    ``marks``: trace marks (name, clock time) of the turn a final ends, which the STT measured but cannot key by
    epoch — the turn's epoch opens only when the turn-taker ends it, and the turn-taker records them then.
    ``usage``: for the same reason, the metered usage of the utterance a final ends, as (stage name, counter, amount)
    — a streaming STT's audio seconds — which the turn-taker counts for that turn (or, not a turn, the next one).
    """

    text: str
    final: bool
    words: tuple[TranscriptWord, ...] = ()
    marks: tuple[tuple[str, float], ...] = ()
    usage: tuple[tuple[str, str, float], ...] = ()


# ---------------------------------------------------------------------------------------------- LLM


@dataclass(frozen=True, slots=True, kw_only=True)
class LLMRequest(Frame):
    """The reasoner was asked for a reply (for tracing: marks ``llm.request``)."""

    interruptible: ClassVar[bool] = True


@dataclass(frozen=True, slots=True, kw_only=True)
class TextDelta(Frame):
    """A piece of streamed LLM text, as the model produced it."""

    interruptible: ClassVar[bool] = True

    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SpeakableChunk(Frame):
    """Text ready to be spoken: a clause or sentence the chunker cut from the deltas."""

    interruptible: ClassVar[bool] = True

    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolCall(Frame):
    """The reasoner asked for a tool to run."""

    interruptible: ClassVar[bool] = True

    call_id: str
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolResult(Frame):
    """The outcome of a :class:`ToolCall`: ``result`` on success, ``error`` on failure.

    Not interruptible: a tool that ran changed the world (a table is booked) even if the reply that asked for it
    was cut off, so its result travels upstream to the turn-taker, which keeps it in the conversation.
    """

    call_id: str
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    result: Any = None
    error: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ResponseEnd(Frame):
    """The reasoner finished its reply; ``text`` is everything it produced (not necessarily heard)."""

    interruptible: ClassVar[bool] = True

    text: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class TTSDone(Frame):
    """The synthesiser produced the last audio of the reply."""

    interruptible: ClassVar[bool] = True


# --------------------------------------------------------------------------------- playout reports


@dataclass(frozen=True, slots=True, kw_only=True)
class BotStartedSpeaking(Frame):
    """The output transport played the first sample of a reply (travels upstream)."""

    at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class BotStoppedSpeaking(Frame):
    """The output transport finished or cut a reply (travels upstream).

    ``heard`` is the words whose audio was fully played; ``played`` the seconds of reply audio played.
    """

    at: float
    interrupted: bool
    heard: tuple[str, ...]
    played: float


# -------------------------------------------------------------------------------------------- control


@dataclass(frozen=True, slots=True, kw_only=True)
class ControlFrame(Frame):
    """Control frames overtake queued data frames."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Start(ControlFrame):
    """The pipeline started; the first frame every stage sees."""


@dataclass(frozen=True, slots=True, kw_only=True)
class End(ControlFrame):
    """Drain: stages finish what is queued, then stop. Travels in order behind data, unlike other controls."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Cancel(ControlFrame):
    """Abort: the first stage it reaches cancels the run (``pipeline.cancel()``): every stage stops, every task is
    cancelled, what is queued is dropped."""

    urgent: ClassVar[bool] = True


@dataclass(frozen=True, slots=True, kw_only=True)
class Interrupt(ControlFrame):
    """Barge-in: everything of an epoch lower than ``epoch`` is stale. ``at`` is the decision's clock time."""

    urgent: ClassVar[bool] = True

    at: float
    reason: str = "barge-in"


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorFrame(ControlFrame):
    """A stage failed. Travels upstream to the pipeline, which applies the stage's error policy."""

    urgent: ClassVar[bool] = True

    stage: str
    error: str
    fatal: bool = True
