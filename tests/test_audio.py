import asyncio
import itertools
import wave
from collections.abc import AsyncIterator

import numpy as np
import pytest

from tests.helpers import Collect
from voxpipe.pipeline import (
    DOWNSTREAM,
    AudioFormat,
    AudioFormatError,
    AudioFrame,
    Frame,
    Interrupt,
    Pipeline,
    SpeakableChunk,
    TTSAudioFrame,
    TTSDone,
    UserSpeechStopped,
    VirtualClock,
    WordMark,
)
from voxpipe.stages.resample import Resample
from voxpipe.stages.tts import TTSStage
from voxpipe.testing import ScriptedVAD, load_wav


def tone(rate: int, seconds: float, channels: int = 1, freq: float = 440.0) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    mono = (np.sin(2 * np.pi * freq * t) * 10000).astype(np.int16)
    return np.repeat(mono[:, None], channels, axis=1) if channels > 1 else mono


def test_wrong_rate_is_rejected_with_the_stage_named():
    fmt = AudioFormat(16000)
    with pytest.raises(AudioFormatError, match=r"stage 'vad' expects 16000 Hz mono audio but got 8000 Hz stereo"):
        fmt.check(AudioFrame(pcm=bytes(640), sample_rate=8000, channels=2), "vad")


def test_malformed_frame_is_rejected():
    with pytest.raises(AudioFormatError, match="malformed audio frame: 641 bytes"):
        AudioFormat(16000).check(AudioFrame(pcm=bytes(641), sample_rate=16000), "vad")


def test_a_stage_receiving_the_wrong_rate_stops_the_pipeline_with_a_clear_error():
    clock = VirtualClock()
    vad = ScriptedVAD(AudioFormat(16000))
    pipeline = Pipeline([vad, Collect()], clock=clock)

    async def main() -> None:
        run = asyncio.create_task(pipeline.run())
        await asyncio.sleep(0)
        await vad.receive(AudioFrame(pcm=bytes(320), sample_rate=8000), DOWNSTREAM)
        await run

    with pytest.raises(AudioFormatError, match="'vad' expects 16000 Hz mono"):
        clock.run(main())


def test_resample_converts_rate_and_channels_and_keeps_the_signal():
    clock = VirtualClock()
    sink = Collect()
    resample = Resample(16000, 1)
    pipeline = Pipeline([resample, sink], clock=clock)
    stereo_8k = tone(8000, 1.0, channels=2)

    async def main() -> None:
        run = asyncio.create_task(pipeline.run())
        await asyncio.sleep(0)
        for i in range(0, len(stereo_8k), 160):
            chunk = stereo_8k[i : i + 160]
            await resample.receive(AudioFrame(pcm=chunk.tobytes(), sample_rate=8000, channels=2, pts=i), DOWNSTREAM)
        await pipeline.end()
        await run

    clock.run(main())
    frames = [f for f in sink.frames if isinstance(f, AudioFrame)]
    assert all(f.sample_rate == 16000 and f.channels == 1 for f in frames)
    out = np.concatenate([np.frombuffer(f.pcm, dtype=np.int16) for f in frames]).astype(np.float32)
    assert abs(len(out) - 16000) < 20  # nothing lost: the filter's tail is flushed at End
    ends = [f.pts + len(f.pcm) // 2 for f in frames]
    assert [f.pts for f in frames[1:]] == ends[:-1], "every frame, the flushed tail too, follows the one before"
    spectrum = np.abs(np.fft.rfft(out[2000:14000]))
    peak_hz = np.argmax(spectrum) * 16000 / len(out[2000:14000])
    assert abs(peak_hz - 440) < 5


def test_resample_rescales_word_marks_of_bot_audio():
    resample = Resample(16000)
    frame = TTSAudioFrame(pcm=bytes(2 * 2205), sample_rate=22050, pts=22050, words=(WordMark("hi", 0, 11025),))
    out = resample.convert(frame)
    assert isinstance(out, TTSAudioFrame)
    assert out.pts == 16000 and out.words == (WordMark("hi", 0, 8000),)


def test_load_wav_converts_stereo_8k_and_rejects_non_audio(tmp_path):
    path = tmp_path / "caller.wav"
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        wav.writeframes(tone(8000, 0.5, channels=2).tobytes())
    mono = load_wav(path, 16000)
    assert abs(len(mono) - 8000) <= 2 and np.abs(mono).max() > 5000
    junk = tmp_path / "junk.wav"
    junk.write_text("this is not audio")
    with pytest.raises(ValueError, match=r"junk\.wav: not a readable PCM WAV"):
        load_wav(junk, 16000)


def test_resample_streams_every_frame_without_bursts_and_stamps_pts_by_samples_emitted():
    resample = Resample(16000)
    out = [
        resample.convert(AudioFrame(pcm=tone(8000, 0.02).tobytes(), sample_rate=8000, pts=i * 160)) for i in range(50)
    ]
    frames = [f for f in out if f is not None]
    assert len(frames) >= 49, "a frame out for (nearly) every frame in: no bursts"
    assert all(b.pts == a.pts + a.samples for a, b in itertools.pairwise(frames)), "pts runs on without gaps"
    assert abs(sum(f.samples for f in frames) - 16000) < 20


def test_resample_drops_bot_audio_filter_state_on_interrupt():
    resample = Resample(16000)
    resample.convert(TTSAudioFrame(epoch=0, pcm=tone(22050, 0.02).tobytes(), sample_rate=22050))
    assert any(key[2] for key in resample._streams)
    asyncio.run(resample.on_interrupt(Interrupt(epoch=1, at=0.0)))
    assert not any(key[2] for key in resample._streams)


def test_a_replys_resampler_tail_ends_that_reply_and_not_the_next():
    clock = VirtualClock()
    sink = Collect()
    resample = Resample(48000)
    pipeline = Pipeline([resample, sink], clock=clock)
    reply = tone(24000, 0.2)  # 10 frames of 20 ms at 24 kHz

    async def main() -> None:
        run = asyncio.create_task(pipeline.run())
        await asyncio.sleep(0)
        for epoch in (0, 1):  # two replies, one after the other
            for pts in range(0, len(reply), 480):
                pcm = reply[pts : pts + 480].tobytes()
                await resample.receive(TTSAudioFrame(epoch=epoch, pcm=pcm, sample_rate=24000, pts=pts), DOWNSTREAM)
            await resample.receive(TTSDone(epoch=epoch), DOWNSTREAM)
        await pipeline.end()
        await run

    clock.run(main())
    for epoch in (0, 1):
        frames = [f for f in sink.frames if isinstance(f, TTSAudioFrame) and f.epoch == epoch]
        assert frames[0].pts == 0
        assert sum(f.samples for f in frames) == 2 * len(reply), f"reply {epoch}: every sample, the tail too"
        ends = [f.pts + f.samples for f in frames]
        assert [f.pts for f in frames[1:]] == ends[:-1], "the tail follows the reply's last frame"
        done = next(i for i, f in enumerate(sink.frames) if isinstance(f, TTSDone) and f.epoch == epoch)
        assert sink.frames.index(frames[-1]) < done, "the tail is played before the reply ends"


def test_the_vad_ends_speech_at_the_frame_that_completes_stop_ms_exactly():
    # Speech ends on a frame edge (sample 14 * 320) and 300 ms of silence end exactly on a later frame's edge. In
    # seconds as floats, 4.76 - 4.46 < 0.3, and the turn would end one frame (20 ms) late; the VAD counts samples.
    clock = VirtualClock()
    sink = Collect()
    vad = ScriptedVAD(AudioFormat(16000), start_ms=60, stop_ms=300)
    pipeline = Pipeline([vad, sink], clock=clock)
    loud = (np.ones(320, dtype=np.int16) * 10000).tobytes()

    async def main() -> None:
        run = asyncio.create_task(pipeline.run())
        await asyncio.sleep(0)
        for index in range(40):
            pcm = loud if 4 <= index < 14 else bytes(640)
            await vad.receive(AudioFrame(pcm=pcm, sample_rate=16000, pts=index * 320), DOWNSTREAM)
            if any(isinstance(f, UserSpeechStopped) for f in sink.frames):
                break
        await pipeline.end()
        await run
        return index

    last_frame = clock.run(main())
    (stopped,) = [f for f in sink.frames if isinstance(f, UserSpeechStopped)]
    assert stopped.last_voiced_at == 14 * 320 / 16000
    assert last_frame == 14 + 15 - 1, "the 15th silent frame completes 300 ms"


def run_resample(resample: Resample, frames: list[AudioFrame], *, reply_done: bool = False) -> list[Frame]:
    """Feeds ``frames`` through ``resample`` (then the reply's ``TTSDone`` if ``reply_done``) and ends the call."""
    clock = VirtualClock()
    sink = Collect()
    pipeline = Pipeline([resample, sink], clock=clock)

    async def main() -> None:
        run = asyncio.create_task(pipeline.run())
        await asyncio.sleep(0)
        for frame in frames:
            await resample.receive(frame, DOWNSTREAM)
        if reply_done:
            await resample.receive(TTSDone(epoch=0), DOWNSTREAM)
        await pipeline.end()
        await run

    clock.run(main())
    return sink.frames


def spoken_reply(rate: int, pieces: list[int]) -> list[TTSAudioFrame]:
    """A reply streamed in pieces of the given sample counts, a word starting in each piece."""
    frames, pts = [], 0
    for k, n in enumerate(pieces):
        pcm = tone(rate, n / rate).tobytes()
        frames.append(TTSAudioFrame(pcm=pcm, sample_rate=rate, pts=pts, words=(WordMark(f"w{k}", pts, pts + n),)))
        pts += n
    return frames


@pytest.mark.parametrize(
    "quality,rate,pieces",
    [
        ("HQ", 22050, [441] * 12),  # HQ yields nothing for many 20 ms frames (12 words came out as 6)
        ("QQ", 22050, [441, 1, 1, 441]),  # a network chunk of a sample or two yields nothing even at QQ
        ("QQ", 44100, [882, 882, 0]),  # marks-only (ElevenLabs' last marks), and this filter's tail is empty
    ],
)
def test_resample_passes_on_the_word_marks_of_a_frame_that_yields_no_samples(quality, rate, pieces):
    reply = spoken_reply(rate, pieces)
    out = [
        f
        for f in run_resample(Resample(16000, quality=quality), reply, reply_done=True)
        if isinstance(f, TTSAudioFrame)
    ]
    ratio = 16000 / rate
    words = [w for f in out for w in f.words]
    assert words == [WordMark(w.word, round(w.start * ratio), round(w.end * ratio)) for f in reply for w in f.words]
    assert out[0].pts == 0
    ends = [f.pts + f.samples for f in out]
    assert [f.pts for f in out[1:]] == ends[:-1], "every frame, the tail too, follows the one before"


def test_a_short_hq_reply_the_filter_holds_whole_is_played_at_its_tail():
    out = run_resample(Resample(16000, quality="HQ"), spoken_reply(22050, [441, 441]), reply_done=True)
    frames = [f for f in out if isinstance(f, TTSAudioFrame)]
    assert frames and frames[0].pts == 0
    assert abs(sum(f.samples for f in frames) - 640) <= 2, "40 ms in, 40 ms out"
    assert [w.word for f in frames for w in f.words] == ["w0", "w1"]


def test_hq_caller_audio_is_stamped_from_the_streams_first_frame_not_its_first_output():
    caller = tone(8000, 0.4)
    frames = [
        AudioFrame(pcm=caller[i : i + 160].tobytes(), sample_rate=8000, pts=i) for i in range(0, len(caller), 160)
    ]
    out = [f for f in run_resample(Resample(16000, quality="HQ"), frames) if isinstance(f, AudioFrame)]
    assert out[0].pts == 0, "the HQ filter's first output is the stream's first sample, not 100 ms in"
    ends = [f.pts + f.samples for f in out]
    assert [f.pts for f in out[1:]] == ends[:-1]
    assert abs(ends[-1] - 6400) <= 2


@pytest.mark.parametrize("rate,channels", [(0, 1), (-8000, 1), (8000, 0), (8000, 3)])
def test_resample_names_itself_for_a_frame_of_no_real_format(rate, channels):
    clock = VirtualClock()
    resample = Resample(16000, name="resample-in")
    pipeline = Pipeline([resample, Collect()], clock=clock)

    async def main() -> None:
        run = asyncio.create_task(pipeline.run())
        await asyncio.sleep(0)
        await resample.receive(AudioFrame(pcm=bytes(1920), sample_rate=rate, channels=channels), DOWNSTREAM)
        await run

    with pytest.raises(AudioFormatError, match=rf"stage 'resample-in' got a malformed audio frame: sample_rate={rate}"):
        clock.run(main())


class SilentFirstPieceTTS(TTSStage):
    """The first piece is 20 ms of leading silence and brings the first word's mark (alignment often comes with
    the first audio); the speech follows, after 20 ms more silence."""

    async def synthesize(self, text: str) -> AsyncIterator[tuple[bytes, tuple[WordMark, ...]]]:
        yield bytes(640), (WordMark("hello", 640, 4000),)
        yield bytes(640) + np.full(8000, 3000, dtype=np.int16).tobytes(), (WordMark("world", 4800, 8000),)


def test_a_word_mark_that_came_with_trimmed_leading_silence_goes_out_with_the_first_sound():
    clock = VirtualClock()
    sink = Collect()
    tts = SilentFirstPieceTTS(AudioFormat(16000))
    pipeline = Pipeline([tts, sink], clock=clock)

    async def main() -> None:
        run = asyncio.create_task(pipeline.run())
        await asyncio.sleep(0)
        await tts.receive(SpeakableChunk(epoch=0, text="hello world"), DOWNSTREAM)
        await pipeline.end()
        await run

    clock.run(main())
    (frame,) = [f for f in sink.frames if isinstance(f, TTSAudioFrame)]
    assert frame.pts == 0 and frame.samples == 8000, "the 640 samples of leading silence are trimmed"
    assert frame.words == (WordMark("hello", 0, 3360), WordMark("world", 4160, 7360)), "shifted by the trim"


def frames_at(rate: int, pts: list[int], samples: int, *, bot: bool = False) -> list[AudioFrame]:
    """Frames of ``samples`` samples of one tone, one at each of ``pts`` (each with the tone's audio at its pts); bot
    audio with a word starting at each frame's start."""
    audio = tone(rate, (max(pts) + samples) / rate)
    if not bot:
        return [AudioFrame(pcm=audio[p : p + samples].tobytes(), sample_rate=rate, pts=p) for p in pts]
    return [
        TTSAudioFrame(
            pcm=audio[p : p + samples].tobytes(), sample_rate=rate, pts=p, words=(WordMark(f"w{p}", p, p + samples),)
        )
        for p in pts
    ]


def stretches(frames: list[Frame]) -> list[tuple[int, int]]:
    """The ``[start, end)`` spans that the audio frames among ``frames`` cover without a break, in order."""
    spans: list[tuple[int, int]] = []
    for f in frames:
        if not isinstance(f, AudioFrame) or not f.samples:
            continue
        if spans and spans[-1][1] == f.pts:
            spans[-1] = (spans[-1][0], f.pts + f.samples)
        else:
            spans.append((f.pts, f.pts + f.samples))
    return spans


@pytest.mark.parametrize("quality", ["QQ", "HQ"])
@pytest.mark.parametrize("target", [24000, 8000])
def test_resample_keeps_a_gap_in_caller_audio(quality, target):
    # 20 ms frames at 16 kHz from 1 s in, the 11th lost in transport: the audio after it is stamped 20 ms later.
    pts = [16000 + i * 320 for i in range(20) if i != 10]
    out = run_resample(Resample(target, quality=quality), frames_at(16000, pts, 320))
    ratio = target / 16000
    before, after = stretches(out)
    assert before[0] == 16000 * ratio and after[0] == 19520 * ratio
    assert abs(before[1] - 19200 * ratio) <= 1, "the audio before the gap is flushed, and ends where the gap starts"
    assert abs(after[1] - 22400 * ratio) <= 1
    audio = sum(f.samples for f in out if isinstance(f, AudioFrame))
    assert abs(audio - 19 * 320 * ratio) <= 2, "no audio lost"


def test_resample_follows_a_source_that_restarts_its_timeline():
    # pts back to 0 (a source that reconnected, say): the audio is stamped on the new timeline, not after the old.
    pts = [3200 + i * 320 for i in range(5)] + [i * 320 for i in range(5)]
    out = run_resample(Resample(24000), frames_at(16000, pts, 320))
    assert stretches(out) == [(4800, 7200), (0, 2400)]


def test_resample_takes_pts_a_sample_off_as_contiguous_but_never_drifts_from_its_input():
    # pts rounded from a clock step a sample off now and then with nothing missing: one stream, no cut.
    jittered = frames_at(16000, [i * 320 + i % 2 for i in range(50)], 320)
    assert stretches(run_resample(Resample(24000), jittered)) == [(0, 50 * 480)]
    # pts that run a sample per frame ahead of the audio: the steps add up, and past the tolerance (0.5 ms) the
    # output follows the input again, so it ends where the input does, within that tolerance.
    drifting = frames_at(16000, [i * 321 for i in range(50)], 320)
    spans = stretches(run_resample(Resample(24000), drifting))
    assert len(spans) > 1
    assert abs(spans[-1][1] - (49 * 321 + 320) * 1.5) <= 0.0005 * 24000 + 1


def test_resample_keeps_a_gap_in_bot_audio_and_its_word_marks_with_their_audio():
    # A reply whose 5th 20 ms piece never came: the pieces after it, and their words, are stamped 20 ms later.
    reply = frames_at(24000, [i * 480 for i in range(10) if i != 4], 480, bot=True)
    out = run_resample(Resample(48000), reply, reply_done=True)
    assert stretches(out) == [(0, 3840), (4800, 9600)]
    words = [(f, w) for f in out if isinstance(f, TTSAudioFrame) for w in f.words]
    expected = [
        WordMark(w.word, 2 * w.start, 2 * w.end) for f in reply if isinstance(f, TTSAudioFrame) for w in f.words
    ]
    assert [w for _, w in words] == expected
    assert all(f.pts <= w.start < f.pts + f.samples for f, w in words), "each word goes out with its audio"
    done = next(i for i, f in enumerate(out) if isinstance(f, TTSDone))
    assert all(i < done for i, f in enumerate(out) if isinstance(f, TTSAudioFrame)), "the reply ends after its tail"


def test_the_word_marks_hq_holds_at_a_gap_go_out_with_the_audio_before_it():
    # HQ yields nothing for a reply's first two 20 ms pieces; the third never came. Their marks and audio go out
    # together, as the tail flushed at the gap, before the audio after it.
    reply = frames_at(22050, [i * 441 for i in range(10) if i != 2], 441, bot=True)
    out = [f for f in run_resample(Resample(16000, quality="HQ"), reply, reply_done=True) if isinstance(f, AudioFrame)]
    assert isinstance(out[0], TTSAudioFrame)
    assert (out[0].pts, out[0].samples, [w.word for w in out[0].words]) == (0, 640, ["w0", "w441"])
    assert stretches(out) == [(0, 640), (960, 3200)]
    assert [w.word for f in out if isinstance(f, TTSAudioFrame) for w in f.words] == [
        f"w{p}" for p in (0, 441, *range(1323, 4410, 441))
    ]
