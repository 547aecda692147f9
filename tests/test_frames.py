import dataclasses

import pytest

from voxpipe.pipeline import (
    AudioFormat,
    AudioFormatError,
    AudioFrame,
    Cancel,
    End,
    EndOfTurn,
    Interrupt,
    SpeakableChunk,
    Transcript,
    TTSAudioFrame,
    UserSpeechStarted,
)


def test_frames_are_immutable_and_carry_their_epoch():
    frame = AudioFrame(epoch=3, pcm=b"\0\0" * 320, sample_rate=16000)
    assert frame.epoch == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        frame.epoch = 4  # type: ignore[misc]
    assert not hasattr(frame, "__dict__"), "slots keep frames small"


def test_audio_frame_duration_and_samples():
    frame = AudioFrame(pcm=bytes(640), sample_rate=16000)
    assert frame.samples == 320
    assert frame.duration == pytest.approx(0.02)
    stereo = AudioFrame(pcm=bytes(640), sample_rate=8000, channels=2)
    assert stereo.samples == 160
    assert stereo.duration == pytest.approx(0.02)


def test_reply_frames_are_interruptible_and_caller_frames_are_not():
    assert SpeakableChunk(text="hi").interruptible
    assert TTSAudioFrame(pcm=b"", sample_rate=16000).interruptible
    assert EndOfTurn(text="hi", at=0.0).interruptible
    assert not AudioFrame(pcm=b"", sample_rate=16000).interruptible
    assert not Transcript(text="hi", final=True).interruptible
    assert not UserSpeechStarted(at=0.0).interruptible


def test_interrupt_and_cancel_overtake_but_end_drains_in_order():
    assert Interrupt(epoch=1, at=0.0).urgent
    assert Cancel().urgent
    assert not End().urgent


@pytest.mark.parametrize(("rate", "channels"), [(16000, 3), (16000, 0), (0, 1), (-8000, 1)])
def test_a_frame_with_an_impossible_format_is_named_by_the_stage_that_got_it(rate, channels):
    frame = AudioFrame(pcm=bytes(640), sample_rate=rate, channels=channels)
    with pytest.raises(AudioFormatError, match=rf"stage 'vad' got a malformed audio frame: sample_rate={rate}, "):
        AudioFormat(16000).check(frame, "vad")
