"""HeapFreeze: keeps CPython's cyclic garbage collector from walking the long-lived heap while calls run.

A collection of the oldest generation walks every object the collector tracks, and it runs on the thread that
carries the call's audio. With the cloud SDKs imported (~200 000 objects), one took 68 ms (median of 3, max 147 ms)
in a 12-turn call on this 2-core VM: a stall of several audio frames, landing on whichever turn it hits.
``gc.freeze()`` moves every object alive at that moment (the modules, the SDKs' types, loaded models) into a
permanent generation that collections skip, so a collection only walks what calls have made since.

Pipelines hold the freeze while they run (``Pipeline(freeze_heap=True)``, the default): the first pipeline to start
in a process freezes, once its stages are ready; when the last one still running ends, the heap is unfrozen, and what
became garbage in between is collected as usual. Pipelines that start while the heap is frozen do not freeze again:
their own objects stay collectable. The objects of the pipelines that were running when the heap froze are frozen
with it, though: once such a call ends, its cyclic garbage (a pipeline and its stages refer to each other) is
collected only when the heap is unfrozen - when no pipeline runs. In a process whose calls keep overlapping (B
starts before A ends, C before B ends, ...) that can be long after the call ended; reference counting still frees
what is not in a cycle.
"""

from __future__ import annotations

import gc


class HeapFreeze:
    """A process-wide, counted ``gc.freeze()``: frozen while anyone holds it."""

    def __init__(self) -> None:
        self.holders = 0

    def hold(self) -> None:
        if self.holders == 0:
            gc.freeze()
        self.holders += 1

    def release(self) -> None:
        if self.holders <= 0:
            raise RuntimeError("HeapFreeze.release() without a matching hold()")
        self.holders -= 1
        if self.holders == 0:
            gc.unfreeze()


HEAP = HeapFreeze()  # the one the pipelines of this process share
