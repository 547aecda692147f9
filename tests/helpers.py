"""Shared helpers: tiny stages for observing pipelines from the outside."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from voxpipe.pipeline import Direction, Frame, Interrupt, Stage

_sequence = itertools.count()


@dataclass
class Seen:
    seq: int
    frame: Frame
    direction: Direction


class Tap(Stage):
    """Logs every frame that reaches it, in either direction, *before* any gate — what its neighbours emitted."""

    def __init__(self, name: str) -> None:
        super().__init__(name=name)
        self.log: list[Seen] = []

    async def receive(self, frame: Frame, direction: Direction) -> None:
        self.log.append(Seen(next(_sequence), frame, direction))
        await super().receive(frame, direction)


class Collect(Stage):
    """A sink that keeps every downstream frame (and passes control frames on)."""

    def __init__(self, name: str = "collect") -> None:
        super().__init__(name=name)
        self.frames: list[Frame] = []

    async def process(self, frame: Frame, direction: Direction) -> None:
        if direction is Direction.DOWNSTREAM:
            self.frames.append(frame)
        await self.push(frame, direction)

    async def on_interrupt(self, interrupt: Interrupt) -> None:
        self.frames.append(interrupt)


@dataclass
class Calls:
    items: list[object] = field(default_factory=list)
