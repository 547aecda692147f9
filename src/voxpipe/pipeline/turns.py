"""The turn policy: when caller speech over the bot becomes an interrupt, and when it is ignored."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Letters and digits of any script ("Здравствуйте", "Café", "你好"), joined by inner apostrophes and hyphens
# ("don't", "uh-huh"); ``[^\W_]`` is \w without the underscore.
_WORD = re.compile(r"[^\W_]+(?:['-][^\W_]+)*")

DEFAULT_BACKCHANNELS: frozenset[str] = frozenset(
    {"uh-huh", "mm-hmm", "mhm", "mm", "hmm", "yeah", "yep", "yes", "right", "okay", "ok", "sure", "uh", "um", "ah"}
)


def words_of(text: str) -> list[str]:
    """Lower-case words of ``text`` in any script, punctuation dropped (hyphenated backchannels such as uh-huh kept
    whole; a typographic apostrophe is read as ``'``)."""
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def backchannel_word(entry: str) -> str:
    """``entry`` as the one word a backchannel is matched as; ValueError unless it is exactly one word."""
    words = words_of(entry)
    if len(words) != 1:
        raise ValueError(
            f"backchannel {entry!r} is not one word: backchannels are single words, matched one at a time "
            "(list 'got it' as 'got' and 'it' only if each alone should never interrupt)"
        )
    return words[0]


# What the reasoner is told when a barge-in cut the bot off but the caller then said nothing (a noise long enough to
# interrupt, a partial transcript the final took back): without it the bot would stay silent until the caller speaks.
DEFAULT_RESUME_PROMPT = (
    "(The caller started to speak, then said nothing. Carry on from where you were cut off, without repeating what "
    "they already heard.)"
)


@dataclass(frozen=True, slots=True)
class TurnPolicy:
    """Decides whether caller speech while the bot is talking is a barge-in.

    * ``min_speech_ms`` — the caller must have been speaking this long (filters coughs and clicks);
    * ``min_words`` — and the transcript so far must hold this many words that are not backchannels
      (0 interrupts on duration alone, before any transcript);
    * ``backchannels`` — words that alone never interrupt ("uh-huh", "yeah"): an utterance made only of them,
      spoken over the bot, is neither an interrupt nor a turn;
    * ``resume_prompt`` — after a barge-in whose utterance ends with no words (a false interruption), the bot is
      asked to carry on with this note as the caller's side of the turn (never kept in the conversation); None
      leaves the line silent until the caller speaks again.
    """

    min_speech_ms: float = 300.0
    min_words: int = 1
    backchannels: frozenset[str] = DEFAULT_BACKCHANNELS
    resume_prompt: str | None = DEFAULT_RESUME_PROMPT

    def __post_init__(self) -> None:
        if self.min_speech_ms < 0:
            raise ValueError(f"TurnPolicy.min_speech_ms must be >= 0, got {self.min_speech_ms}")
        if self.min_words < 0:
            raise ValueError(f"TurnPolicy.min_words must be >= 0, got {self.min_words}")
        if self.resume_prompt is not None and not self.resume_prompt.strip():
            raise ValueError("TurnPolicy.resume_prompt must hold some text, or be None to resume nothing")
        # Matched against words_of(transcript): each entry must be one such word ("Yeah" is "yeah").
        object.__setattr__(self, "backchannels", frozenset(backchannel_word(entry) for entry in self.backchannels))

    def content_words(self, text: str) -> list[str]:
        """The words of ``text`` that are not backchannels."""
        return [w for w in words_of(text) if w not in self.backchannels]

    def is_barge_in(self, speech_s: float, transcript: str) -> bool:
        """True when ``speech_s`` seconds of caller speech with this ``transcript`` should cut the bot off."""
        if speech_s * 1000 < self.min_speech_ms:
            return False
        return len(self.content_words(transcript)) >= self.min_words

    def is_turn(self, transcript: str, over_bot: bool) -> bool:
        """True when a finished utterance is a turn the bot should answer."""
        if over_bot:
            return len(self.content_words(transcript)) >= max(self.min_words, 1)
        return bool(words_of(transcript))

    def resumes_after(self, transcript: str) -> bool:
        """True when the bot, cut off by an utterance that ended with ``transcript``, should carry on: the
        utterance held no words at all (one with words is a turn, or backchannels, which never cut the bot off
        unless ``min_words`` is 0 — then they are a turn too)."""
        return self.resume_prompt is not None and not words_of(transcript)
