"""A stage paced by the clock's metronome: the base of transports that send or play a frame per period."""

from __future__ import annotations

from voxpipe.pipeline import Stage


class PacedStage(Stage):
    """Calls :meth:`tick` once per ``period`` of clock time while the pipeline runs.

    The call's stages share one metronome slot (``group=pipeline``), so a call's input and output tick together.
    A tick that raises is this stage's failure, handled by its error policy like any other.
    """

    def __init__(self, *, period: float = 0.02, name: str | None = None) -> None:
        super().__init__(name=name)
        self.period = period

    async def start(self) -> None:
        metronome = self.clock.metronome(self.period)
        self.spawn(metronome.ticking(self.tick, self._tick_failed, group=self.pipeline), name=f"{self.name}-ticks")

    async def tick(self, now: float) -> None:
        """One period is due at clock time ``now``."""
        raise NotImplementedError

    def _tick_failed(self, exc: BaseException) -> None:
        assert isinstance(exc, Exception)
        self.spawn(self.pipeline._stage_failed(self, exc, None), name=f"{self.name}-tick-failed")
