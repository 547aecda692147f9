"""SnapshotWriter: writes the newest snapshot of something from a thread of its own, off the event loop.

A call rewrites ``transcript.json`` at every turn's end; serialising and writing it grows with the call (about a
millisecond at 60 turns), time the event loop carrying the call's audio should not spend. The loop takes the
snapshot (cheap, and consistent since nothing changes under it), this writer's thread does the rest.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

S = TypeVar("S")

log = logging.getLogger("voxpipe.snapshots")


class SnapshotWriter(Generic[S]):
    """Runs ``write(snapshot)`` in one thread for the snapshots :meth:`submit` hands it, one at a time and in order.

    Only the newest snapshot waiting is written: one submitted while another waits replaces it, so a slow disk
    costs skipped intermediate versions, never an older version written over a newer one. ``write`` handles its
    own failures; one that escapes is logged and the writer goes on. Whoever creates the writer owns its thread and
    must :meth:`close` it.
    """

    def __init__(self, write: Callable[[S], None], *, name: str) -> None:
        self._write = write
        self._name = name
        self._changed = threading.Condition()
        self._waiting: list[S] = []  # the newest snapshot not yet written, if any (at most one)
        self._closed = False
        # daemon: close() is what ends the thread; a disk stuck for good must not also hold up the process's exit
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, snapshot: S) -> None:
        """Have ``snapshot`` written; returns at once. Ignored once closed: it would overwrite what the owner
        wrote last."""
        with self._changed:
            if self._closed:
                return
            self._waiting[:] = [snapshot]
            self._changed.notify()

    def close(self) -> None:
        """Stop the thread: a snapshot still waiting is dropped, one being written is finished first. When this
        returns nothing of the writer's runs any more, so what the owner writes next is the file's last content."""
        with self._changed:
            self._closed = True
            self._waiting.clear()
            self._changed.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._waiting or self._closed)
                if self._closed:
                    return
                snapshot = self._waiting.pop()
            try:
                self._write(snapshot)
            except Exception:
                log.exception("%s: writing a snapshot failed; the next one will be tried", self._name)
