"""The speakable-chunk cutter between the reasoner and the voice (``voxpipe.stages.text``)."""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voxpipe.stages.text import SpeakableChunker


def chunk_by_words(text: str, chunker: SpeakableChunker | None = None) -> list[str]:
    """Stream ``text`` a word at a time, as an LLM's tokens arrive."""
    chunker = chunker or SpeakableChunker()
    chunks: list[str] = []
    for token in text.split(" "):
        chunks += chunker.feed(token + " ")
    rest = chunker.flush()
    return chunks + ([rest] if rest else [])


def test_the_first_clause_is_cut_early_and_later_chunks_at_sentence_ends():
    text = "Sure, I can do that. Your table is booked for eight! Anything else? Bye"
    chunks = chunk_by_words(text)
    assert chunks == ["Sure, I can do that.", "Your table is booked for eight!", "Anything else? Bye"]


def test_the_first_chunk_does_not_wait_forever_for_a_clause_mark():
    text = "I would be very happy to help you book a table for your family tonight"
    chunks = chunk_by_words(text, SpeakableChunker(first_max_words=8))
    assert chunks[0] == "I would be very happy to help you"
    assert " ".join(chunks) == text


def test_a_long_sentence_of_commas_is_cut_at_its_last_clause_within_max_words():
    first = "Of course, here is the menu."
    long = (
        "We have pasta with tomatoes and basil, risotto with mushrooms and a little truffle, grilled fish with "
        "lemon and capers, and a tiramisu that people drive across town for"
    )
    chunks = chunk_by_words(f"{first} {long}", SpeakableChunker(max_words=12))
    assert chunks == [
        "Of course,",
        "here is the menu.",
        "We have pasta with tomatoes and basil,",
        "risotto with mushrooms and a little truffle,",
        "grilled fish with lemon and capers,",
        "and a tiramisu that people drive across town for",
    ]


def test_a_long_sentence_without_any_clause_mark_is_cut_after_max_words():
    words = [f"w{n}" for n in range(30)]
    chunks = chunk_by_words("Yes, right. " + " ".join(words), SpeakableChunker(max_words=10))
    assert chunks[:3] == ["Yes, right.", " ".join(words[:10]), " ".join(words[10:20])]


@pytest.mark.parametrize(
    "text",
    [
        "Hello there, Dr. Smith will see you at noon today.",
        "Thank you. Mrs. Jones and Mr. Brown booked the table for seven people tonight.",
        "Certainly. Pick a starter, e.g. the soup or the salad, and then a main course.",
        "Of course. J. R. Tolkien wrote it, and it is a very long book indeed.",
    ],
)
def test_a_period_after_a_title_or_an_initial_ends_nothing(text):
    chunks = chunk_by_words(text)
    for abbreviation in ("Dr.", "Mrs.", "Mr.", "e.g.", "J.", "R."):
        assert not any(chunk.endswith(abbreviation) for chunk in chunks), chunks
    assert " ".join(chunks) == text


def test_dotted_letters_end_a_sentence_only_before_a_capital():
    text = "Of course, your table is booked for 8 p.m. tonight at the U.S. embassy branch. See you at 8 p.m. Bye now."
    assert chunk_by_words(text) == [
        "Of course,",
        "your table is booked for 8 p.m. tonight at the U.S. embassy branch.",
        "See you at 8 p.m.",
        "Bye now.",
    ]


def test_impossible_limits_are_refused_naming_them():
    with pytest.raises(ValueError, match="min_words <= max_words"):
        SpeakableChunker(min_words=10, max_words=5)


WORDS = st.sampled_from(
    ["yes", "Dr.", "the", "table", "1,000", "7.30", "e.g.", "J.", "p.m.", "U.S.", "eight", "okay", "I'm"]
)
MARKS = st.sampled_from(["", "", "", ",", ".", "!", "?", ";", ":", '."', "...", ")"])
TOKENS = st.lists(st.tuples(WORDS, MARKS).map("".join), min_size=1, max_size=80)


@settings(max_examples=400, deadline=None)
@given(tokens=TOKENS, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=20))
def test_nothing_is_lost_or_repeated_however_the_text_is_streamed(tokens, cuts):
    text = " ".join(tokens)
    pieces = [text[a:b] for a, b in pairwise([0, *sorted(cuts), len(text)])]
    chunker = SpeakableChunker(max_words=6)
    chunks = [chunk for piece in pieces for chunk in chunker.feed(piece)]
    chunks.append(chunker.flush())
    assert " ".join(chunk for chunk in chunks if chunk).split() == text.split()
    assert all(chunk.strip() == chunk for chunk in chunks)


@settings(max_examples=200, deadline=None)
@given(tokens=TOKENS)
def test_streamed_word_by_word_no_chunk_outgrows_its_limit(tokens):
    """The cut comes when the word past the limit arrives; if that word ends a clause, the cut falls after it."""
    chunks = chunk_by_words(" ".join(tokens), SpeakableChunker(first_max_words=5, max_words=7))
    assert len(chunks[0].split()) <= 5 + 1
    assert all(len(chunk.split()) <= 7 + 1 for chunk in chunks[1:])
