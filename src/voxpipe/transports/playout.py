"""The output side of a transport: a playout buffer paced by the metronome.

Bot audio is appended to the buffer as it arrives and one frame is played per tick. Audio need not wait for the
next tick (10 ms on average): arriving while nothing plays (a reply starting, or one whose audio ran out), its
samples up to that tick play at once — a short lead-in frame; arriving while the reply's last frame plays, they
follow it without a gap, up to the tick. Either way the ticks carry on from there. On an interrupt the buffer is
flushed, the frame playing at that instant is cut at that instant, and the output reports exactly which samples (and
so which words) the caller heard. A late frame of the interrupted reply never reaches the buffer: the stage's epoch
gate drops it.

The reports (:class:`BotStartedSpeaking`, :class:`BotStoppedSpeaking`) go upstream in the order they happened, one
at a time, from a task of the output's own: a tick or a provider handing over audio never waits on the stages
upstream, and nothing that happens while a report travels (an interrupt) finds the playout half updated. An
interrupt returns only once every report made before it has arrived, its own reply's stop included: the turn-taker
keeps the reply as heard ahead of the caller's next turn.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol

from voxpipe.pipeline import (
    AudioFormat,
    BotStartedSpeaking,
    BotStoppedSpeaking,
    Direction,
    End,
    Frame,
    Interrupt,
    LLMRequest,
    TTSAudioFrame,
    TTSDone,
    WordMark,
)
from voxpipe.transports.paced import PacedStage, samples_per_period

_MIN_LEAD_IN_S = 0.001  # a lead-in shorter than this is not worth a frame of its own: the tick is about due


class AudioSink(Protocol):
    """Where played audio goes: a device, a socket, a recording.

    A sink that takes one channel count only (a :class:`~voxpipe.transports.recorder.StereoRecorder`) says so in a
    ``channels`` attribute; the output refuses one that does not match its format.
    """

    def play(self, at: float, pcm: bytes) -> None:
        """Play ``pcm`` from clock time ``at`` (now, or right after the audio handed over before it)."""

    def cut(self, at: float) -> None:
        """Stop anything handed over at or after ``at`` (e.g. send Twilio ``clear``)."""


class PlayoutOutput(PacedStage):
    """Plays bot audio one ``period`` per metronome tick and reports what was heard."""

    def __init__(
        self, audio: AudioFormat, sink: AudioSink | None = None, *, period: float = 0.02, name: str = "output"
    ) -> None:
        super().__init__(period=period, name=name)
        takes = getattr(sink, "channels", audio.channels)
        if takes != audio.channels:
            raise ValueError(f"{name}: plays {audio} audio, but its sink {sink!r} takes {takes}-channel audio")
        self.consumes = audio
        self.sink = sink
        self._frame_bytes = samples_per_period(audio, period, name) * audio.sample_bytes
        self._buffer = bytearray()
        self._marks: list[WordMark] = []
        self._reply_epoch: int | None = None  # the reply requested, arriving or playing; None once reported
        self._started = False
        self._tts_done = False
        self._played = 0  # reply samples handed to the sink
        self._last: tuple[float, int] | None = None  # (start time, samples) of the reply's audio playing now
        self._next_tick: float | None = None  # when the next tick is due, once ticking
        self._playing_until = float("-inf")  # when the last frame handed to the sink ends (or was cut)
        self._drained: asyncio.Future[None] | None = None
        # Reports made and not yet sent upstream. Whoever made one sends it: a tick or arriving audio soon, from
        # the output's own task (_send_reports_soon); an interrupt or the end of the call at once (_send_reports).
        self._reports: deque[BotStartedSpeaking | BotStoppedSpeaking] = deque()
        self._reporting = asyncio.Lock()  # one report on its way at a time: none overtakes another
        self._reporting_in: asyncio.Task[None] | None = None  # the task sending one now
        self._reporter: asyncio.Task[None] | None = None  # the output's own task sending them
        self.played_frames = 0

    # ----------------------------------------------------------------------------------- frames

    async def process(self, frame: Frame, direction: Direction) -> None:
        if direction is Direction.UPSTREAM:
            await self.push(frame, direction)
        elif isinstance(frame, TTSAudioFrame):
            self._enqueue(frame)
            self._lead_in()
            self._send_reports_soon()  # the provider's worker goes back to its stream at once
        elif isinstance(frame, LLMRequest):
            # A reply is owed from now on: cut before any of it plays, it is still reported (interrupted).
            if frame.epoch != self._reply_epoch:
                self._begin(frame.epoch)
            await self.push(frame, direction)
        elif isinstance(frame, TTSDone):
            if frame.epoch == self._reply_epoch:
                if self._started or self._buffer:
                    self._tts_done = True
                else:  # a reply without audio: over now, nothing heard
                    self.mark("out.done", frame.epoch, heard=[], played_s=0.0)
                    self._reply_epoch = None
        elif isinstance(frame, End):
            # Also while the last frame plays (buffer empty): the tick after it reports the reply done.
            if self._buffer or self._started:
                self._drained = asyncio.get_running_loop().create_future()
                await self._drained
            await self._send_reports()  # the reply's stop reaches the turn-taker before the call ends
            await self.push(frame)
        else:
            await self.push(frame, direction)

    def _begin(self, epoch: int) -> None:
        self._reply_epoch, self._started, self._tts_done, self._played, self._last = epoch, False, False, 0, None
        self._marks = []

    def _enqueue(self, frame: TTSAudioFrame) -> None:
        audio = self.consumes
        assert audio is not None
        audio.check(frame, self.name)
        if frame.epoch != self._reply_epoch:
            self._begin(frame.epoch)
        self._buffer += frame.pcm
        self._marks.extend(frame.words)

    async def tick(self, now: float) -> None:
        # Nothing here awaits: the metronome every call shares waits for the tick, and an interrupt can only come
        # between two ticks, never halfway through one.
        self._next_tick = now + self.period
        n = min(len(self._buffer), self._frame_bytes)
        if n == 0:
            if self._tts_done and self._started and self._last is not None:
                at, samples = self._last
                self._finish(at + samples / self._rate, interrupted=False)
                self._send_reports_soon()
            if self._drained is not None and not self._drained.done():
                self._drained.set_result(None)
            return
        self._play(now, n)
        self._send_reports_soon()

    def _lead_in(self) -> None:
        """Play the buffer up to the next tick, unless that tick is due (a late tick must not play on top of it):
        right after the reply's audio playing now, so a short first frame leaves no hole, or at once if nothing
        plays. A frame of another reply still playing holds it back."""
        due = self._next_tick
        now = self.clock.now()
        if due is None or now >= due:
            return
        follows = now < self._playing_until
        if follows and self._last is None:
            return
        start = self._playing_until if follows else now
        # Whole samples that end on the tick, so the two never overlap and a recording's sample grid has no hole
        # between them (the nudge: float error must not lose one).
        samples = int((due - start) * self._rate + 1e-6)
        if samples > 0 and (follows or samples >= round(_MIN_LEAD_IN_S * self._rate)):
            n = min(len(self._buffer), samples * self._sample_bytes)
            if n:
                self._play(due - samples / self._rate, n, follows=follows)

    def _play(self, at: float, n: int, *, follows: bool = False) -> None:
        """Hand the buffer's first ``n`` bytes to the sink, to play from ``at``; ``follows``: right after the
        reply's audio playing now, which an interrupt then cuts as one with them."""
        pcm = bytes(self._buffer[:n])
        del self._buffer[:n]
        samples = n // self._sample_bytes
        epoch = self._reply_epoch
        assert epoch is not None
        if self.sink is not None:
            self.sink.play(at, pcm)  # first: a sink that fails drops the frame, and nothing counts it as played
        if follows and self._last is not None:
            self._last = (self._last[0], self._last[1] + samples)
        else:
            self._last = (at, samples)
        self._playing_until = at + samples / self._rate
        self._played += samples
        self.played_frames += 1
        if not self._started:
            self._started = True
            self.mark("out.first_play", epoch, at=at)
            self._reports.append(BotStartedSpeaking(epoch=epoch, at=at))

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
        epoch = self._reply_epoch
        if epoch is not None and epoch < interrupt.epoch:
            self._end_reply(self.clock.now())
            if self._drained is not None and not self._drained.done():
                self._drained.set_result(None)
        # Whatever was reported before the interrupt arrives before it goes on (a reply that ended at the last
        # tick too): the turn-taker keeps the reply as heard ahead of the caller's next turn.
        await self._send_reports()

    async def stop(self) -> None:
        # The call ends (hung up, cancelled, failed) while a reply is owed: the end of the call cuts it like a
        # barge-in, so the trace and the conversation keep what the caller heard, not the whole reply as if spoken.
        if self._reply_epoch is not None:
            self._end_reply(self.clock.now())
        await self._send_reports()  # the stages upstream stop after this one: they still hear it
        await super().stop()

    def _end_reply(self, now: float) -> None:
        """The reply owed ends at ``now``: played in full, cut while playing, or cut before any of it played."""
        epoch = self._reply_epoch
        assert epoch is not None
        if self._started and self._tts_done and not self._buffer and now >= self._playing_until:
            # Played in full: the tick that reports it is just not due yet. Nothing was cut.
            self._finish(self._playing_until, interrupted=False)
        elif self._started:
            self._cut(now)
            self._finish(now, interrupted=True)
        else:
            # Cut before its first sample played (still being generated, or waiting for the tick): the turn ends
            # here, with nothing heard, not at the end of the call.
            self._buffer.clear()
            self._reply_epoch = None
            self.mark("out.interrupted", epoch, at=now, heard=[], played_s=0.0)

    def _cut(self, now: float) -> None:
        """Drop what is queued, and stop the audio playing now at ``now``: only what played counts as heard."""
        self._buffer.clear()
        if self._last is not None:
            at, samples = self._last
            unplayed = samples - round((now - at) * self._rate)  # round: float error must not lose a sample
            if unplayed > 0:
                self._played -= min(unplayed, samples)
                if self.sink is not None:
                    self.sink.cut(now)
            self._playing_until = min(self._playing_until, now)

    def _finish(self, at: float, *, interrupted: bool) -> None:
        epoch = self._reply_epoch
        assert epoch is not None
        heard = tuple(m.word for m in self._marks if m.end <= self._played)
        played_s = self._played / self._rate
        self._started, self._tts_done, self._last, self._marks = False, False, None, []
        self._reply_epoch = None
        self.mark("out.interrupted" if interrupted else "out.done", epoch, at=at, heard=list(heard), played_s=played_s)
        self._reports.append(
            BotStoppedSpeaking(epoch=epoch, at=at, interrupted=interrupted, heard=heard, played=played_s)
        )

    # ------------------------------------------------------------------------------- reports upstream

    def _send_reports_soon(self) -> None:
        """Send the reports made so far from a task of the output's own: a tick, or a provider's worker handing
        over audio, does not wait for the stages upstream (and a worker an interrupt cancels cannot lose one)."""
        if self._reports and (self._reporter is None or self._reporter.done()):
            self._reporter = self.spawn(self._send_reports(), name=f"{self.name}-reports")

    async def _send_reports(self) -> None:
        """Send the reports made so far upstream, in order and one at a time; return once all have arrived (or
        are on their way from this very task)."""
        me = asyncio.current_task()
        if self._reporting_in is me:
            # A report on its way raised this (a stage upstream failed on it, under skip-turn, and interrupted):
            # waiting for it here would wait forever. The rest follows once it has arrived.
            return
        async with self._reporting:
            self._reporting_in = me
            try:
                while self._reports:
                    await self.push(self._reports.popleft(), Direction.UPSTREAM)
            finally:
                self._reporting_in = None
