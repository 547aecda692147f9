"""Shared helpers: tiny stages for observing pipelines from the outside."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Any, TypeVar

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


S = TypeVar("S", bound=Stage)


def watching_stop(stage_class: type[S]) -> tuple[type[S], asyncio.Event]:
    """A subclass of ``stage_class`` whose ``stop()`` sets the event returned with it as it begins."""
    stopping = asyncio.Event()

    class Watched(stage_class):  # type: ignore[valid-type,misc]
        async def stop(self) -> None:
            stopping.set()
            await super().stop()

    return Watched, stopping


async def cancel_while_stopping(running: asyncio.Task[Any], stopping: asyncio.Event, websocket: Any) -> None:
    """Cancel ``run()`` itself once the stage is stopping, so the teardown cuts short a close under way: the
    connection must still be aborted, not left CLOSING with its transport open."""
    await asyncio.wait_for(stopping.wait(), 10)
    running.cancel()
    await asyncio.wait({running})
    await asyncio.wait_for(websocket.wait_closed(), 5)  # aborted: the transport is gone
