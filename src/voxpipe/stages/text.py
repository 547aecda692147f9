"""Cutting streamed LLM text into speakable chunks.

Time to first audio is dominated by how long the TTS waits for text, so the first chunk is cut at the first
clause boundary (a comma is enough) once it holds ``first_min_words`` words; later chunks are cut at sentence ends,
which gives the synthesiser better prosody at no cost in latency (audio is already playing by then).
"""

from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*\s")
_CLAUSE_END = re.compile(r"[,;:.!?]+[\"')\]]*\s")


class SpeakableChunker:
    """Feed LLM text deltas in; get speakable chunks out, in order, with nothing lost."""

    def __init__(self, first_min_words: int = 3, min_words: int = 4) -> None:
        self.first_min_words = first_min_words
        self.min_words = min_words
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
        pattern, min_words = (
            (_CLAUSE_END, self.first_min_words) if self._emitted == 0 else (_SENTENCE_END, self.min_words)
        )
        for match in pattern.finditer(self._buffer):
            if len(self._buffer[: match.end()].split()) >= min_words:
                return match.end()
        return None
