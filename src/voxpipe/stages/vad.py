"""Voice activity detection: the speaking/silent state machine every VAD provider shares.

A provider only says, per audio frame, whether it holds speech and where the first and last voiced samples are
(:class:`Voicing`). This stage turns that into :class:`UserSpeechStarted` (after ``start_ms`` of speech),
:class:`UserSpeechProgress` (with every frame of speech after that) and :class:`UserSpeechStopped` (after
``stop_ms`` of silence), stamped with the time of the *audio* — the first and last voiced samples — not the time
of the decision, so that latency is measured from what the caller really did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from voxpipe.pipeline import (
    AudioFormat,
    AudioFrame,
    Direction,
    Frame,
    Stage,
    UserSpeechProgress,
    UserSpeechStarted,
    UserSpeechStopped,
)


@dataclass(frozen=True, slots=True)
class Voicing:
    """What a VAD provider found in one frame: sample offsets of the first and last voiced samples, if any."""

    first: int
    last: int


class VADStage(Stage):
    """Base of VAD stages. Subclasses implement :meth:`analyse`; audio passes through unchanged."""

    def __init__(self, audio: AudioFormat, *, start_ms: float = 60.0, stop_ms: float = 500.0, name: str | None = None):
        super().__init__(name=name)
        if start_ms < 0 or stop_ms <= 0:
            raise ValueError(f"{self.name}: start_ms must be >= 0 and stop_ms > 0 (got {start_ms}, {stop_ms})")
        self.consumes = audio
        self.start_s = start_ms / 1000
        self.stop_s = stop_ms / 1000
        # Decided in whole samples: with seconds as floats, silence that ends exactly on a frame edge would end the
        # turn at that frame or the next one by rounding.
        self._start_samples = round(self.start_s * audio.sample_rate)
        self._stop_samples = round(self.stop_s * audio.sample_rate)
        self.speaking = False
        self._run_start: int | None = None  # sample index of the first voiced sample of the current voiced run
        self._last_voiced: int | None = None  # the index just after the last voiced sample

    def analyse(self, frame: AudioFrame) -> Voicing | None:
        """Return where speech is in ``frame``, or ``None`` for no speech."""
        raise NotImplementedError

    async def process(self, frame: Frame, direction: Direction) -> None:
        if not isinstance(frame, AudioFrame) or direction is Direction.UPSTREAM:
            await self.push(frame, direction)
            return
        fmt = self.consumes
        assert fmt is not None
        if frame.sample_rate != fmt.sample_rate or frame.channels != fmt.channels or len(frame.pcm) & 1:
            fmt.check(frame, self.name)  # raises, naming the problem
        await self.push(frame)
        voicing = self.analyse(frame)
        if voicing is None and self._run_start is None:
            return  # silence while silent: the common case, nothing to decide
        rate = frame.sample_rate
        if voicing is not None:
            if self._run_start is None:
                self._run_start = frame.pts + voicing.first
            self._last_voiced = frame.pts + voicing.last + 1
            # Speech is counted to its last voiced sample, not to the frame's end: 41 ms of voice at the head of a
            # 60 ms frame is not 60 ms of speech.
            if not self.speaking and self._last_voiced - self._run_start >= self._start_samples:
                self.speaking = True
                await self.push(UserSpeechStarted(epoch=self.pipeline.epoch, at=self._run_start / rate))
            if self.speaking:
                await self.push(UserSpeechProgress(epoch=self.pipeline.epoch, voiced_until=self._last_voiced / rate))
            return
        if not self.speaking:
            self._run_start = None  # a blip shorter than start_ms
            return
        assert self._last_voiced is not None
        if frame.pts + frame.samples - self._last_voiced >= self._stop_samples:
            await self.stop_speaking(self._last_voiced)

    async def stop_speaking(self, last_voiced: int) -> None:
        """End the caller's speech now, its last voiced sample just before index ``last_voiced`` (after
        ``stop_ms`` of silence, or earlier when an end-of-turn model says the turn is complete)."""
        fmt = self.consumes
        assert fmt is not None
        self.speaking = False
        self._run_start = None
        at = last_voiced / fmt.sample_rate
        await self.push(UserSpeechStopped(epoch=self.pipeline.epoch, at=self.clock.now(), last_voiced_at=at))


class NoVADSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NoVAD(Stage):
    """No local VAD (``vad: {provider: none}``): audio passes through, and the speech events come from the STT
    instead — a cloud STT that reports them itself (Deepgram's ``speech_events``)."""

    Settings: ClassVar[type[BaseModel]] = NoVADSettings

    @classmethod
    def from_settings(cls, settings: NoVADSettings, context: Any, name: str) -> NoVAD:
        return cls(name=name)
