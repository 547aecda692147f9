"""Smart-Turn v3 with the real model (from pipecat-ai, the smart-turn extra), alone and ending turns in SileroVAD."""

from __future__ import annotations

import asyncio
import functools
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from tests.embedded.test_silero_vad import padded, speech_events
from tests.helpers import Collect
from voxpipe.measure import voiced_segments
from voxpipe.pipeline import AudioFormat, Pipeline, RealClock, UserSpeechStopped, VirtualClock
from voxpipe.stages import smart_turn
from voxpipe.stages.silero_vad import SileroVAD, SileroVADSettings
from voxpipe.stages.smart_turn import (
    SmartTurn,
    SmartTurnSettings,
    UtteranceAudio,
    default_model_path,
    fit_to_model_window,
    log_mel_features,
)
from voxpipe.testing.clip import ClipCaller
from voxpipe.testing.speech import speak
from voxpipe.transports.simulated import SimulatedInput

RATE = 16000
# Piper reads these with a clear verdict (P ≈ 0.98 and ≈ 0.01 over repeated syntheses); many other lines are
# ambiguous to the model in Piper's voice (see benchmarks/vad.py).
COMPLETE = "I'd like to book a table for two."
INCOMPLETE = "Can you tell me the weather in"

needs_model = pytest.mark.skipif(
    importlib.util.find_spec("pipecat") is None,
    reason="pipecat-ai (the smart-turn extra, which ships the Smart-Turn v3 model) is not installed",
)


@functools.cache
def model() -> SmartTurn:
    return SmartTurn()


@functools.cache
def spoken(text: str) -> np.ndarray:
    return speak(text)


def ends_with_silence(speech: np.ndarray, silence_s: float) -> np.ndarray:
    """The utterance as the VAD hands it over: up to its last voiced sample, then ``silence_s`` of silence."""
    last = voiced_segments(speech, RATE, 0.01, min_gap_s=0.5)[-1][1]
    return np.concatenate([speech[: last + 1], np.zeros(round(silence_s * RATE), np.int16)])


def stops(clip: np.ndarray, vad: SileroVAD, clock: VirtualClock | RealClock) -> list[UserSpeechStopped]:
    sink = Collect()
    pipeline = Pipeline([SimulatedInput(ClipCaller(clip), AudioFormat(RATE)), vad, sink], clock=clock)
    outcome = clock.run(pipeline.run()) if isinstance(clock, VirtualClock) else asyncio.run(pipeline.run())
    assert outcome == "ended"
    events = speech_events(sink.frames)
    assert len(events) == 2, events
    return [e for e in events if isinstance(e, UserSpeechStopped)]


# ------------------------------------------------------------------------------------------------ the model


@needs_model
def test_the_model_hears_whether_the_turn_is_complete():
    assert model().probability(ends_with_silence(spoken(COMPLETE), 0.2)) > 0.8
    assert model().probability(ends_with_silence(spoken(INCOMPLETE), 0.2)) < 0.2


@needs_model
def test_a_shared_model_waiting_longer_than_stop_ms_is_refused_as_the_settings_are():
    # stop_ms would end every turn before Smart-Turn is asked, whichever way the model was given.
    shared = SmartTurn(SmartTurnSettings(silence_ms=500))
    try:
        with pytest.raises(ValueError, match=r"end_of_turn.silence_ms \(500.0\) must be < stop_ms \(400.0\)"):
            SileroVAD(SileroVADSettings(stop_ms=400), end_of_turn=shared)
    finally:
        shared.close()


@needs_model
async def test_the_thread_gives_the_same_answer_and_a_closed_model_refuses():
    audio = ends_with_silence(spoken(COMPLETE), 0.2)
    own = SmartTurn()
    try:
        assert await own.probability_async(audio) == pytest.approx(own.probability(audio), abs=1e-6)
    finally:
        own.close()
    assert own.closed
    with pytest.raises(RuntimeError, match="closed"):
        await own.probability_async(audio)


@needs_model
def test_features_equal_the_reference_whisper_features():
    # pipecat-ai vendors transformers' WhisperFeatureExtractor (the features the model was trained on) as numpy;
    # loaded from its file, so pipecat itself is not imported.
    reference_file = default_model_path().parents[1] / "_whisper_features.py"
    spec = importlib.util.spec_from_file_location("whisper_features_reference", reference_file)
    assert spec is not None and spec.loader is not None
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    audio = fit_to_model_window(spoken(COMPLETE))
    ours = log_mel_features(audio)
    assert ours.shape == (80, 800)
    np.testing.assert_allclose(ours, reference.compute_whisper_log_mel_features(audio), atol=1e-5)


def test_bad_audio_is_named():
    with pytest.raises(ValueError, match="no audio"):
        fit_to_model_window(np.zeros(0, np.int16))
    with pytest.raises(ValueError, match="1-D"):
        fit_to_model_window(np.zeros((2, 100), np.int16))
    window = fit_to_model_window(np.full(10 * RATE, 16384, np.int16))
    assert window.shape == (8 * RATE,) and window[0] == pytest.approx(0.5), "the last 8 s, as float"
    assert not fit_to_model_window(np.ones(RATE, np.float32))[: 7 * RATE].any(), "padded at the start"


def test_a_missing_model_names_the_extra_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(smart_turn, "MODEL_PACKAGE", "voxpipe_test_no_such_package")
    with pytest.raises(FileNotFoundError, match=r"install the smart-turn extra \(pipecat-ai\)"):
        SmartTurn()
    with pytest.raises(FileNotFoundError, match=r"nope\.onnx does not exist"):
        SmartTurn(SmartTurnSettings(model_path=tmp_path / "nope.onnx"))
    with pytest.raises(FileNotFoundError, match="smart-turn extra"):
        SileroVAD(SileroVADSettings(end_of_turn=SmartTurnSettings()))


def test_utterance_audio_keeps_the_last_8_seconds_and_slices_by_sample():
    kept = UtteranceAudio(RATE, max_s=1.0)
    for i in range(100):  # 2 s of 20 ms frames, each filled with its own index
        kept.append(i * 320, np.full(320, i, np.int16).tobytes())
    everything = kept.since(0)
    assert everything.size == RATE and everything[0] == 50 and everything[-1] == 99
    assert kept.since(99 * 320 + 300).tolist() == [99] * 20


# ----------------------------------------------------------------------------------- ending turns early


@needs_model
def test_a_complete_turn_ends_after_the_short_silence_and_an_incomplete_one_waits():
    settings = SileroVADSettings(stop_ms=1000, end_of_turn=SmartTurnSettings(silence_ms=200))
    (complete,) = stops(padded(spoken(COMPLETE), after_s=1.5), SileroVAD(settings), VirtualClock())
    (incomplete,) = stops(padded(spoken(INCOMPLETE), after_s=1.5), SileroVAD(settings), VirtualClock())
    # Virtual time: the model answers at once, so the stop is at the first frame 200 ms after the last voiced sample.
    assert 0.2 <= complete.at - complete.last_voiced_at < 0.2 + 0.021
    assert 1.0 <= incomplete.at - incomplete.last_voiced_at < 1.0 + 0.021


@needs_model
def test_on_the_real_clock_the_model_answers_from_its_thread_before_the_fallback():
    shared = model()
    vad = SileroVAD(SileroVADSettings(stop_ms=1500), end_of_turn=shared)
    (stop,) = stops(padded(spoken(COMPLETE), before_s=0.2, after_s=1.6), vad, RealClock())
    # Ended by the model (after 200 ms of silence plus the inference), not by the 1.5 s fallback.
    assert 0.2 <= stop.at - stop.last_voiced_at < 1.5
    assert not shared.closed, "a SmartTurn passed in stays open: its owner closes it"


def test_end_of_turn_is_given_once(tmp_path):
    path = Path(tmp_path / "model.onnx")
    with pytest.raises(ValueError, match="either in settings or as a SmartTurn"):
        SileroVAD(SileroVADSettings(end_of_turn=SmartTurnSettings(model_path=path)), end_of_turn=object())  # type: ignore[arg-type]
