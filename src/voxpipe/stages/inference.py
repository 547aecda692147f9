"""Where model inference runs: a single-worker thread per model, at a lower CPU priority than the event loop.

Inference must not delay the event loop that carries audio. Running it in a thread keeps it off the loop, but on
a small machine (2 cores; Whisper, llama.cpp and Piper each busy in their own thread) the OS scheduler still makes
the loop wait for a core. Lowering the inference threads' priority (a higher ``nice`` value, per thread on Linux)
lets the loop — which needs the CPU for microseconds every 20 ms — run as soon as it wakes. Native worker threads
that a library starts from an inference thread inherit the lower priority.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("voxpipe.inference")

INFERENCE_NICENESS = 10


def _lower_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), INFERENCE_NICENESS)
    except (AttributeError, OSError) as exc:  # not Linux, or not permitted: run at normal priority
        log.debug("could not lower the inference thread's priority: %s", exc)


def inference_executor(name: str) -> ThreadPoolExecutor:
    """A one-thread executor for one model's inference, at lower CPU priority than the event loop."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=_lower_priority)
