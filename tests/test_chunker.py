"""The speakable-chunk cutter between the reasoner and the voice (``voxpipe.stages.text``)."""

# ruff: noqa: RUF001  (Chinese and Japanese text with its full-width marks is what some of these tests are about)

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


def chunk_by_tokens(tokens: list[str], chunker: SpeakableChunker | None = None) -> list[str]:
    """Stream ``tokens`` as they are, a mark or a piece of a URL on its own as LLM tokenizers often send them."""
    chunker = chunker or SpeakableChunker()
    chunks = [chunk for token in tokens for chunk in chunker.feed(token)]
    rest = chunker.flush()
    return chunks + ([rest] if rest else [])


def split_periods(text: str) -> list[str]:
    """LLM-like tokens: each word with the space before it, a period after a word as a token of its own."""
    tokens = []
    for word in text.split(" "):
        tokens += [f" {word[:-1]}", "."] if word.endswith(".") else [f" {word}"]
    return tokens


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


def test_a_numbered_lists_marker_stays_with_its_item():
    # Before: "2. Tap settings. 3." | "Pick your account.": the TTS said "…settings. Three." and paused.
    text = "Sure, I can. Steps: 1. Open the app now. 2. Tap settings. 3. Pick your account."
    assert chunk_by_words(text) == [
        "Sure, I can.",
        "Steps: 1. Open the app now.",
        "2. Tap settings. 3. Pick your account.",
    ]
    lines = "Here you go:\n1. Open the app now.\n2. Tap the settings icon.\n3. Pick your account."
    assert chunk_by_words(lines) == [
        "Here you go:",
        "1. Open the app now.",
        "2. Tap the settings icon.",
        "3. Pick your account.",
    ]


def test_a_number_that_is_no_list_marker_still_ends_its_sentence():
    assert chunk_by_words("Sure, we have 12. That is more than enough for your group.") == [
        "Sure, we have 12.",
        "That is more than enough for your group.",
    ]


@pytest.mark.parametrize(
    ("text", "abbreviation"),
    [
        ("Right. It is room No. 5 on the second floor of the main building.", "No."),
        ("Of course, she has a Ph.D. in physics from a big university in town.", "Ph.D."),
        ("Okay. The total is approx. 40 dollars for the two of you tonight.", "approx."),
        ("Sure. Acme Inc. will deliver it to your house on Monday morning.", "Inc."),
        ("Of course. The meeting is on Jan. 5 at the main office downtown.", "Jan."),
        ("Of course. The letter went to Capt. Hook at the harbour this morning.", "Capt."),
        ("Of course, the shop on Oak Ave. in Boston opens at nine every day.", "Ave."),
    ],
)
def test_a_period_inside_an_abbreviation_ends_nothing(text, abbreviation):
    chunks = chunk_by_words(text)
    assert not any(chunk.endswith(abbreviation) for chunk in chunks), chunks
    assert " ".join(chunks) == text


@pytest.mark.parametrize(
    ("text", "sentence"),
    [
        ("Of course. I work at Acme Inc. Then we can meet at the office.", "I work at Acme Inc."),
        ("Of course. The shop is on Oak Ave. It opens at nine every day.", "The shop is on Oak Ave."),
        ("I am sorry, but the answer is no. Sorry about that, my friend.", "but the answer is no."),
    ],
)
def test_a_company_or_street_suffix_still_ends_a_sentence_before_a_capital(text, sentence):
    """The rule chosen for "Inc." and "Ave.": a sentence end only before a capitalised word (see text.py)."""
    assert sentence in chunk_by_words(text)


@pytest.mark.parametrize(
    ("text", "sentence"),
    [
        ("Yes, so did I. Then we went home and had some dinner together.", "Yes, so did I."),
        ("Of course. The best one is plan B. It is cheaper and it includes a breakfast.", "The best one is plan B."),
    ],
)
def test_a_one_letter_capital_word_can_end_a_sentence(text, sentence):
    assert sentence in chunk_by_words(text)


@pytest.mark.parametrize(
    "text",
    [
        "Sure thing. It was John F. Kennedy who said that in a speech.",
        "Of course. The book is by J. Smith and it is very good indeed.",
        "Sure thing. The author J. K. Rowling wrote that one in a cafe.",
    ],
)
def test_an_initial_after_a_word_is_still_no_sentence_end(text):
    for chunks in (chunk_by_words(text), chunk_by_tokens(split_periods(text))):
        assert chunks[1:] == [text.split(". ", 1)[1]], chunks


@pytest.mark.parametrize(
    ("text", "first_sentence"),
    [
        ("Of course. He told me \u201cI will be there by noon.\u201d Then he left for the station.", "noon.\u201d"),
        ("Of course. Hmm, that one is booked\u2026 Let me look at Friday instead for you.", "booked\u2026"),
        ("Of course. He said \u00abI will be there by noon.\u00bb Then he left for the station.", "noon.\u00bb"),
    ],
)
def test_typographic_quotes_and_ellipses_end_a_sentence_like_ascii_ones(text, first_sentence):
    chunks = chunk_by_words(text)
    assert chunks[1].endswith(first_sentence), chunks
    assert len(chunks) == 3


def test_chinese_is_cut_at_its_own_marks_while_it_streams():
    text = "好的，我可以帮你预订。你想要几点的桌子？我们今晚七点有空位。请告诉我你的名字和电话号码，我马上为你确认。"
    chunker = SpeakableChunker()
    streamed = [chunk for character in text for chunk in chunker.feed(character)]
    assert streamed == ["好的，我可以帮你预订。", "你想要几点的桌子？", "我们今晚七点有空位。"]
    assert chunker.flush() == "请告诉我你的名字和电话号码，我马上为你确认。"


def test_the_first_chinese_or_japanese_clause_is_cut_as_soon_as_its_mark_arrives():
    chunker = SpeakableChunker()
    assert chunker.feed("好的，我可以帮你预订") == []
    assert chunker.feed("。") == ["好的，我可以帮你预订。"]
    # A closing quote after a later sentence's mark stays with it: the cut waits for the next character.
    assert chunk_by_tokens(["はい、", "かしこまりました。", "お店は「山田", "です。", "」", "ありがとう"]) == [
        "はい、かしこまりました。",
        "お店は「山田です。」",
        "ありがとう",
    ]


def test_half_width_marks_between_cjk_characters_cut_it_too():
    # Models often write Chinese and Japanese with ASCII punctuation, and no space after it.
    text = "好的,我可以帮你预订.你想要几点的桌子?我们今晚七点有空位!请告诉我你的名字,我马上为你确认."
    chunker = SpeakableChunker()
    streamed = [chunk for character in text for chunk in chunker.feed(character)]
    assert streamed == ["好的,我可以帮你预订.", "你想要几点的桌子?", "我们今晚七点有空位!"]
    assert chunker.flush() == "请告诉我你的名字,我马上为你确认."
    # Only between CJK characters: a version number or a domain in CJK text stays whole.
    chunks = chunk_by_tokens(
        list("我的版本是3.5.请访问example.com的网站吧。谢谢"), SpeakableChunker(first_max_words=20)
    )
    assert chunks == [
        "我的版本是3.5.请访问example.com的网站吧。",
        "谢谢",
    ]


def test_two_cjk_characters_count_as_a_word_for_the_limits():
    text = "我可以帮你预订一张今晚七点的四人桌子然后我们再看看菜单上有什么好吃的东西吧"
    chunks = chunk_by_tokens(list(text), SpeakableChunker(first_max_words=4, max_words=6))
    assert [len(chunk) for chunk in chunks] == [8, 12, 12, 5]  # 4 words, then 6 a chunk, then the rest
    assert "".join(chunks) == text


@pytest.mark.parametrize(
    "tokens",
    [
        ["Visit", " https", ":", "//example.com", "/help", " for", " more", " details", "."],
        ["Open", " example.com", "/search", "?", "q=menu", " for", " the", " list", "."],
    ],
)
def test_the_early_first_cut_does_not_split_a_url(tokens):
    assert chunk_by_tokens(tokens) == ["".join(tokens)]


def test_the_early_first_cut_still_comes_with_the_mark_after_a_word():
    chunker = SpeakableChunker()
    assert chunker.feed("Here is the plan") == []
    assert chunker.feed(":") == ["Here is the plan:"]
    chunker = SpeakableChunker()
    assert chunker.feed("Don't worry") == []
    assert chunker.feed(",") == ["Don't worry,"]


def test_impossible_limits_are_refused_naming_them():
    with pytest.raises(ValueError, match="min_words <= max_words"):
        SpeakableChunker(min_words=10, max_words=5)


WORDS = st.sampled_from(
    [
        *("yes", "Dr.", "the", "table", "1,000", "7.30", "e.g.", "J.", "p.m.", "U.S.", "eight", "okay", "I'm"),
        *("No.", "Inc.", "Ph.D.", "plan", "B.", "I", "3", "12.", "https:", "\u201cso"),
    ]
)
MARKS = st.sampled_from(["", "", "", ",", ".", "!", "?", ";", ":", '."', "...", ")", "\u2026", ".\u201d"])
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


CJK_TOKENS = st.lists(
    st.sampled_from(
        [
            "好的",
            "我",
            "可以",
            "预订",
            "かしこまり",
            "iPhone",
            "7.30",
            "，",
            "、",
            "。",
            "？",
            "「",
            "」",
            " ",
            ",",
            ".",
            "!",
        ]
    ),
    min_size=1,
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(tokens=CJK_TOKENS, cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=20))
def test_nothing_is_lost_or_repeated_in_cjk_text_cut_without_spaces(tokens, cuts):
    text = "".join(tokens)
    pieces = [text[a:b] for a, b in pairwise([0, *sorted(cuts), len(text)])]
    chunker = SpeakableChunker(max_words=6)
    chunks = [chunk for piece in pieces for chunk in chunker.feed(piece)]
    chunks.append(chunker.flush())
    assert "".join("".join(chunks).split()) == "".join(text.split())
    assert all(chunk.strip() == chunk for chunk in chunks)
