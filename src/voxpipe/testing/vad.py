"""ScriptedVAD: an energy-threshold VAD — deterministic, model-free, exact to the sample on scripted audio."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from voxpipe.pipeline import AudioFormat, AudioFrame
from voxpipe.stages.vad import VADStage, Voicing

VOICED_LEVEL = 0.01  # of full scale (-40 dBFS); the same level voxpipe.measure uses on recordings


class ScriptedVADSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    level: float = Field(VOICED_LEVEL, gt=0, lt=1, description="a sample louder than this (of full scale) is speech")
    start_ms: float = Field(60.0, ge=0, le=2000, description="speech needed before speech-start is reported")
    stop_ms: float = Field(500.0, gt=0, le=5000, description="silence needed before speech-stop is reported")


class ScriptedVAD(VADStage):
    """Speech is any sample louder than ``level`` (a fraction of full scale)."""

    Settings: ClassVar[type[BaseModel]] = ScriptedVADSettings

    @classmethod
    def from_settings(cls, settings: ScriptedVADSettings, context: Any, name: str) -> ScriptedVAD:
        return cls(context.audio, level=settings.level, start_ms=settings.start_ms, stop_ms=settings.stop_ms, name=name)

    def __init__(
        self,
        audio: AudioFormat = AudioFormat(16000),
        *,
        level: float = VOICED_LEVEL,
        start_ms: float = 60.0,
        stop_ms: float = 500.0,
        name: str = "vad",
    ) -> None:
        super().__init__(audio, start_ms=start_ms, stop_ms=stop_ms, name=name)
        self.threshold = int(level * 32767)
        self._silence: dict[int, bytes] = {n: bytes(n) for n in (640, 320, 960, 1280)}

    def analyse(self, frame: AudioFrame) -> Voicing | None:
        pcm = frame.pcm
        if pcm == self._silence.get(len(pcm)):
            return None  # digital silence, the common case in scripted calls: a memcmp instead of numpy
        samples = np.frombuffer(pcm, dtype=np.int16)
        loud = np.flatnonzero(np.abs(samples.astype(np.int32)) > self.threshold)
        if loud.size == 0:
            return None
        return Voicing(int(loud[0]), int(loud[-1]))
