"""ClipCaller: the simplest simulated caller — it says one recorded clip and hangs up at its end."""

from __future__ import annotations

import numpy as np


class ClipCaller:
    """Plays ``clip`` (int16 mono at ``sample_rate``) from the start of the call, then hangs up (a ``CallerSource``)."""

    def __init__(self, clip: np.ndarray, sample_rate: int = 16000) -> None:
        self.clip = clip
        self.sample_rate = sample_rate
        self._heard_until = 0

    @property
    def finished(self) -> bool:
        return self._heard_until >= self.clip.size

    def audio(self, start: float, samples: int) -> bytes:
        first = round(start * self.sample_rate)
        self._heard_until = first + samples
        chunk = self.clip[first : first + samples]
        return np.pad(chunk, (0, samples - chunk.size)).astype(np.int16).tobytes()

    def bot_started(self, at: float) -> None:
        """A clip does not listen."""

    def bot_stopped(self, at: float, interrupted: bool) -> None:
        """A clip does not listen."""
