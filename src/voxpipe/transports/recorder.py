"""A stereo recording of a call as the transport saw it: caller on the left channel, bot on the right."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np


class StereoRecorder:
    """Collects caller and bot audio at their clock times; :meth:`write` renders a stereo WAV.

    Bot audio is recorded as it is *played*; :meth:`cut` removes what was handed to the device but cut off by an
    interrupt, so the recording holds exactly the samples the caller heard.
    """

    def __init__(self, sample_rate: int, origin: float = 0.0) -> None:
        self.sample_rate = sample_rate
        self.origin = origin
        self._caller: list[tuple[int, bytes]] = []  # raw bytes: converted once, at render time
        self._bot: list[tuple[int, np.ndarray]] = []

    def _position(self, at: float) -> int:
        return round((at - self.origin) * self.sample_rate)

    def caller(self, at: float, pcm: bytes) -> None:
        self._caller.append((self._position(at), pcm))

    def play(self, at: float, pcm: bytes) -> None:
        self._bot.append((self._position(at), np.frombuffer(pcm, dtype=np.int16)))

    def cut(self, at: float) -> None:
        """Drop bot audio at and after ``at`` (it was flushed before it played)."""
        limit = self._position(at)
        kept: list[tuple[int, np.ndarray]] = []
        for start, samples in self._bot:
            if start < limit:
                kept.append((start, samples[: limit - start]))
        self._bot = kept

    def render(self) -> np.ndarray:
        """The recording as an ``(n, 2)`` int16 array."""
        caller = [(start, np.frombuffer(pcm, dtype=np.int16)) for start, pcm in self._caller]
        ends = [start + len(s) for start, s in (*caller, *self._bot)]
        out = np.zeros((max(ends, default=0), 2), dtype=np.int16)
        for channel, segments in ((0, caller), (1, self._bot)):
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
