"""Errors the runtime raises. Each message names the stage or thing at fault and what was wrong."""

from __future__ import annotations

import asyncio


class VoxpipeError(Exception):
    """Base of voxpipe's own errors."""


class PipelineBuildError(VoxpipeError):
    """The pipeline was put together wrongly (found when it is built, before anything runs)."""


class AudioFormatError(VoxpipeError):
    """Audio of the wrong sample rate, channel count or shape reached a stage."""


class StrayCancellation(VoxpipeError):
    """A ``CancelledError`` reached a stage whose task was not being cancelled: the stage awaited a task or future
    that someone else cancelled (a connection task torn down on reconnect). It is the stage's failure."""


def being_cancelled() -> bool:
    """True when the current task has been asked to stop (``Task.cancel()``): its ``CancelledError`` is real."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def as_failure(error: BaseException) -> Exception:
    """What a stage raised, as a failure for its error policy: an ``Exception`` as it is, and a stray
    ``CancelledError`` as :class:`StrayCancellation` (left alone it would end the task silently: a worker, or the
    metronome every call shares). Re-raises ``error`` when it is the current task's own cancellation, or any other
    ``BaseException`` (KeyboardInterrupt, SystemExit)."""
    if isinstance(error, Exception):
        return error
    if isinstance(error, asyncio.CancelledError) and not being_cancelled():
        failure = StrayCancellation(
            "a CancelledError reached the stage, which was not being cancelled (it awaited a task or future "
            "that was cancelled)"
        )
        failure.__cause__ = error
        return failure
    raise error
