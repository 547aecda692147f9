"""Cutting streamed LLM text into speakable chunks.

Time to first audio is dominated by how long the TTS waits for text, so the first chunk is cut at the first
clause boundary (a comma is enough) once it holds ``first_min_words`` words ("I'm sorry," "Of course,") — or, if
no boundary comes, at a word boundary after ``first_max_words`` words (Piper takes ~30 ms per word to its first
audio: a 19-word first clause costs ~560 ms, 8 words ~250 ms). Later chunks are cut at sentence ends, which gives
the synthesiser better prosody at no cost in latency (audio is already playing by then) — unless a sentence runs
past ``max_words`` words: then it is cut at its last clause boundary within them (or after ``max_words`` words if
it has none), so a long sentence of commas does not reach the TTS only at its end, after the audio before it ran out.

A clause mark ends a chunk when the space after it arrives, but the first chunk is cut as soon as a comma (or
``;:!?``) right after a word of letters ends the text so far: an LLM streams that space with the next word, one
token (35-65 ms of Gemma 3 270M here) later. After a digit it waits ("1,000"), and after a URL scheme or a word
that is not all letters ("https:", "example.com/search?": the URL goes on); a period always waits ("7.30").
A period ends nothing after a title ("Dr.", "Capt."), another abbreviation ("approx.", "Jan.", "e.g."), "No"
before a number ("room No. 5"), a list number ("Steps: 1. Open…", "…now. 2. Tap…") or an initial ("J. R. R.
Tolkien", "John F. Kennedy"). After dotted letters ("p.m.", "U.S.", "Ph.D."), a company or street suffix ("Inc.",
"Ave.") or a single capital after a lowercase word ("plan B.") it ends the sentence only if the next word starts
with a capital (or a digit). "I." always ends one.

Chinese and Japanese have no spaces: their full stop "。" and full-width exclamation and question marks end a
sentence, and their commas ("、" too), semicolons and colons a clause, with no space after them, as soon as the next
character shows that no closing quote follows (the first chunk's at once). The half-width marks do the same between
two CJK characters ("太好了!我们…"), as models often write them. Two of their characters count as one
word: about the length of a Chinese word, and of an English word in time to speak (a character is one syllable).
"""

from __future__ import annotations

import re

from voxpipe.pipeline.context import CJK_LETTERS

# Closing quotes and brackets may stand between a sentence's mark and the space after it.
_CLOSING = "\"')]”’»」』）】》"  # noqa: RUF001
_OPENING = "\"'(“‘«「『（【《"  # noqa: RUF001
_CJK = CJK_LETTERS  # kana and ideographs, written without spaces
_CLOSERS = f"[{re.escape(_CLOSING)}]*"
_NOT_CLOSER = f"(?=[^{re.escape(_CLOSING)}])"  # a CJK mark waits for the next character: "。」" stays together


def _boundary(marks: str, cjk_marks: str) -> re.Pattern[str]:
    """A run of ``marks`` and the space after it, or of ``cjk_marks`` (which need none), closing quotes between; or
    of ``marks`` between CJK characters, which need none either ("太好了!我们明天见": half-width marks in CJK text)."""
    # One mark first, as a plain character class, lets the regex engine skip to the marks: half the time of "[.!?]+"
    # on a sentence (this runs over the whole buffer on every token).
    spaced = rf"(?<=[{marks}])[{marks}]*{_CLOSERS}\s"
    unspaced = rf"(?<=[{cjk_marks}])[{cjk_marks}]*{_CLOSERS}{_NOT_CLOSER}"
    between_cjk = rf"(?<=[{_CJK}][{marks}])[{marks}]*{_CLOSERS}(?=[{_CJK}{re.escape(_OPENING)}])"
    return re.compile(rf"[{marks}{cjk_marks}](?:{spaced}|{unspaced}|{between_cjk})")


_SENTENCE_END = _boundary(".!?…", "。！？")  # noqa: RUF001
_CLAUSE_END = _boundary(",;:.!?…", "，、；：。！？")  # noqa: RUF001
# The first chunk is cut at once when one of these ends the text after a word.
_EARLY_MARKS = ",;:!?，、；：。！？"  # noqa: RUF001
_CJK_MARKS = "，、；：。！？"  # noqa: RUF001
# The last word before an early mark must be letters (not "1,000", "https:", "example.com/search?").
_WORD_THEN_MARK = re.compile(rf"[{re.escape(_OPENING)}]*([^\W\d_]+(?:['’-][^\W\d_]+)*)([,;:!?]+)")  # noqa: RUF001
_URL_SCHEMES = frozenset({"http", "https", "ftp", "mailto"})
_CJK_LETTER = re.compile(f"[{_CJK}]")
_WORD = re.compile(r"\S+\s")
# Text with CJK in it: a word is two CJK characters (with the marks after them), or a space-delimited word.
_WORD_OR_CJK_PAIR = re.compile(
    rf"[{_CJK}]{{1,2}}[^\s\w{re.escape(_OPENING)}]*|[^\s{_CJK}]*[^\W{_CJK}][^\s{_CJK}]*(?:\s|(?=[{_CJK}]))"
)
_SPOKEN_RUN = re.compile(rf"[{_CJK}]+|[^\s{_CJK}]*[^\W{_CJK}][^\s{_CJK}]*")
_LAST_WORD = re.compile(r"[\w.]+$")
_NEXT_WORD = re.compile(r"\s*(\S+)\s")
# Words whose period is part of them: cutting after one would make the TTS pause mid-sentence ("Dr. | Smith").
_ABBREVIATIONS = frozenset(
    {"mr", "mrs", "ms", "dr", "prof", "st", "mt", "jr", "sr", "vs", "e.g", "i.e", "approx", "dept", "est", "fig"}
    | {"gen", "col", "capt", "sgt", "lt", "maj", "gov", "rev"}
    | {"jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec"}
)
# These end names, and a name often ends a sentence ("…from Acme Inc. Then…"), so like dotted letters they end one
# only before a capital: a capitalised word going on with the name ("Acme Inc. CEO…") is rarer than that.
_NAME_SUFFIXES = frozenset({"inc", "ltd", "co", "corp", "llc", "ave", "rd", "blvd", "etc"})
# Dotted letters ("p.m", "U.S", "Ph.D", before their last period) end a sentence only when a capital or digit
# follows: "at 8 p.m. tonight" is one sentence, "at 8 p.m. Tomorrow we…" two.
_DOTTED_LETTERS = re.compile(r"(?:[^\W\d_]{1,2}\.)+[^\W\d_]{1,2}")
# Words after which a single capital is more likely an initial than a sentence's last word ("by J. Smith").
_BEFORE_NAMES = frozenset({"and", "or", "by", "with", "to", "for", "from", "of", "at", "as", "than", "like"})
_INITIAL = re.compile(rf"[{re.escape(_OPENING)}]*[^\W\d_]\.")


def _count_words(text: str) -> int:
    return len(text.split())


def _count_words_with_cjk(text: str) -> int:
    """Words in ``text``, two CJK characters counting as one."""
    return sum((len(run) + 1) // 2 if _CJK_LETTER.match(run) else 1 for run in _SPOKEN_RUN.findall(text))


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
        # Set by the reply's first CJK character; until then the words are counted the faster way, by spaces.
        self._count_words = _count_words
        self._word = _WORD

    def feed(self, delta: str) -> list[str]:
        """Add ``delta``; return the chunks that are now complete."""
        self._buffer += delta
        if self._word is _WORD and not delta.isascii() and _CJK_LETTER.search(delta):
            self._count_words, self._word = _count_words_with_cjk, _WORD_OR_CJK_PAIR
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
        words = list(self._word.finditer(self._buffer))  # the words the next one has begun after
        if len(words) <= self.max_words:
            return None
        within = words[self.max_words - 1].end()
        clauses = [end for end in self._ends(_CLAUSE_END, self.min_words) if end <= within]
        return clauses[-1] if clauses else within

    def _first_cut(self) -> int | None:
        ends = self._ends(_CLAUSE_END, self.first_min_words)
        if ends:
            return ends[0]
        if self._clause_mark_just_streamed() and self._count_words(self._buffer) >= self.first_min_words:
            return len(self._buffer)
        words = list(self._word.finditer(self._buffer))
        if len(words) > self.first_max_words:
            return words[self.first_max_words - 1].end()  # no clause boundary in sight: don't wait for one
        return None

    def _clause_mark_just_streamed(self) -> bool:
        """Whether the text so far ends with a clause mark that the word before it cannot go on past."""
        if not self._buffer or self._buffer[-1] not in _EARLY_MARKS:
            return False
        last = self._buffer.rsplit(maxsplit=1)[-1]
        if last[-1] in _CJK_MARKS:
            return _CJK_LETTER.fullmatch(last.rstrip(_CJK_MARKS)[-1:]) is not None
        word = _WORD_THEN_MARK.fullmatch(last)
        return word is not None and not (":" in word[2] and word[1].lower() in _URL_SCHEMES)

    def _ends(self, pattern: re.Pattern[str], min_words: int) -> list[int]:
        """Where ``pattern``'s boundaries end chunks of at least ``min_words`` words, skipping abbreviations."""
        return [
            match.end()
            for match in pattern.finditer(self._buffer)
            if not self._abbreviation_at(match) and self._count_words(self._buffer[: match.end()]) >= min_words
        ]

    def _abbreviation_at(self, match: re.Match[str]) -> bool:
        """Whether the period ``match`` ends belongs to the word before it (or may, until the next word comes)."""
        if match.group().rstrip() != ".":
            return False
        # From the last space: the same word (it has none in it), without trying every position before it.
        word = _LAST_WORD.search(self._buffer, self._buffer.rfind(" ", 0, match.start()) + 1, match.start())
        if word is None:
            return False
        text = word.group()
        lowered = text.lower()
        if lowered in _ABBREVIATIONS:
            return True
        if lowered in _NAME_SUFFIXES or _DOTTED_LETTERS.fullmatch(text):
            after = self._next_text(match.end())
            return not after or after[0].islower()  # nothing yet: undecided, so no cut until the next word comes
        if lowered == "no":  # "room No. 5", but "The answer is no. Sorry."
            after = self._next_text(match.end())
            return not after or after[0].isdigit()
        if len(text) == 1 and text.isupper() and text != "I":
            return self._initial_at(word, match)
        if len(text) <= 2 and text.isascii() and text.isdigit():
            return self._list_number_at(word)
        return False

    def _next_text(self, start: int) -> str:
        """The text after ``start``, from the next word's first letter (past any opening quote)."""
        return self._buffer[start:].lstrip().lstrip(_OPENING)

    def _initial_at(self, letter: re.Match[str], period: re.Match[str]) -> bool:
        """Whether a single capital is an initial ("J. R. R. Tolkien") rather than a sentence's end ("plan B. It")."""
        before = self._buffer[: letter.start()]
        previous = before.split()[-1] if before[-1:].isspace() and not before.isspace() else ""
        if not (previous.isalpha() and previous[0].islower()) or previous in _BEFORE_NAMES:
            return True  # after a name, a title, a sentence's end or a comma: "John F. Kennedy", "Of course, J. Smith"
        after = _NEXT_WORD.match(self._buffer, period.end())
        if after is None:
            return True  # undecided until the next word is whole: "K" may still become "K."
        following = after[1].lstrip(_OPENING)
        return not following[:1].isupper() or _INITIAL.fullmatch(after[1]) is not None

    def _list_number_at(self, number: re.Match[str]) -> bool:
        """Whether a 1-2 digit number is a list's marker: it starts the text, a line or follows a sentence's end."""
        before = self._buffer[: number.start()]
        text_before = before.rstrip()
        if text_before == before:
            return False  # "(3." or "x3.": not a word of its own
        return not text_before or "\n" in before[len(text_before) :] or text_before.rstrip(_CLOSING)[-1:] in ".!?:…"
