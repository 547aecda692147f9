"""Loopback fakes of the cloud providers' services, speaking their real wire protocols (docs/testing.md).

The fakes need ``aiohttp`` (``pip install 'voxpipe[fakes]'``, part of ``voxpipe[cloud]``); each lives in its own
module — ``deepgram``, ``anthropic``, ``elevenlabs``, ``cartesia`` — and is imported from there.
"""

from voxpipe.testing.fakes.server import FakeServer, Faults, Seen, serving

__all__ = ["FakeServer", "Faults", "Seen", "serving"]
