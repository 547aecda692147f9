"""The input side of a simulated call: caller audio delivered one frame per metronome tick.

The frame delivered at tick ``t`` holds the audio captured during ``[t - period, t)`` — audio never arrives before
it was spoken. Its ``pts`` is the sample index of its first sample on the clock's timeline, so any stage can turn a
sample position into a clock time. When the caller hangs up, the input sends :class:`End`, which drains the call.
"""

from __future__ import annotations

from typing import Protocol

from voxpipe.pipeline import (
    AudioFormat,
    AudioFrame,
    BotStartedSpeaking,
    BotStoppedSpeaking,
    Direction,
    End,
    Frame,
)
from voxpipe.transports.paced import PacedStage, samples_per_period


class CallerSource(Protocol):
    """The far end of a simulated call: produces caller audio and hears about the bot's speech.

    A source that renders its audio at one rate (the :class:`~voxpipe.testing.ScriptedCaller`) says so in a
    ``sample_rate`` attribute; the input refuses one that does not match its format.
    """

    @property
    def finished(self) -> bool:
        """True once the caller has hung up."""

    def audio(self, start: float, samples: int) -> bytes:
        """``samples`` samples of caller audio starting at clock time ``start`` (int16 mono PCM)."""

    def bot_started(self, at: float) -> None: ...

    def bot_stopped(self, at: float, interrupted: bool) -> None: ...


class CapturedAudio(Protocol):
    def caller(self, at: float, pcm: bytes) -> None: ...


class SimulatedInput(PacedStage):
    """Feeds a :class:`CallerSource` into the pipeline in real (or virtual) time."""

    def __init__(
        self,
        caller: CallerSource,
        audio: AudioFormat,
        *,
        recorder: CapturedAudio | None = None,
        period: float = 0.02,
        max_duration_s: float = 3600.0,
        name: str = "input",
    ) -> None:
        super().__init__(period=period, name=name)
        if audio.channels != 1:
            raise ValueError(f"{name}: simulated caller audio is mono, got {audio}")
        # Asked for the input's samples per tick, a caller at another rate would play too fast or too slow.
        speaks = getattr(caller, "sample_rate", audio.sample_rate)
        if speaks != audio.sample_rate:
            raise ValueError(
                f"{name}: delivers {audio.sample_rate} Hz audio, but its caller {type(caller).__name__} speaks at "
                f"{speaks} Hz; give both the same rate"
            )
        self.produces = audio
        self.caller = caller
        self.recorder = recorder
        self.max_duration_s = max_duration_s
        self._samples = samples_per_period(audio, period, name)
        self._origin: float | None = None
        self._ended = False

    async def tick(self, now: float) -> None:
        if self._ended:
            return
        if self._origin is None:
            self._origin = now
            return
        start = now - self.period
        if self.caller.finished or now - self._origin > self.max_duration_s:
            self._ended = True
            # The drain may wait on stages (an STT's last final): from a task of its own, not the metronome's tick.
            self.spawn(self.push(End(epoch=self.pipeline.epoch)), name=f"{self.name}-hang-up")
            return
        pcm = self.caller.audio(start, self._samples)
        if self.recorder is not None:
            self.recorder.caller(start, pcm)
        audio = self.produces
        assert audio is not None
        frame = AudioFrame(
            epoch=self.pipeline.epoch, pcm=pcm, sample_rate=audio.sample_rate, pts=round(start * audio.sample_rate)
        )
        await self.push(frame)

    async def process(self, frame: Frame, direction: Direction) -> None:
        if direction is Direction.UPSTREAM:
            if isinstance(frame, BotStartedSpeaking):
                self.caller.bot_started(frame.at)
            elif isinstance(frame, BotStoppedSpeaking):
                self.caller.bot_stopped(frame.at, frame.interrupted)
        await self.push(frame, direction)
