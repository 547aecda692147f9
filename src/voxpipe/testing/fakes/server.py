"""What every loopback fake shares: an aiohttp server on 127.0.0.1, injected failures, and a log of what the
client did, which tests wait on instead of sleeping.

A fake speaks its provider's real protocol (``docs/providers-wire.md`` of the design notes) so the provider's
official SDK runs against it unmodified, pointed at :attr:`FakeServer.url` / :attr:`FakeServer.ws_url`.

    async with FakeAnthropic(replies=["Hello there."]) as fake:
        client = AsyncAnthropic(api_key=fake.api_key, base_url=fake.url, max_retries=0)
        ...
        await fake.wait_for("disconnect")       # the SDK closed the stream (a barge-in)
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Self

from aiohttp import web

Corruption = Literal["malformed-json", "unknown-event", "bad-audio"]

_CONNECTION_POLL_S = 0.02  # how often a stall looks whether its client is still there


@dataclass
class Faults:
    """Failures a fake injects; the defaults inject none.

    * ``refuse`` — answer the handshake or request with this HTTP status (401, 429, 500, 503…) and the provider's
      own error body;
    * ``stall_s`` — wait this long before the first byte of each response (a provider that hangs);
    * ``drop_after`` — disconnect abruptly after this many response messages or audio chunks;
    * ``corrupt`` — send one broken message in place of the first normal one: JSON that does not parse, an event
      type the provider does not have, or audio in an encoding other than the one asked for.
    """

    refuse: int | None = None
    stall_s: float = 0.0
    drop_after: int | None = None
    corrupt: Corruption | None = None


@dataclass(frozen=True)
class Seen:
    """One thing the fake observed, in order: ``kind`` is e.g. ``connect``, ``message``, ``cancel``,
    ``disconnect``, ``close``; ``data`` holds its details (headers, the parsed message…)."""

    kind: str
    data: dict[str, Any] = field(default_factory=dict)
    at: float = 0.0


@dataclass(frozen=True, order=True)
class Wait:
    """One injected wait as the fake served it, in ``time.monotonic()`` seconds (the clock of asyncio's loops, the
    same in every process): the request that started it arrived, and the answer that ended it was written.
    ``served_s`` is the injected latency plus the fake's own lateness (its timer waking late, its pauses) — the
    server's share of a turn, which benchmarks take out of the client's. Both ends lean towards the client: an
    arrival is stamped once the fake has read the request, an answer just before it is written."""

    arrived: float
    answered: float

    @property
    def served_s(self) -> float:
        return self.answered - self.arrived


class FakeServer:
    """Base of the loopback fakes. Subclasses add routes in :meth:`routes` and call :meth:`record` for what they
    observe; :meth:`refusal` gives them the injected or authentication failure for a request."""

    provider = "fake"

    def __init__(self, *, faults: Faults | None = None, api_key: str = "test-key") -> None:
        self.faults = faults or Faults()
        self.api_key = api_key
        self.seen: list[Seen] = []
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()  # wait_for()s, on any loop
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._sockets: set[web.WebSocketResponse] = set()

    # ------------------------------------------------------------------------------- lifecycle

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def start(self) -> Self:
        app = web.Application()
        self.routes(app)
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._runner = runner
        self._port = runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        for socket in list(self._sockets):
            if socket.prepared:  # one whose client left during the handshake never opened
                await socket.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"fake {self.provider} is not started")
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------------- what was seen

    def record(self, kind: str, **data: Any) -> Seen:
        seen = Seen(kind, data, time.monotonic())
        self.seen.append(seen)
        for loop, changed in list(self._waiters):  # a waiter may be on another thread's loop (see serving())
            loop.call_soon_threadsafe(changed.set)
        return seen

    def waits(self) -> list[Wait]:
        """Each injected wait this fake has served, in order: when the request that starts it arrived and when the
        answer that ends it was written (Deepgram: a Finalize and its result; Claude: a messages request and its
        first text; the TTS fakes: a context's or connection's first text and its first audio)."""
        raise NotImplementedError

    def kinds(self) -> list[str]:
        return [s.kind for s in self.seen]

    def of(self, kind: str) -> list[Seen]:
        return [s for s in self.seen if s.kind == kind]

    async def wait_for(
        self, kind: str, predicate: Callable[[Seen], bool] | None = None, *, within_s: float = 5.0
    ) -> Seen:
        """The first record of ``kind`` (matching ``predicate``), waiting up to ``within_s`` seconds for it."""

        def find() -> Seen | None:
            return next((s for s in self.seen if s.kind == kind and (predicate is None or predicate(s))), None)

        waiter = (asyncio.get_running_loop(), asyncio.Event())
        self._waiters.add(waiter)
        try:
            async with asyncio.timeout(within_s):
                while True:
                    waiter[1].clear()  # before looking: a record made after the look sets it again
                    if (found := find()) is not None:
                        return found
                    await waiter[1].wait()
        finally:
            self._waiters.discard(waiter)

    # ---------------------------------------------------------------------- failure injection

    def authorized(self, request: web.Request) -> bool:
        """Whether the request carries this provider's credentials for :attr:`api_key`."""
        raise NotImplementedError

    def error_body(self, status: int) -> dict[str, Any]:
        """The provider's own JSON error body for an HTTP status."""
        return {"error": {"status": status, "message": f"fake {self.provider}: HTTP {status}"}}

    def refusal(self, request: web.Request) -> web.Response | None:
        """The response refusing this request — bad credentials (401) or an injected status — or None. Records
        ``connect`` first: its path, headers and :func:`query`."""
        self.record("connect", path=request.path, query=query(request), headers=dict(request.headers))
        status = self.faults.refuse
        if status is None and not self.authorized(request):
            status = 401
        if status is None:
            return None
        self.record("refused", status=status)
        return web.json_response(self.error_body(status), status=status)

    async def stall(self, request: web.Request | None = None) -> bool:
        """Wait the injected ``stall_s`` (recorded ``stall``). Given the HTTP ``request`` being answered, watch its
        connection meanwhile and end the stall as soon as the client has gone: False then, True otherwise."""
        if self.faults.stall_s <= 0:
            return True
        self.record("stall", seconds=self.faults.stall_s)
        if request is None:
            await asyncio.sleep(self.faults.stall_s)
            return True
        # aiohttp does not cancel a handler whose client left (handler_cancellation is off by default), and its
        # protocol has no hook for a handler to await: the transport it drops on connection_lost is what tells.
        loop = asyncio.get_running_loop()
        until = loop.time() + self.faults.stall_s
        while connected(request):
            left = until - loop.time()
            if left <= 0:
                return True
            await asyncio.sleep(min(left, _CONNECTION_POLL_S))
        return False

    def should_drop(self, sent: int) -> bool:
        """Whether to disconnect now, having sent ``sent`` messages or chunks of the current response."""
        drop = self.faults.drop_after
        return drop is not None and sent >= drop

    def take_corruption(self) -> Corruption | None:
        """The injected corruption, once: the first message after it is normal again."""
        corrupt, self.faults.corrupt = self.faults.corrupt, None
        if corrupt is not None:
            self.record("corrupted", how=corrupt)
        return corrupt

    # ---------------------------------------------------------------------------- websockets

    def track(self, socket: web.WebSocketResponse) -> web.WebSocketResponse:
        """Remember an open websocket so :meth:`stop` can close it (an idle client would hold shutdown open)."""
        self._sockets.add(socket)
        return socket

    async def accept(self, request: web.Request, socket: web.WebSocketResponse) -> bool:
        """Complete the handshake of a tracked ``socket``; False (recorded ``gone``) if the client left during it
        (a barge-in while the reply's socket opens). The handler then returns :func:`client_left`, not the unopened
        ``socket``: aiohttp would try to close that one and log an error."""
        try:
            await socket.prepare(request)
        except ConnectionResetError:
            self.untrack(socket)
            self.record("gone", during="handshake")
            return False
        return True

    def untrack(self, socket: web.WebSocketResponse) -> None:
        self._sockets.discard(socket)

    async def drop(self, request: web.Request) -> None:
        """Disconnect abruptly, without a close frame or the end of the HTTP body: a provider dying mid-stream."""
        self.record("dropped")
        transport = request.transport
        if transport is not None:
            transport.abort()


def query(request: web.Request) -> dict[str, str | list[str]]:
    """A request's query parameters: each one's value, or the list of its values when it is repeated (Deepgram's
    ``keyterm=a&keyterm=b``; a plain dict would keep only the first)."""
    values = {name: request.query.getall(name) for name in request.query}
    return {name: got[0] if len(got) == 1 else got for name, got in values.items()}


def connected(request: web.Request) -> bool:
    """Whether the client of ``request`` is still connected (aiohttp drops the transport once the connection is
    lost)."""
    transport = request.transport
    return transport is not None and not transport.is_closing()


def client_left() -> web.Response:
    """What a handler returns for a client that has gone: aiohttp finds the connection closed and writes nothing."""
    return web.Response(status=499, reason="Client Closed Request")


@contextlib.contextmanager
def serving(*fakes: FakeServer, within_s: float = 10.0) -> Iterator[tuple[FakeServer, ...]]:
    """Serve ``fakes`` from a thread with its own event loop, for code that runs a loop of its own — such as
    ``voxpipe.call.run_configured_call`` or ``voxpipe call --fake-providers``. Inspect ``fake.seen`` afterwards."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="voxpipe-fakes", daemon=True)
    thread.start()

    def call(coroutine: Any) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout=within_s)

    started: list[FakeServer] = []
    try:
        for fake in fakes:
            call(fake.start())
            started.append(fake)
        yield fakes
    finally:
        try:
            for fake in started:
                call(fake.stop())
        finally:
            # Handlers aiohttp no longer tracks (their client left; e.g. one in a stall) are still pending: end them
            # as asyncio.run() would, or closing the loop destroys them ("Task was destroyed but it is pending!").
            call(_cancel_remaining(within_s / 2))
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=within_s)
            loop.close()


async def _cancel_remaining(within_s: float) -> None:
    """Cancel every other task of the running loop and wait for them (up to ``within_s`` seconds); then close its
    async generators. Like asyncio.run()'s teardown, an exception a task ended with goes to the loop's handler."""
    loop = asyncio.get_running_loop()
    tasks = asyncio.all_tasks(loop) - {asyncio.current_task(loop)}
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=within_s)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            context = {"message": "unhandled exception during serving() shutdown", "task": task}
            loop.call_exception_handler(context | {"exception": task.exception()})
    await loop.shutdown_asyncgens()
