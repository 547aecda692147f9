"""Voice-to-voice measured from the audio itself — the ground truth the trace is checked against.

Given a stereo recording (caller left, bot right, as the transport saw them), find each caller utterance's last
voiced sample and the first bot sample after it; the gap is that turn's voice-to-voice time. "Voiced" is an
amplitude above ``level`` of full scale; pauses shorter than ``min_gap_s`` inside an utterance do not end it.
"""

from __future__ import annotations

import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class MeasuredTurn:
    caller_end: float
    bot_start: float

    @property
    def voice_to_voice_ms(self) -> float:
        return (self.bot_start - self.caller_end) * 1000


def voiced_segments(channel: np.ndarray, sample_rate: int, level: float, min_gap_s: float) -> list[tuple[int, int]]:
    """``(first, last)`` voiced sample of each segment; gaps shorter than ``min_gap_s`` are bridged."""
    loud = np.flatnonzero(np.abs(channel.astype(np.int32)) > level * 32767)
    if loud.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(loud) > min_gap_s * sample_rate)
    starts = np.concatenate([[loud[0]], loud[breaks + 1]])
    ends = np.concatenate([loud[breaks], [loud[-1]]])
    return [(int(a), int(b)) for a, b in zip(starts, ends, strict=True)]


def read_stereo(path: str | Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as wav:
        if wav.getnchannels() != 2 or wav.getsampwidth() != 2:
            raise ValueError(f"{path}: expected a 16-bit stereo WAV (caller left, bot right)")
        rate = wav.getframerate()
        data = np.frombuffer(wav.readframes(wav.getnframes()), dtype=np.int16).reshape(-1, 2)
    return data, rate


def measure_voice_to_voice(
    recording: str | Path | np.ndarray,
    sample_rate: int | None = None,
    *,
    level: float = 0.01,
    min_gap_s: float = 0.3,
) -> list[MeasuredTurn]:
    """One :class:`MeasuredTurn` per caller utterance the bot answered (in order)."""
    if isinstance(recording, np.ndarray):
        if sample_rate is None:
            raise ValueError("measure_voice_to_voice: pass sample_rate with an array")
        data, rate = recording, sample_rate
    else:
        data, rate = read_stereo(recording)
    caller = voiced_segments(data[:, 0], rate, level, min_gap_s)
    bot = voiced_segments(data[:, 1], rate, level, min_gap_s)
    bot_starts = np.array([start for start, _ in bot], dtype=np.int64)
    turns: list[MeasuredTurn] = []
    for i, (_, end) in enumerate(caller):
        after = bot_starts[bot_starts > end]
        if after.size == 0:
            continue
        onset = int(after[0])
        next_caller = caller[i + 1][0] if i + 1 < len(caller) else None
        if next_caller is not None and next_caller < onset:
            continue  # the caller spoke again before the bot answered (a cough, or an unanswered line)
        turns.append(MeasuredTurn(caller_end=(end + 1) / rate, bot_start=onset / rate))
    return turns
