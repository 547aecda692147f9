"""The TLS context of the TTS providers' wss:// connections, and the Cartesia client: built once, off the event loop.

Given no context, asyncio builds ``ssl.create_default_context()`` at every wss:// connect, on the loop every call
shares (20-50 ms of loading CA certificates). The connects here go to a TCP server that never answers TLS, with a
short connect timeout: what is checked is the client's own work before the network, not a TLS session.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest

from voxpipe.pipeline import DOWNSTREAM, ErrorPolicy, LLMRequest, Pipeline, RealClock
from voxpipe.stages import tls
from voxpipe.stages.cartesia_tts import CartesiaTTS, CartesiaTTSSettings
from voxpipe.stages.cloud import ProviderError
from voxpipe.stages.elevenlabs_tts import ElevenLabsTTS, ElevenLabsTTSSettings

VOICE = "a0e99841-438c-4a64-b679-ae501e7d6091"


@pytest.fixture
def contexts_built(monkeypatch: pytest.MonkeyPatch) -> list[threading.Thread]:
    """The thread of every ``ssl.create_default_context()`` from here on (a fresh process: none cached yet)."""
    built: list[threading.Thread] = []
    create = ssl.create_default_context

    def recording(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        built.append(threading.current_thread())
        return create(*args, **kwargs)

    monkeypatch.setattr(ssl, "create_default_context", recording)
    monkeypatch.setattr(tls, "_context", None)
    return built


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """A TCP server that accepts and never answers: a TLS handshake with it times out."""
    server = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


@pytest.mark.timeout(30)
async def test_elevenlabs_replies_share_one_tls_context_built_off_the_loop(contexts_built, silent_port):
    settings = ElevenLabsTTSSettings(base_url=f"https://127.0.0.1:{silent_port}", connect_timeout_s=0.2)
    tts = ElevenLabsTTS(settings, api_key="k")
    assert tts.url().startswith("wss://")
    for _ in range(3):  # one socket per reply
        with pytest.raises(ProviderError, match=r"no connection within 0\.2 s"):
            await tts._connect()
    assert len(contexts_built) == 1, "one TLS context for every connect"
    assert contexts_built[0] is not threading.current_thread(), "built on a worker thread, not the event loop's"


@pytest.mark.timeout(30)
async def test_cartesia_builds_its_client_and_tls_context_off_the_loop(contexts_built, silent_port):
    clients_built: list[threading.Thread] = []

    class Watched(CartesiaTTS):
        def _new_client(self) -> Any:
            clients_built.append(threading.current_thread())
            return super()._new_client()

    settings = CartesiaTTSSettings(voice=VOICE, websocket_url=f"wss://127.0.0.1:{silent_port}", connect_timeout_s=0.2)
    tts = Watched(settings, api_key="k")
    tts.error_policy = ErrorPolicy.SKIP_FRAME  # a failed connect is reported, and the call goes on
    pipeline = Pipeline([tts], clock=RealClock())
    running = asyncio.create_task(pipeline.run())  # start() connects
    epoch = pipeline.next_epoch()
    await tts.receive(LLMRequest(epoch=epoch), DOWNSTREAM)  # the first reply: no socket, so it connects again
    await pipeline.end()
    assert await asyncio.wait_for(running, 10) == "ended"
    assert [e.error.count("no WebSocket handshake within 0.2 s") for e in pipeline.errors] == [1, 1]
    loop_thread = threading.current_thread()
    assert len(clients_built) == 1 and clients_built[0] is not loop_thread, "the SDK client, once, off the loop"
    # The SDK client's REST pool may build a context of its own, in the same thread job; the sockets share one.
    assert tls._context is not None, "the sockets were given the shared context"
    assert all(thread is not loop_thread for thread in contexts_built), "no TLS context built on the loop"


@pytest.mark.timeout(10)
async def test_only_a_wss_url_gets_the_shared_context(contexts_built):
    assert await tls.context_for("ws://127.0.0.1:8000/tts/websocket") is None  # websockets refuses one for ws://
    assert not contexts_built
    shared = await tls.context_for("wss://api.cartesia.ai/tts/websocket")
    assert isinstance(shared, ssl.SSLContext) and shared.verify_mode is ssl.CERT_REQUIRED
    assert await tls.context_for("wss://api.elevenlabs.io/v1/text-to-speech/v/stream-input") is shared
    assert len(contexts_built) == 1
