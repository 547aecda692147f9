"""The output side of a transport: a playout buffer paced by the metronome.

Bot audio is appended to the buffer as it arrives and one frame is played per tick. A reply that starts while
nothing is playing does not wait for the next tick (10 ms on average): its first samples, up to that tick, play at
once — a short lead-in frame — and the ticks carry on from there. On an interrupt the buffer is flushed, the frame
playing at that instant is cut at that instant, and the output reports exactly which samples (and so which words)
the caller heard. A late frame of the interrupted reply never reaches the buffer: the stage's epoch gate drops it.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from voxpipe.pipeline import (
    AudioFormat,
    BotStartedSpeaking,
    BotStoppedSpeaking,
    Direction,
    End,
    Frame,
    Interrupt,
    TTSAudioFrame,
    TTSDone,
    WordMark,
)
from voxpipe.transports.paced import PacedStage

_MIN_LEAD_IN_S = 0.001  # a lead-in shorter than this is not worth a frame of its own: the tick is about due


class AudioSink(Protocol):
    """Where played audio goes: a device, a socket, a recording."""

    def play(self, at: float, pcm: bytes) -> None: ...

    def cut(self, at: float) -> None:
        """Stop anything handed over at or after ``at`` (e.g. send Twilio ``clear``)."""


class PlayoutOutput(PacedStage):
    """Plays bot audio one ``period`` per metronome tick and reports what was heard."""

    def __init__(
        self, audio: AudioFormat, sink: AudioSink | None = None, *, period: float = 0.02, name: str = "output"
    ) -> None:
        super().__init__(period=period, name=name)
        self.consumes = audio
        self.sink = sink
        self._frame_bytes = audio.frame_bytes(period)
        self._buffer = bytearray()
        self._marks: list[WordMark] = []
        self._reply_epoch: int | None = None
        self._started = False
        self._tts_done = False
        self._played = 0  # reply samples handed to the sink
        self._last: tuple[float, int] | None = None  # (start time, samples) of the frame playing now
        self._next_tick: float | None = None  # when the next tick is due, once ticking
        self._playing_until = float("-inf")  # when the last frame handed to the sink ends (or was cut)
        self._drained: asyncio.Future[None] | None = None
        self.played_frames = 0

    # --------------------------------------------------------------------------------- lifecycle

    # ----------------------------------------------------------------------------------- frames

    async def process(self, frame: Frame, direction: Direction) -> None:
        if direction is Direction.UPSTREAM:
            await self.push(frame, direction)
        elif isinstance(frame, TTSAudioFrame):
            self._enqueue(frame)
            if not self._started:
                await self._lead_in()
        elif isinstance(frame, TTSDone):
            if frame.epoch == self._reply_epoch:
                self._tts_done = True
        elif isinstance(frame, End):
            if self._buffer:
                self._drained = asyncio.get_running_loop().create_future()
                await self._drained
            await self.push(frame)
        else:
            await self.push(frame, direction)

    def _enqueue(self, frame: TTSAudioFrame) -> None:
        audio = self.consumes
        assert audio is not None
        audio.check(frame, self.name)
        if frame.epoch != self._reply_epoch:
            self._reply_epoch, self._started, self._tts_done, self._played, self._last = (
                frame.epoch,
                False,
                False,
                0,
                None,
            )
            self._marks = []
        self._buffer += frame.pcm
        self._marks.extend(frame.words)

    async def tick(self, now: float) -> None:
        self._next_tick = now + self.period
        n = min(len(self._buffer), self._frame_bytes)
        if n == 0:
            if self._tts_done and self._started and self._last is not None:
                at, samples = self._last
                await self._finish(at + samples / self._rate, interrupted=False)
            if self._drained is not None and not self._drained.done():
                self._drained.set_result(None)
            return
        await self._play(now, n)

    async def _lead_in(self) -> None:
        """Play the start of a new reply now, up to the next tick, if the output is idle: nothing playing and that
        tick not overdue (a late tick must not play on top of it)."""
        due = self._next_tick
        now = self.clock.now()
        if due is None or now >= due or now < self._playing_until:
            return
        # Whole samples that end by the tick, so the two never overlap (the nudge: float error must not lose one).
        samples = int((due - now) * self._rate + 1e-6)
        if samples >= round(_MIN_LEAD_IN_S * self._rate):
            await self._play(now, min(len(self._buffer), samples * self._sample_bytes))

    async def _play(self, now: float, n: int) -> None:
        """Hand the buffer's first ``n`` bytes to the sink, starting at ``now``."""
        pcm = bytes(self._buffer[:n])
        del self._buffer[:n]
        samples = n // self._sample_bytes
        epoch = self._reply_epoch
        assert epoch is not None
        if not self._started:
            self._started = True
            self.mark("out.first_play", epoch, at=now)
            await self.push(BotStartedSpeaking(epoch=self.epoch, at=now), Direction.UPSTREAM)
        if self.sink is not None:
            self.sink.play(now, pcm)
        self._last = (now, samples)
        self._playing_until = now + samples / self._rate
        self._played += samples
        self.played_frames += 1

    @property
    def _rate(self) -> int:
        audio = self.consumes
        assert audio is not None
        return audio.sample_rate

    @property
    def _sample_bytes(self) -> int:
        audio = self.consumes
        assert audio is not None
        return audio.sample_bytes

    # ------------------------------------------------------------------------------ interrupts

    async def on_interrupt(self, interrupt: Interrupt) -> None:
        if self._reply_epoch is None or self._reply_epoch >= interrupt.epoch:
            return
        now = self.clock.now()
        self._buffer.clear()
        if self._last is not None:
            at, samples = self._last
            unplayed = samples - round((now - at) * self._rate)  # round: float error must not lose a sample
            if unplayed > 0:
                self._played -= min(unplayed, samples)
                if self.sink is not None:
                    self.sink.cut(now)
            self._playing_until = min(self._playing_until, now)
        if self._started:
            await self._finish(now, interrupted=True)
        self._reply_epoch = None
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    async def _finish(self, at: float, *, interrupted: bool) -> None:
        epoch = self._reply_epoch
        assert epoch is not None
        heard = tuple(m.word for m in self._marks if m.end <= self._played)
        played_s = self._played / self._rate
        self._started, self._tts_done, self._last, self._marks = False, False, None, []
        self.mark("out.interrupted" if interrupted else "out.done", epoch, at=at, heard=list(heard), played_s=played_s)
        stopped = BotStoppedSpeaking(epoch=self.epoch, at=at, interrupted=interrupted, heard=heard, played=played_s)
        await self.push(stopped, Direction.UPSTREAM)
