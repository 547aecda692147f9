"""Silero VAD (v6) on onnxruntime - the embedded default VAD - with optional Smart-Turn v3 endpointing.

The model is ``silero_vad_v6.onnx`` as the ``faster-whisper`` package ships it (no torch: the ``silero-vad``
package hard-requires it). One run scores one 32 ms window (512 samples at 16 kHz, plus the previous window's last
64 samples as context) and carries an LSTM state to the next. Any Silero ONNX file is accepted: both graph
signatures in circulation, ``(input, h, c)`` as faster-whisper ships it and ``(input, state, sr)`` as silero-vad
and pipecat-ai ship it. One onnxruntime session per file serves every call in the process; a call keeps only its
own state, and ``start()`` resets it.

Frames and windows. Caller frames are 20 ms (320 samples) and windows 32 ms, so a frame completes zero, one or two
windows. A window's probability becomes voiced/silent with hysteresis (voiced from ``start_threshold``, silent again
below ``stop_threshold``). Silero says *whether* there is speech; *where* it starts and ends inside the voiced
windows is set by the samples louder than ``voiced_level`` (-40 dBFS, the level ``voxpipe.measure`` uses for the
call's ground truth). Without that, the stop's ``last_voiced_at`` would land 60-80 ms after the last audible sample
(Silero stays confident through a word's fading tail: measured on Piper speech), and every turn's endpointing would
be that much longer and its trace that much off the recording; with it, the last voiced sample is exact on clean
speech. A voiced window with no loud sample still counts before speech-start (keeps the run alive) and after 200 ms
without a loud sample (a quiet caller). The end of a frame whose window is not complete yet keeps the last window's
verdict. A start is stamped at most one frame late (~12 ms: a window that began in the previous frame is clamped to
this one, as ``Voicing`` offsets lie inside the frame). Runs of digital silence skip the model (and reset its
state, as at a stream's start): a muted or scripted call costs ~20 us per frame instead of ~280 us (loaded
machine).

Inline, not in a thread. A window takes ~95-110 us on an idle core (DESIGN section 9) and 230-330 us median on
this 2-core machine while it ran two other test suites (``benchmarks/vad.py``). Through ``run_in_executor`` the event
loop's own share per window drops (70 us against 150 us of loop CPU, same loaded run), but each window then takes
370 us of wall time instead of 230 us, and the verdict arrives after its frame: awaiting it in :meth:`analyse`'s
caller would hold the metronome tick that delivers every call's frame (``pacing.py``: tick handlers must not wait
on anything slow) - n calls x 370 us in series per tick - and a worker task of its own would put a queue hop on
every frame and decide on audio that has already moved on. At about the cost of a thread hop per window, inline is
the simpler and per call the cheaper choice. A thread pays only batched: one hop per tick for every call's windows.

Batching across sessions: not built, on this measurement. faster-whisper's graph cannot batch streams (its LSTM
state is fixed at batch 1; its first axis is time). pipecat-ai's graph can: per stream-window it costs 120 us at
batch 64 against 333 us single-stream in the same loaded run (DESIGN: ~55 against ~94 us idle). At idle figures that
saves ~1.2 ms of CPU per call-second, 0.1 % of a core. On the embedded stack that is noise - whisper tiny.en alone
takes ~8 % of a core per talking caller, so a core carries ~10 embedded calls and their VAD ~3 % of it. It would
pay with cloud STT/LLM/TTS and local VAD at hundreds of calls per core (~340 calls per core of VAD single-stream,
~580 batched, idle figures), and then needs pipecat-ai's graph (a ~500 MB install) and a ``VADStage`` that accepts a
verdict one metronome tick after its frame. The figures are printed by ``benchmarks/vad.py``.

Smart-Turn. With ``end_of_turn`` set, the stage asks Smart-Turn v3 (``smart_turn.py``) once the caller has been
silent ``silence_ms``; a "complete" answer ends the turn then, otherwise ``stop_ms`` does. The model answers on its
own thread; under a :class:`~voxpipe.pipeline.VirtualClock` virtual time holds still until the answer is back, so a
simulated call stays reproducible (the inference takes no virtual time, as all computation there).
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from voxpipe.config.registry import Package
from voxpipe.pipeline import (
    AudioFormat,
    AudioFormatError,
    AudioFrame,
    Direction,
    Frame,
)
from voxpipe.stages.smart_turn import MODEL_PACKAGE as SMART_TURN_PACKAGE
from voxpipe.stages.smart_turn import SmartTurn, SmartTurnSettings, UtteranceAudio
from voxpipe.stages.vad import VADStage, Voicing

log = logging.getLogger("voxpipe.stages.silero_vad")

SAMPLE_RATE = 16000  # the graph also knows 8 kHz, but voxpipe resamples to 16 kHz with a Resample stage instead
WINDOW = 512  # samples per Silero window at 16 kHz (32 ms)
CONTEXT = 64  # samples of the previous window prepended to each window
QUIET_SPEECH_S = 0.2  # voiced windows with no loud sample count as speech after this long (see _voicing_in_frame)
MODEL_PACKAGE = "faster_whisper"
MODEL_FILE = "assets/silero_vad_v6.onnx"

# ------------------------------------------------------------------------------------------------ settings


class SileroVADSettings(BaseModel):
    """Silero VAD settings; ``end_of_turn`` switches Smart-Turn v3 endpointing on."""

    model_config = ConfigDict(extra="forbid")

    start_threshold: float = Field(
        default=0.5, gt=0, lt=1, description="speech probability at or above which a 32 ms window becomes voiced"
    )
    stop_threshold: float = Field(
        default=0.35,
        gt=0,
        lt=1,
        description="a voiced run continues until a window scores below this (<= start_threshold)",
    )
    start_ms: float = Field(default=60.0, ge=0, le=2000, description="speech needed before speech-start is reported")
    stop_ms: float = Field(
        default=500.0,
        gt=0,
        le=10000,
        description="silence that ends a turn (with end_of_turn: for turns judged incomplete)",
    )
    voiced_level: float = Field(
        default=0.01,
        ge=0,
        lt=1,
        description="in voiced windows, where speech starts and ends is set by samples louder than this (of full "
        "scale; 0.01 = -40 dBFS, the level voxpipe.measure uses): sharper than the 32 ms window",
    )
    model_path: Path | None = Field(
        default=None,
        description="Silero VAD ONNX file; default: silero_vad_v6.onnx shipped by the faster-whisper package",
    )
    end_of_turn: SmartTurnSettings | None = Field(
        default=None, description="Smart-Turn v3: end complete turns after a short silence (needs the smart-turn extra)"
    )

    @model_validator(mode="after")
    def _hysteresis_is_ordered(self) -> SileroVADSettings:
        if self.stop_threshold > self.start_threshold:
            raise ValueError(
                f"stop_threshold ({self.stop_threshold}) must be <= start_threshold ({self.start_threshold})"
            )
        if self.end_of_turn is not None and self.end_of_turn.silence_ms >= self.stop_ms:
            raise ValueError(
                f"end_of_turn.silence_ms ({self.end_of_turn.silence_ms}) must be < stop_ms ({self.stop_ms}): "
                "stop_ms would end every turn before Smart-Turn is asked"
            )
        return self


# -------------------------------------------------------------------------------------------------- load


def default_model_path() -> Path:
    """``silero_vad_v6.onnx`` from the installed faster-whisper package.

    ``find_spec`` locates the package without importing it: ``import faster_whisper`` loads ctranslate2, PyAV and
    tokenizers (~0.4 s, ~390 modules), which a call using a cloud recogniser should not pay for a file path.
    """
    hint = "install the package faster-whisper (pip install 'voxpipe[embedded]')"
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the Silero VAD model is missing: {hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"the Silero VAD model {path} is missing from faster-whisper: {hint}")
    return path


class SileroModel:
    """A loaded Silero graph: one window (with context) and a recurrent state in, P(speech) and the new state out.

    Hides the two graph signatures: ``(input, h, c)`` (faster-whisper's export) and ``(input, state, sr)``
    (silero-vad's own and pipecat-ai's).
    """

    def __init__(self, session: Any, path: Path) -> None:
        self.session = session
        names = {i.name for i in session.get_inputs()}
        if names == {"input", "h", "c"}:
            self.split_state = True
        elif names == {"input", "state", "sr"}:
            self.split_state = False
        else:
            raise ValueError(
                f"{path} is not a Silero VAD model: its inputs are {sorted(names)}, expected input/h/c or "
                "input/state/sr"
            )
        self._rate = np.array(SAMPLE_RATE, dtype=np.int64)
        zeros = np.zeros((1, 1, 128), np.float32)
        # Shared by every call: onnxruntime returns new state arrays and nothing writes into these.
        self._initial_state = (zeros, zeros) if self.split_state else (np.zeros((2, 1, 128), np.float32),)

    def initial_state(self) -> tuple[np.ndarray, ...]:
        return self._initial_state

    def run(self, window: np.ndarray, state: tuple[np.ndarray, ...]) -> tuple[float, tuple[np.ndarray, ...]]:
        """``window``: shape (1, CONTEXT + WINDOW) float32 in [-1, 1]."""
        if self.split_state:
            probability, h, c = self.session.run(None, {"input": window, "h": state[0], "c": state[1]})
            return float(probability.reshape(-1)[0]), (h, c)
        probability, new_state = self.session.run(None, {"input": window, "state": state[0], "sr": self._rate})
        return float(probability.reshape(-1)[0]), (new_state,)


@functools.lru_cache(maxsize=4)
def load_model(path: str) -> SileroModel:
    """One session per model file, shared by every call in the process: each call keeps only its own state."""
    try:
        import onnxruntime as ort
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError("Silero VAD needs onnxruntime: pip install 'voxpipe[embedded]'") from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # a window is too small to split; threads would only contend with the loop
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
        raise ValueError(f"{path} is not a loadable ONNX model: {exc}") from exc
    return SileroModel(session, Path(path))


# ------------------------------------------------------------------------------------------------ stream


class SileroVAD(VADStage):
    """Voice activity from Silero VAD v6, 16 kHz mono; optionally Smart-Turn v3 ends complete turns early.

    ``end_of_turn`` takes a :class:`SmartTurn` you own (e.g. one shared by many calls); otherwise
    ``settings.end_of_turn`` makes the stage load one of its own, closed in :meth:`stop`.
    """

    Settings: ClassVar[type[BaseModel]] = SileroVADSettings

    @classmethod
    def required_packages(cls, settings: SileroVADSettings) -> tuple[Package, ...]:
        """onnxruntime; without ``model_path``, faster-whisper, which ships the default model; with ``end_of_turn``
        but without its ``model_path``, pipecat-ai, which ships Smart-Turn's."""
        packages = [Package("onnxruntime", "onnxruntime", "embedded")]
        if settings.model_path is None:
            packages.append(Package(MODEL_PACKAGE, "faster-whisper", "embedded"))
        if settings.end_of_turn is not None and settings.end_of_turn.model_path is None:
            packages.append(Package(SMART_TURN_PACKAGE, "pipecat-ai", "smart-turn"))
        return tuple(packages)

    def __init__(
        self,
        settings: SileroVADSettings | None = None,
        *,
        audio: AudioFormat = AudioFormat(SAMPLE_RATE),
        name: str | None = None,
        end_of_turn: SmartTurn | None = None,
    ) -> None:
        settings = settings or SileroVADSettings()
        name = name or "vad"
        if audio != AudioFormat(SAMPLE_RATE, 1):
            raise AudioFormatError(
                f"stage {name!r} (Silero VAD) takes 16000 Hz mono audio, not {audio}; put a Resample(16000, 1) "
                "stage before it and build it with audio=AudioFormat(16000)"
            )
        if end_of_turn is not None and settings.end_of_turn is not None:
            raise ValueError(f"stage {name!r}: give end_of_turn either in settings or as a SmartTurn, not both")
        if end_of_turn is not None and end_of_turn.settings.silence_ms >= settings.stop_ms:
            # The settings' own check, for a SmartTurn given as an object.
            raise ValueError(
                f"stage {name!r}: end_of_turn.silence_ms ({end_of_turn.settings.silence_ms}) must be < stop_ms "
                f"({settings.stop_ms}): stop_ms would end every turn before Smart-Turn is asked"
            )
        super().__init__(audio, start_ms=settings.start_ms, stop_ms=settings.stop_ms, name=name)
        self.settings = settings
        path = Path(settings.model_path) if settings.model_path is not None else default_model_path()
        if not path.is_file():
            raise FileNotFoundError(f"stage {name!r}: the Silero VAD model file {path} does not exist")
        self.model = load_model(str(path.resolve()))
        self._level = int(settings.voiced_level * 32767)
        self._owns_end_of_turn = end_of_turn is None and settings.end_of_turn is not None
        self.end_of_turn = SmartTurn(settings.end_of_turn) if self._owns_end_of_turn else end_of_turn
        self._reset_stream()

    def _reset_stream(self) -> None:
        """Forget the previous call's audio: model state, window alignment, Smart-Turn questions."""
        self._state = self.model.initial_state()
        self._context = np.zeros(CONTEXT, np.float32)
        self._pending = np.zeros(0, np.float32)  # samples not yet scored: fewer than one window
        self._pending_pts = 0  # stream index of _pending[0]
        self._next_pts: int | None = None
        self._window_voiced = False  # the hysteresis state: the verdict of the last complete window
        self._last_loud: int | None = None  # stream index of the last voiced sample louder than voiced_level
        self._utterance = UtteranceAudio(SAMPLE_RATE)
        self._asked_about: int | None = None  # the index after the last voiced sample whose silence was asked about
        self._question: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await super().start()
        self._reset_stream()

    # -------------------------------------------------------------------------------- voice activity

    def analyse(self, frame: AudioFrame) -> Voicing | None:
        samples = np.frombuffer(frame.pcm, dtype=np.int16)
        if samples.size == 0:
            return None  # e.g. a resampler still filling its filter
        if frame.pts != self._next_pts:
            self._follow_timeline(frame.pts)
        self._next_pts = frame.pts + samples.size
        self._pending = np.concatenate((self._pending, samples.astype(np.float32) * np.float32(1 / 32768)))
        voiced_windows: list[tuple[int, int]] = []
        while self._pending.size >= WINDOW:
            window, self._pending = self._pending[:WINDOW], self._pending[WINDOW:]
            start, self._pending_pts = self._pending_pts, self._pending_pts + WINDOW
            if self._score(window):
                voiced_windows.append((start, start + WINDOW))
        if not voiced_windows and not self._window_voiced:
            return None  # the common case: silence
        return self._voicing_in_frame(frame.pts, samples, voiced_windows)

    def _follow_timeline(self, pts: int) -> None:
        """The frame does not start where the previous one ended. A small step (a resampler's output drifting
        around its input's pts) keeps the audio flowing into the same windows, re-anchored on this frame; the first
        frame or a real gap (lost audio) restarts the windows here."""
        if self._next_pts is not None and abs(pts - self._next_pts) < WINDOW:
            self._pending_pts = pts - self._pending.size
            return
        self._pending = np.zeros(0, np.float32)
        self._pending_pts = pts
        self._context = np.zeros(CONTEXT, np.float32)

    def _score(self, window: np.ndarray) -> bool:
        """Run one window through the model; returns the hysteresis verdict (voiced or not)."""
        if not self._window_voiced and not window.any():
            # Digital silence while silent: nothing to detect. Skipping the model makes scripted and muted calls
            # nearly free; resetting its state makes the speech after it score exactly as at a stream's start.
            self._state = self.model.initial_state()
            self._context = np.zeros(CONTEXT, np.float32)
            return False
        probability, self._state = self.model.run(np.concatenate((self._context, window))[None], self._state)
        self._context = window[-CONTEXT:]
        threshold = self.settings.stop_threshold if self._window_voiced else self.settings.start_threshold
        self._window_voiced = probability >= threshold
        return self._window_voiced

    def _voicing_in_frame(self, pts: int, samples: np.ndarray, voiced_windows: list[tuple[int, int]]) -> Voicing | None:
        """Where speech is in the frame: Silero says *whether* (per window), the samples' level says *where*.

        Spans under voiced windows that completed now count by their samples louder than ``voiced_level``; the
        frame's tail, in a window not complete yet, keeps the last window's verdict. A voiced span with no loud
        sample is Silero's confidence outlasting the audio (it stays high for ~60-80 ms after a word fades), so it
        counts only before speech-start (to keep the run alive) or after ``QUIET_SPEECH_S`` without a loud sample
        (a quiet caller, or soft speech that really continues).
        """
        size = samples.size
        spans = [(max(start - pts, 0), min(end - pts, size)) for start, end in voiced_windows]
        if self._window_voiced and self._pending_pts < pts + size:
            spans.append((max(self._pending_pts - pts, 0), size))
        claims = [claim for lo, hi in spans if lo < hi and (claim := self._claim(samples, pts, lo, hi)) is not None]
        if not claims:
            return None
        return Voicing(min(first for first, _ in claims), max(last for _, last in claims))

    def _claim(self, samples: np.ndarray, pts: int, lo: int, hi: int) -> tuple[int, int] | None:
        """The first and last voiced sample of the voiced span ``samples[lo:hi]`` (see :meth:`_voicing_in_frame`)."""
        loud = np.flatnonzero(np.abs(samples[lo:hi].astype(np.int32)) > self._level)
        if loud.size:
            self._last_loud = pts + lo + int(loud[-1])
            return lo + int(loud[0]), lo + int(loud[-1])
        quiet_for = pts + lo - self._last_loud if self._last_loud is not None else None
        if not self.speaking or quiet_for is None or quiet_for > QUIET_SPEECH_S * SAMPLE_RATE:
            return lo, lo
        return None

    # ----------------------------------------------------------------------------- end of turn (Smart-Turn)

    async def process(self, frame: Frame, direction: Direction) -> None:
        await super().process(frame, direction)
        if self.end_of_turn is not None and direction is Direction.DOWNSTREAM and isinstance(frame, AudioFrame):
            await self._consider_end_of_turn(frame, self.end_of_turn)

    async def _consider_end_of_turn(self, frame: AudioFrame, model: SmartTurn) -> None:
        """Ask Smart-Turn once per silence that has lasted ``silence_ms``, one question at a time."""
        self._utterance.append(frame.pts, frame.pcm)
        last_voiced, utterance_start = self._last_voiced, self._run_start
        if not self.speaking or last_voiced is None or utterance_start is None:
            return
        silence = frame.pts + frame.samples - last_voiced  # in samples, as the base class counts stop_ms
        enough = round(model.settings.silence_ms / 1000 * SAMPLE_RATE)
        if silence < enough or last_voiced == self._asked_about or self._question is not None:
            return
        self._asked_about = last_voiced
        audio = self._utterance.since(utterance_start - round(model.settings.pre_speech_ms / 1000 * SAMPLE_RATE))
        self._question = self.spawn(self._ask(model, audio, last_voiced), name=f"{self.name}-smart-turn")

    async def _ask(self, model: SmartTurn, audio: np.ndarray, last_voiced: int) -> None:
        """Ask the model about the silence after sample ``last_voiced`` (on its thread), then act on it.

        The model is an optimisation: when it fails or is slow, the turn still ends, at ``stop_ms``.
        """
        try:
            probability = await model.probability_async(audio)
        except TimeoutError:
            timeout = model.settings.timeout_s
            log.warning("%s: Smart-Turn gave no answer in %.1f s; stop_ms will end the turn", self.name, timeout)
            return
        except Exception:
            log.exception("%s: Smart-Turn failed; stop_ms will end the turn", self.name)
            return
        finally:
            self._question = None
        await self._end_turn_if_complete(probability, last_voiced, model)

    async def _end_turn_if_complete(self, probability: float, last_voiced: int, model: SmartTurn) -> None:
        """End the turn now if the model says it is complete and the caller is still silent since ``last_voiced``."""
        at = last_voiced / SAMPLE_RATE
        log.debug("%s: P(turn complete) = %.3f after the sample at %.3f s", self.name, probability, at)
        still_silent = self.speaking and self._last_voiced == last_voiced
        if probability < model.settings.complete_threshold or not still_silent:
            return
        await self.stop_speaking(last_voiced)  # the base class's own stop, taken before stop_ms

    # --------------------------------------------------------------------------------------------- close

    async def stop(self) -> None:
        question, self._question = self._question, None
        if question is not None:
            question.cancel()  # the pipeline would too; the answer is no longer wanted
        if self._owns_end_of_turn and self.end_of_turn is not None:
            self.end_of_turn.close()
        await super().stop()
