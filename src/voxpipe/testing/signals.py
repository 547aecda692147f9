"""Audible test signals: speech-like voiced bursts (one per word) and cough-like noise.

They are what the scripted caller and TTS speak: loud enough for an energy VAD and an audio-based latency
measurement, shaped so word boundaries are where the script says they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FADE_S = 0.004  # short ramps: no clicks, and the onset is still within a millisecond of the word's start


@dataclass(frozen=True, slots=True)
class WordSpan:
    """A word of a synthesised utterance, in samples from the utterance's start."""

    word: str
    start: int
    end: int


def word_duration(word: str, seconds_per_letter: float = 0.055, base_s: float = 0.12) -> float:
    """A plausible spoken length for ``word`` (longer words take longer)."""
    return base_s + seconds_per_letter * len(word)


def speechlike(
    text: str, sample_rate: int, *, f0: float = 140.0, gap_s: float = 0.07, amplitude: float = 0.3, rate: float = 1.0
) -> tuple[np.ndarray, list[WordSpan]]:
    """Voiced bursts, one per word of ``text``, with a harmonic spectrum at pitch ``f0``; returns int16 and spans.

    ``rate`` > 1 speaks faster. The pitch glides a little within each word so it is not a pure tone.
    """
    words = text.split()
    pieces: list[np.ndarray] = []
    spans: list[WordSpan] = []
    cursor = 0
    gap = np.zeros(round(gap_s / rate * sample_rate), dtype=np.float32)
    for i, word in enumerate(words):
        n = max(1, round(word_duration(word) / rate * sample_rate))
        t = np.arange(n, dtype=np.float32) / sample_rate
        pitch = f0 * (1.0 + 0.06 * np.sin(2 * np.pi * 2.5 * t + i))
        phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
        voice = sum(np.sin(k * phase) / k for k in range(1, 5))
        envelope = np.ones(n, dtype=np.float32)
        ramp = min(n // 2, round(FADE_S * sample_rate))
        if ramp:
            envelope[:ramp] = np.linspace(0.3, 1.0, ramp)
            envelope[-ramp:] = np.linspace(1.0, 0.3, ramp)
        pieces.append((voice * envelope * (amplitude / 1.6)).astype(np.float32))
        spans.append(WordSpan(word, cursor, cursor + n))
        cursor += n
        if i + 1 < len(words):
            pieces.append(gap)
            cursor += len(gap)
    signal = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
    return (np.clip(signal, -1, 1) * 32767).astype(np.int16), spans


def cough(sample_rate: int, duration_s: float = 0.18, amplitude: float = 0.5, seed: int = 7) -> np.ndarray:
    """A short burst of shaped noise with a fast attack and decay, like a cough or a bump on the microphone."""
    n = round(duration_s * sample_rate)
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(n).astype(np.float32)
    envelope = np.exp(-np.linspace(0, 5, n)).astype(np.float32)
    envelope[: max(1, n // 20)] *= np.linspace(0.3, 1, max(1, n // 20))
    return (np.clip(noise * envelope * amplitude / 3, -1, 1) * 32767).astype(np.int16)
