"""Resampling and channel conversion of audio frames, with soxr's streaming resampler."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import soxr

from voxpipe.pipeline import (
    AudioFormat,
    AudioFormatError,
    AudioFrame,
    Direction,
    End,
    Frame,
    Interrupt,
    Stage,
    TTSAudioFrame,
    TTSDone,
    WordMark,
)

# A frame that starts within this much of where its stream's input so far ends continues the stream. pts are whole
# samples, and a source that stamps them from a clock (``round(t * rate)``, as the simulated input does) can step a
# sample off with nothing missing; 0.5 ms is 4 samples at 8 kHz and 8 at 16 kHz — over that rounding at every rate
# in use, yet far under a 20 ms frame and under anything VAD or turn timing resolves.
CONTINUITY_TOLERANCE_S = 0.0005


@dataclass(slots=True)
class _Timeline:
    """Where one stream stands: its next frame should start at ``input_end`` (its origin's pts plus every sample fed
    since, so small steps cannot add up unnoticed), and its next output sample is stamped ``output_end``."""

    input_end: int
    output_end: int
    epoch: int  # of the last frame fed: the tail of a bot stream cut at a discontinuity goes out with its reply


class Resample(Stage):
    """Converts every downstream audio frame to ``sample_rate``/``channels``.

    One soxr stream per source format keeps the filter state between frames, so there are no clicks at frame
    boundaries. The default quality is soxr's "QQ": fed 20 ms frames, it returns each frame's worth at once, while
    "LQ", "MQ" and "HQ" hold output back and release it in bursts every 60 to 120 ms (measured 8→16 kHz and
    22.05→16 kHz with 20 ms frames) — on a voice path that is added to voice-to-voice and makes frames late. Use a
    higher quality for offline work. ``pts`` counts the samples emitted for each source stream from its first input
    frame (soxr's output is aligned to it), so bursts or filter delay never stamp audio late. A frame that does not
    start where its stream's input ended (more than ``CONTINUITY_TOLERANCE_S`` later — lost frames, a paused source —
    or earlier — an overlap, a source that restarted its timeline) cuts the stream: the filter's tail goes out
    stamped where the audio before it ended, and the frame starts the stream afresh at its own pts, as a first frame
    does, so output pts follow input time across the discontinuity. A bot frame that yields no samples yet passes its
    word marks and text on to the next frame out (or to the reply's tail), so no word is lost; no empty frame is
    emitted, except a tail that only carries such marks. The held tail is flushed at ``End`` (caller audio) and at
    each reply's ``TTSDone`` (bot audio: the tail ends its own reply instead of opening the next).
    """

    def __init__(self, sample_rate: int, channels: int = 1, *, quality: str = "QQ", name: str | None = None):
        super().__init__(name=name)
        self.produces = AudioFormat(sample_rate, channels)
        self.quality = quality
        # One filter and clock per (source rate, channels, bot audio?): bot audio has its own, dropped on an interrupt
        # so no sample of a cut reply can leak into the next one.
        self._streams: dict[tuple[int, int, bool], soxr.ResampleStream] = {}
        self._timelines: dict[tuple[int, int, bool], _Timeline] = {}  # bot audio's on its reply's timeline
        # Bot audio: word marks (already at the output rate) and text of frames the filter has yielded nothing for.
        self._held: dict[tuple[int, int, bool], tuple[tuple[WordMark, ...], str]] = {}

    async def on_interrupt(self, interrupt: Interrupt) -> None:
        for key in [key for key in self._streams if key[2]]:
            del self._streams[key]
        for key in [key for key in self._timelines if key[2]]:
            del self._timelines[key]
        self._held.clear()

    async def process(self, frame: Frame, direction: Direction) -> None:
        if direction is Direction.DOWNSTREAM:
            if isinstance(frame, AudioFrame):
                tail = self._cut_at_discontinuity(frame)
                if tail is not None:
                    await self.push(tail)
                converted = self.convert(frame)
                if converted is None:
                    return  # the filter is still filling: nothing to emit yet
                frame = converted
            elif isinstance(frame, TTSDone):
                await self._end_reply(frame.epoch)
            elif isinstance(frame, End):
                await self._flush()
        await self.push(frame, direction)

    async def _end_reply(self, epoch: int) -> None:
        """The reply's last samples, still in its filter, as its last frame; the next reply starts afresh."""
        for key in [key for key in self._timelines if key[2]]:
            tail = self._end_stream(key, epoch)
            if tail is not None:
                await self.push(tail)

    async def _flush(self) -> None:
        """The caller audio the filters still hold, stamped where its stream left off (a reply's tail is dropped: the
        call is over)."""
        for key in [key for key in self._timelines if not key[2]]:
            tail = self._end_stream(key, self.epoch)
            if tail is not None:
                await self.push(tail)

    def _cut_at_discontinuity(self, frame: AudioFrame) -> AudioFrame | None:
        """Ends ``frame``'s stream if ``frame`` does not start where the stream's input ended, so that ``convert``
        starts it afresh at ``frame.pts``; returns the stream's tail, stamped on the timeline it ends (see
        :meth:`_end_stream`). Later and earlier are alike: after a gap the output must skip it, and after an overlap
        or a restarted source timeline, counting on would stamp every later frame late by as much (downstream places
        audio by pts: the STT's buffer overwrites an overlap)."""
        if self._passes_through(frame):
            return None
        self._check_format(frame)
        key = self._stream_key(frame)
        timeline = self._timelines.get(key)
        if timeline is None or abs(frame.pts - timeline.input_end) <= CONTINUITY_TOLERANCE_S * frame.sample_rate:
            return None
        return self._end_stream(key, timeline.epoch)

    def _end_stream(self, key: tuple[int, int, bool], epoch: int) -> AudioFrame | None:
        """Ends stream ``key``: returns the samples its filter still holds, stamped where its output ends, as one
        frame (bot audio: with the marks held for them, as an empty frame if there are only marks), or None. The
        filter is reset and the clock forgotten, so the stream's next frame sets its origins as its first did."""
        target = self.produces
        assert target is not None
        timeline = self._timelines.pop(key, None)
        words, text = self._held.pop(key, ((), ""))
        stream = self._streams.get(key)
        tail = np.zeros((0, key[1]), dtype=np.int16)
        if stream is not None:
            tail = stream.resample_chunk(tail, last=True)
            stream.clear()  # ready for a fresh signal: cheaper than a new stream
        if timeline is None:
            return None
        pcm = np.ascontiguousarray(tail, dtype=np.int16).tobytes()
        rate, channels, bot_audio = target.sample_rate, key[1], key[2]
        if bot_audio and (len(tail) or words):
            return TTSAudioFrame(
                epoch=epoch,
                pcm=pcm,
                sample_rate=rate,
                channels=channels,
                pts=timeline.output_end,
                text=text,
                words=words,
            )
        if not bot_audio and len(tail):
            return AudioFrame(epoch=epoch, pcm=pcm, sample_rate=rate, channels=channels, pts=timeline.output_end)
        return None

    def _passes_through(self, frame: AudioFrame) -> bool:
        target = self.produces
        assert target is not None
        return (frame.sample_rate, frame.channels) == (target.sample_rate, target.channels)

    def _stream_key(self, frame: AudioFrame) -> tuple[int, int, bool]:
        target = self.produces
        assert target is not None
        return (frame.sample_rate, target.channels, frame.interruptible)

    def _check_format(self, frame: AudioFrame) -> None:
        if frame.sample_rate <= 0 or frame.channels not in (1, 2):
            raise AudioFormatError(
                f"stage {self.name!r} got a malformed audio frame: sample_rate={frame.sample_rate}, "
                f"channels={frame.channels} (it takes a positive rate and 1 or 2 channels)"
            )
        if len(frame.pcm) % (2 * frame.channels):
            raise ValueError(f"stage {self.name!r}: malformed audio frame of {len(frame.pcm)} bytes")

    def convert(self, frame: AudioFrame) -> AudioFrame | None:
        """``frame`` in the target format, stamped on its stream's output timeline, or None while the filter is still
        filling. ``frame`` is taken to continue its stream: :meth:`process` first cuts the stream at a discontinuity."""
        target = self.produces
        assert target is not None
        if self._passes_through(frame):
            return frame
        self._check_format(frame)
        ratio = target.sample_rate / frame.sample_rate
        key = self._stream_key(frame)
        timeline = self._timelines.get(key)
        if timeline is None:  # the stream's (or a reply's) first frame, or the first after a discontinuity
            # Origins come from the first frame fed in, not the first out: soxr's output is aligned to its first input.
            timeline = self._timelines[key] = _Timeline(frame.pts, round(frame.pts * ratio), frame.epoch)
        timeline.input_end += frame.samples
        timeline.epoch = frame.epoch
        samples = np.frombuffer(frame.pcm, dtype=np.int16).reshape(-1, frame.channels)
        if frame.channels != target.channels:
            mono = samples.mean(axis=1, dtype=np.float32)
            samples = (mono if target.channels == 1 else np.repeat(mono[:, None], 2, axis=1)).astype(np.int16)
            samples = samples.reshape(-1, target.channels)
        held = False
        if frame.sample_rate != target.sample_rate:
            stream = self._streams.get(key)
            if stream is None:
                stream = self._streams[key] = soxr.ResampleStream(
                    frame.sample_rate, target.sample_rate, target.channels, dtype="int16", quality=self.quality
                )
            samples = stream.resample_chunk(samples)
            held = len(samples) == 0  # the filter is still filling (or the frame is marks only)
        pcm = np.ascontiguousarray(samples, dtype=np.int16).tobytes()
        # pts counts samples as emitted, so that the filter's delay leaves no gap after the first frame and the tail
        # flushed at the end (of the call, a reply, or before a discontinuity) follows on.
        if isinstance(frame, TTSAudioFrame):
            words = tuple(WordMark(w.word, round(w.start * ratio), round(w.end * ratio)) for w in frame.words)
            text = frame.text
            if key in self._held:  # marks of earlier frames that yielded nothing go out with this one
                held_words, held_text = self._held.pop(key)
                words = held_words + words
                text = held_text + text if text != held_text else text  # a chunk's pieces share its text
            if held:
                if words or text:
                    self._held[key] = (words, text)
                return None
            pts = timeline.output_end
            timeline.output_end += len(samples)
            return TTSAudioFrame(
                epoch=frame.epoch,
                pcm=pcm,
                sample_rate=target.sample_rate,
                channels=target.channels,
                pts=pts,
                text=text,
                words=words,
            )
        if held:
            return None
        pts = timeline.output_end
        timeline.output_end += len(samples)
        return AudioFrame(epoch=frame.epoch, pcm=pcm, sample_rate=target.sample_rate, channels=target.channels, pts=pts)
