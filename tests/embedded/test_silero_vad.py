"""SileroVAD with the real Silero v6 model, on real (Piper) speech, through real pipelines."""

from __future__ import annotations

import asyncio
import functools

import numpy as np
import pytest
import soxr
from pydantic import ValidationError

from tests.helpers import Collect
from voxpipe.measure import voiced_segments
from voxpipe.pipeline import (
    DOWNSTREAM,
    AudioFormat,
    AudioFormatError,
    AudioFrame,
    Frame,
    Pipeline,
    PipelineBuildError,
    UserSpeechStarted,
    UserSpeechStopped,
    VirtualClock,
)
from voxpipe.stages.resample import Resample
from voxpipe.stages.silero_vad import SileroVAD, SileroVADSettings
from voxpipe.testing.clip import ClipCaller
from voxpipe.testing.signals import cough
from voxpipe.testing.speech import speak
from voxpipe.transports.simulated import SimulatedInput

RATE = 16000
VOICED_LEVEL = 0.01  # what voxpipe.measure calls voiced: the ground truth of the call's recording


def run_clip(clip: np.ndarray, vad: SileroVAD, *, input_rate: int = RATE) -> list[Frame]:
    """Play ``clip`` through input → [resample] → vad → sink under a virtual clock; returns what reached the sink."""
    sink = Collect()
    stages = [SimulatedInput(ClipCaller(clip, input_rate), AudioFormat(input_rate))]
    if input_rate != RATE:
        stages.append(Resample(RATE))
    clock = VirtualClock()
    pipeline = Pipeline([*stages, vad, sink], clock=clock)
    assert clock.run(pipeline.run()) == "ended"
    return sink.frames


def speech_events(frames: list[Frame]) -> list[Frame]:
    return [f for f in frames if isinstance(f, UserSpeechStarted | UserSpeechStopped)]


def padded(speech: np.ndarray, before_s: float = 0.5, after_s: float = 1.0) -> np.ndarray:
    return np.concatenate(
        [np.zeros(round(before_s * RATE), np.int16), speech, np.zeros(round(after_s * RATE), np.int16)]
    )


@functools.cache
def utterance() -> np.ndarray:
    return speak("I'd like to book a table for two, please.")


def test_speech_gives_one_start_and_one_stop_at_the_voiced_samples():
    clip = padded(utterance())
    frames = run_clip(clip, SileroVAD())

    events = speech_events(frames)
    assert [type(e) for e in events] == [UserSpeechStarted, UserSpeechStopped]
    started, stopped = events
    segments = voiced_segments(clip, RATE, VOICED_LEVEL, min_gap_s=0.5)
    onset, last_voiced = segments[0][0] / RATE, (segments[-1][1] + 1) / RATE
    assert abs(started.at - onset) <= 0.1
    assert abs(stopped.last_voiced_at - last_voiced) <= 0.05
    assert 0.5 <= stopped.at - stopped.last_voiced_at <= 0.5 + 0.02 + 1e-9  # stop_ms, to the next frame boundary
    audio = b"".join(f.pcm for f in frames if isinstance(f, AudioFrame))
    assert audio[: clip.size * 2] == clip.tobytes(), "audio passes through the VAD untouched"


def test_telephone_audio_is_found_behind_a_resample_stage():
    clip = padded(utterance())
    narrow = soxr.resample(clip, RATE, 8000)  # 8 kHz, as from a phone line
    events = speech_events(run_clip(narrow, SileroVAD(), input_rate=8000))
    # Timing is not compared here: Resample's soxr stream emits 8→16 kHz audio in ~110 ms bursts stamped with the
    # pts of the frame that released them, so its timestamps are late by up to a burst (reported with this file).
    assert [type(e) for e in events] == [UserSpeechStarted, UserSpeechStopped]


def test_silence_and_quiet_noise_are_not_speech():
    rng = np.random.default_rng(3)
    silence = np.zeros(3 * RATE, np.int16)
    noise = (rng.standard_normal(3 * RATE) * 0.01 * 32767).astype(np.int16)  # white noise at -40 dBFS RMS
    assert speech_events(run_clip(silence, SileroVAD())) == []
    assert speech_events(run_clip(noise, SileroVAD())) == []


@pytest.mark.parametrize("start_ms", [60.0, 250.0])
def test_a_cough_starts_no_speech(start_ms):
    burst = cough(RATE, duration_s=0.18, amplitude=0.9)
    clip = np.concatenate([np.zeros(RATE // 2, np.int16), burst, np.zeros(RATE, np.int16)])
    assert speech_events(run_clip(clip, SileroVAD(SileroVADSettings(start_ms=start_ms)))) == []


def test_calls_sharing_the_model_keep_their_own_state():
    speech, silence = padded(utterance()), np.zeros(utterance().size + 3 * RATE // 2, np.int16)
    alone = speech_events(run_clip(speech, SileroVAD()))
    sinks = [Collect(name="a"), Collect(name="b")]
    clock = VirtualClock()
    pipelines = [
        Pipeline([SimulatedInput(ClipCaller(clip), AudioFormat(RATE)), SileroVAD(), sink], clock=clock)
        for clip, sink in zip((speech, silence), sinks, strict=True)
    ]

    async def both() -> None:
        await asyncio.gather(*(p.run() for p in pipelines))

    clock.run(both())
    assert speech_events(sinks[0].frames) == alone
    assert speech_events(sinks[1].frames) == []


def test_audio_at_the_wrong_rate_is_rejected():
    with pytest.raises(AudioFormatError, match="16000 Hz mono"):
        SileroVAD(audio=AudioFormat(8000))
    narrow = SimulatedInput(ClipCaller(np.zeros(RATE, np.int16), 8000), AudioFormat(8000))
    with pytest.raises(PipelineBuildError, match="put a Resample"):
        Pipeline([narrow, SileroVAD()])

    # A stage that does not declare its format slips past the build check: the frame itself is then rejected.
    clock = VirtualClock()
    vad = SileroVAD()
    pipeline = Pipeline([vad, Collect()], clock=clock)

    async def send_8khz() -> None:
        run = asyncio.create_task(pipeline.run())
        await asyncio.sleep(0)
        await vad.receive(AudioFrame(pcm=bytes(320), sample_rate=8000), DOWNSTREAM)
        await run

    with pytest.raises(AudioFormatError, match=r"stage 'vad' expects 16000 Hz mono audio but got 8000 Hz"):
        clock.run(send_8khz())


def test_a_missing_or_broken_model_file_is_named(tmp_path):
    missing = tmp_path / "silero.onnx"
    with pytest.raises(FileNotFoundError, match=r"model file .*silero\.onnx does not exist"):
        SileroVAD(SileroVADSettings(model_path=missing))
    missing.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a loadable ONNX model"):
        SileroVAD(SileroVADSettings(model_path=missing))


def test_settings_are_validated():
    with pytest.raises(ValidationError, match="stop_threshold"):
        SileroVADSettings(start_threshold=0.4, stop_threshold=0.6)
    with pytest.raises(ValidationError, match="stop_ms"):
        SileroVADSettings(stop_ms=0)
    with pytest.raises(ValidationError, match="extra"):
        SileroVADSettings(treshold=0.5)
    with pytest.raises(ValidationError, match=r"end_of_turn.silence_ms \(500.0\) must be < stop_ms \(400.0\)"):
        SileroVADSettings(stop_ms=400, end_of_turn={"silence_ms": 500})
