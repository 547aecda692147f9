"""A stage paced by the clock's metronome: the base of transports that send or play a frame per period."""

from __future__ import annotations

import asyncio

from voxpipe.pipeline import AudioFormat, Direction, ErrorPolicy, Frame, Stage, Start
from voxpipe.pipeline.errors import as_failure


def samples_per_period(audio: AudioFormat, period: float, name: str) -> int:
    """Samples of ``audio`` in one ``period``, which must be a whole number: a transport moves that many per tick
    while its timeline follows the clock, so a fraction dropped each tick would leave a hole or drift."""
    exact = period * audio.sample_rate
    if abs(exact - round(exact)) > 1e-6:
        raise ValueError(
            f"{name}: a {period:g} s period holds {exact:g} samples of {audio.sample_rate} Hz audio, not a whole "
            "number; use a period that does, or resample the audio to a rate that does"
        )
    return round(exact)


class PacedStage(Stage):
    """Calls :meth:`tick` once per ``period`` of clock time while the pipeline runs.

    Ticking begins when the :class:`Start` frame arrives — after every stage's ``start()`` has finished (models
    loaded), so no audio flows, and no tick is counted late, while the pipeline is still getting ready. The call's
    stages share one metronome slot (``group=pipeline``), so a call's input and output tick together. A tick that
    raises is this stage's failure, handled by its error policy like any other: under ``skip-frame`` and
    ``skip-turn`` the stage ticks on (what the tick was doing is what is skipped), under ``stop`` it ticks no more.
    """

    def __init__(self, *, period: float = 0.02, name: str | None = None) -> None:
        super().__init__(name=name)
        self.period = period
        self._ticking = False

    async def receive(self, frame: Frame, direction: Direction) -> None:
        if isinstance(frame, Start) and not self._ticking:
            self._ticking = True
            metronome = self.clock.metronome(self.period)
            ticking = metronome.ticking(self._tick, self._tick_failed, group=self.pipeline)
            self.spawn(ticking, name=f"{self.name}-ticks")
        await super().receive(frame, direction)

    async def tick(self, now: float) -> None:
        """One period is due at clock time ``now``."""
        raise NotImplementedError

    async def _tick(self, now: float) -> None:
        try:
            await self.tick(now)
        except (Exception, asyncio.CancelledError) as exc:
            failure = as_failure(exc)  # re-raises the metronome's own cancellation
            if self.error_policy is ErrorPolicy.STOP or self.pipeline.stopping:
                raise  # the call is ending: the metronome drops this stage and hands the failure to _tick_failed
            # Skipped, the call goes on: the metronome must keep ticking this stage (it drops a subscriber whose
            # tick raises), or the output would be silent for the rest of the call and the drain would never end.
            self._tick_failed(failure)

    def _tick_failed(self, exc: Exception) -> None:
        # Called in the metronome's task, which every call on the clock shares: the error policy (a skip-turn
        # interrupt may wait on providers) runs in a task of this pipeline instead.
        self.pipeline.fail_later(self, exc)
