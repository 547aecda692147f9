"""Errors the runtime raises. Each message names the stage or thing at fault and what was wrong."""

from __future__ import annotations


class VoxpipeError(Exception):
    """Base of voxpipe's own errors."""


class PipelineBuildError(VoxpipeError):
    """The pipeline was put together wrongly (found when it is built, before anything runs)."""


class AudioFormatError(VoxpipeError):
    """Audio of the wrong sample rate, channel count or shape reached a stage."""
