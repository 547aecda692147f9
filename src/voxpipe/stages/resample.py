"""Resampling and channel conversion of audio frames, with soxr's streaming resampler."""

from __future__ import annotations

import numpy as np
import soxr

from voxpipe.pipeline import AudioFormat, AudioFrame, Direction, End, Frame, Stage, TTSAudioFrame, WordMark


class Resample(Stage):
    """Converts every downstream audio frame to ``sample_rate``/``channels``.

    One soxr stream per source format keeps the filter state between frames, so there are no clicks at frame
    boundaries. Word marks and ``pts`` of bot audio are rescaled to the new rate. The default quality is soxr's
    "MQ": it holds back ~26 ms of audio in its filter where "HQ" holds ~66 ms (measured 8→16 kHz), and on a
    voice path every millisecond held back is added to voice-to-voice. The held tail is flushed at ``End``.
    """

    def __init__(self, sample_rate: int, channels: int = 1, *, quality: str = "MQ", name: str | None = None):
        super().__init__(name=name)
        self.produces = AudioFormat(sample_rate, channels)
        self.quality = quality
        self._streams: dict[tuple[int, int], soxr.ResampleStream] = {}

    async def process(self, frame: Frame, direction: Direction) -> None:
        if direction is Direction.DOWNSTREAM:
            if isinstance(frame, AudioFrame):
                frame = self.convert(frame)
            elif isinstance(frame, End):
                await self._flush()
        await self.push(frame, direction)

    async def _flush(self) -> None:
        target = self.produces
        assert target is not None
        for stream in self._streams.values():
            tail = stream.resample_chunk(np.zeros((0, target.channels), dtype=np.int16), last=True)
            if len(tail):
                pcm = np.ascontiguousarray(tail, dtype=np.int16).tobytes()
                await self.push(AudioFrame(pcm=pcm, sample_rate=target.sample_rate, channels=target.channels))

    def convert(self, frame: AudioFrame) -> AudioFrame:
        target = self.produces
        assert target is not None
        if (frame.sample_rate, frame.channels) == (target.sample_rate, target.channels):
            return frame
        if len(frame.pcm) % (2 * frame.channels):
            raise ValueError(f"stage {self.name!r}: malformed audio frame of {len(frame.pcm)} bytes")
        samples = np.frombuffer(frame.pcm, dtype=np.int16).reshape(-1, frame.channels)
        if frame.channels != target.channels:
            mono = samples.mean(axis=1, dtype=np.float32)
            samples = (mono if target.channels == 1 else np.repeat(mono[:, None], 2, axis=1)).astype(np.int16)
            samples = samples.reshape(-1, target.channels)
        if frame.sample_rate != target.sample_rate:
            key = (frame.sample_rate, target.channels)
            stream = self._streams.get(key)
            if stream is None:
                stream = self._streams[key] = soxr.ResampleStream(
                    frame.sample_rate, target.sample_rate, target.channels, dtype="int16", quality=self.quality
                )
            samples = stream.resample_chunk(samples)
        ratio = target.sample_rate / frame.sample_rate
        pcm = np.ascontiguousarray(samples, dtype=np.int16).tobytes()
        pts = round(frame.pts * ratio)
        if isinstance(frame, TTSAudioFrame):
            words = tuple(WordMark(w.word, round(w.start * ratio), round(w.end * ratio)) for w in frame.words)
            return TTSAudioFrame(
                epoch=frame.epoch,
                pcm=pcm,
                sample_rate=target.sample_rate,
                channels=target.channels,
                pts=pts,
                text=frame.text,
                words=words,
            )
        return AudioFrame(epoch=frame.epoch, pcm=pcm, sample_rate=target.sample_rate, channels=target.channels, pts=pts)
