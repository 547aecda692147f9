"""The synthesiser stage: speaks :class:`SpeakableChunk` text as :class:`TTSAudioFrame` audio with word marks.

Providers implement :meth:`TTSStage.synthesize`, an async iterator of ``(pcm, word_marks)`` pairs whose marks are in
samples from the start of that chunk's audio. The stage places them on the reply's own timeline (``pts`` counts
samples since the reply began), marks ``tts.first_audio``, and ends each reply with :class:`TTSDone`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import numpy as np

from voxpipe.pipeline import (
    AudioFormat,
    Direction,
    Frame,
    QueuedStage,
    ResponseEnd,
    SpeakableChunk,
    TTSAudioFrame,
    TTSDone,
    WordMark,
)

LEADING_SILENCE_LEVEL = 0.01  # of full scale: the level voxpipe.measure calls voiced


class TTSStage(QueuedStage):
    """Base of TTS stages; ``audio`` is the format :meth:`synthesize` produces."""

    def __init__(self, audio: AudioFormat, *, name: str | None = None) -> None:
        super().__init__(name=name)
        self.produces = audio
        self._reply_epoch = -1
        self._reply_samples = 0
        self._silence_level = int(LEADING_SILENCE_LEVEL * 32767)

    def _trim_leading_silence(self, pcm: bytes, channels: int) -> tuple[bytes, int]:
        """Drop the silence a synthesiser puts before a reply's first sound (Piper: ~40 ms): it would be played,
        and counted as the reply having started, before the caller hears anything. Returns (rest, samples dropped)."""
        samples = np.frombuffer(pcm, dtype=np.int16)
        loud = np.flatnonzero(np.abs(samples.astype(np.int32)) > self._silence_level)
        if loud.size == 0:
            return b"", len(samples) // channels
        first = int(loud[0]) // channels
        return pcm[first * 2 * channels :], first

    def synthesize(self, text: str) -> AsyncIterator[tuple[bytes, tuple[WordMark, ...]]]:
        raise NotImplementedError

    async def process(self, frame: Frame, direction: Direction) -> None:
        if isinstance(frame, SpeakableChunk):
            await self._speak(frame)
        elif isinstance(frame, ResponseEnd):
            await self.push(frame)
            await self.push(TTSDone(epoch=frame.epoch))
        else:
            await self.push(frame, direction)

    async def _speak(self, chunk: SpeakableChunk) -> None:
        audio = self.produces
        assert audio is not None
        epoch = chunk.epoch
        if epoch != self._reply_epoch:
            self._reply_epoch, self._reply_samples = epoch, 0
        chunk_start = self._reply_samples  # word marks are relative to the chunk's first sample
        trimmed = 0  # leading silence dropped from this chunk (only ever at the start of a reply)
        # aclosing: a cancellation while pushing still closes the provider's stream here, not at garbage collection.
        async with contextlib.aclosing(self.synthesize(chunk.text)) as stream:
            async for pcm, marks in stream:
                if self._reply_samples == 0:
                    pcm, dropped = self._trim_leading_silence(pcm, audio.channels)
                    trimmed += dropped
                if not pcm:
                    continue
                if self._reply_samples == 0:
                    self.mark("tts.first_audio", epoch)
                offset = chunk_start - trimmed
                words = tuple(WordMark(m.word, max(0, m.start + offset), max(0, m.end + offset)) for m in marks)
                frame = TTSAudioFrame(
                    epoch=epoch,
                    pcm=pcm,
                    sample_rate=audio.sample_rate,
                    channels=audio.channels,
                    pts=self._reply_samples,
                    text=chunk.text,
                    words=words,
                )
                self._reply_samples += frame.samples
                await self.push(frame)
