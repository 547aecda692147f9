"""FakeCartesia: a loopback Cartesia TTS WebSocket server for the official ``cartesia`` SDK (4.x).

It speaks the protocol of ``providers-wire.md`` §4.3: ``GET /tts/websocket`` with ``Authorization: Bearer <key>``
and ``cartesia-version`` (the handshake is refused with 401 otherwise); one JSON text frame per client input —
generation requests (``context_id``, ``model_id``, ``transcript``, ``voice``, ``output_format``, ``continue``,
``language``, ``add_timestamps`` …) and ``{"cancel": true, "context_id": …}`` — and, per context, ``chunk``
messages (base64 raw PCM in the requested encoding, ``pcm_s16le`` or ``pcm_f32le``), ``timestamps`` messages
(``word_timestamps`` with ``words``/``start``/``end`` in seconds from the context's first sample) and ``done`` once
the context's ``continue: false`` input has been spoken. A bad request gets Cartesia's ``error`` message
(``status_code`` 400) for its context.

How it speaks. A context's transcript pieces are concatenated as Cartesia does (so the client must keep the spaces
between pieces); complete words are spoken as they arrive, the rest once ``continue: false`` comes. The voice is
:func:`voxpipe.testing.signals.speechlike` at pitch ``f0``: the first chunk goes out ``ttfa_s`` after the context's
first input, then ``chunk_s`` pieces at real-time factor ``rtf`` (0.5: twice as fast as real time). A word's
timestamps go out after the chunk that holds its end — timestamps trail the audio, as they do from a synthesiser
that knows where a word ends only once it has made it. ``quiet_words`` speaks the first that many words of each
context's first piece softly (peak about -50 dBFS, below the level voxpipe trims as leading silence), as a breathy
start: their timestamps go out before any audible audio (while a chunk is shorter than the pause after a word). A
cancel stops the context at once: nothing more is sent for it. ``idle_close_s`` closes a connection that long
without a message from the client while no context speaks, with code 1000 "connection idle timeout", as Cartesia
does after 5 minutes (None, the default: never). As Cartesia's do, a context expires
``context_expiry_s`` (1 s) after its last audio went out if no input came meanwhile: it is sent ``done`` though its
``continue: false`` never came, and later input to it is refused with an ``error`` (which the SDK, having seen
the context's ``done``, drops).

    async with FakeCartesia() as fake:
        client = AsyncCartesia(api_key=fake.api_key, base_url=fake.url, websocket_base_url=fake.ws_url)
        ...
        await fake.wait_for("cancel")             # the client cancelled a context (a barge-in)

Faults (``Faults``): ``refuse`` answers the handshake with that status; ``stall_s`` holds each context's audio back
that long after its first input; ``drop_after`` aborts the first ``drop_connections`` connections once that many
messages were sent on each; ``corrupt`` sends one broken message in place of the first normal one: a text frame
that is not JSON, an event ``type`` Cartesia does not have, or a chunk whose audio is bad (``bad_audio``: invalid
base64, a length that is not whole samples, or ``pcm_f32le`` when ``pcm_s16le`` was asked) — after
``corrupt_after`` good messages on the connection. ``error_event`` makes the server answer one context with
Cartesia's ``error`` message after some chunks. ``deaf`` wedges the server at a context's first input: it sends
nothing more and stops reading its socket (a dead network path), so the client's close frame is never answered.

Records: ``connect`` (path, query, headers), ``refused``, ``message`` (connection, the parsed client message),
``context`` (connection, context id, output format), ``cancel`` (connection, context id), ``chunk`` (context id,
bytes; as it is written), ``done`` and ``error`` (context id), ``expired`` (context id; its ``done`` follows),
``idle-close`` (connection), ``corrupted``, ``stall``, ``dropped``, ``disconnect`` (connection; the client went away
or closed), ``deaf`` (connection).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from aiohttp import WSMsgType, web

from voxpipe.testing.fakes.server import FakeServer, Faults, Wait, client_left
from voxpipe.testing.signals import WordSpan, speechlike

API_VERSION = "2026-08-14"
SAMPLE_RATES = (8000, 16000, 22050, 24000, 44100, 48000)
ENCODINGS = ("pcm_s16le", "pcm_f32le")  # Cartesia also has pcm_mulaw and pcm_alaw; this fake does not
BadAudio = Literal["base64", "odd-length", "float32"]


@dataclass(frozen=True)
class ErrorEvent:
    """Answer the ``context``-th context the server sees (0-based, across connections) with Cartesia's ``error``
    message after ``after_chunks`` audio chunks."""

    context: int = 0
    after_chunks: int = 0
    status_code: int = 500
    title: str = "Internal Server Error"
    message: str = "synthesis failed"
    error_code: str = "internal_error"


@dataclass(eq=False)
class _Context:
    id: str
    index: int
    encoding: str
    sample_rate: int
    timestamps: bool
    text: str = ""  # received, not yet spoken
    closed: bool = False  # continue: false received
    more: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


@dataclass(eq=False)
class _Connection:
    index: int
    socket: web.WebSocketResponse
    request: web.Request
    sent: int = 0
    contexts: dict[str, _Context] = field(default_factory=dict)
    finished: set[str] = field(default_factory=set)  # contexts done, cancelled or failed
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class _Dropped(Exception):
    """The fault injection aborted the connection."""


class FakeCartesia(FakeServer):
    """A Cartesia TTS WebSocket (``/tts/websocket``) on 127.0.0.1."""

    provider = "Cartesia"

    def __init__(
        self,
        *,
        faults: Faults | None = None,
        api_key: str = "test-key",
        ttfa_s: float = 0.05,
        rtf: float = 0.5,
        chunk_s: float = 0.04,
        f0: float = 200.0,
        rate: float = 1.15,
        quiet_words: int = 0,
        drop_connections: int = 1,
        corrupt_after: int = 0,
        bad_audio: BadAudio = "base64",
        error_event: ErrorEvent | None = None,
        deaf: bool = False,
        context_expiry_s: float | None = 1.0,
        idle_close_s: float | None = None,
    ) -> None:
        super().__init__(faults=faults, api_key=api_key)
        self.idle_close_s = idle_close_s
        self.context_expiry_s = context_expiry_s  # None: contexts wait for input for ever
        self.ttfa_s = ttfa_s
        self.rtf = rtf
        self.chunk_s = chunk_s
        self.f0 = f0
        self.rate = rate
        self.quiet_words = quiet_words
        self.drop_connections = drop_connections
        self.corrupt_after = corrupt_after
        self.bad_audio = bad_audio
        self.error_event = error_event
        self.deaf = deaf
        self._connections = itertools.count()
        self._contexts = itertools.count()

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/tts/websocket", self._websocket)

    def authorized(self, request: web.Request) -> bool:
        return (
            request.headers.get("Authorization") == f"Bearer {self.api_key}"
            and request.headers.get("cartesia-version", "") != ""
        )

    def waits(self) -> list[Wait]:
        """Each context that spoke: its first text's arrival and the write of its first audio chunk."""
        arrivals = {s.data["context_id"]: s.at for s in self.of("context")}
        firsts: dict[str, float] = {}
        for chunk in self.of("chunk"):
            firsts.setdefault(chunk.data["context_id"], chunk.at)
        return sorted(Wait(arrivals[context], answered) for context, answered in firsts.items())

    def error_body(self, status: int) -> dict[str, Any]:
        titles = {401: "Unauthorized", 429: "Too Many Requests"}
        return {"error": titles.get(status, "Error"), "message": f"fake Cartesia: HTTP {status}", "status": status}

    # --------------------------------------------------------------------------------- the socket

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        refused = self.refusal(request)
        if refused is not None:
            return refused
        socket = self.track(web.WebSocketResponse())
        if not await self.accept(request, socket):
            return client_left()
        connection = _Connection(next(self._connections), socket, request)
        try:
            while True:
                try:
                    message = await socket.receive(timeout=self.idle_close_s)
                except TimeoutError:
                    if any(c.task is not None and not c.task.done() for c in connection.contexts.values()):
                        continue  # speaking: not idle
                    self.record("idle-close", connection=connection.index)
                    await socket.close(code=1000, message=b"connection idle timeout")
                    break
                if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                    break
                if message.type is WSMsgType.TEXT:
                    await self._on_text(connection, message.data)
                elif message.type is WSMsgType.BINARY:
                    await self._send_error(connection, None, 400, "Invalid request", "binary frames are not accepted")
        except _Dropped:
            pass
        finally:
            for context in connection.contexts.values():
                if context.task is not None:
                    context.task.cancel()
            tasks = [c.task for c in connection.contexts.values() if c.task is not None]
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            self.untrack(socket)
            self.record("disconnect", connection=connection.index, code=socket.close_code)
        return socket

    async def _on_text(self, connection: _Connection, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            await self._send_error(connection, None, 400, "Invalid request", "the message is not valid JSON")
            return
        self.record("message", connection=connection.index, message=message)
        if not isinstance(message, dict):
            await self._send_error(connection, None, 400, "Invalid request", "the message is not a JSON object")
            return
        context_id = message.get("context_id")
        if message.get("cancel") is True:
            self.record("cancel", connection=connection.index, context_id=context_id)
            context = connection.contexts.get(context_id) if isinstance(context_id, str) else None
            if context is not None and context.task is not None:
                context.task.cancel()  # stops at once: nothing more goes out for it
            if isinstance(context_id, str):
                connection.finished.add(context_id)
            return
        problem = self._invalid(message)
        if problem is not None or not isinstance(context_id, str):
            await self._send_error(connection, context_id, 400, "Invalid request", problem or "context_id is required")
            return
        if context_id in connection.finished:
            await self._send_error(connection, context_id, 400, "Invalid request", f"context {context_id} is closed")
            return
        context = connection.contexts.get(context_id)
        if context is None:
            output = message["output_format"]
            context = _Context(
                context_id,
                next(self._contexts),
                output["encoding"],
                output["sample_rate"],
                bool(message.get("add_timestamps")),
            )
            connection.contexts[context_id] = context
            self.record("context", connection=connection.index, context_id=context_id, output_format=output)
        elif context.closed:
            await self._send_error(connection, context_id, 400, "Invalid request", "input after continue: false")
            return
        context.text += message["transcript"]
        context.closed = message.get("continue", False) is False
        context.more.set()
        if context.task is None:
            context.task = asyncio.create_task(self._speak(connection, context))

    @staticmethod
    def _invalid(message: dict[str, Any]) -> str | None:
        """What is wrong with a generation request, as Cartesia would say it (None: nothing)."""
        if not isinstance(message.get("context_id"), str) or not message["context_id"]:
            return "context_id is required"
        if not isinstance(message.get("model_id"), str) or not message["model_id"]:
            return "model_id is required"
        voice = message.get("voice")
        if isinstance(voice, dict):
            voice = voice.get("id")
        if not isinstance(voice, str) or not voice:
            return "voice is required (a voice id)"
        if not isinstance(message.get("transcript"), str):
            return "transcript must be a string"
        output = message.get("output_format")
        if not isinstance(output, dict) or output.get("container") != "raw":
            return "output_format.container must be 'raw' on the WebSocket"
        if output.get("encoding") not in ENCODINGS:
            return f"unsupported encoding {output.get('encoding')!r} (this fake: {', '.join(ENCODINGS)})"
        if output.get("sample_rate") not in SAMPLE_RATES:
            return f"unsupported sample_rate {output.get('sample_rate')!r}; supported: {SAMPLE_RATES}"
        return None

    # ---------------------------------------------------------------------------------- speaking

    async def _speak(self, connection: _Connection, context: _Context) -> None:
        """Stream the context's audio as its text arrives; ``done`` after its last input was spoken."""
        rate = context.sample_rate
        step = max(1, round(self.chunk_s * rate))
        gap = np.zeros(round(0.07 / self.rate * rate), dtype=np.int16)  # between pieces, as between words
        position = 0  # samples sent for this context
        chunks = 0
        failure = self.error_event if self.error_event and self.error_event.context == context.index else None
        loop = asyncio.get_running_loop()
        first_audio_due = loop.time() + self.ttfa_s  # from the context's first input: synthesis is inside it
        try:
            if self.deaf:  # wedged: it reads and says nothing more, until the connection's handler is torn down
                if connection.request.transport is not None:
                    connection.request.transport.pause_reading()
                self.record("deaf", connection=connection.index)
                await asyncio.Future()
            await self.stall()
            while True:
                text = self._take_ready(context)
                if not text:
                    if context.closed:
                        break
                    context.more.clear()
                    if position and not await self._more_in_time(context):
                        self.record("expired", context_id=context.id)
                        break
                    await context.more.wait()
                    continue
                samples, spans = speechlike(text, rate, f0=self.f0, rate=self.rate)
                if not position and self.quiet_words and spans:
                    samples = self._soften(samples, spans[min(self.quiet_words, len(spans)) - 1].end)
                if position:
                    samples = np.concatenate([gap, samples])
                    spans = [WordSpan(s.word, s.start + len(gap), s.end + len(gap)) for s in spans]
                pending = list(spans)
                for start in range(0, len(samples), step):
                    if failure is not None and chunks >= failure.after_chunks:
                        await self._send_error(
                            connection,
                            context.id,
                            failure.status_code,
                            failure.title,
                            failure.message,
                            failure.error_code,
                        )
                        return
                    piece = samples[start : start + step]
                    if chunks == 0 and (wait := first_audio_due - loop.time()) > 0:
                        await asyncio.sleep(wait)
                    await self._send_chunk(connection, context, piece)
                    chunks += 1
                    end = start + len(piece)
                    said = [s for s in pending if s.end <= end]
                    pending = pending[len(said) :]
                    if said and context.timestamps:
                        await self._send(
                            connection,
                            {
                                "type": "timestamps",
                                "context_id": context.id,
                                "done": False,
                                "status_code": 206,
                                "flush_id": 1,
                                "word_timestamps": {
                                    "words": [s.word for s in said],
                                    "start": [round((position + s.start) / rate, 6) for s in said],
                                    "end": [round((position + s.end) / rate, 6) for s in said],
                                },
                            },
                        )
                    await asyncio.sleep(len(piece) / rate * self.rtf)
                position += len(samples)
            connection.finished.add(context.id)  # first: input arriving while done is written is refused too
            await self._send(connection, {"type": "done", "context_id": context.id, "done": True, "status_code": 206})
            self.record("done", context_id=context.id)
        except _Dropped:
            pass
        except (ConnectionError, RuntimeError):
            pass  # the client went away mid-context

    async def _more_in_time(self, context: _Context) -> bool:
        """Whether more input comes for ``context`` before it expires (its audio is all out)."""
        if self.context_expiry_s is None:
            return True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.context_expiry_s):
                await context.more.wait()
        return context.more.is_set()

    @staticmethod
    def _soften(samples: np.ndarray, end: int) -> np.ndarray:
        """``samples`` with the first ``end`` brought down to a peak of about -50 dBFS (100 of 32767)."""
        quiet = samples.astype(np.float32)
        quiet[:end] *= 100 / max(1, int(np.abs(quiet[:end]).max(initial=0)))
        return quiet.astype(np.int16)

    @staticmethod
    def _take_ready(context: _Context) -> str:
        """The text ready to speak: complete words (followed by whitespace), or everything once input ended."""
        if context.closed:
            ready, context.text = context.text, ""
        else:
            cut = max(context.text.rfind(" "), context.text.rfind("\n"))
            ready, context.text = context.text[: cut + 1], context.text[cut + 1 :]
        return ready if ready.strip() else ""

    async def _send_chunk(self, connection: _Connection, context: _Context, samples: np.ndarray) -> None:
        if context.encoding == "pcm_f32le":
            pcm = (samples.astype(np.float32) / 32768.0).astype("<f4").tobytes()
        else:
            pcm = samples.astype("<i2").tobytes()
        message: dict[str, Any] = {
            "type": "chunk",
            "context_id": context.id,
            "data": base64.b64encode(pcm).decode("ascii"),
            "done": False,
            "status_code": 206,
            "step_time": round(self.chunk_s * self.rtf * 1000, 3),
            "flush_id": 1,
        }
        self.record("chunk", context_id=context.id, bytes=len(pcm))  # as it is written: benchmarks time answers
        await self._send(connection, message, audio=samples)

    async def _send_error(
        self,
        connection: _Connection,
        context_id: Any,
        status: int,
        title: str,
        problem: str,
        code: str = "invalid_request",
    ) -> None:
        message: dict[str, Any] = {
            "type": "error",
            "done": True,
            "status_code": status,
            "title": title,
            "message": problem,
            "error_code": code,
            "request_id": f"fake-{connection.index}",
        }
        if isinstance(context_id, str):
            message["context_id"] = context_id
            connection.finished.add(context_id)
        self.record("error", context_id=context_id, status_code=status, message=problem)
        with contextlib.suppress(_Dropped, ConnectionError, RuntimeError):
            await self._send(connection, message)

    # ---------------------------------------------------------------------------- the wire, faults

    async def _send(self, connection: _Connection, message: dict[str, Any], audio: np.ndarray | None = None) -> None:
        """Send one message — or the injected corruption in its place, or abort the connection (``drop_after``)."""
        async with connection.lock:
            if connection.index < self.drop_connections and self.should_drop(connection.sent):
                await self.drop(connection.request)
                raise _Dropped
            text = json.dumps(message)
            corrupt = self.faults.corrupt if connection.sent >= self.corrupt_after else None
            if corrupt == "bad-audio" and message["type"] == "chunk" and audio is not None:
                self.take_corruption()
                message = {**message, "data": self._bad_audio(audio)}
                text = json.dumps(message)
            elif corrupt in ("malformed-json", "unknown-event"):
                self.take_corruption()
                if corrupt == "malformed-json":
                    text = '{"type": "chunk", "context_id": '  # a truncated frame
                else:
                    text = json.dumps({**message, "type": "audio_chunk"})
            await connection.socket.send_str(text)
            connection.sent += 1

    def _bad_audio(self, samples: np.ndarray) -> str:
        if self.bad_audio == "base64":
            return "%%not base64: this is not audio%%"
        if self.bad_audio == "odd-length":
            return base64.b64encode(samples.astype("<i2").tobytes()[:-1]).decode("ascii")
        return base64.b64encode((samples.astype(np.float32) / 32768.0).astype("<f4").tobytes()).decode("ascii")
