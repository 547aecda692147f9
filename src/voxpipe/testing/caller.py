"""The scripted caller: speaks a script into a simulated call, reacting to the bot like a person would.

A script is a list of steps. :class:`Say` speaks a line ``pause`` seconds after the bot finished answering the
previous one — or, with ``barge_in``, that many seconds into the bot's reply, cutting it off. :class:`Noise`
makes a cough-like sound; :class:`Silence` waits. After the last step the caller waits for the bot's answer and
hangs up. Lines are spoken as audible speech-like audio (or a given WAV file), and every word's time on the clock
is logged in :attr:`ScriptedCaller.spoken`, which is what :class:`~voxpipe.testing.ScriptedSTT` "recognises".
"""

from __future__ import annotations

import enum
import math
import wave
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr

from voxpipe.measure import voiced_segments
from voxpipe.pipeline import TranscriptWord
from voxpipe.testing.signals import WordSpan, cough, speechlike
from voxpipe.testing.vad import VOICED_LEVEL


@dataclass(frozen=True)
class Say:
    """Speak ``text`` (as speech-like audio, or the mono/stereo WAV ``wav`` if given)."""

    text: str
    pause: float = 0.8
    barge_in: float | None = None
    wav: str | Path | None = None


@dataclass(frozen=True)
class Noise:
    """A cough-like noise burst: must not interrupt the bot or start a turn."""

    duration: float = 0.18
    pause: float = 0.8
    during_reply: float | None = None  # seconds into the bot's next reply, like barge_in


@dataclass(frozen=True)
class Silence:
    """Say nothing for ``seconds``."""

    seconds: float


Step = Say | Noise | Silence

Voice = Callable[[str, int], tuple[np.ndarray, list[WordSpan] | None]]
"""Speaks a line: ``voice(text, sample_rate) -> (int16 audio, word spans or None)``; see ``testing.speech``."""


def load_wav(path: str | Path, sample_rate: int) -> np.ndarray:
    """A WAV file as mono int16 at ``sample_rate`` (stereo is mixed down, other rates resampled with soxr)."""
    path = Path(path)
    try:
        with wave.open(str(path), "rb") as wav:
            channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            raw = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as exc:
        raise ValueError(f"{path}: not a readable PCM WAV file ({exc})") from exc
    if width != 2:
        raise ValueError(f"{path}: only 16-bit PCM WAV is supported, this one has {8 * width}-bit samples")
    samples = np.frombuffer(raw, dtype=np.int16).reshape(-1, channels).astype(np.float32)
    mono = samples.mean(axis=1)
    if rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate)
    return np.clip(mono, -32768, 32767).astype(np.int16)


def voiced_span(audio: np.ndarray, sample_rate: int) -> tuple[int, int] | None:
    """``(first, end)``: the first voiced sample of ``audio`` and the end of its last (exclusive), voiced as the
    ScriptedVAD and ``voxpipe.measure`` count it; None if no sample is."""
    segments = voiced_segments(audio, sample_rate, VOICED_LEVEL, min_gap_s=math.inf)  # every pause bridged: one
    if not segments:
        return None
    first, last = segments[0]
    return first, last + 1


class _State(enum.Enum):
    WAITING = "waiting"  # until _next_at, then the next step
    SPEAKING = "speaking"  # until the step's last voiced sample; the silence after it still plays, in any state
    AWAIT_REPLY = "await-reply"  # a line was said; waiting for the bot to start answering
    LISTENING = "listening"  # the bot is answering; waiting for it to finish
    HUNG_UP = "hung-up"


class ScriptedCaller:
    """Plays ``script`` into a simulated call (implements ``CallerSource``).

    ``f0`` is the caller's pitch and ``rate`` the speaking rate, so the caller sounds unlike the scripted bot.
    """

    def __init__(
        self,
        script: list[Step],
        sample_rate: int = 16000,
        *,
        f0: float = 125.0,
        rate: float = 1.0,
        reply_timeout: float = 10.0,
        hangup_after: float = 0.6,
        voice: Voice | None = None,
    ) -> None:
        if not script:
            raise ValueError("ScriptedCaller: the script is empty — give it at least one Say step")
        self.sample_rate = sample_rate
        self.f0 = f0
        self.rate = rate
        self.reply_timeout = reply_timeout
        self.hangup_after = hangup_after
        self.voice = voice
        self.spoken: list[TranscriptWord] = []
        self.lines: list[tuple[float, float, str]] = []  # (start, end, text) of every line spoken
        self._steps: deque[Step] = deque(script)
        self._state = _State.WAITING
        self._next_at = 0.0
        self._deadline = 0.0
        self._audio = np.zeros(0, dtype=np.int16)
        self._played = 0
        self._step_end = 0  # the sample of _audio at which the step is over
        self._bot_speaking = False
        self._step: Step | None = None
        # Render every line now: synthesising a line (Piper takes ~0.1-3 s) inside a tick would stall the call.
        self._rendered: dict[int, tuple[np.ndarray, list[WordSpan] | None]] = {
            id(step): self._render(step) for step in script if isinstance(step, Say | Noise)
        }
        self._free(0.0)

    # ------------------------------------------------------------------------------ the script

    @staticmethod
    def _offset(step: Step) -> float | None:
        """Seconds into the bot's reply at which ``step`` cuts in, or None for a step that waits its turn."""
        if isinstance(step, Say):
            return step.barge_in
        if isinstance(step, Noise):
            return step.during_reply
        return None

    def _free(self, at: float) -> None:
        """The caller has nothing to wait for since ``at``: schedule the next step (or hang up)."""
        if not self._steps:
            self._state, self._next_at = _State.WAITING, at + self.hangup_after
            return
        step = self._steps[0]
        if self._bot_speaking and self._offset(step) is None:
            self._state, self._deadline = _State.LISTENING, at + 6 * self.reply_timeout
            return
        pause = step.seconds if isinstance(step, Silence) else step.pause
        self._state, self._next_at = _State.WAITING, at + pause

    def _render(self, step: Say | Noise) -> tuple[np.ndarray, list[WordSpan] | None]:
        if isinstance(step, Noise):
            return cough(self.sample_rate, step.duration), None
        if step.wav is not None:
            return load_wav(step.wav, self.sample_rate), None
        if self.voice is not None:
            return self.voice(step.text, self.sample_rate)
        return speechlike(step.text, self.sample_rate, f0=self.f0, rate=self.rate)

    def _begin_step(self, start: float) -> None:
        step = self._step = self._steps.popleft()
        if isinstance(step, Silence):
            self._free(start)
            return
        self._audio, spans = self._rendered[id(step)]
        self._step_end = len(self._audio)
        if isinstance(step, Say):
            # A line is said once its voice stops: a recording's (or Piper's) trailing silence plays on, but a reply
            # that starts in it answers the line. Its leading silence holds none of its words either.
            voiced = voiced_span(self._audio, self.sample_rate) or (0, len(self._audio))
            self._step_end = voiced[1]
            self._log_line(start, step.text, spans, voiced)
        self._played = 0
        self._state = _State.SPEAKING

    def _log_line(self, start: float, text: str, spans: list[WordSpan] | None, voiced: tuple[int, int]) -> None:
        sr = self.sample_rate
        self.lines.append((start, start + len(self._audio) / sr, text))
        words = text.split()
        if spans is None:  # a recording, or a voice without word times: spread the words evenly over its voice
            n = max(1, len(words))
            first, end = voiced
            per_word = (end - first) / sr / n
            voice_start = start + first / sr
            self.spoken += [
                TranscriptWord(w, voice_start + i * per_word, voice_start + (i + 1) * per_word)
                for i, w in enumerate(words)
            ]
        else:
            self.spoken += [TranscriptWord(s.word, start + s.start / sr, start + s.end / sr) for s in spans]

    def _end_step(self, at: float) -> None:
        if isinstance(self._step, Say):
            self._state, self._deadline = _State.AWAIT_REPLY, at + self.reply_timeout
            self._said_at = at
        else:
            self._free(at)

    # --------------------------------------------------------------------------- CallerSource

    @property
    def finished(self) -> bool:
        return self._state is _State.HUNG_UP

    def audio(self, start: float, samples: int) -> bytes:
        state = self._state
        if state in (_State.AWAIT_REPLY, _State.LISTENING) and start >= self._deadline:
            self._bot_speaking = False  # the bot never answered, or never stopped: carry on
            self._free(start)
        elif state is _State.WAITING and start >= self._next_at:
            if self._steps:
                self._begin_step(start)
            else:
                self._state = _State.HUNG_UP
        # What is left of the step's audio plays on after the step is over (the silence after a line's voice), until
        # the next step's audio replaces it.
        chunk = self._audio[self._played : self._played + samples]
        before, self._played = self._played, self._played + len(chunk)
        if self._state is _State.SPEAKING and self._played >= self._step_end:
            self._end_step(start + (self._step_end - before) / self.sample_rate)
        if len(chunk) < samples:
            chunk = np.concatenate([chunk, np.zeros(samples - len(chunk), dtype=np.int16)])
        return chunk.tobytes()

    def bot_started(self, at: float) -> None:
        self._bot_speaking = True
        if self._state is _State.AWAIT_REPLY and at >= self._said_at:
            offset = self._offset(self._steps[0]) if self._steps else None
            if offset is not None:
                self._state, self._next_at = _State.WAITING, at + offset
            else:
                self._state, self._deadline = _State.LISTENING, at + 6 * self.reply_timeout

    def bot_stopped(self, at: float, interrupted: bool) -> None:
        self._bot_speaking = False
        if self._state is _State.LISTENING:
            self._free(at)

    # ------------------------------------------------------------------------------ ground truth

    def words_between(self, start: float, end: float) -> list[TranscriptWord]:
        """Words spoken (fully) within ``[start, end]`` — what a perfect recogniser would return."""
        return [w for w in self.spoken if w.start >= start - 1e-9 and w.end <= end + 1e-9]
