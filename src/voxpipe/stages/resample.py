"""Resampling and channel conversion of audio frames, with soxr's streaming resampler."""

from __future__ import annotations

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


class Resample(Stage):
    """Converts every downstream audio frame to ``sample_rate``/``channels``.

    One soxr stream per source format keeps the filter state between frames, so there are no clicks at frame
    boundaries. The default quality is soxr's "QQ": fed 20 ms frames, it returns each frame's worth at once, while
    "LQ", "MQ" and "HQ" hold output back and release it in bursts every 60 to 120 ms (measured 8→16 kHz and
    22.05→16 kHz with 20 ms frames) — on a voice path that is added to voice-to-voice and makes frames late. Use a
    higher quality for offline work. ``pts`` counts the samples emitted for each source stream from its first input
    frame (soxr's output is aligned to it), so bursts or filter delay never stamp audio late. A bot frame that
    yields no samples yet passes its word marks and text on to the next frame out (or to the reply's tail), so no
    word is lost; no empty frame is emitted, except a reply's tail that only carries such marks. The held tail is
    flushed at ``End`` (caller audio) and at each reply's ``TTSDone`` (bot audio: the tail ends its own reply
    instead of opening the next).
    """

    def __init__(self, sample_rate: int, channels: int = 1, *, quality: str = "QQ", name: str | None = None):
        super().__init__(name=name)
        self.produces = AudioFormat(sample_rate, channels)
        self.quality = quality
        # One filter per (source rate, channels, bot audio?): bot audio has its own, dropped on an interrupt so no
        # sample of a cut reply can leak into the next one.
        self._streams: dict[tuple[int, int, bool], soxr.ResampleStream] = {}
        self._emitted: dict[tuple[int, int], int] = {}  # caller audio: samples emitted per source, the output pts
        self._reply_end: dict[tuple[int, int, bool], int] = {}  # bot audio: where the reply's output ends so far
        # Bot audio: word marks (already at the output rate) and text of frames the filter has yielded nothing for.
        self._held: dict[tuple[int, int, bool], tuple[tuple[WordMark, ...], str]] = {}

    async def on_interrupt(self, interrupt: Interrupt) -> None:
        for key in [key for key in self._streams if key[2]]:
            del self._streams[key]
        self._reply_end.clear()
        self._held.clear()

    async def process(self, frame: Frame, direction: Direction) -> None:
        if direction is Direction.DOWNSTREAM:
            if isinstance(frame, AudioFrame):
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
        """The reply's last samples, still in its filter, as its last frame; the next reply starts a fresh filter."""
        target = self.produces
        assert target is not None
        for key in [key for key in self._streams if key[2]]:
            stream, end = self._streams.pop(key), self._reply_end.get(key, 0)
            tail = stream.resample_chunk(np.zeros((0, key[1]), dtype=np.int16), last=True)
            words, text = self._held.get(key, ((), ""))
            if len(tail) or words:  # an empty tail still carries the marks of frames that yielded nothing
                pcm = np.ascontiguousarray(tail, dtype=np.int16).tobytes()
                await self.push(
                    TTSAudioFrame(
                        epoch=epoch,
                        pcm=pcm,
                        sample_rate=target.sample_rate,
                        channels=key[1],
                        pts=end,
                        text=text,
                        words=words,
                    )
                )
        self._reply_end.clear()
        self._held.clear()

    async def _flush(self) -> None:
        """The caller audio the filters still hold, stamped where its stream left off (a reply's tail is dropped: the
        call is over)."""
        target = self.produces
        assert target is not None
        for (rate, channels, bot_audio), stream in self._streams.items():
            if bot_audio:
                continue
            tail = stream.resample_chunk(np.zeros((0, channels), dtype=np.int16), last=True)
            source = next((key for key in self._emitted if key[0] == rate), None)
            if len(tail) and source is not None:
                pts = self._emitted[source]
                self._emitted[source] += len(tail)
                pcm = np.ascontiguousarray(tail, dtype=np.int16).tobytes()
                await self.push(
                    AudioFrame(epoch=self.epoch, pcm=pcm, sample_rate=target.sample_rate, channels=channels, pts=pts)
                )

    def convert(self, frame: AudioFrame) -> AudioFrame | None:
        target = self.produces
        assert target is not None
        if (frame.sample_rate, frame.channels) == (target.sample_rate, target.channels):
            return frame
        if frame.sample_rate <= 0 or frame.channels not in (1, 2):
            raise AudioFormatError(
                f"stage {self.name!r} got a malformed audio frame: sample_rate={frame.sample_rate}, "
                f"channels={frame.channels} (it takes a positive rate and 1 or 2 channels)"
            )
        if len(frame.pcm) % (2 * frame.channels):
            raise ValueError(f"stage {self.name!r}: malformed audio frame of {len(frame.pcm)} bytes")
        ratio = target.sample_rate / frame.sample_rate
        key = (frame.sample_rate, target.channels, frame.interruptible)
        source = (frame.sample_rate, frame.channels)
        # Origins come from the first frame fed in, not the first out: soxr's output is aligned to its first input.
        if isinstance(frame, TTSAudioFrame):
            if frame.pts == 0 or key not in self._reply_end:  # a reply's first frame
                self._reply_end[key] = round(frame.pts * ratio)
        elif source not in self._emitted:
            self._emitted[source] = round(frame.pts * ratio)  # the stream's first frame sets the origin
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
        if isinstance(frame, TTSAudioFrame):
            # Bot audio: pts is the sample index in its reply, counted as emitted (as for caller audio) so that the
            # filter's delay leaves no gap after the first frame and the tail flushed at TTSDone follows on.
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
            pts = self._reply_end[key]
            self._reply_end[key] = pts + len(samples)
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
        pts = self._emitted[source]
        self._emitted[source] += len(pcm) // (2 * target.channels)
        return AudioFrame(epoch=frame.epoch, pcm=pcm, sample_rate=target.sample_rate, channels=target.channels, pts=pts)
