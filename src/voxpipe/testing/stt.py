"""ScriptedSTT: "recognises" exactly the words the scripted caller spoke, with configurable latency.

It listens to the VAD events like a real streaming recogniser: partial transcripts of the words heard so far every
``partial_every_s`` of speech, and the final transcript ``final_latency_s`` after the VAD says the caller stopped.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, Field

from voxpipe.pipeline import (
    AudioFrame,
    Direction,
    Frame,
    Stage,
    Transcript,
    TranscriptWord,
    UserSpeechStarted,
    UserSpeechStopped,
)


class WordSource(Protocol):
    def words_between(self, start: float, end: float) -> list[TranscriptWord]: ...


class ScriptedSTTSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    partial_every_s: float = Field(0.2, gt=0, le=5, description="seconds of speech between partial transcripts")
    final_latency_s: float = Field(0.08, ge=0, le=10, description="delay of the final transcript after speech stops")


class ScriptedSTT(Stage):
    """A perfect recogniser of ``source`` (usually the :class:`ScriptedCaller`) with latency."""

    Settings: ClassVar[type[BaseModel]] = ScriptedSTTSettings

    @classmethod
    def from_settings(cls, settings: ScriptedSTTSettings, context: Any, name: str) -> ScriptedSTT:
        if context.caller is None:
            raise ValueError(f"{name}: the scripted STT recognises a scripted caller's words; this call has none")
        return cls(
            context.caller,
            partial_every_s=settings.partial_every_s,
            final_latency_s=settings.final_latency_s,
            name=name,
        )

    def __init__(
        self,
        source: WordSource,
        *,
        partial_every_s: float = 0.2,
        final_latency_s: float = 0.08,
        name: str = "stt",
    ) -> None:
        super().__init__(name=name)
        self.source = source
        self.partial_every_s = partial_every_s
        self.final_latency_s = final_latency_s
        self._segment_start: float | None = None
        self._next_partial = 0.0

    async def process(self, frame: Frame, direction: Direction) -> None:
        await self.push(frame, direction)
        if direction is Direction.UPSTREAM:
            return
        if isinstance(frame, UserSpeechStarted):
            self._segment_start = frame.at
            self._next_partial = frame.at + self.partial_every_s
        elif isinstance(frame, AudioFrame) and self._segment_start is not None:
            heard_until = (frame.pts + frame.samples) / frame.sample_rate
            if heard_until >= self._next_partial:
                self._next_partial = heard_until + self.partial_every_s
                words = tuple(self.source.words_between(self._segment_start - 0.1, heard_until))
                if words:
                    text = " ".join(w.word for w in words)
                    await self.push(Transcript(epoch=self.pipeline.epoch, text=text, final=False, words=words))
        elif isinstance(frame, UserSpeechStopped) and self._segment_start is not None:
            start, self._segment_start = self._segment_start, None
            self.spawn(self._final(start, frame.last_voiced_at), name=f"{self.name}-final")

    async def _final(self, start: float, end: float) -> None:
        await self.clock.sleep(self.final_latency_s)
        words = tuple(self.source.words_between(start - 0.1, end + 0.05))
        text = " ".join(w.word for w in words)
        await self.push(Transcript(epoch=self.pipeline.epoch, text=text, final=True, words=words))
