"""Audio formats, and the check a stage makes on the audio it receives.

The runtime never guesses: audio in a format a stage does not expect is either converted by an explicit
``Resample`` stage (``voxpipe.stages.resample``, built on soxr) or rejected with an error that names the stage,
the format it got and the format it needs.
"""

from __future__ import annotations

from dataclasses import dataclass

from voxpipe.pipeline.errors import AudioFormatError
from voxpipe.pipeline.frames import AudioFrame


@dataclass(frozen=True, slots=True)
class AudioFormat:
    """PCM int16 audio at ``sample_rate`` Hz with ``channels`` interleaved channels."""

    sample_rate: int
    channels: int = 1

    def __post_init__(self) -> None:
        if self.sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {self.sample_rate}")
        if self.channels not in (1, 2):
            raise ValueError(f"channels must be 1 or 2, got {self.channels}")

    def __str__(self) -> str:
        return f"{self.sample_rate} Hz {'mono' if self.channels == 1 else 'stereo'}"

    def samples(self, seconds: float) -> int:
        """Samples per channel in ``seconds`` of audio."""
        return round(seconds * self.sample_rate)

    @property
    def sample_bytes(self) -> int:
        """Bytes of one sample time: an int16 for each channel."""
        return 2 * self.channels

    def frame_bytes(self, seconds: float) -> int:
        return self.samples(seconds) * self.sample_bytes

    def check(self, frame: AudioFrame, stage: str) -> None:
        """Raise :class:`AudioFormatError` unless ``frame`` is well-formed audio in this format."""
        if frame.sample_rate <= 0 or frame.channels not in (1, 2):
            raise AudioFormatError(
                f"stage {stage!r} got a malformed audio frame: sample_rate={frame.sample_rate}, "
                f"channels={frame.channels} (a rate must be positive, channels 1 or 2)"
            )
        if frame.sample_rate != self.sample_rate or frame.channels != self.channels:
            got = AudioFormat(frame.sample_rate, frame.channels)
            raise AudioFormatError(
                f"stage {stage!r} expects {self} audio but got {got}; add a Resample stage before it"
            )
        if len(frame.pcm) % self.sample_bytes:
            raise AudioFormatError(
                f"stage {stage!r} got a malformed audio frame: {len(frame.pcm)} bytes is not a whole number "
                f"of {self.channels}-channel int16 samples"
            )
