import pytest

from voxpipe.pipeline import TurnPolicy
from voxpipe.pipeline.turns import words_of


def test_speech_must_last_min_speech_ms():
    policy = TurnPolicy(min_speech_ms=300, min_words=0)
    assert not policy.is_barge_in(0.2, "")
    assert policy.is_barge_in(0.31, "")


def test_min_words_counts_words_that_are_not_backchannels():
    policy = TurnPolicy(min_speech_ms=100, min_words=2)
    assert not policy.is_barge_in(1.0, "wait")
    assert not policy.is_barge_in(1.0, "uh-huh yeah")
    assert policy.is_barge_in(1.0, "yeah wait stop")


def test_backchannel_over_the_bot_is_not_a_turn_but_is_when_the_bot_is_silent():
    policy = TurnPolicy()
    assert not policy.is_turn("Uh-huh.", over_bot=True)
    assert policy.is_turn("Yes.", over_bot=False)
    assert policy.is_turn("No, the other one", over_bot=True)
    assert not policy.is_turn("", over_bot=False)


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="min_speech_ms"):
        TurnPolicy(min_speech_ms=-1)
    with pytest.raises(ValueError, match="min_words"):
        TurnPolicy(min_words=-2)


def test_backchannels_are_matched_whatever_their_case_and_must_be_single_words():
    policy = TurnPolicy(min_speech_ms=0, backchannels=frozenset({"Yeah", "OK"}))
    assert not policy.is_barge_in(1.0, "yeah, ok")
    with pytest.raises(ValueError, match="backchannel 'got it' is not one word"):
        TurnPolicy(backchannels=frozenset({"got it"}))


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("Здравствуйте, я хочу заказать столик.", ["здравствуйте", "я", "хочу", "заказать", "столик"]),
        ("Γεια σας", ["γεια", "σας"]),
        ("¿Qué tal? Café, über alles", ["qué", "tal", "café", "über", "alles"]),
        ("你好\uff0c我想订桌子", ["你好", "我想订桌子"]),  # no spaces between words: one run of letters each
        ("Don\u2019t stop, uh-huh, snake_case", ["don't", "stop", "uh-huh", "snake", "case"]),
    ],
    ids=["cyrillic", "greek", "accented", "chinese", "apostrophe-hyphen-underscore"],
)
def test_words_are_letters_and_digits_of_any_script(text, words):
    assert words_of(text) == words


def test_a_caller_speaking_another_language_is_answered_and_can_barge_in():
    policy = TurnPolicy(min_speech_ms=100, min_words=2, backchannels=frozenset({"Да"}))
    assert policy.is_turn("Здравствуйте!", over_bot=False)
    assert policy.is_turn("Подождите, пожалуйста", over_bot=True)
    assert policy.is_barge_in(1.0, "да, подождите минуту")
    assert not policy.is_barge_in(1.0, "ДА, да")
