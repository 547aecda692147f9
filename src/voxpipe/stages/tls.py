"""The TLS context of the providers' ``wss://`` connections: one per process, built off the event loop.

Given ``ssl=True`` (what websockets passes for a ``wss://`` URL when it is given no context), asyncio builds
``ssl.create_default_context()`` at every connect. Loading the system's CA certificates takes 20-50 ms, on the event
loop every call shares, so each connect stalled every call's audio (ElevenLabs connects once per reply). The context
is built once, on a worker thread, and shared: an ``SSLContext`` holds nothing per connection, and any thread and
event loop may use it (calls run on event loops of their own, in threads).
"""

from __future__ import annotations

import asyncio
import ssl
import threading

_lock = threading.Lock()  # two calls connecting at once, on two loops, still build it once
_context: ssl.SSLContext | None = None


async def context_for(url: str) -> ssl.SSLContext | None:
    """The shared TLS context for a ``wss://`` URL (built on a worker thread the first time); None for ``ws://``,
    which takes no TLS (websockets refuses a context for it)."""
    if not url.startswith("wss://"):
        return None
    if _context is not None:
        return _context
    return await asyncio.to_thread(_default_context)


def _default_context() -> ssl.SSLContext:
    global _context
    with _lock:
        if _context is None:
            _context = ssl.create_default_context()
        return _context
