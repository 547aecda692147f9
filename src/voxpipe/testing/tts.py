"""ScriptedTTS: audible speech-like audio of the right length, with word marks, at a set speed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from voxpipe.pipeline import AudioFormat, WordMark
from voxpipe.stages.tts import TTSStage
from voxpipe.testing.signals import speechlike


class ScriptedTTSSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ttfa_s: float = Field(0.12, ge=0, le=30, description="time to first audio of each chunk")
    rtf: float = Field(0.2, gt=0, le=10, description="real-time factor of synthesis after the first audio")
    chunk_s: float = Field(0.04, gt=0, le=1, description="size of the audio pieces streamed")
    f0: float = Field(210.0, ge=50, le=500, description="pitch of the voice, Hz")


class ScriptedTTS(TTSStage):
    """Speaks each chunk after ``ttfa_s``, then streams it in ``chunk_s`` pieces at real-time factor ``rtf``.

    The voice is pitched at ``f0`` (different from the scripted caller's) so the two are easy to tell apart.
    """

    def __init__(
        self,
        audio: AudioFormat = AudioFormat(16000),
        *,
        ttfa_s: float = 0.12,
        rtf: float = 0.2,
        chunk_s: float = 0.04,
        f0: float = 210.0,
        name: str = "tts",
    ) -> None:
        super().__init__(audio, name=name)
        self.ttfa_s = ttfa_s
        self.rtf = rtf
        self.chunk_s = chunk_s
        self.f0 = f0

    Settings: ClassVar[type[BaseModel]] = ScriptedTTSSettings

    @classmethod
    def from_settings(cls, settings: ScriptedTTSSettings, context: Any, name: str) -> ScriptedTTS:
        return cls(
            context.audio, ttfa_s=settings.ttfa_s, rtf=settings.rtf, chunk_s=settings.chunk_s, f0=settings.f0, name=name
        )

    async def synthesize(self, text: str) -> AsyncIterator[tuple[bytes, tuple[WordMark, ...]]]:
        audio = self.produces
        assert audio is not None
        samples, spans = speechlike(text, audio.sample_rate, f0=self.f0, rate=1.15)
        await self.clock.sleep(self.ttfa_s)
        step = audio.samples(self.chunk_s)
        for start in range(0, len(samples), step):
            if start:
                await self.clock.sleep(self.chunk_s * self.rtf)
            end = start + step
            marks = tuple(WordMark(s.word, s.start, s.end) for s in spans if start <= s.start < end)
            yield samples[start:end].tobytes(), marks
