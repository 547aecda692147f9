"""Smart-Turn v3: an end-of-turn model that hears whether the caller has finished, from the audio alone.

Silence alone cannot tell "I want to fly to... [thinking]" from "I want to fly to Boston on Friday." - a VAD has to
wait out its full ``stop_ms`` on both. Smart-Turn v3 (pipecat-ai's open model: a Whisper-tiny encoder with a
classification head, 8.7 MB int8 ONNX) looks at the last up-to-8 s of the utterance and returns P(turn complete).
:class:`~voxpipe.stages.silero_vad.SileroVAD` uses it like this: after ``silence_ms`` of silence (default 200) it
asks the model, on the model's thread; if P >= ``complete_threshold`` the turn ends then, otherwise at the VAD's
full ``stop_ms`` - which then only has to cover turns the model judged incomplete, so it can be set longer than
without Smart-Turn (e.g. 1000 ms) to let callers pause mid-thought without being cut off.

The model file ships inside the ``pipecat-ai`` wheel (``pip install 'voxpipe[smart-turn]'``); it is found without
importing pipecat. Its input is Whisper's log-mel spectrogram (80 mel bands, 25 ms windows every 10 ms, 8 s = 800
frames), computed here in numpy - no torch, no transformers - and equal to the reference extractor (tested).

Cost (``benchmarks/vad.py``, 2-core machine busy with two other test suites): features ~28 ms, inference ~195 ms
median per question. Far too long for the event loop: :meth:`SmartTurn.probability_async` runs both on the model's
own single-worker thread, so each :class:`SmartTurn` answers one question at a time.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from pydantic import BaseModel, ConfigDict, Field

from voxpipe.stages.inference import inference_executor

log = logging.getLogger("voxpipe.stages.smart_turn")

SAMPLE_RATE = 16000
MAX_AUDIO_S = 8.0  # the model's input window: 8 s of audio → 800 feature frames
MODEL_PACKAGE = "pipecat"  # the import name of the pipecat-ai distribution
MODEL_FILE = "audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx"
INSTALL_HINT = "install the smart-turn extra (pipecat-ai): pip install 'voxpipe[smart-turn]'"

# Whisper's feature settings, which Smart-Turn v3 was trained with.
N_FFT = 400  # 25 ms analysis window
HOP = 160  # 10 ms between frames
N_MELS = 80
FEATURE_FRAMES = 800

# ------------------------------------------------------------------------------------------------ settings


class SmartTurnSettings(BaseModel):
    """How Smart-Turn is asked, and what its answer does to endpointing."""

    model_config = ConfigDict(extra="forbid")

    model_path: Path | None = Field(
        default=None,
        description="Smart-Turn v3 ONNX file; default: smart-turn-v3.2-cpu.onnx from the pipecat-ai package",
    )
    complete_threshold: float = Field(
        default=0.5, gt=0, lt=1, description="P(turn complete) at or above which the turn ends after silence_ms"
    )
    silence_ms: float = Field(
        default=200.0, ge=20, le=5000, description="silence after the last voiced sample before the model is asked"
    )
    pre_speech_ms: float = Field(
        default=500.0,
        ge=0,
        le=2000,
        description="audio before the utterance's first voiced sample that the model also hears",
    )
    timeout_s: float = Field(
        default=2.0,
        gt=0,
        le=30,
        description="give up on an answer after this long (the VAD's stop_ms then ends the turn)",
    )
    threads: int = Field(default=1, ge=1, le=16, description="onnxruntime intra-op threads for one inference")


# -------------------------------------------------------------------------------------------------- load


def default_model_path() -> Path:
    """The Smart-Turn v3 model inside the installed pipecat-ai package.

    ``find_spec`` locates the package without running ``pipecat/__init__.py`` (which imports loguru and logs a
    banner): we only want a data file from it.
    """
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the Smart-Turn v3 model is missing: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"the Smart-Turn v3 model {path} is missing from pipecat-ai: {INSTALL_HINT}")
    return path


@functools.lru_cache(maxsize=4)
def _load_session(path: str, threads: int) -> Any:
    """One onnxruntime session per model file and thread count, shared by every call in the process
    (``InferenceSession.run`` is thread-safe, and each load costs time and tens of MB)."""
    try:
        import onnxruntime as ort
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(f"Smart-Turn needs onnxruntime: {INSTALL_HINT}") from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
        raise ValueError(f"{path} is not a loadable ONNX model: {exc}") from exc
    inputs = session.get_inputs()
    if len(inputs) != 1 or list(inputs[0].shape[1:]) != [N_MELS, FEATURE_FRAMES]:
        shapes = ", ".join(f"{i.name}{i.shape}" for i in inputs)
        raise ValueError(
            f"{path} is not a Smart-Turn v3 model: it takes {shapes}, expected one input of shape [batch, 80, 800]"
        )
    return session


# ------------------------------------------------------------------------------------------------ features


def _hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """Slaney's mel scale (as librosa and Whisper use): linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = 3.0 * hz / 200.0
    logarithmic = 15.0 + np.log(np.maximum(hz, 1e-9) / 1000.0) * (27.0 / np.log(6.4))
    return np.where(hz >= 1000.0, logarithmic, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear = 200.0 * mel / 3.0
    logarithmic = 1000.0 * np.exp((mel - 15.0) * (np.log(6.4) / 27.0))
    return np.where(mel >= 15.0, logarithmic, linear)


@functools.cache
def mel_filterbank() -> np.ndarray:
    """Triangular filters, shape (80, 201): 80 mel bands over the 201 FFT bins from 0 to 8 kHz, each filter
    normalised to unit area (Slaney), so loud low bands do not dominate because their filters are narrow."""
    band_edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(SAMPLE_RATE / 2), N_MELS + 2))
    bins = np.linspace(0.0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    lower, centre, upper = band_edges[:-2, None], band_edges[1:-1, None], band_edges[2:, None]
    rising = (bins - lower) / (centre - lower)
    falling = (upper - bins) / (upper - centre)
    triangles = np.maximum(0.0, np.minimum(rising, falling))
    return np.asarray(triangles * (2.0 / (upper - lower)), dtype=np.float64)


@functools.cache
def _hann_window() -> np.ndarray:
    """The periodic Hann window (torch.hann_window's default), which Whisper's STFT uses."""
    return np.asarray(0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT), dtype=np.float64)


def fit_to_model_window(audio: np.ndarray) -> np.ndarray:
    """Float32 audio of exactly 8 s: the *last* 8 s of ``audio`` (int16 or float in [-1, 1]), zero-padded at the
    start when shorter — the end of the utterance is what tells whether it is finished."""
    if audio.ndim != 1:
        raise ValueError(f"Smart-Turn takes mono audio as a 1-D array, got shape {audio.shape}")
    if audio.size == 0:
        raise ValueError("Smart-Turn got no audio: pass at least the utterance's last voiced samples")
    samples = audio.astype(np.float32) / 32768.0 if audio.dtype == np.int16 else audio.astype(np.float32)
    window = int(MAX_AUDIO_S * SAMPLE_RATE)
    samples = samples[-window:]
    return np.pad(samples, (window - samples.size, 0))


def log_mel_features(audio: np.ndarray) -> np.ndarray:
    """Whisper's log-mel spectrogram of 8 s of 16 kHz audio (from :func:`fit_to_model_window`): (80, 800) float32.

    The waveform is first scaled to zero mean and unit variance (the feature extractor Smart-Turn was trained with
    does that), then: centred STFT (reflect-padded, periodic Hann, 400-point FFT, hop 160), power spectrum, mel
    filterbank, log10, the dynamic range clamped to 80 dB below the loudest value, and scaled to about [-1, 1].
    """
    window = int(MAX_AUDIO_S * SAMPLE_RATE)
    if audio.shape != (window,):
        raise ValueError(f"log_mel_features needs exactly {window} samples (8 s at 16 kHz), got shape {audio.shape}")
    x = audio.astype(np.float32)
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    padded = np.pad(x.astype(np.float64), N_FFT // 2, mode="reflect")
    frames = sliding_window_view(padded, N_FFT)[::HOP]  # (801, 400): a view, no copy
    power = np.abs(np.fft.rfft(frames * _hann_window(), axis=-1)) ** 2  # (801, 201)
    mel = mel_filterbank() @ power.T  # (80, 801)
    log_mel = np.log10(np.maximum(mel, 1e-10))[:, :FEATURE_FRAMES]  # Whisper drops the centred STFT's extra frame
    log_mel = np.maximum(log_mel, log_mel.max() - 8.0)
    return np.asarray((log_mel + 4.0) / 4.0, dtype=np.float32)


# ------------------------------------------------------------------------------------------------ stream


class SmartTurn:
    """The Smart-Turn v3 model: audio of the caller's utterance in, P(turn complete) out.

    :meth:`probability` runs on the calling thread; :meth:`probability_async` runs it on this object's own
    single-worker thread so the event loop stays free. Close it with :meth:`close` (the VAD stage that owns it
    does so in ``stop()``).
    """

    def __init__(self, settings: SmartTurnSettings | None = None) -> None:
        self.settings = settings or SmartTurnSettings()
        path = self.settings.model_path or default_model_path()
        if not Path(path).is_file():
            raise FileNotFoundError(f"the Smart-Turn model file {path} does not exist (settings.model_path)")
        self.model_path = Path(path)
        self._session = _load_session(str(self.model_path), self.settings.threads)
        self._input_name: str = self._session.get_inputs()[0].name
        self._executor: ThreadPoolExecutor | None = inference_executor("smart-turn")

    @property
    def closed(self) -> bool:
        return self._executor is None

    def probability(self, audio: np.ndarray) -> float:
        """P(turn complete) for the utterance ending with the last sample of ``audio`` (16 kHz mono, int16 or float
        in [-1, 1]; only the last 8 s are used). Blocks for the inference: call it off the event loop."""
        return self.probability_from_features(log_mel_features(fit_to_model_window(audio)))

    def probability_from_features(self, features: np.ndarray) -> float:
        """The model alone, on :func:`log_mel_features` (for measuring the two parts apart)."""
        (output,) = self._session.run(None, {self._input_name: features[None]})
        return float(np.asarray(output).reshape(-1)[0])  # the graph ends in a sigmoid: already a probability

    async def probability_async(self, audio: np.ndarray) -> float:
        """:meth:`probability` on the model's thread; raises ``TimeoutError`` after ``settings.timeout_s``."""
        if self._executor is None:
            raise RuntimeError("this SmartTurn is closed")
        loop = asyncio.get_running_loop()
        answer = loop.run_in_executor(self._executor, self.probability, audio)
        return await asyncio.wait_for(answer, timeout=self.settings.timeout_s)

    # -------------------------------------------------------------------------------------------- cancel

    # An inference cannot be stopped half-way (onnxruntime has no cancel): a question nobody needs any more is
    # abandoned by its asker - the VAD ignores an answer about a silence that speech has since broken - and the
    # thread finishes it in the background, a few hundred ms later at most.

    # --------------------------------------------------------------------------------------------- close

    def close(self) -> None:
        """Stop the model's thread (a running inference finishes in the background; queued ones are dropped)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)


class UtteranceAudio:
    """The caller's most recent audio, kept for Smart-Turn: at most the model's 8 s, as the frames arrived.

    A deque of the frames' own ``bytes`` (no copy per frame); :meth:`since` joins them only when a question is
    asked. 8 s of 16 kHz int16 is 256 KB per call with Smart-Turn enabled.
    """

    def __init__(self, sample_rate: int = SAMPLE_RATE, max_s: float = MAX_AUDIO_S) -> None:
        self.sample_rate = sample_rate
        self._max_samples = round(max_s * sample_rate)
        self._frames: deque[tuple[int, bytes]] = deque()  # (pts of the first sample, pcm)
        self._samples = 0

    def append(self, pts: int, pcm: bytes) -> None:
        self._frames.append((pts, pcm))
        self._samples += len(pcm) // 2
        while self._frames and self._samples - len(self._frames[0][1]) // 2 >= self._max_samples:
            self._samples -= len(self._frames.popleft()[1]) // 2

    def since(self, pts: int) -> np.ndarray:
        """int16 audio from sample ``pts`` of the stream to the newest sample (as much of it as is kept)."""
        pieces = []
        for start, pcm in self._frames:
            samples = np.frombuffer(pcm, dtype=np.int16)
            end = start + samples.size
            if end > pts:
                pieces.append(samples[max(0, pts - start) :])
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int16)
