"""Cutting streamed LLM text into speakable chunks.

Time to first audio is dominated by how long the TTS waits for text, so the first chunk is cut at the first
clause boundary (a comma is enough) once it holds ``first_min_words`` words ("I'm sorry," "Of course,") — or, if
no boundary comes, at a word boundary after ``first_max_words`` words (Piper takes ~30 ms per word to its first
audio: a 19-word first clause costs ~560 ms, 8 words ~250 ms). Later chunks are cut at sentence ends, which gives
the synthesiser better prosody at no cost in latency (audio is already playing by then) — unless a sentence runs
past ``max_words`` words: then it is cut at its last clause boundary within them (or after ``max_words`` words if
it has none), so a long sentence of commas does not reach the TTS only at its end, after the audio before it ran out.

A clause mark ends a chunk when the space after it arrives, but the first chunk is cut as soon as a comma (or
``;:!?``) right after a letter ends the text so far: an LLM streams that space with the next word, one token
(35-65 ms of Gemma 3 270M here) later. After a digit it waits ("1,000"); a period always waits ("7.30"). A period
after a title ("Dr.", "Mrs."), "e.g."/"i.e."/"vs." or a single capital letter ("J. Smith") ends nothing, nor
does the last period of dotted letters ("p.m.", "U.S.") unless the next word starts with a capital or a digit.
"""

from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*\s")
_CLAUSE_END = re.compile(r"[,;:.!?]+[\"')\]]*\s")
_CLAUSE_AT_END = re.compile(r"[^\W\d_][,;:!?]+$")  # a clause mark just streamed, after a word (not a number)
_WORD = re.compile(r"\S+\s")
_LAST_WORD = re.compile(r"[\w.]+$")
# Words whose period is part of them: cutting after one would make the TTS pause mid-sentence ("Dr. | Smith").
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "st", "mt", "jr", "sr", "vs", "e.g", "i.e"})
# Dotted letters ("p.m", "U.S", before their last period) end a sentence only when a capital or digit follows:
# "at 8 p.m. tonight" is one sentence, "at 8 p.m. Tomorrow we…" two.
_DOTTED_LETTERS = re.compile(r"(?:[^\W\d_]\.)+[^\W\d_]")


class SpeakableChunker:
    """Feed LLM text deltas in; get speakable chunks out, in order, with nothing lost."""

    def __init__(
        self, first_min_words: int = 2, min_words: int = 4, first_max_words: int = 8, max_words: int = 20
    ) -> None:
        if not 0 < first_min_words <= first_max_words or not 0 < min_words <= max_words:
            raise ValueError(
                "SpeakableChunker needs 0 < first_min_words <= first_max_words and 0 < min_words <= max_words, got "
                f"{first_min_words}, {first_max_words}, {min_words}, {max_words}"
            )
        self.first_min_words = first_min_words
        self.first_max_words = first_max_words
        self.min_words = min_words
        self.max_words = max_words
        self._buffer = ""
        self._emitted = 0

    def feed(self, delta: str) -> list[str]:
        """Add ``delta``; return the chunks that are now complete."""
        self._buffer += delta
        chunks: list[str] = []
        while True:
            cut = self._find_cut()
            if cut is None:
                return chunks
            chunk, self._buffer = self._buffer[:cut].strip(), self._buffer[cut:]
            if chunk:
                chunks.append(chunk)
                self._emitted += 1

    def flush(self) -> str:
        """Whatever is left at the end of the reply."""
        rest, self._buffer = self._buffer.strip(), ""
        return rest

    def _find_cut(self) -> int | None:
        if self._emitted == 0:
            return self._first_cut()
        ends = self._ends(_SENTENCE_END, self.min_words)
        if ends:
            return ends[0]
        words = list(_WORD.finditer(self._buffer))
        if len(words) <= self.max_words:
            return None
        within = words[self.max_words - 1].end()
        clauses = [end for end in self._ends(_CLAUSE_END, self.min_words) if end <= within]
        return clauses[-1] if clauses else within

    def _first_cut(self) -> int | None:
        ends = self._ends(_CLAUSE_END, self.first_min_words)
        if ends:
            return ends[0]
        if _CLAUSE_AT_END.search(self._buffer) and len(self._buffer.split()) >= self.first_min_words:
            return len(self._buffer)
        words = list(_WORD.finditer(self._buffer))
        if len(words) > self.first_max_words:
            return words[self.first_max_words - 1].end()  # no clause boundary in sight: don't wait for one
        return None

    def _ends(self, pattern: re.Pattern[str], min_words: int) -> list[int]:
        """Where ``pattern``'s boundaries end chunks of at least ``min_words`` words, skipping abbreviations."""
        return [
            match.end()
            for match in pattern.finditer(self._buffer)
            if not self._abbreviation_at(match) and len(self._buffer[: match.end()].split()) >= min_words
        ]

    def _abbreviation_at(self, match: re.Match[str]) -> bool:
        if match.group().rstrip() != ".":
            return False
        word = _LAST_WORD.search(self._buffer, 0, match.start())
        if word is None:
            return False
        text = word.group()
        if text.lower() in _ABBREVIATIONS or (len(text) == 1 and text.isupper()):
            return True
        if _DOTTED_LETTERS.fullmatch(text):
            after = self._buffer[match.end() :].lstrip()
            return not after or after[0].islower()  # nothing yet: undecided, so no cut until the next word comes
        return False
