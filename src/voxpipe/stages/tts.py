"""The synthesiser stage: speaks :class:`SpeakableChunk` text as :class:`TTSAudioFrame` audio with word marks.

Providers implement :meth:`TTSStage.synthesize`, an async iterator of ``(pcm, word_marks)`` pairs whose marks are in
samples from the start of that chunk's audio, one call per speakable chunk. Providers that stream a whole reply's
text into one context subclass :class:`StreamingTTSStage` instead. Either way the stage places the audio on the
reply's own timeline (``pts`` counts samples since the reply began), marks ``tts.first_audio``, counts the
characters spoken (usage), and ends each reply with :class:`TTSDone`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import numpy as np

from voxpipe.pipeline import (
    AudioFormat,
    Direction,
    Frame,
    Interrupt,
    LLMRequest,
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
        self._reply_samples = 0  # emitted so far in the current reply
        self._trimmed = 0  # leading silence dropped from the current reply
        self._carry = b""  # an odd byte left over from the last piece
        self._held: tuple[tuple[WordMark, ...], str] = ((), "")  # marks and text of pieces trimmed whole
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
            self.count(frame.epoch, characters=len(frame.text))
            await self._speak(frame)
        elif isinstance(frame, ResponseEnd):
            await self.push(frame)
            await self.push(TTSDone(epoch=frame.epoch))
        else:
            await self.push(frame, direction)

    async def _speak(self, chunk: SpeakableChunk) -> None:
        epoch = chunk.epoch
        chunk_start = self.reply_position(epoch)  # the provider's word marks count from the chunk's first sample
        # aclosing: a cancellation while pushing still closes the provider's stream here, not at garbage collection.
        async with contextlib.aclosing(self.synthesize(chunk.text)) as stream:
            async for pcm, marks in stream:
                shifted = tuple(WordMark(m.word, m.start + chunk_start, m.end + chunk_start) for m in marks)
                await self.emit_audio(epoch, pcm, shifted, chunk.text)

    # --------------------------------------------------------------------------- the reply's audio

    def reply_position(self, epoch: int) -> int:
        """Samples the provider has produced so far for reply ``epoch`` (leading silence included)."""
        return self._reply_samples + self._trimmed if epoch == self._reply_epoch else 0

    async def emit_audio(self, epoch: int, pcm: bytes, marks: tuple[WordMark, ...] = (), text: str = "") -> None:
        """Push synthesised audio of reply ``epoch`` as a :class:`TTSAudioFrame`.

        ``marks`` count samples from the start of the reply's audio as the provider produced it; this places the
        frame on the reply's timeline (``pts``), drops the reply's leading silence, marks ``tts.first_audio``, and
        carries an odd byte over to the next piece (network chunks need not end on a sample boundary). The marks of
        a piece that is all leading silence go out with the reply's first audible frame. Audio of a reply an
        interrupt has cut (a provider's receiver handing over a last piece) is dropped here: it would restart the
        timeline of the reply under way.
        """
        if epoch < self.epoch:
            return
        audio = self.produces
        assert audio is not None
        if epoch != self._reply_epoch:
            self._reply_epoch, self._reply_samples, self._trimmed, self._carry = epoch, 0, 0, b""
            self._held = ((), "")
        if self._carry:
            pcm = self._carry + pcm
        frame_bytes = audio.sample_bytes
        cut = len(pcm) - len(pcm) % frame_bytes
        pcm, self._carry = pcm[:cut], pcm[cut:]
        if self._reply_samples == 0:
            pcm, dropped = self._trim_leading_silence(pcm, audio.channels)
            self._trimmed += dropped
            held_marks, held_text = self._held
            marks = held_marks + marks  # marks that came with silence trimmed whole: their words are still to come
            if text != held_text:  # a chunk's pieces share its text; a stream's frames carry their own words
                text = " ".join(part for part in (held_text, text) if part)
            if not pcm:
                self._held = (marks, text)
                return
            self._held = ((), "")
            self.mark("tts.first_audio", epoch)
        trimmed = self._trimmed
        words = tuple(WordMark(m.word, max(0, m.start - trimmed), max(0, m.end - trimmed)) for m in marks)
        frame = TTSAudioFrame(
            epoch=epoch,
            pcm=pcm,
            sample_rate=audio.sample_rate,
            channels=audio.channels,
            pts=self._reply_samples,
            text=text,
            words=words,
        )
        self._reply_samples += frame.samples
        await self.push(frame)


class StreamingTTSStage(TTSStage):
    """Base of TTS providers that take a whole reply's text as it streams, over one connection or context per
    reply (Cartesia's contexts, ElevenLabs' stream-input socket), so prosody carries across the reply's chunks.

    A provider implements four hooks; its receiver (a task it starts in :meth:`open_reply`, owned by the stage)
    passes audio to :meth:`emit_audio` with marks counted from the start of the reply:

    * :meth:`open_reply` — open the context/connection for reply ``epoch`` and start receiving (called when the
      reasoner is asked, :class:`LLMRequest`, so the set-up overlaps its first token);
    * :meth:`send_text` — push one speakable chunk of text; returns the text as it went to the provider (with the
      spacing the provider wants), whose characters are counted as usage, or None if nothing went (text a failed or
      cut reply never sent is not billed);
    * :meth:`finish_reply` — say no more text is coming, and wait until the reply's last audio was emitted (if it
      fails, the reply's :class:`ResponseEnd` and :class:`TTSDone` still go out, then the failure is raised);
    * :meth:`cancel_reply` — barge-in: stop the provider (its own cancel message or a close) and the receiver.
    """

    def __init__(self, audio: AudioFormat, *, name: str | None = None) -> None:
        super().__init__(audio, name=name)
        self._open_epoch: int | None = None

    async def open_reply(self, epoch: int) -> None:
        raise NotImplementedError

    async def send_text(self, epoch: int, text: str) -> str | None:
        raise NotImplementedError

    async def finish_reply(self, epoch: int) -> None:
        raise NotImplementedError

    async def cancel_reply(self, epoch: int) -> None:
        raise NotImplementedError

    async def process(self, frame: Frame, direction: Direction) -> None:
        if isinstance(frame, LLMRequest | SpeakableChunk) and self._open_epoch != frame.epoch:
            # Opened as soon as the reasoner is asked: a connection's set-up overlaps the model's first token.
            self._open_epoch = frame.epoch
            await self.open_reply(frame.epoch)
        if isinstance(frame, SpeakableChunk):
            sent = await self.send_text(frame.epoch, frame.text)
            if sent:
                self.count(frame.epoch, characters=len(sent))
        elif isinstance(frame, ResponseEnd):
            # The reply ends here even when its provider fails at its end (a socket that dropped before it): the
            # output marks the reply done only on these frames. The failure itself still goes to the error policy.
            try:
                if self._open_epoch == frame.epoch:
                    await self.finish_reply(frame.epoch)
            finally:
                if self._open_epoch == frame.epoch:
                    self._open_epoch = None
                await self.push(frame)
                await self.push(TTSDone(epoch=frame.epoch))
        else:
            await self.push(frame, direction)  # LLMRequest included: the output marks nothing on it, observers may

    async def on_interrupt(self, interrupt: Interrupt) -> None:
        epoch, self._open_epoch = self._open_epoch, None
        if epoch is not None and epoch < interrupt.epoch:
            await self.cancel_reply(epoch)
