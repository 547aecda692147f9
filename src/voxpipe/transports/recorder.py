"""A stereo recording of a call as the transport saw it: caller on the left channel, bot on the right."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np


class StereoRecorder:
    """Collects caller and bot audio at their clock times; :meth:`write` renders a stereo WAV.

    Bot audio is recorded as it is *played*; :meth:`cut` removes what was handed to the device but cut off by an
    interrupt, so the recording holds exactly the samples the caller heard. Bot audio has ``channels``
    interleaved channels (the output it is the sink of checks that it plays that many) and is mixed down to the
    bot's channel; caller audio is mono.
    """

    def __init__(self, sample_rate: int, origin: float = 0.0, *, channels: int = 1) -> None:
        if channels not in (1, 2):
            raise ValueError(f"channels must be 1 or 2, got {channels}")
        self.sample_rate = sample_rate
        self.origin = origin
        self.channels = channels
        self._caller: list[tuple[int, bytes]] = []  # raw bytes: converted once, at render time
        self._bot: list[tuple[float, np.ndarray]] = []  # (clock time, mono samples): cut relative to that time

    def _position(self, at: float) -> int:
        return round((at - self.origin) * self.sample_rate)

    def caller(self, at: float, pcm: bytes) -> None:
        self._caller.append((self._position(at), pcm))

    def play(self, at: float, pcm: bytes) -> None:
        samples = np.frombuffer(pcm, dtype=np.int16)
        if self.channels > 1:  # one sample per sample time, or the bot's audio is stretched by the channel count
            samples = samples.reshape(-1, self.channels).mean(axis=1).round().astype(np.int16)
        self._bot.append((at, samples))

    def cut(self, at: float) -> None:
        """Drop bot audio at and after ``at`` (it was flushed before it played). Each frame keeps
        ``round((at - start) * rate)`` samples, as the output counts them played, so the two agree to the sample."""
        kept: list[tuple[float, np.ndarray]] = []
        for start, samples in self._bot:
            played = round((at - start) * self.sample_rate)
            if played > 0:
                kept.append((start, samples[:played]))
        self._bot = kept

    def render(self) -> np.ndarray:
        """The recording as an ``(n, 2)`` int16 array."""
        caller = [(start, np.frombuffer(pcm, dtype=np.int16)) for start, pcm in self._caller]
        bot = [(self._position(at), samples) for at, samples in self._bot]
        ends = [start + len(s) for start, s in (*caller, *bot)]
        out = np.zeros((max(ends, default=0), 2), dtype=np.int16)
        for channel, segments in ((0, caller), (1, bot)):
            for start, samples in segments:
                if start < 0:
                    samples, start = samples[-start:], 0
                out[start : start + len(samples), channel] = samples
        return out

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        with wave.open(str(path), "wb") as wav:
            wav.setnchannels(2)
            wav.setsampwidth(2)
            wav.setframerate(self.sample_rate)
            wav.writeframes(self.render().tobytes())
        return path
