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
    A failure that repeats on every tick (a device gone, a closed socket) is handled once; the ticks it repeats on
    are counted and reported in one line when it stops repeating, not 50 times a second.
    """

    def __init__(self, *, period: float = 0.02, name: str | None = None) -> None:
        super().__init__(name=name)
        self.period = period
        self._ticking = False
        self._failing: tuple[type, str] | None = None  # the failure the last tick raised, if it raised
        self._repeats = 0  # ticks since that failure was handled that raised it again

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
            problem = (type(failure), str(failure))
            if problem == self._failing:
                self._repeats += 1
                return
            self._end_repeats()
            self._failing = problem
            self._tick_failed(failure)
        else:
            if self._failing is not None:
                self._end_repeats()

    def _end_repeats(self) -> None:
        """The failure of the ticks before this one, if any, stopped repeating: report how often it did."""
        if self._repeats and not self.pipeline.stopping:
            kind, message = self._failing or (Exception, "")
            problem = f"the same failure on {self._repeats} more ticks ({self._repeats * self.period:g} s): "
            self.spawn(self.report(f"{problem}{kind.__name__}: {message}"), name=f"{self.name}-repeats")
        self._failing, self._repeats = None, 0

    def _tick_failed(self, exc: Exception) -> None:
        # Called in the metronome's task, which every call on the clock shares: the error policy (a skip-turn
        # interrupt may wait on providers) runs in a task of this pipeline instead.
        self.pipeline.fail_later(self, exc)
