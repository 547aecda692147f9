"""Streaming TTS with Cartesia's WebSocket API, through the official ``cartesia`` SDK (4.x, ``[websockets]`` extra).

Connect. One WebSocket per call, opened when the stage starts — in a task the pipeline owns, so a refused handshake
(401, 429, 5xx) is an error frame and an outcome like any other failure — within ``connect_timeout_s``, and kept
for the whole call. If it is gone by the next reply (dropped, or the SDK's reader died on a message it could not
parse), that reply opens a new one; so does text after a pause in which it went (Cartesia closes idle sockets).
voxpipe reconnects itself: the SDK's own reconnect (4.2) asks its connection manager again, which hands back the same
dead socket.

Stream. One Cartesia *context* per reply, so prosody carries across the reply's chunks: the socket is made ready when
the reasoner is asked, the context is created at the reply's first text (no network; a reply cut before it says anything
leaves no context, whose queue the SDK would keep for the rest of the call), each speakable chunk is pushed as it comes
(``continue: true``; Cartesia joins the pieces as they are, so each chunk goes with a trailing space, unless it ends
in Chinese or Japanese, which have none), and ``continue: false`` follows the last. A pause in a reply longer than
a context lives (Cartesia ends one 1 s after its last audio when no input came) goes on on a new context: text that
comes 0.5 s or more after the context's last audio, with everything pushed spoken, opens another, and a ``done``
before ``continue: false`` ends the context, not the reply.
A receiver task per context reads its events: ``chunk`` → audio, checked (valid base64, whole samples, really
``pcm_s16le``); ``timestamps`` → word marks; ``done`` ends the reply; ``error`` →
:class:`ProviderError` with Cartesia's message. Cartesia sends audio and timestamps as separate messages, in either
order, so a word's mark waits until the audio holding its end has arrived (:class:`PendingMarks`), then travels on that
audio's frame, or at once on an empty frame if the timestamps came after it: the output counts a word as heard only if
its mark reached it before the cut, so a mark must not wait for audio that a pause in the reply holds back. Before the
reply's first audible audio nothing has gone out (the base trims leading silence, frame and all), so marks wait for it
and travel on its frame: a soft first word must not be lost. At ``done`` the marks left are clamped to the audio
received (timestamps rounded past the last sample must not cost the last word), or dropped if nothing was audible.

Timeouts. Every network wait is bounded: the handshake (``connect_timeout_s``), the first audio after the first
text was pushed (``first_audio_timeout_s``), and each read while audio is due (``read_timeout_s`` from the first
input sent since the last event, or from the last event once the end of the text was sent: more text pushed while
Cartesia is silent does not move the deadline). While the reasoner is slow and everything pushed has been spoken,
nothing is due and nothing times out. A timeout also retires the connection: a stuck socket is not reused.

Cancel. On a barge-in the stage cancels the reply's receiver task at once and sends ``{"cancel": true,
"context_id": …}`` (``ctx.cancel()``) from a task of its own, so the interrupt never waits on the network. Late
events of the cancelled context are dropped by the SDK (the cancel detached its queue), and any frame that still
slipped out is stale by epoch. The next reply uses a new context on the same socket.

Close. :meth:`CartesiaTTS.stop` closes the socket within ``close_timeout_s``, and waits for sockets still closing;
from then on nothing connects (a handshake under way closes what it opened). A close cut short or failing aborts the
connection: websockets aborts it only when its own ``close_timeout`` runs out inside ``close()``.

Module layout: settings; audio checks and word marks; the socket and a reply; the stage: connect, stream, cancel,
close.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, Field, SecretStr, model_validator

from voxpipe.config.errors import ConfigError
from voxpipe.config.registry import Package
from voxpipe.pipeline import AudioFormat, WordMark
from voxpipe.pipeline.context import written_unspaced
from voxpipe.stages import tls
from voxpipe.stages.cloud import CloudSettings, ProviderError, abort_unless_closed, require_sdk
from voxpipe.stages.tts import LEADING_SILENCE_LEVEL, StreamingTTSStage

log = logging.getLogger("voxpipe.stages.cartesia_tts")

PROVIDER = "Cartesia"
API_URL = "https://api.cartesia.ai"
WEBSOCKET_URL = "wss://api.cartesia.ai"
SAMPLE_RATES = (8000, 16000, 22050, 24000, 44100, 48000)
"""The raw output rates Cartesia supports; the call's rate must be one of them (no resampling here)."""
ENCODING = "pcm_s16le"
_REFUSALS = {  # status: (what happened, what to do)
    401: ("API key rejected", ""),  # the hint names where the key came from (_refusal)
    402: ("account out of credits", "top up the Cartesia account"),
    403: ("API key not allowed to use this API", "check the key's permissions"),
    429: ("rate limited", "too many concurrent connections or requests for the plan"),
}
_IGNORED_EVENTS = frozenset({"flush_done", "phoneme_timestamps"})  # known, and of no use to voxpipe
CONTEXT_EXPIRY_S = 1.0
"""Cartesia ends a context this long after its last audio went out if no input came meanwhile (its ``done`` comes
then, though ``continue: false`` never did), and input to it after that is not spoken."""


# ------------------------------------------------------------------------------------------------ settings


class CartesiaTTSSettings(CloudSettings):
    """Cartesia TTS settings; timeouts are seconds."""

    service_name: ClassVar[str] = PROVIDER
    api_key_env: ClassVar[str] = "CARTESIA_API_KEY"

    voice: str = Field(
        min_length=1,
        description="Cartesia voice id (a UUID from play.cartesia.ai or GET /voices); required, there is no default "
        "voice",
    )
    api_key: SecretStr | None = Field(
        default=None, description="Cartesia API key; default: $CARTESIA_API_KEY (read by voxpipe, not the SDK)"
    )
    model: str = Field(default="sonic-3", min_length=1, description="Cartesia model id")
    language: str = Field(default="en", min_length=2, max_length=8, description="language of the text")
    speed: float | None = Field(
        default=None,
        ge=0.6,
        le=1.5,
        description="speaking speed, 1.0 is normal (sonic-3's generation_config); unset: the voice's own",
    )
    max_buffer_delay_ms: int | None = Field(
        default=None,
        ge=0,
        le=5000,
        description="longest Cartesia waits for more text before speaking what it has; unset: Cartesia's default",
    )
    base_url: str = Field(default=API_URL, pattern=r"^https?://\S+$", description="REST base URL")
    websocket_url: str = Field(
        default=WEBSOCKET_URL,
        pattern=r"^wss?://\S+$",
        description="WebSocket base URL (/tts/websocket is appended); a ws://127.0.0.1:PORT fake in tests",
    )
    connect_timeout_s: float = Field(default=5.0, gt=0, le=60, description="longest WebSocket handshake")
    first_audio_timeout_s: float = Field(
        default=5.0, gt=0, le=60, description="longest wait for a reply's first audio after its first text"
    )
    read_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=60,
        description="longest silence from Cartesia while audio is due (also bounds each send); keep it above "
        "max_buffer_delay_ms",
    )
    close_timeout_s: float = Field(default=2.0, gt=0, le=30, description="longest wait for the socket to close")

    @model_validator(mode="after")
    def _timeouts_outlast_the_buffer(self) -> CartesiaTTSSettings:
        # Cartesia may hold text that long before it speaks: a shorter timeout would take its wait for a stall.
        delay_s = (self.max_buffer_delay_ms or 0) / 1000
        shortest = min(self.first_audio_timeout_s, self.read_timeout_s)
        if delay_s >= shortest:
            raise ValueError(
                f"max_buffer_delay_ms ({self.max_buffer_delay_ms}) must be under first_audio_timeout_s and "
                f"read_timeout_s ({shortest:g} s): Cartesia may wait that long for more text before it speaks, which "
                "would read as a stall"
            )
        return self


# Marks that may close a chunk after its last word; whether a space follows is the word's script's to say.
_CLOSING_MARKS = "…\"'”\u2019)]」』\uff09】》"  # \u2019: right single quote, \uff09: full-width ")"


def check_audio(audio: AudioFormat) -> None:
    """The call's audio must be a format Cartesia can produce directly: mono at one of :data:`SAMPLE_RATES`."""
    if audio.sample_rate not in SAMPLE_RATES:
        raise ConfigError(
            "audio.sample_rate",
            f"{PROVIDER} TTS cannot produce {audio.sample_rate} Hz audio",
            ", ".join(str(rate) for rate in SAMPLE_RATES),
        )
    if audio.channels != 1:
        raise ConfigError("audio.channels", f"{PROVIDER} TTS produces mono audio, not {audio.channels} channels", "1")


def _sdk() -> Any:
    # websockets: cartesia's [websockets] extra, which its WebSocket API needs (and imports at its first connect)
    return require_sdk(PROVIDER, "cartesia", "cartesia", "websockets.asyncio.client")


# ---------------------------------------------------------------------------------- audio and word marks


def decode_audio(data: Any) -> bytes:
    """A ``chunk`` message's audio, checked: valid base64 of whole ``pcm_s16le`` samples, not float samples."""
    if not isinstance(data, str):
        raise ProviderError(PROVIDER, f"a chunk message carries no audio data (data={data!r})")
    try:
        pcm = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProviderError(PROVIDER, f"a chunk's audio is not valid base64 ({exc})") from None
    if len(pcm) % 2:
        raise ProviderError(PROVIDER, f"a chunk of {len(pcm)} bytes is not whole {ENCODING} samples")
    if looks_like_float32(pcm):
        raise ProviderError(PROVIDER, f"a chunk holds pcm_f32le audio where {ENCODING} was asked for")
    return pcm


def looks_like_float32(pcm: bytes) -> bool:
    """Whether "int16" audio is really float32 samples (which would play as loud noise).

    Read as float32, nearly every non-zero value of float audio is a normal number within [-1, 1]. Int16 speech read
    that way almost never is: every other sample would have to sit in one of two narrow bands (13696..16256 or
    -19072..-16512). Silence reads as zeros either way and is left alone.
    """
    if len(pcm) % 4 or len(pcm) < 128:
        return False
    values = np.frombuffer(pcm, dtype="<f4")
    values = values[values != 0]
    if len(values) < 32:
        return False
    with np.errstate(invalid="ignore", over="ignore"):
        magnitude = np.abs(values)
        plausible = np.isfinite(values) & (magnitude >= 1e-6) & (magnitude <= 1.0)
    return bool(plausible.mean() >= 0.9)


def _audible(pcm: bytes) -> bool:
    """Whether ``pcm`` has a sample the TTS base would not trim as leading silence."""
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.int32)
    return bool(samples.size and np.abs(samples).max() > int(LEADING_SILENCE_LEVEL * 32767))


def word_marks(timestamps: Any, sample_rate: int, offset: int = 0) -> list[WordMark]:
    """A ``timestamps`` message's words as marks in samples from the reply's start: Cartesia counts seconds from the
    context's start, which is ``offset`` samples into the reply."""
    if timestamps is None:
        return []
    words = list(getattr(timestamps, "words", None) or [])
    starts = list(getattr(timestamps, "start", None) or [])
    ends = list(getattr(timestamps, "end", None) or [])
    if not len(words) == len(starts) == len(ends):
        raise ProviderError(
            PROVIDER, f"word timestamps do not line up: {len(words)} words, {len(starts)} starts, {len(ends)} ends"
        )
    try:
        return [
            WordMark(str(word), offset + round(float(start) * sample_rate), offset + round(float(end) * sample_rate))
            for word, start, end in zip(words, starts, ends, strict=True)
        ]
    except (TypeError, ValueError) as exc:
        raise ProviderError(PROVIDER, f"word timestamps are not numbers ({exc})") from None


class PendingMarks:
    """Word marks waiting for their audio: a mark is ready once the audio holding its end has arrived (a mark handed
    out earlier could promise audio that never comes, and a word is heard only once its end is played)."""

    def __init__(self) -> None:
        self._marks: list[WordMark] = []

    def __len__(self) -> int:
        return len(self._marks)

    def add(self, marks: Iterable[WordMark]) -> None:
        self._marks.extend(marks)

    def take(self, received: int) -> tuple[WordMark, ...]:
        """The marks ending within the first ``received`` samples (the audio received so far), in order."""
        ready = tuple(m for m in self._marks if m.end <= received)
        if ready:
            self._marks = [m for m in self._marks if m.end > received]
        return ready

    def drain(self, received: int) -> tuple[WordMark, ...]:
        """Every mark left, clamped to the ``received`` samples there are (the reply is complete)."""
        marks, self._marks = self._marks, []
        return tuple(WordMark(m.word, min(m.start, received), min(m.end, received)) for m in marks)


# ---------------------------------------------------------------------------------- the socket and a reply


class _Socket:
    """The SDK's connection, and whether its reader has ended.

    The SDK (4.2) reads the socket in a task of its own that feeds every context's queue. That task ends when the
    socket closes, and also — silently for the contexts — when a message does not parse; the SDK then starts a new
    one at the next send, so the broken message would just be lost. So every reader task is watched (it is created
    by each send, and watched right after it), and the first one to end marks the whole socket as gone: the reply in
    flight fails with the reason, and the next reply connects again. These are the module's only reads of SDK
    internals; if they change, the read timeouts still end a reply whose events stop.
    """

    def __init__(self, connection: Any) -> None:
        self.sdk = connection  # the SDK's AsyncTTSResourceConnection
        self.lost: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
        self._watched: asyncio.Task[None] | None = None
        self.retired = False  # voxpipe stopped using it (it broke, stalled or is closing)

    def watch(self) -> None:
        """Call after each send: the SDK may have started a reader task for it."""
        reader = getattr(self.sdk, "_processing_task", None)
        if isinstance(reader, asyncio.Task) and reader is not self._watched:
            self._watched = reader
            reader.add_done_callback(self._reader_ended)

    def _reader_ended(self, reader: asyncio.Task[None]) -> None:
        error = None if reader.cancelled() else reader.exception()  # retrieved: reported through `lost`
        if not self.lost.done():
            self.lost.set_result(error)

    @property
    def alive(self) -> bool:
        if self.retired or self.lost.done():
            return False
        state = getattr(getattr(self.sdk, "_connection", None), "state", None)
        return state is None or getattr(state, "name", "OPEN") == "OPEN"

    async def close(self) -> None:
        """Close the socket. The SDK's ``close()`` first awaits its reader, re-raising the reader's failure (a message
        that did not parse) before it gets to the socket: then the socket is closed directly. A close cut short or
        failing aborts the connection (:func:`~voxpipe.stages.cloud.abort_unless_closed`)."""
        raw = getattr(self.sdk, "_connection", None)
        try:
            try:
                await self.sdk.close()
            except Exception as exc:  # the reader's failure, already reported through `lost`
                log.debug("the SDK's close failed (%s: %s); closing the socket itself", type(exc).__name__, exc)
                if raw is not None:
                    await raw.close()
        finally:
            abort_unless_closed(raw)

    def loss(self) -> str:
        """Why the socket is gone, once :attr:`lost` is done."""
        error = self.lost.result()
        if isinstance(error, json.JSONDecodeError):
            return f"sent a message that is not valid JSON ({error})"
        if error is not None:
            return f"the SDK failed reading the socket ({type(error).__name__}: {error})"
        socket = getattr(self.sdk, "_connection", None)
        code, reason = getattr(socket, "close_code", None), getattr(socket, "close_reason", None)
        if code in (None, 1006):  # 1006: websockets' code for "no close frame"
            return "the connection was lost, without a close frame, in the middle of a reply"
        return f"the connection was closed by the server (code {code}{f': {reason}' if reason else ''}) mid-reply"


@dataclass(eq=False)
class _Reply:
    """One bot reply: its Cartesia context, its receiver task, and what is due from Cartesia."""

    epoch: int
    socket: _Socket
    context: Any  # the SDK's AsyncWebSocketContext taking the reply's text now; None before it, or between two
    offset: int = 0  # samples of the reply before the context's audio (its timestamps count from there)
    marks: PendingMarks = field(default_factory=PendingMarks)
    receiver: asyncio.Task[None] | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # the receiver is finished, one way or another
    first_input_at: float | None = None  # loop time of the first text pushed
    unanswered_since: float | None = None  # loop time of the first input (text, or its end) since the last event
    last_event_at: float = 0.0
    inputs_closed: bool = False  # continue: false was sent
    settled: bool = False  # nothing is in flight at Cartesia: done, error, or cancelled
    audio: bool = False  # a chunk arrived
    audible: bool = False  # a chunk louder than leading silence arrived (so the base has emitted a frame)
    received: int = 0  # samples received
    last_audio_at: float | None = None  # loop time of the context's last chunk
    pushed_since_audio: bool = False  # text went to the context after its last chunk
    wakeup: asyncio.Future[None] | None = None  # the receiver's: text was pushed, the deadline moved

    def poke(self) -> None:
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)

    def deadline(self, first_audio_s: float, read_s: float) -> float | None:
        """Loop time by which Cartesia must have sent something, or None while nothing is due."""
        if self.first_input_at is None:
            return None
        if not self.audio:
            return self.first_input_at + first_audio_s
        # From the first input since the last event: more text pushed while Cartesia is silent does not move the
        # deadline (a stall must not hide behind a reasoner that keeps streaming).
        if self.unanswered_since is not None:
            return self.unanswered_since + read_s
        return self.last_event_at + read_s if self.inputs_closed else None

    def input_sent(self, at: float) -> None:
        if self.unanswered_since is None:
            self.unanswered_since = at
        self.poke()  # audio is due now: the receiver's deadline moved

    def expiring(self, now: float) -> bool:
        """Whether the context has spoken all it was given and its last audio came half :data:`CONTEXT_EXPIRY_S` ago
        or more: Cartesia may end it before more text reaches it. (Its last audio went out of Cartesia before it
        came here, so this errs early.)"""
        return (
            self.context is not None
            and not self.pushed_since_audio
            and self.last_audio_at is not None
            and now - self.last_audio_at >= CONTEXT_EXPIRY_S / 2
        )


# ---------------------------------------------------------------------------------------------- the stage


class CartesiaTTS(StreamingTTSStage):
    """Cartesia streaming TTS: one WebSocket per call, one context per reply, word timestamps as marks."""

    Settings: ClassVar[type[BaseModel]] = CartesiaTTSSettings

    @classmethod
    def required_packages(cls, settings: CartesiaTTSSettings) -> tuple[Package, ...]:
        """The SDK, and websockets for its WebSocket API (cartesia[websockets], which the extra asks for)."""
        return (Package("cartesia", "cartesia", "cartesia"), Package("websockets", "websockets", "cartesia"))

    @classmethod
    def from_settings(cls, settings: CartesiaTTSSettings, context: Any, name: str) -> CartesiaTTS:
        key = settings.require_api_key("tts")  # before anything connects
        return cls(settings, api_key=key, audio=context.audio, name=name)

    def __init__(
        self,
        settings: CartesiaTTSSettings,
        *,
        api_key: str | None = None,
        audio: AudioFormat = AudioFormat(16000),
        name: str = "tts",
    ) -> None:
        check_audio(audio)
        _sdk()  # a missing SDK is a build-time error, not a failure in the middle of a call
        super().__init__(audio, name=name)
        self.settings = settings
        # A missing or blank key given in code (an unset variable read there) is named now, not refused later.
        self._api_key = (api_key or "").strip() or settings.require_api_key("tts")
        self._client: Any = None
        self._socket: _Socket | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._connect_lock = asyncio.Lock()
        self._closings: set[asyncio.Task[None]] = set()  # retired sockets being closed
        self._closed = False  # stop() has begun: nothing connects any more
        self._reply: _Reply | None = None

    # ------------------------------------------------------------------------------------------- connect

    async def start(self) -> None:
        """Open the socket now, in a task: the first reply does not wait for the handshake, and a refusal is
        reported through the pipeline like any other failure."""
        await super().start()
        self._connecting = self.spawn(self._connect(), name=f"{self.name}-connect")

    def _new_client(self) -> Any:
        """The SDK client, made on a worker thread: its HTTP client loads a CA bundle, and its ``tts`` resource is
        imported at first use — some 90 ms in all, which on the event loop would stall every call's audio."""
        s = self.settings
        client = _sdk().AsyncCartesia(api_key=self._api_key, base_url=s.base_url, websocket_base_url=s.websocket_url)
        _ = client.tts
        return client

    async def _connect(self) -> None:
        """Open the call's socket, unless the stage is stopped: a socket opened then would serve no call, and
        nothing would be left to close it."""
        from websockets.exceptions import InvalidStatus, WebSocketException

        if self._closed:
            return
        if self._client is None:
            self._client = await asyncio.to_thread(self._new_client)
        url = f"{self.settings.websocket_url.rstrip('/')}/tts/websocket"
        options: dict[str, Any] = {"open_timeout": None, "close_timeout": self.settings.close_timeout_s}
        ssl_context = await tls.context_for(url)  # built once per process, off the loop; None for ws://
        if ssl_context is not None:
            options["ssl"] = ssl_context
        manager = self._client.tts.websocket_connect(websocket_connection_options=options)
        limit = self.settings.connect_timeout_s
        try:
            async with asyncio.timeout(limit):
                socket = _Socket(await manager.enter())
        except TimeoutError:
            raise ProviderError(PROVIDER, f"no WebSocket handshake within {limit:g} s at {url}") from None
        except InvalidStatus as exc:
            raise _refusal(exc, url, self.settings) from None
        except (OSError, WebSocketException) as exc:
            raise ProviderError(PROVIDER, f"cannot connect to {url}: {exc}") from None
        if self._closed:  # stop() ran during the handshake: Cartesia must not keep a socket of an ended call
            await self._close(socket)
            return
        self._socket = socket
        log.debug("connected to %s", url)

    async def _open_socket(self) -> _Socket | None:
        """The socket for the next reply: the one :meth:`start` opened, or a new one if it is gone; None once the
        stage is stopped."""
        async with self._connect_lock:
            connecting = self._connecting
            if connecting is not None and not connecting.done():
                await asyncio.wait({connecting})  # its own failure was reported by its task
            socket = self._socket
            if socket is not None and socket.alive:
                return socket
            if socket is not None:
                self._retire(socket)
            await self._connect()
            return self._socket

    def _retire(self, socket: _Socket) -> None:
        """Stop using ``socket`` (it dropped, stalled or broke); the next reply connects again. Its close runs in a
        task that :meth:`stop` waits for (the teardown after it would cut the close short)."""
        if not socket.retired:
            socket.retired = True
            closing = self.spawn(self._close(socket), name=f"{self.name}-close")
            self._closings.add(closing)
            closing.add_done_callback(self._closings.discard)
        if self._socket is socket:
            self._socket = None

    # -------------------------------------------------------------------------------------------- stream

    async def open_reply(self, epoch: int) -> None:
        if self._reply is not None:
            self._abandon(self._reply)  # a reply never finished (no ResponseEnd): it is over now
        socket = await self._open_socket()
        if socket is not None:  # None: the stage is stopped, and the reply has nowhere to go
            self._reply = _Reply(epoch, socket, context=None)

    def _start_context(self, reply: _Reply) -> None:
        """A Cartesia context for the reply (no network) and its receiver, at its first text: a reply cut before it
        says anything leaves no context behind (the SDK keeps a queue per context until its ``done``). A reply's
        text after a pause that outlasted its context goes to a new one, its audio after the last one's."""
        settings = self.settings
        reply.offset, reply.last_audio_at, reply.pushed_since_audio = reply.received, None, False
        context = reply.context = reply.socket.sdk.context(
            model_id=settings.model,
            voice=settings.voice,
            output_format={"container": "raw", "encoding": ENCODING, "sample_rate": self.produces_rate},
            language=settings.language,
            add_timestamps=True,
            generation_config={"speed": settings.speed} if settings.speed is not None else None,
            max_buffer_delay_ms=settings.max_buffer_delay_ms,
        )
        reply.receiver = self.spawn(
            self._receive(reply, context), name=f"{self.name}-receive-{reply.epoch}", epoch=reply.epoch
        )

    async def _end_context(self, reply: _Reply) -> None:
        """Stop using the reply's context, which has spoken everything and may expire at any moment: its marks go
        out (clamped to the audio received), its receiver is cancelled and Cartesia is told to drop it (from a task:
        which also frees its queue in the SDK)."""
        context, receiver = reply.context, reply.receiver
        reply.context = reply.receiver = None
        await self._hand_out(reply, reply.marks.drain(reply.received))
        if receiver is not None and not receiver.done():
            receiver.cancel()
        if reply.socket.alive:
            self._send_cancel(reply, context)

    @property
    def produces_rate(self) -> int:
        audio = self.produces
        assert audio is not None
        return audio.sample_rate

    async def send_text(self, epoch: int, text: str) -> str | None:
        reply = self._reply
        if reply is None or reply.epoch != epoch or reply.ended.is_set() or not text:
            return None  # the reply failed or was abandoned: its text has nowhere to go
        word_end = text.rstrip(_CLOSING_MARKS)[-1:] or text[-1]  # "はい…", "“好的”": the character before the marks
        if not text[-1].isspace() and not written_unspaced(word_end):
            text += " "  # Cartesia joins the pieces as they are; chunks come stripped, and end on a word
        loop = asyncio.get_running_loop()
        if reply.expiring(loop.time()):  # a pause in the reply (a tool, a slow reasoner): the context may be gone
            await self._end_context(reply)
        if reply.context is None:
            if not reply.socket.alive:  # closed while the reply had no context (Cartesia closes idle sockets)
                socket = await self._open_socket()
                if socket is None:
                    return None  # the stage is stopped
                reply.socket = socket
            self._start_context(reply)
        if reply.first_input_at is None:
            self.mark("tts.sdk_call", epoch)  # the SDK boundary: the context's first text goes to the SDK
        await self._send(reply, reply.context.push(text), "text")
        now = loop.time()
        if reply.first_input_at is None:
            reply.first_input_at = now
        reply.pushed_since_audio = True
        reply.input_sent(now)
        return text

    async def finish_reply(self, epoch: int) -> None:
        reply = self._reply
        if reply is None or reply.epoch != epoch:
            return
        try:
            if reply.first_input_at is None:
                self._abandon(reply)  # nothing was said: Cartesia has no context to close
            elif not reply.ended.is_set() and (
                reply.context is None or reply.expiring(asyncio.get_running_loop().time())
            ):
                # All spoken, and the context gone or about to go (a pause before the end): its done might never come.
                if reply.context is not None:
                    await self._end_context(reply)
                reply.settled = True
                reply.ended.set()
            elif not reply.ended.is_set():
                await self._send(reply, reply.context.no_more_inputs(), "the end of the text")
                reply.inputs_closed = True
                reply.input_sent(asyncio.get_running_loop().time())
            await reply.ended.wait()  # the receiver enforces the timeouts, so this wait is bounded
        finally:
            if self._reply is reply:
                self._reply = None

    async def _send(self, reply: _Reply, sending: Awaitable[None], what: str) -> None:
        """Send one input of ``reply`` within ``read_timeout_s``; a failure abandons the reply."""
        from websockets.exceptions import WebSocketException

        limit = self.settings.read_timeout_s
        try:
            async with asyncio.timeout(limit):
                await sending
            reply.socket.watch()
        except TimeoutError:
            problem = f"sending {what} took over {limit:g} s (the connection is stuck)"
        except (OSError, WebSocketException) as exc:
            problem = f"the connection was lost while sending {what} ({exc})"
        except Exception:
            if not reply.socket.lost.done():
                raise
            problem = reply.socket.loss()  # the SDK re-raises its dead reader's failure on a closed socket
        else:
            return
        self._retire(reply.socket)
        self._abandon(reply, in_flight=False)
        raise ProviderError(PROVIDER, problem)

    async def _receive(self, reply: _Reply, context: Any) -> None:
        """A receiver task: Cartesia's events for one context of the reply → audio and word marks, until ``done``.
        The reply ends with it, unless the reply went on to another context (this one expired in a pause)."""
        try:
            await self._read_events(reply, context)
        except Exception:
            self._abandon(reply)  # stop Cartesia's work on the context, if any is left
            raise
        finally:
            if reply.context is context:
                reply.ended.set()

    async def _read_events(self, reply: _Reply, context: Any) -> None:
        loop = asyncio.get_running_loop()
        settings = self.settings
        socket = reply.socket
        events = context.receive()
        pending: asyncio.Task[Any] | None = None
        ending = False  # the last event was the context's last (done or error)
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(anext(events))
                if reply.wakeup is None or reply.wakeup.done():
                    reply.wakeup = loop.create_future()
                deadline = reply.deadline(settings.first_audio_timeout_s, settings.read_timeout_s)
                wait = None if deadline is None else max(0.0, deadline - loop.time())
                done, _ = await asyncio.wait(
                    {pending, socket.lost, reply.wakeup}, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                )
                if pending in done:  # events already delivered come first, even when the socket is gone since
                    finished, pending = pending, None
                    try:
                        event = finished.result()
                    except StopAsyncIteration:
                        raise ProviderError(PROVIDER, "the SDK stopped delivering the reply's events") from None
                    reply.last_event_at, reply.unanswered_since = loop.time(), None
                    ending = getattr(event, "type", None) in ("done", "error")
                    if await self._on_event(reply, event):
                        return
                elif socket.lost in done:
                    self._retire(socket)
                    raise ProviderError(PROVIDER, socket.loss())
                elif deadline is not None and loop.time() >= deadline:
                    self._retire(socket)  # a stalled socket is not reused
                    raise ProviderError(PROVIDER, self._timeout_problem(reply))
        finally:
            if pending is not None:
                pending.cancel()
                await asyncio.wait({pending})
            with contextlib.suppress(RuntimeError, StopAsyncIteration):
                if ending:  # resumed past its last event, the SDK's generator ends and forgets the context's queue
                    await anext(events)  # (closed there instead, it keeps the queue for the rest of the call)
                else:
                    await events.aclose()

    def _timeout_problem(self, reply: _Reply) -> str:
        if not reply.audio:
            return f"no audio within {self.settings.first_audio_timeout_s:g} s of the reply's first text"
        return f"no message for {self.settings.read_timeout_s:g} s while audio was due (the stream stalled)"

    async def _on_event(self, reply: _Reply, event: Any) -> bool:
        """Handle one event of the reply's context; True once the reply is complete."""
        kind = getattr(event, "type", None)
        if kind == "chunk":
            if not reply.audio:
                self.mark("tts.sdk_answer", reply.epoch)  # the SDK boundary: its first audio, as the SDK gave it
            await self._play(reply, decode_audio(getattr(event, "data", None)))
        elif kind == "timestamps":
            reply.marks.add(word_marks(getattr(event, "word_timestamps", None), self.produces_rate, reply.offset))
            if reply.audible:  # until then they stay pending: the first audible frame takes them (_play)
                await self._hand_out(reply, reply.marks.take(reply.received))  # marks that trailed their audio
        elif kind == "done":
            await self._hand_out(reply, reply.marks.drain(reply.received))  # none if never audible: nothing was heard
            if not reply.inputs_closed:  # Cartesia ended the context itself: it expired in a pause of the reply
                if reply.pushed_since_audio:
                    reply.settled = True  # nothing to cancel: Cartesia is done with the context
                    raise ProviderError(
                        PROVIDER,
                        f"ended the reply's context (it expires {CONTEXT_EXPIRY_S:g} s after its last audio) before "
                        "speaking the text sent to it since",
                    )
                reply.context = reply.receiver = None  # the reply's next text goes to a new context
                return True
            reply.settled = True
            return True
        elif kind == "error":
            reply.settled = True
            raise ProviderError(PROVIDER, _describe_error(event))
        elif kind not in _IGNORED_EVENTS:
            raise ProviderError(PROVIDER, f"unknown event type {kind!r} (the SDK or the API changed?)")
        return False

    async def _play(self, reply: _Reply, pcm: bytes) -> None:
        if not pcm:
            return
        reply.audio, reply.pushed_since_audio = True, False
        reply.last_audio_at = asyncio.get_running_loop().time()
        reply.received += len(pcm) // 2
        reply.audible = reply.audible or _audible(pcm)
        # Until a frame is emitted (leading silence is trimmed, frame and all), marks stay pending.
        marks = reply.marks.take(reply.received) if reply.audible else ()
        if reply.epoch < self.epoch:
            return  # stale: never touch the timeline of the reply that replaced it
        await self.emit_audio(reply.epoch, pcm, marks, _words(marks))

    async def _hand_out(self, reply: _Reply, marks: tuple[WordMark, ...]) -> None:
        """Marks whose audio has already gone out, on an empty frame of their own."""
        if marks and reply.audible and reply.epoch >= self.epoch:
            await self.emit_audio(reply.epoch, b"", marks, _words(marks))

    # -------------------------------------------------------------------------------------------- cancel

    async def cancel_reply(self, epoch: int) -> None:
        reply = self._reply
        if reply is not None and reply.epoch == epoch:
            self._reply = None
            self._abandon(reply)

    def _abandon(self, reply: _Reply, *, in_flight: bool = True) -> None:
        """Stop ``reply`` now: its receiver, and Cartesia's work on its context (``ctx.cancel()``, sent from a task
        so that an interrupt never waits on the network). ``in_flight=False``: the socket is unusable, send nothing."""
        if self._reply is reply:
            self._reply = None
        receiver = reply.receiver
        # A receiver that failed is the task running this (through the error policy's interrupt): not cancelled.
        if receiver is not None and receiver is not asyncio.current_task() and not receiver.done():
            receiver.cancel()
        context = reply.context
        if in_flight and context is not None and not reply.settled and reply.socket.alive:
            self._send_cancel(reply, context)
        reply.settled = True
        reply.ended.set()

    def _send_cancel(self, reply: _Reply, context: Any) -> None:
        """Send ``context``'s cancel from a task: an interrupt never waits on the network."""
        self.spawn(
            self._cancel_context(reply.epoch, context, reply.socket),
            name=f"{self.name}-cancel-{reply.epoch}",
            epoch=reply.epoch,
        )

    async def _cancel_context(self, epoch: int, context: Any, socket: _Socket) -> None:
        # The context's socket, passed in: by the time a send fails, the reply may have gone on to another.
        try:
            async with asyncio.timeout(self.settings.read_timeout_s):
                await context.cancel()
        except Exception as exc:
            # Best effort, nothing to report: the context is left either way. A socket that cannot take a cancel
            # (stuck, gone, or the SDK re-raising its dead reader's failure) is not reused.
            log.info("%s: could not cancel the context of reply %d (%s: %s)", self.name, epoch, type(exc).__name__, exc)
            self._retire(socket)

    # --------------------------------------------------------------------------------------------- close

    async def stop(self) -> None:
        """Stop the receiver and close every socket, each within ``close_timeout_s``. The teardown that follows
        cancels what is still running, so nothing may be left closing, or connecting, for it."""
        self._closed = True  # from here on nothing connects; a handshake under way closes what it opened
        connecting, self._connecting = self._connecting, None
        if connecting is not None and not connecting.done():
            connecting.cancel()
            await asyncio.wait({connecting})
        reply, self._reply = self._reply, None
        receiver = reply.receiver if reply is not None else None
        if receiver is not None and not receiver.done():
            receiver.cancel()  # the socket is closing: no cancel message needed
            await asyncio.wait({receiver}, timeout=self.settings.close_timeout_s)
        socket, self._socket = self._socket, None
        if socket is not None:
            socket.retired = True
            await self._close(socket)
        if self._closings:  # sockets retired earlier, still closing (each within close_timeout_s)
            await asyncio.wait(set(self._closings))
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):  # the REST client was never used: nothing to lose
                async with asyncio.timeout(self.settings.close_timeout_s):
                    await client.close()
        await super().stop()

    async def _close(self, socket: _Socket) -> None:
        from websockets.exceptions import WebSocketException

        try:
            async with asyncio.timeout(self.settings.close_timeout_s + 0.5):  # websockets aborts at close_timeout_s
                await socket.close()
        except (TimeoutError, OSError, WebSocketException) as exc:
            log.info("%s: the socket did not close cleanly (%s)", self.name, exc)


# ------------------------------------------------------------------------------------------------ helpers


def _refusal(error: Any, url: str, settings: CartesiaTTSSettings) -> ProviderError:
    """The error for a refused handshake (``websockets.exceptions.InvalidStatus``), naming the status."""
    response = error.response
    status = int(response.status_code)
    what, hint = _REFUSALS.get(status) or ("server error" if status >= 500 else "handshake refused", "")
    if status == 401:  # the key the call used: the config's (its own, or a ${VAR} it named), else the environment's
        hint = f"check {settings.key_source('tts')}"
    problem = f"{what} (HTTP {status}) when opening the WebSocket at {url}"
    detail = _body_message(getattr(response, "body", b""))
    if detail:
        problem += f": {detail}"
    if hint:
        problem += f"; {hint}"
    return ProviderError(PROVIDER, problem)


def _body_message(body: bytes | None) -> str:
    if not body:
        return ""
    try:
        parsed = json.loads(body)
    except ValueError:
        return body[:200].decode("utf-8", "replace").strip()
    if isinstance(parsed, dict):
        return str(parsed.get("message") or parsed.get("error") or "")[:200]
    return ""


def _describe_error(event: Any) -> str:
    status = getattr(event, "status_code", None)
    title = getattr(event, "title", None) or "error"
    message = getattr(event, "message", None) or "(no message)"
    code = getattr(event, "error_code", None)
    return f"error event{f' {status}' if status else ''}: {title}: {message}{f' [{code}]' if code else ''}"


def _words(marks: tuple[WordMark, ...]) -> str:
    return " ".join(m.word for m in marks)
