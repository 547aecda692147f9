"""Streaming speech-to-text with Deepgram's live Listen v1 API, through the official ``deepgram-sdk`` (7.x).

One WebSocket per call, opened in :meth:`DeepgramSTT.start` so the first turn does not pay for the handshake, and
owned by the stage (a task the pipeline owns). Every caller frame passes straight through (the turn-taker times
barge-ins on audio) and is streamed to Deepgram as linear16 at the call's rate. Deepgram answers with interim
results (→ partial :class:`Transcript` frames: the utterance's finalized segments plus the current interim) and
``is_final`` segments, which accumulate until the utterance's single final transcript:

* with a local VAD (the default), at each :class:`UserSpeechStopped` the stage sends ``Finalize`` and emits the
  final when the ``from_finalize`` answer arrives — or at once, when ``is_final`` results already cover the speech
  up to the VAD's last voiced sample (Deepgram's endpointing usually fires before the VAD's hang-over ends) — or,
  after ``finalize_timeout_s``, with what it has, reported as a non-fatal error;
* with ``speech_events: true`` (for ``vad: {provider: none}``) the stage itself emits :class:`UserSpeechStarted` on
  Deepgram's ``SpeechStarted`` and :class:`UserSpeechStopped` on a ``speech_final`` result or ``UtteranceEnd``,
  Deepgram's audio timestamps mapped to the call's clock through the ``pts`` of the audio it sent.

Words are assigned to utterances by their position in the audio, so a late result of a finished utterance is
dropped instead of leaking into the next one; a result whose audio span ends by the last utterance given out (the
answer to a timed-out ``Finalize``, say) is late as a whole: it answers no ``Finalize`` awaited now, and its words are
reported as dropped. Each utterance's audio seconds go on its final for the turn-taker to count, or, with no
turn-taker downstream, the stage counts them itself. The stage keeps the audio since the last finalized segment: if the
socket drops (or stalls: a ``Finalize`` whose answer is awaited and that Deepgram shows no sign of having processed
for ``result_timeout_s``, ``message_timeout_s`` of audio sent with no message at all from Deepgram since — it sends
Results as it processes audio, silence included — or a message the socket cannot take for ``send_timeout_s``) it
reconnects, replays that audio and any unanswered ``Finalize``, then carries on live; a refused handshake
(401/429/5xx) is never retried in a loop but is a :class:`ProviderError` naming the status. ``KeepAlive`` goes out
every ``keepalive_s`` while no audio flows.

The frames the stage makes itself (transcripts; with ``speech_events``, the speech events) go downstream in order from
a delivery task of the stage's own, which lives across sockets: a reconnect tears down the socket's tasks, never a
transcript on its way.

Interrupts do not concern this stage: the caller's speech is what interrupts, and its transcript is the next turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, Field, SecretStr, model_validator

from voxpipe.config.registry import Package
from voxpipe.pipeline import (
    AudioFormat,
    AudioFormatError,
    AudioFrame,
    Direction,
    End,
    Frame,
    Stage,
    Transcript,
    TranscriptWord,
    UserSpeechProgress,
    UserSpeechStarted,
    UserSpeechStopped,
)
from voxpipe.pipeline.usage import AUDIO_SECONDS
from voxpipe.stages.cloud import CloudSettings, ProviderError, require_sdk
from voxpipe.stages.turn import TurnTaker

log = logging.getLogger("voxpipe.stages.deepgram_stt")

PROVIDER = "Deepgram"
PRODUCTION_URL = "wss://api.deepgram.com"
_REFUSALS = {401: "API key rejected", 402: "account out of credit", 403: "API key not allowed to use this model"}
_PRE_ROLL_S = 0.5  # audio kept while nobody speaks: a drop at a speech onset must not cut the first word
RECONNECT_WINDOW_S = 60.0  # more than max_reconnects drops within this long end the session
# Waits before the reconnects after a drop, the last repeated: the first at once (a blip costs no more), then room
# for a server or network in trouble — all in the caller's audio, which is replayed, not lost.
RECONNECT_BACKOFF_S = (0.0, 0.25, 1.0, 2.0)
# A result ending within this of the last cut given out is of audio already given out (Deepgram's times are whole
# ms; an answer ends where its Finalize went into the stream, at its utterance's cut). Any later utterance's cut is
# its speech and the VAD's hang-over further on, so its answer never ends this close.
_LATE_MARGIN_S = 0.1
_TIME_STEP_S = 0.001  # Deepgram's times are whole milliseconds
# No stream is this long (11 days): a time past it in a message is garbage, and one past ~1e304 s, though finite,
# is infinite once counted in samples.
_LONGEST_STREAM_S = 1e6

# ------------------------------------------------------------------------------------------------ settings


class DeepgramSTTSettings(CloudSettings):
    """Deepgram live STT settings; timeouts are seconds, Deepgram's own options keep their names and units."""

    service_name: ClassVar[str] = PROVIDER
    api_key_env: ClassVar[str] = "DEEPGRAM_API_KEY"

    api_key: SecretStr | None = Field(default=None, description="Deepgram API key; default: $DEEPGRAM_API_KEY")
    base_url: str = Field(
        default=PRODUCTION_URL,
        pattern=r"^wss?://[^\s]+$",
        description="Listen WebSocket base URL (/v1/listen is appended); a ws://127.0.0.1:PORT fake in tests",
    )
    model: str = Field(default="nova-3", min_length=1, description="Deepgram model")
    language: str = Field(default="en", min_length=2, max_length=16, description="language code, or 'multi'")
    keyterms: list[str] = Field(
        default_factory=list, max_length=100, description="terms to boost (names, products); nova-3 keyterm prompting"
    )
    smart_format: bool = Field(default=True, description="punctuation and formatting of numbers, dates, etc.")
    interim_results: bool = Field(default=True, description="partial transcripts while the caller speaks")
    endpointing: int | None = Field(
        default=300, ge=10, le=10000, description="ms of silence before Deepgram marks speech_final; null: off"
    )
    utterance_end_ms: int | None = Field(
        default=1000, ge=1000, le=10000, description="ms without words before an UtteranceEnd; null: off"
    )
    speech_events: bool = Field(
        default=False,
        description="emit the caller's speech start/stop from Deepgram's events (for vad: {provider: none}); "
        "with a local VAD, Deepgram's SpeechStarted is only a trace mark",
    )
    connect_timeout_s: float = Field(default=5.0, gt=0, le=60, description="longest WebSocket handshake")
    finalize_timeout_s: float = Field(
        default=1.5,
        gt=0,
        le=30,
        description="longest wait for the final result after the caller stopped; then the utterance ends with the "
        "words heard so far (reported)",
    )
    result_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=60,
        description="a Finalize with no sign this long that Deepgram processed it (its answer, or results of the "
        "audio after it): reconnect",
    )
    send_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=60,
        description="a message the socket cannot take this long (a server that stopped reading): reconnect",
    )
    message_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=60,
        description="this many seconds of audio sent, and as long, with no message at all from Deepgram since (it "
        "sends Results as it processes audio, silence included; a server that stalled sends nothing): reconnect",
    )
    keepalive_s: float = Field(default=4.0, gt=0, le=9, description="KeepAlive period while no audio flows")
    max_reconnects: int = Field(
        default=3, ge=0, le=20, description=f"reconnects within {RECONNECT_WINDOW_S:g} s before the stage fails"
    )
    retry_after_s: float = Field(
        default=5.0, gt=0, le=600, description="after a failure (skip policies), reconnect no sooner than this"
    )
    close_timeout_s: float = Field(default=2.0, gt=0, le=30, description="longest wait for Deepgram's close")
    replay_max_s: float = Field(
        default=30.0, ge=1, le=300, description="most audio kept for replay after a reconnect (seconds)"
    )

    @model_validator(mode="after")
    def _coherent(self) -> DeepgramSTTSettings:
        if self.utterance_end_ms is not None and not self.interim_results:
            raise ValueError("utterance_end_ms needs interim_results: true (Deepgram sends UtteranceEnd only then)")
        if self.speech_events and self.endpointing is None and self.utterance_end_ms is None:
            raise ValueError("speech_events needs endpointing or utterance_end_ms: nothing would end an utterance")
        return self


# ------------------------------------------------------------------------------------------ audio and time


@dataclass(frozen=True, slots=True)
class _Chunk:
    pts: int
    pcm: bytes
    samples: int


class AudioLog:
    """The caller audio not yet covered by a final result, by absolute chunk index: what a new socket replays."""

    def __init__(self) -> None:
        self._chunks: deque[_Chunk] = deque()
        self.first_index = 0  # index of _chunks[0]
        self.end_pts = 0

    @property
    def end_index(self) -> int:
        return self.first_index + len(self._chunks)

    @property
    def first_pts(self) -> int:
        return self._chunks[0].pts if self._chunks else self.end_pts

    def append(self, pts: int, pcm: bytes, samples: int) -> None:
        self._chunks.append(_Chunk(pts, pcm, samples))
        self.end_pts = pts + samples

    def get(self, index: int) -> _Chunk | None:
        offset = index - self.first_index
        return self._chunks[offset] if 0 <= offset < len(self._chunks) else None

    def forget_before(self, pts: int) -> None:
        """Drop chunks that end at or before ``pts``."""
        while self._chunks and self._chunks[0].pts + self._chunks[0].samples <= pts:
            self._chunks.popleft()
            self.first_index += 1


class StreamTimeline:
    """Maps a socket's stream time (seconds of audio Deepgram received on it) to the call's sample positions."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._runs: list[tuple[int, int, int]] = []  # (stream sample, pts, samples) of contiguous audio sent
        self.samples = 0

    def add(self, pts: int, samples: int) -> None:
        if self._runs:
            stream0, pts0, length = self._runs[-1]
            if pts0 + length == pts:
                self._runs[-1] = (stream0, pts0, length + samples)
                self.samples += samples
                return
        self._runs.append((self.samples, pts, samples))
        self.samples += samples

    def to_pts(self, stream_s: float) -> int:
        sample = round(stream_s * self.rate)
        for stream0, pts0, _length in reversed(self._runs):
            if sample >= stream0:
                return pts0 + (sample - stream0)  # past the last run: extrapolated
        return self._runs[0][1] + sample - self._runs[0][0] if self._runs else sample


# ------------------------------------------------------------------------------------------------ utterances


@dataclass(frozen=True, slots=True)
class _Word:
    text: str
    start: int  # pts
    end: int


@dataclass(eq=False)
class PendingFinal:
    """An utterance that ended (VAD stop, or Deepgram's in speech_events mode), waiting for its final transcript."""

    cut_index: int  # audio chunks before this index belong to it: Finalize goes after them
    cut_pts: int  # words starting before this sample are its words
    speech_end_pts: int  # its last voiced sample: is_final results reaching it complete the utterance
    finalize_on: _Socket | None = None  # the socket its Finalize was sent on
    heard_at: float | None = None  # with a local VAD: where Deepgram's SpeechStarted put its start, if one came
    # Clock times, also the SDK boundary for the trace (stt.sdk_call / stt.sdk_answer): its end first handed to the
    # SDK — the first of its audio still unsent when it ended, else its Finalize, which goes out right after that
    # audio — and the SDK handing over the result that answered the Finalize.
    sdk_call_at: float | None = None
    answered_at: float | None = None
    timed_out_at: float | None = None  # when finalize_timeout_s ran out, if it did
    # Its Finalize's place in the stream of the socket it went out on (samples sent before it), and when (loop time):
    # the stall deadline runs from then until Deepgram shows it processed it.
    finalize_pos: int = 0
    finalize_sent_at: float = 0.0
    settled: bool = False  # its final transcript went out
    audio_s: float = 0.0  # seconds of its audio sent to Deepgram (replays included): billed to its turn
    timer: asyncio.Task[None] | None = None

    @property
    def answered(self) -> bool:
        return self.answered_at is not None

    @property
    def timed_out(self) -> bool:
        return self.timed_out_at is not None

    def trace_marks(self) -> tuple[tuple[str, float], ...]:
        """Marks for the turn its final ends (:attr:`Transcript.marks`: the turn's epoch does not exist yet)."""
        marks: list[tuple[str, float]] = []
        if self.heard_at is not None:
            marks.append(("stt.speech_started", self.heard_at))
        if self.sdk_call_at is not None and self.answered_at is not None:
            marks += [("stt.sdk_call", self.sdk_call_at), ("stt.sdk_answer", self.answered_at)]
        if self.timed_out_at is not None:
            marks.append(("stt.finalize_timeout", self.timed_out_at))
        return tuple(marks)


@dataclass(eq=False)
class _Socket:
    """One live connection: the SDK socket, its time map, how far the audio log was sent, Finalizes in flight."""

    sdk: Any
    timeline: StreamTimeline
    cursor: int
    finalizes: deque[PendingFinal] = field(default_factory=deque)  # answers awaited (finals not out yet), in order
    # Finalizes whose finals went out on their timeout, unanswered: no answer is paired with them any more, but a
    # server that never showed it processed them is still a stalled one (their stall deadline keeps running).
    given_up: deque[PendingFinal] = field(default_factory=deque)
    heard_to: int = 0  # stream samples Deepgram has shown it processed: the furthest end of its Results
    # Since Deepgram last said anything: the stream samples sent by then, and when (loop time) the first audio after
    # it went out (None: none yet). Audio that long unanswered is a stalled socket (message_timeout_s).
    said_at: int = 0
    quiet_since: float | None = None
    reading: asyncio.Timeout | None = None  # the receiver's wait for the next message, under the stall deadline
    frames: _LastFrame | None = None  # the SDK socket's websocket, keeping the last frame received


def _backoff(drops: int) -> float:
    """The wait before reconnecting after the ``drops``-th recent drop, jittered (down to half) so that calls a
    server dropped together do not all come back at the same instant."""
    wait = RECONNECT_BACKOFF_S[min(drops, len(RECONNECT_BACKOFF_S)) - 1]
    return wait * random.uniform(0.5, 1.0)


class _ConnectionLost(Exception):
    """The socket dropped or stalled; the session reconnects."""


@dataclass
class DeepgramStats:
    connects: int = 0
    reconnects: int = 0
    messages: int = 0  # messages received from Deepgram
    finals: int = 0
    partials: int = 0
    finalize_timeouts: int = 0
    late_finals: int = 0  # is_final results with words, dropped: their utterance's final had gone out without them
    keepalives: int = 0
    audio_s: float = 0.0


def _sdk() -> Any:
    return require_sdk(PROVIDER, "deepgram", "deepgram")


class _LastFrame:
    """Stands in for the SDK socket's websocket (its private ``_websocket``, which :func:`_abort` reads too) and keeps
    the last frame received: for a message the SDK cannot parse — a type it does not know, JSON that is no object —
    its ``recv()`` returns None, and the report should say what came. Everything else is the websocket's own (not
    ``async for``, which the stage does not use)."""

    def __init__(self, websocket: Any) -> None:
        self.websocket = websocket
        self.last: str | bytes | None = None

    async def recv(self, *args: Any, **kwargs: Any) -> str | bytes:
        self.last = await self.websocket.recv(*args, **kwargs)
        return self.last

    def __getattr__(self, name: str) -> Any:
        return getattr(self.websocket, name)

    @classmethod
    def around(cls, sdk_socket: Any) -> _LastFrame | None:
        websocket = getattr(sdk_socket, "_websocket", None)
        if websocket is None:  # another SDK layout: reports then say less
            return None
        sdk_socket._websocket = frames = cls(websocket)
        return frames


def _unparsed(raw: str | bytes | None) -> str:
    """What a message the SDK could not parse was, from its raw frame (None: not kept)."""
    unknown = "a message this SDK cannot parse (an unknown type or JSON that is no object)"
    if raw is None:
        return unknown
    try:
        value = json.loads(raw)
    except ValueError:
        return unknown
    if isinstance(value, dict):
        kind = value.get("type")
        return f"a message of unknown type {kind!r}" if kind is not None else "a message without a type"
    return f"JSON that is no object ({raw[:60]!r})"


def _word_text(word: Any) -> str:
    """A Results word's text (punctuated with smart_format); ValueError when it has none that is a string."""
    text = word.punctuated_word or word.word
    if not isinstance(text, str) or not text:
        raise ValueError(f"a word whose text is {text!r}")
    return text


def _abort(sdk_socket: Any) -> None:
    """Drop the connection under the SDK socket at once. Leaving the SDK's ``async with`` runs websockets' closing
    handshake, which waits up to its ``close_timeout`` (10 s), twice over, for a peer that may have stopped reading;
    after an abort it returns at once."""
    transport = getattr(getattr(sdk_socket, "_websocket", None), "transport", None)
    if transport is not None:
        transport.abort()


# ------------------------------------------------------------------------------------------------ the stage


class DeepgramSTT(Stage):
    """Deepgram live STT: audio and VAD events pass through; partial transcripts while the caller speaks; exactly
    one final transcript per utterance (its text is "" when nothing was recognised)."""

    Settings: ClassVar[type[BaseModel]] = DeepgramSTTSettings

    @classmethod
    def required_packages(cls, settings: DeepgramSTTSettings) -> tuple[Package, ...]:
        return (Package("deepgram", "deepgram-sdk", "deepgram"),)

    @classmethod
    def from_settings(cls, settings: DeepgramSTTSettings, context: Any, name: str) -> DeepgramSTT:
        key = settings.require_api_key("stt")  # before anything connects
        return cls(settings, api_key=key, audio=context.audio, name=name)

    def __init__(
        self,
        settings: DeepgramSTTSettings | None = None,
        *,
        api_key: str | None = None,
        audio: AudioFormat = AudioFormat(16000),
        name: str | None = None,
    ) -> None:
        super().__init__(name=name or "stt")
        if audio.channels != 1:
            raise AudioFormatError(
                f"stage {self.name!r} (Deepgram STT) takes mono audio, not {audio}; put a Resample("
                f"{audio.sample_rate}, 1) stage before it"
            )
        _sdk()  # a missing SDK fails here, naming the extra, not in the middle of a call
        self.settings = settings or DeepgramSTTSettings()
        self.consumes = self._format = audio
        self._rate = audio.sample_rate
        # A missing or blank key given in code (an unset variable read there) is named now, not refused later.
        self._api_key = (api_key or "").strip() or self.settings.require_api_key("stt")
        self._audio = AudioLog()
        self._socket: _Socket | None = None
        self._session: asyncio.Task[None] | None = None
        self._session_failed_at: float | None = None
        self._wake = asyncio.Event()  # the sender has audio, a Finalize or the close to send
        self._closing = False
        self._speaking = False  # an utterance is open (the VAD's, or Deepgram's in speech_events mode)
        # With a local VAD: where it heard the open utterance start, and Deepgram's SpeechStarted times not yet
        # given to an utterance (for the trace only).
        self._vad_started_at = 0.0
        self._heard: list[float] = []
        self._pending: deque[PendingFinal] = deque()  # utterances waiting for their final transcript
        self._unanswered: deque[PendingFinal] = deque()  # utterances whose Finalize is unsent or unanswered
        self._no_pending = asyncio.Event()
        self._no_pending.set()
        self._final_words: list[_Word] = []  # is_final words not yet given out in a final transcript
        self._interim_words: list[_Word] = []
        self._finalized_until = 0  # pts up to which Deepgram's is_final results reach
        self._given_until = 0  # pts before which every word went out in a final transcript: later ones are stale
        self._last_partial = ""
        # The frames the stage makes itself, in order, for the delivery task (which stop() ends).
        self._outbox: asyncio.Queue[Frame] = asyncio.Queue()
        self._deliverer: asyncio.Task[None] | None = None
        self._warned_vad = False
        self._reconnected_at: float | None = None  # a reconnect not marked yet: it goes on the next final's turn
        self._speech_start_pts = 0  # speech_events: where the open utterance started
        self._unbilled_s = 0.0  # audio sent that no ended utterance holds yet: the next one to end takes it
        self._hands_over_usage = False  # a turn-taker downstream counts each final's audio (set at start)
        self._sdk_client: Any = None  # built once, off the event loop, and kept for every session and reconnect
        self.stats = DeepgramStats()

    # ------------------------------------------------------------------------------------------ connect

    async def start(self) -> None:
        """Open the socket now, so the first turn does not wait for the handshake."""
        await super().start()
        # A final's audio is counted by the turn-taker that takes the final (Transcript.usage). A pipeline composed
        # without one (transcription alone, STT straight into a reasoner) would bill nothing: count it here then.
        stages = self.pipeline.stages
        self._hands_over_usage = any(isinstance(s, TurnTaker) for s in stages[stages.index(self) + 1 :])
        self._deliverer = self.spawn(self._deliver_loop(), name=f"{self.name}-deliver")
        self._start_session()

    def _start_session(self) -> None:
        self._session_failed_at = None
        self._session = self.spawn(self._run_session(), name=f"{self.name}-deepgram")

    def _client(self) -> Any:
        deepgram = _sdk()
        base = self.settings.base_url
        production = deepgram.DeepgramClientEnvironment.PRODUCTION
        environment = deepgram.DeepgramClientEnvironment(
            base="http" + base.removeprefix("ws"),  # REST (unused here) on the same host
            production=base,
            agent=production.agent,
            agent_rest=production.agent_rest,
        )
        return deepgram.AsyncDeepgramClient(api_key=self._api_key, environment=environment)

    async def _shared_client(self) -> Any:
        """The SDK client, built on a worker thread the first time (its HTTP client loads a CA bundle: tens of ms
        that would hold up every other stage on the loop) and reused by every session and reconnect."""
        if self._sdk_client is None:
            self._sdk_client = await asyncio.to_thread(self._client)
        return self._sdk_client

    def _query(self) -> dict[str, Any]:
        s = self.settings
        query: dict[str, Any] = {
            "model": s.model,
            "language": s.language,
            "encoding": "linear16",
            "sample_rate": self._rate,
            "channels": 1,
            "interim_results": s.interim_results,
            "smart_format": s.smart_format,
            "punctuate": s.smart_format,
            "vad_events": True,  # SpeechStarted: a speech event, or a trace mark next to a local VAD
            "endpointing": s.endpointing if s.endpointing is not None else False,
        }
        if s.utterance_end_ms is not None:
            query["utterance_end_ms"] = s.utterance_end_ms
        if s.keyterms:
            query["keyterm"] = list(s.keyterms)
        return query

    async def _run_session(self) -> None:
        """Connect, serve, reconnect after a drop (up to ``max_reconnects`` within a minute); a refusal is final."""
        loop = asyncio.get_running_loop()
        # When recent connections were lost. Counting drops in a window, not failures in a row, also ends a session
        # whose server answers a little and then drops every connection, instead of reconnecting forever.
        drops: deque[float] = deque()
        limit = self.settings.max_reconnects
        try:
            client = await self._shared_client()
            while not self._closing:
                try:
                    await self._connect_and_serve(client)
                    return
                except _ConnectionLost as lost:
                    now = loop.time()
                    drops.append(now)
                    while now - drops[0] > RECONNECT_WINDOW_S:
                        drops.popleft()
                    if len(drops) > limit:
                        raise ProviderError(
                            PROVIDER,
                            f"connection lost ({lost}), {len(drops)} times within {RECONNECT_WINDOW_S:g} s; "
                            f"gave up after {limit} reconnects",
                        ) from lost
                    if self._closing:
                        return
                    self.stats.reconnects += 1
                    replay_s = (self._audio.end_pts - self._audio.first_pts) / self._rate
                    if self._reconnected_at is None:
                        self._reconnected_at = self.clock.now()
                    await self.report(
                        f"{PROVIDER}: connection lost ({lost}); reconnecting ({len(drops)} of {limit} within "
                        f"{RECONNECT_WINDOW_S:g} s) and replaying {replay_s:.1f} s of the caller's audio"
                    )
                    await asyncio.sleep(_backoff(len(drops)))
        except BaseException:
            self._session_failed_at = self.clock.now()
            raise

    async def _connect_and_serve(self, client: Any) -> None:
        from deepgram.core.api_error import ApiError
        from websockets.exceptions import ConnectionClosed, WebSocketException

        limit = self.settings.connect_timeout_s
        ended: BaseException | None = None  # why serving ended, when the socket did not simply close
        try:
            async with contextlib.AsyncExitStack() as stack:
                try:
                    async with asyncio.timeout(limit):
                        sdk_socket = await stack.enter_async_context(client.listen.v1.connect(**self._query()))
                except ApiError as exc:
                    raise self._refusal(exc) from None
                except TimeoutError:
                    raise _ConnectionLost(f"no handshake within {limit:g} s") from None
                except OSError as exc:
                    raise _ConnectionLost(f"cannot connect to {self.settings.base_url}: {exc}") from None
                except WebSocketException as exc:  # e.g. the connection closed before the handshake's answer
                    raise _ConnectionLost(f"handshake failed: {exc}") from None
                self.stats.connects += 1
                socket = _Socket(sdk_socket, StreamTimeline(self._rate), cursor=self._audio.first_index)
                socket.frames = _LastFrame.around(sdk_socket)
                # A Finalize lost with the old socket is sent again after the replay, unless its final is out.
                self._unanswered = deque(p for p in self._unanswered if not p.settled)
                self._socket = socket
                try:
                    await self._serve(socket)
                except BaseException as exc:
                    ended = exc
                    _abort(sdk_socket)  # lost, stalled, cancelled: no closing handshake with a silent peer
                    raise
                finally:
                    self._socket = None
        except ConnectionClosed:
            if ended is None:
                raise
            raise ended from ended.__cause__  # the aborted socket's `async with` failed to close it: it was gone

    def _refusal(self, exc: Any) -> ProviderError:
        status = getattr(exc, "status_code", None)
        if status == 429:
            what = "rate limited"
        elif isinstance(status, int) and status >= 500:
            what = "server error"
        else:
            what = _REFUSALS.get(status or 0, "handshake refused")
        # The SDK's ApiError carries a canned body; Deepgram's own message and request id are in the refused
        # handshake's headers, on the websockets exception the SDK raised it from.
        refused = exc.__context__  # websockets' InvalidStatusCode (.headers) or, from websockets 14, InvalidStatus
        headers = getattr(refused, "headers", None) or getattr(getattr(refused, "response", None), "headers", None)
        headers = headers or {}
        said = f": {headers['dg-error']}" if headers.get("dg-error") else ""
        request = f" (request id {headers['dg-request-id']})" if headers.get("dg-request-id") else ""
        # 401, 402 and 403 are about the key (its project's credit, its permissions): say which key the call used.
        hint = f"; check {self.settings.key_source('stt')}" if status in _REFUSALS else ""
        return ProviderError(
            PROVIDER,
            f"{what} (HTTP {status}{said}) when opening the live socket at {self.settings.base_url}{request}{hint}",
        )

    # ------------------------------------------------------------------------------------------- stream

    async def process(self, frame: Frame, direction: Direction) -> None:
        if direction is Direction.UPSTREAM:
            await self.push(frame, direction)
            return
        if isinstance(frame, AudioFrame):
            if frame.sample_rate != self._rate or frame.channels != 1 or len(frame.pcm) & 1:
                self._format.check(frame, self.name)  # raises, naming the problem
            await self.push(frame)
            if frame.pcm:  # zero bytes are Deepgram's legacy close signal: it would end the stream
                self._take_audio(frame)
        elif isinstance(frame, UserSpeechStarted | UserSpeechProgress | UserSpeechStopped):
            if self.settings.speech_events:
                if not self._warned_vad:
                    self._warned_vad = True
                    log.warning("%s: speech_events is on; the VAD's speech events are dropped", self.name)
                return
            await self.push(frame)
            if isinstance(frame, UserSpeechStarted):
                self._speaking = True
                self._vad_started_at = frame.at
            elif isinstance(frame, UserSpeechStopped):
                self._speaking = False
                await self._utterance_ended(
                    self._audio.end_index, self._audio.end_pts, round(frame.last_voiced_at * self._rate)
                )
        elif isinstance(frame, End):
            await self._wait_for_finals()  # a drain delivers the finals of utterances already ended
            await self.push(frame)
        else:
            await self.push(frame)

    def _take_audio(self, frame: AudioFrame) -> None:
        self._audio.append(frame.pts, frame.pcm, frame.samples)
        keep_from = self._finalized_until
        if not self._speaking and not self._pending:
            # Only a pre-roll while nobody speaks — but never audio the open socket has not been sent yet, nor, with
            # speech_events, audio Deepgram has not shown it processed, or any while no socket is open: only
            # Deepgram can tell that the caller started speaking (a socket that stalled must have it replayed).
            pre_roll = self._audio.end_pts - round(_PRE_ROLL_S * self._rate)
            socket = self._socket
            if socket is not None:
                unsent = self._audio.get(socket.cursor)
                keep = min(pre_roll, unsent.pts) if unsent is not None else pre_roll
                if self.settings.speech_events:
                    keep = min(keep, socket.timeline.to_pts(socket.heard_to / self._rate))
                keep_from = max(keep_from, keep)
            elif not self.settings.speech_events:
                keep_from = max(keep_from, pre_roll)
        self._audio.forget_before(max(keep_from, self._audio.end_pts - round(self.settings.replay_max_s * self._rate)))
        self._wake.set()
        failed_at, session = self._session_failed_at, self._session
        retry_due = failed_at is not None and self.clock.now() - failed_at >= self.settings.retry_after_s
        if retry_due and session is not None and session.done() and not self._closing:
            self._start_session()  # the stage failed under a skip policy: the call goes on, so try again

    async def _serve(self, socket: _Socket) -> None:
        """Send and receive until the socket closes; the first of the two to fail ends both."""
        sender = asyncio.create_task(self._send_loop(socket), name=f"{self.name}-deepgram-send")
        receiver = asyncio.create_task(self._receive_loop(socket), name=f"{self.name}-deepgram-receive")
        try:
            await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in (sender, receiver):
                task.cancel()
            await asyncio.gather(sender, receiver, return_exceptions=True)
        for task in (receiver, sender):
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _send_loop(self, socket: _Socket) -> None:
        """Audio in order (a new socket starts with the replay), each Finalize after its utterance's audio,
        KeepAlive while nothing flows, CloseStream at the end."""
        from websockets.exceptions import ConnectionClosed

        try:
            while True:
                self._wake.clear()  # before looking: audio arriving during a send below sets it again
                socket.cursor = max(socket.cursor, self._audio.first_index)
                chunk = self._audio.get(socket.cursor)
                if chunk is not None:
                    self._handing_over(socket.cursor)
                    await self._send(socket.sdk.send_media(chunk.pcm), "audio")
                    socket.timeline.add(chunk.pts, chunk.samples)
                    self._unanswered_audio(socket, chunk.samples)
                    socket.cursor += 1
                    seconds = chunk.samples / self._rate
                    self.stats.audio_s += seconds
                    self._bill(socket.cursor - 1, seconds)
                    await self._send_finalizes(socket)
                    continue
                await self._send_finalizes(socket)
                if self._closing:
                    await self._send(socket.sdk.send_close_stream(), "CloseStream")
                    return
                try:
                    async with asyncio.timeout(self.settings.keepalive_s):
                        await self._wake.wait()
                except TimeoutError:
                    self.stats.keepalives += 1
                    await self._send(socket.sdk.send_keep_alive(), "KeepAlive")
        except ConnectionClosed as exc:
            raise _ConnectionLost(f"closed while sending (code {exc.code})") from None

    async def _send(self, sending: Awaitable[None], what: str) -> None:
        """One message to the socket. A server that stops reading fills the TCP buffers, and then a send waits until
        websockets' ping timeout (20 s or more) notices: a wait past ``send_timeout_s`` is a stalled socket."""
        limit = self.settings.send_timeout_s
        try:
            async with asyncio.timeout(limit):
                await sending
        except TimeoutError:
            raise _ConnectionLost(f"{what} not taken within {limit:g} s (the server stopped reading)") from None

    def _bill(self, index: int, seconds: float) -> None:
        """Audio chunk ``index`` went to Deepgram: its seconds belong to the utterance whose audio it is (the oldest
        still waiting for its final that ends after it), else to the next utterance to end — the pause before an
        utterance is billed with it. A final carries its utterance's seconds to the turn-taker (``usage``), or,
        without one downstream, the stage counts them as the final goes out (:meth:`_settle`)."""
        for pending in self._pending:
            if index < pending.cut_index:
                pending.audio_s += seconds
                return
        self._unbilled_s += seconds

    async def _send_finalizes(self, socket: _Socket) -> None:
        for pending in list(self._unanswered):
            if pending.cut_index > socket.cursor:
                return
            if pending.finalize_on is socket:
                continue
            pending.finalize_on = socket
            awaited = not pending.settled
            if awaited:
                pending.finalize_pos = socket.timeline.samples
                pending.finalize_sent_at = asyncio.get_running_loop().time()
                socket.finalizes.append(pending)
                self._rearm(socket)  # a read begun with nothing due takes the deadline
            else:  # its final is out already: the Finalize only flushes Deepgram, which may not answer it
                self._unanswered.remove(pending)
            if pending.sdk_call_at is None:
                pending.sdk_call_at = self.clock.now()
            await self._send(socket.sdk.send_finalize(), "Finalize")

    def _handing_over(self, index: int) -> None:
        """Audio chunk ``index`` is about to go to the SDK: an utterance that already ended with it unsent starts
        its SDK call here (``stt.sdk_call``), as a program sending its last frame, then Finalize, would count it."""
        for pending in self._unanswered:
            if pending.sdk_call_at is None and index < pending.cut_index:
                pending.sdk_call_at = self.clock.now()

    def _unanswered_audio(self, socket: _Socket, samples: int) -> None:
        """``samples`` of audio went out on ``socket``: the first since Deepgram last said anything starts the
        silence clock, and once ``message_timeout_s`` of audio has gone unanswered the read under way takes the
        deadline (audio alone, not time: with no audio flowing, Deepgram has nothing to answer)."""
        if socket.quiet_since is None:
            socket.quiet_since = asyncio.get_running_loop().time()
        limit = round(self.settings.message_timeout_s * self._rate)
        unanswered = socket.timeline.samples - socket.said_at
        if unanswered - samples < limit <= unanswered:
            self._rearm(socket)

    def _stalls(self, socket: _Socket) -> list[tuple[float, str]]:
        """The stall deadlines running on the socket (loop time), each with what passing it means:

        * ``result_timeout_s`` after the first Finalize awaited on it that Deepgram has shown no sign of processing.
          Its answer is such a sign (it leaves ``socket.finalizes``), and so are Results of audio sent after it; a
          message Deepgram wrote before the Finalize reached it (an interim still on its way) is none.
        * ``message_timeout_s`` after the first audio sent since Deepgram last said anything, once that much audio
          has gone out: Deepgram sends Results as it processes audio, silence included, so a socket silent that
          long has stalled. With ``speech_events`` no Finalize goes out before Deepgram's own end of speech, so
          this is the only rule that catches a server gone silent there."""
        stalls = []
        step = round(_TIME_STEP_S * self._rate)  # a result ending at the Finalize, rounded up, is not past it
        for pending in (*socket.given_up, *socket.finalizes):
            if socket.heard_to <= pending.finalize_pos + step:
                limit = self.settings.result_timeout_s
                stalls.append((pending.finalize_sent_at + limit, f"no answer to a Finalize within {limit:g} s"))
                break
        quiet = self.settings.message_timeout_s
        unanswered = socket.timeline.samples - socket.said_at
        if socket.quiet_since is not None and unanswered >= round(quiet * self._rate):
            stalls.append((socket.quiet_since + quiet, f"no message from {PROVIDER} for {quiet:g} s of audio sent"))
        return stalls

    def _stall_deadline(self, socket: _Socket) -> float | None:
        """When the socket counts as stalled (loop time), or None (:meth:`_stalls`)."""
        return min((deadline for deadline, _ in self._stalls(socket)), default=None)

    def _heard_from(self, socket: _Socket) -> None:
        """Deepgram said something (whatever it was): the silence clock starts again with the next audio."""
        socket.said_at = socket.timeline.samples
        socket.quiet_since = None

    def _rearm(self, socket: _Socket) -> None:
        """The stall deadline changed (a Finalize went out, or its answer is awaited no more, or ``message_timeout_s``
        of audio went unanswered): the read under way takes it."""
        reading = socket.reading
        if reading is not None and not reading.expired():
            reading.reschedule(self._stall_deadline(socket))

    async def _receive_loop(self, socket: _Socket) -> None:
        """Read until the socket closes, handing what it recognises to the delivery task. A socket past a stall
        deadline (:meth:`_stalls`) is a stalled one; a message that cannot be used is reported and skipped."""
        from websockets.exceptions import ConnectionClosed, ConnectionClosedOK

        loop = asyncio.get_running_loop()
        while True:
            try:
                async with asyncio.timeout_at(self._stall_deadline(socket)) as socket.reading:
                    message = await socket.sdk.recv()
            except TimeoutError:
                passed = [what for deadline, what in self._stalls(socket) if deadline <= loop.time()]
                if not passed:
                    continue  # the answer was given up on as the deadline passed: nothing is awaited that long
                raise _ConnectionLost(f"{passed[0]} (stalled)") from None
            except json.JSONDecodeError as exc:
                self._heard_from(socket)  # a broken message is still a sign of life
                await self.report(f"{PROVIDER} sent malformed JSON ({exc}); skipped it")
                continue
            except ConnectionClosedOK:
                if self._closing:
                    return
                raise _ConnectionLost("closed by Deepgram") from None
            except ConnectionClosed as exc:
                reason = f"code {exc.rcvd.code}: {exc.rcvd.reason}" if exc.rcvd else "no close frame"
                raise _ConnectionLost(f"closed abruptly ({reason})") from None
            finally:
                socket.reading = None
            received_at = self.clock.now()  # the SDK boundary: it has parsed the message
            self.stats.messages += 1
            self._heard_from(socket)
            await self._on_message(socket, message, received_at)

    async def _on_message(self, socket: _Socket, message: Any, received_at: float) -> None:
        from deepgram.listen.v1.types import (
            ListenV1Error,
            ListenV1Metadata,
            ListenV1Results,
            ListenV1SpeechStarted,
            ListenV1UtteranceEnd,
        )

        if isinstance(message, ListenV1Results):
            await self._on_results(socket, message, received_at)
        elif isinstance(message, ListenV1SpeechStarted):
            timestamp = await self._seconds(message, "timestamp")
            if timestamp is not None:
                self._on_speech_started(socket.timeline.to_pts(timestamp))
        elif isinstance(message, ListenV1UtteranceEnd):
            last_word_end = await self._seconds(message, "last_word_end")
            if last_word_end is not None and self.settings.speech_events and self._speaking:
                end = socket.timeline.to_pts(last_word_end)
                if end < self._speech_start_pts:
                    # The previous utterance's, arriving after the caller started again (SpeechStarted comes
                    # before any word): it must not end the new one.
                    log.debug("%s: an UtteranceEnd from before the open utterance; ignored", self.name)
                else:
                    await self._speech_stopped(socket, end + 1, end)
        elif isinstance(message, ListenV1Metadata):
            log.debug("%s: Deepgram metadata: %s", self.name, message)
        elif isinstance(message, ListenV1Error):
            await self.report(f"{PROVIDER} reported an error: {message.variant}: {message.description}")
        elif isinstance(message, bytes):
            await self.report(f"{PROVIDER} sent {len(message)} bytes of binary data (Listen v1 sends JSON); skipped")
        elif message is None:  # the SDK's recv() parses neither a type it does not know nor JSON that is no object
            raw = socket.frames.last if socket.frames is not None else None
            await self.report(f"{PROVIDER} sent {_unparsed(raw)}; skipped it")
        # ConfigureSuccess / ConfigureFailure: this stage does not reconfigure a live socket

    async def _seconds(self, message: Any, name: str) -> float | None:
        """An event's time field, or None — reported, the event skipped — when it is missing, not a number, or no
        time within a stream (negative, NaN, infinite, past :data:`_LONGEST_STREAM_S`)."""
        value = getattr(message, name, None)
        if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= _LONGEST_STREAM_S:
            return float(value)  # not NaN, which fails every comparison
        await self.report(f"{PROVIDER} sent {message.type} without a usable {name} ({value!r}); skipped it")
        return None

    async def _on_results(self, socket: _Socket, results: Any, received_at: float) -> None:
        try:
            alternative = results.channel.alternatives[0]
            end = _finite(float(results.start) + float(results.duration), "start + duration")
            raw_words = list(alternative.words or [])
            words = [
                _Word(
                    _word_text(w),
                    socket.timeline.to_pts(_finite(float(w.start), "a word's start")),
                    socket.timeline.to_pts(_finite(float(w.end), "a word's end")),
                )
                for w in raw_words
            ]
            heard_to = round(end * self._rate)
        except (AttributeError, IndexError, TypeError, ValueError, OverflowError) as exc:
            await self.report(f"{PROVIDER} sent Results without a usable transcript ({exc}); skipped")
            return
        socket.heard_to = max(socket.heard_to, heard_to)  # Deepgram processed this far: not stalled
        given = self._given_until
        stale = [w for w in words if w.start < given]  # words of utterances whose finals went out
        words = [w for w in words if w.start >= given]
        end_pts = socket.timeline.to_pts(end)
        if given and not words and end_pts <= given + round(_LATE_MARGIN_S * self._rate):
            await self._late(results, stale, received_at)
            return
        if self.settings.speech_events and words and not self._speaking:
            self._on_speech_started(words[0].start)  # a SpeechStarted may not come: use words
        if results.is_final:
            self._final_words.extend(words)
            self._interim_words = []
            self._finalized_until = max(self._finalized_until, end_pts)
            if results.from_finalize:
                socket.given_up.clear()  # Deepgram answers Finalizes: it has not hung
            if results.from_finalize and socket.finalizes:
                answered = socket.finalizes.popleft()
                answered.answered_at = received_at
                if answered in self._unanswered:
                    self._unanswered.remove(answered)
            if self.settings.speech_events and results.speech_final and self._speaking:
                # Deepgram's endpointing: the utterance is over. Without words of its own it is a noise Deepgram
                # took for speech (or its last segment was silence): the stop closes it all the same, and its
                # final is empty, or has the words of its earlier segments.
                mine = [w for w in self._final_words if w.start >= self._speech_start_pts]
                if mine:
                    await self._speech_stopped(socket, end_pts, mine[-1].end)
                elif end_pts > self._speech_start_pts:
                    await self._speech_stopped(socket, end_pts, self._speech_start_pts)
        else:
            self._interim_words = words
        await self._settle()
        self._partial()

    async def _late(self, results: Any, stale: list[_Word], received_at: float) -> None:
        """A result whose audio all belongs to utterances whose finals went out: typically the answer to a Finalize
        whose utterance ended on its timeout. It answers no Finalize awaited now (taken for the next utterance's
        answer, it ended that one early, without its words), and it must not touch the open utterance's words. The
        turn it belonged to is over, so its words are dropped; an is_final result's are reported, naming them."""
        if not (results.is_final and stale):
            log.debug("%s: a late result of audio already given out, without words; skipped", self.name)
            return
        self.stats.late_finals += 1
        text = " ".join(w.text for w in stale)
        what = "answer to a Finalize" if results.from_finalize else "final result"
        await self.report(
            f"{PROVIDER} sent a late {what} at {received_at:.2f} s, for speech at {stale[0].start / self._rate:.2f}-"
            f"{stale[-1].end / self._rate:.2f} s whose utterance had already ended without it; dropped its words "
            f"({text!r})"
        )

    def _on_speech_started(self, at_pts: int) -> None:
        at = at_pts / self._rate
        if not self.settings.speech_events:  # the local VAD decides; this goes to the trace of the turn it starts
            self._heard.append(at)
            return
        if self._speaking:
            return
        self._speaking = True
        self._speech_start_pts = at_pts
        self._deliver(UserSpeechStarted(epoch=self.pipeline.epoch, at=at))

    async def _speech_stopped(self, socket: _Socket, cut_pts: int, last_voiced_pts: int) -> None:
        """speech_events mode: Deepgram says the caller stopped; emit the stop, then treat it like a VAD's."""
        self._speaking = False
        stopped = UserSpeechStopped(
            epoch=self.pipeline.epoch, at=self.clock.now(), last_voiced_at=last_voiced_pts / self._rate
        )
        self._deliver(stopped)
        await self._utterance_ended(socket.cursor, cut_pts, last_voiced_pts)

    async def _utterance_ended(self, cut_index: int, cut_pts: int, speech_end_pts: int) -> None:
        pending = PendingFinal(cut_index, cut_pts, speech_end_pts, audio_s=self._unbilled_s)
        self._unbilled_s = 0.0
        cut = cut_pts / self._rate
        heard = [at for at in self._heard if at < cut]
        self._heard = [at for at in self._heard if at >= cut]  # the next utterance's
        if heard:  # Deepgram may also have heard a noise, or a pause inside the utterance: take the nearest
            pending.heard_at = min(heard, key=lambda at: abs(at - self._vad_started_at))
        self._pending.append(pending)
        self._unanswered.append(pending)
        self._no_pending.clear()
        self._wake.set()  # the sender sends the Finalize once the utterance's audio is out
        await self._settle()  # is_final results may already cover the speech (endpointing beat the VAD)
        if not pending.settled:
            pending.timer = self.spawn(self._finalize_deadline(pending), name=f"{self.name}-finalize-deadline")

    async def _finalize_deadline(self, pending: PendingFinal) -> None:
        await self.clock.sleep(self.settings.finalize_timeout_s)
        if pending.settled:
            return
        pending.timed_out_at = self.clock.now()
        self.stats.finalize_timeouts += 1
        await self._settle()

    async def _settle(self) -> None:
        """Give out the finals that are complete, oldest first: answered, covered by is_final results, or timed out.
        Each is handed to the delivery task as its utterance leaves ``_pending``, with nothing awaited in between
        (so finals leave in order, whichever task settles them, and a task cancelled here loses none); a timed-out
        one is reported after."""
        while self._pending:
            pending = self._pending[0]
            covered = self._finalized_until >= pending.speech_end_pts
            if not (pending.answered or covered or pending.timed_out):
                return
            self._pending.popleft()
            pending.settled = True  # its deadline task, if any, wakes and finds nothing to do
            if not pending.answered:
                self._stop_awaiting(pending, gave_up=not covered)
            if not self._pending:
                self._no_pending.set()
            words = [w for w in self._final_words if w.start < pending.cut_pts]
            self._final_words = [w for w in self._final_words if w.start >= pending.cut_pts]
            problem = None
            if pending.timed_out and not (pending.answered or covered):
                heard = [w for w in self._interim_words if w.start < pending.cut_pts]
                self._interim_words = [w for w in self._interim_words if w.start >= pending.cut_pts]
                words += heard
                text = " ".join(w.text for w in words)
                problem = (
                    f"{PROVIDER}: no final result within {self.settings.finalize_timeout_s:g} s of the end of "
                    f"speech; the utterance ends with the words heard so far ({text!r})"
                )
            self._given_until = max(self._given_until, pending.cut_pts)
            self._finalized_until = max(self._finalized_until, pending.cut_pts)
            self._last_partial = ""
            marks = pending.trace_marks()
            if self._reconnected_at is not None:  # the turn whose audio the new socket was given again
                marks, self._reconnected_at = (*marks, ("stt.reconnect", self._reconnected_at)), None
            usage: tuple[tuple[str, str, float], ...] = ()
            if pending.audio_s and self._hands_over_usage:
                usage = ((self.name, AUDIO_SECONDS, pending.audio_s),)
            elif pending.audio_s:  # counted before the final goes out: a stage it opens a turn in gets it
                self.count_for_next_turn(audio_seconds=pending.audio_s)
            self._emit(words, final=True, marks=marks, usage=usage)
            if problem is not None:  # recorded on the turn in progress before the final can end it
                await self.report(problem)

    def _stop_awaiting(self, pending: PendingFinal, *, gave_up: bool) -> None:
        """``pending`` settled unanswered (is_final results covered it, or, ``gave_up``, its deadline passed): its
        Finalize's answer is no longer awaited, so the answer to a later Finalize must not be taken for it. Covered,
        its silence is no stall either: Deepgram may never answer (it need not when little audio is buffered). Given
        up, it still counts towards the stall deadline until Deepgram shows any sign of processing it: a server that
        has hung must be replaced, not wait out every later utterance's timeout. A Finalize not sent yet still goes
        out, as a flush (:meth:`_send_finalizes`)."""
        socket = pending.finalize_on
        if socket is None:
            return
        with contextlib.suppress(ValueError):
            self._unanswered.remove(pending)
        with contextlib.suppress(ValueError):
            socket.finalizes.remove(pending)
            if gave_up:
                socket.given_up.append(pending)
            self._rearm(socket)  # disarmed, or running for the next Finalize awaited

    def _partial(self) -> None:
        words = [w for w in (*self._final_words, *self._interim_words) if w.start >= self._given_until]
        text = " ".join(w.text for w in words)
        if text and text != self._last_partial:
            self._last_partial = text
            self._emit(words, final=False)

    def _emit(
        self,
        words: list[_Word],
        *,
        final: bool,
        marks: tuple[tuple[str, float], ...] = (),
        usage: tuple[tuple[str, str, float], ...] = (),
    ) -> None:
        rate = self._rate
        timed = tuple(TranscriptWord(w.text, w.start / rate, w.end / rate) for w in words)
        if final:
            self.stats.finals += 1
        else:
            self.stats.partials += 1
        text = " ".join(w.text for w in words)
        transcript = Transcript(
            epoch=self.pipeline.epoch, text=text, final=final, words=timed, marks=marks, usage=usage
        )
        self._deliver(transcript)

    def _deliver(self, frame: Frame) -> None:
        """Hand a frame the stage made (a transcript; with ``speech_events``, a speech event) to the delivery task."""
        self._outbox.put_nowait(frame)

    async def _deliver_loop(self) -> None:
        """Push the stage's own frames downstream, in the order they were made. A task of the stage's own, spawned
        at start and ended by :meth:`stop`: the receiver hands its frames over and reads on, so a reconnect, which
        tears down the socket's tasks, never cancels a final on its way downstream (a stage there awaiting)."""
        while True:
            frame = await self._outbox.get()
            try:
                await self.push(frame)
            finally:
                self._outbox.task_done()

    async def _wait_for_finals(self) -> None:
        # Each pending final has its own deadline; this bound only guards against a bug leaving one behind.
        limit = self.settings.finalize_timeout_s + 1.0
        try:
            async with asyncio.timeout(limit):
                await self._no_pending.wait()
                await self._outbox.join()  # and delivered: what follows must not overtake them
        except TimeoutError:
            log.error("%s: finals still pending or undelivered %g s into a drain", self.name, limit)

    # ------------------------------------------------------------------------------------------- cancel

    # No on_interrupt: an interrupt cancels the *bot's* reply. The caller's speech is the barge-in itself; its
    # utterance ends with a Finalize like any other (what Deepgram sees of a barge-in).

    # -------------------------------------------------------------------------------------------- close

    async def stop(self) -> None:
        """CloseStream after the last audio, wait briefly for Deepgram's Metadata and close, deliver the transcripts
        already made (as briefly), then let go."""
        self._closing = True
        self._wake.set()
        session = self._session
        if session is not None and not session.done():
            done, _ = await asyncio.wait({session}, timeout=self.settings.close_timeout_s)
            if not done:
                log.warning("%s: Deepgram did not close within %g s", self.name, self.settings.close_timeout_s)
                session.cancel()
                await asyncio.wait({session}, timeout=self.settings.close_timeout_s)
        for pending in self._pending:
            if pending.timer is not None:
                pending.timer.cancel()
        undelivered_s = await self._end_delivery()
        # Audio no final carried to a turn (after the last utterance, or of one whose final never went out).
        unbilled = self._unbilled_s + sum(p.audio_s for p in self._pending) + undelivered_s
        self._unbilled_s = 0.0
        for pending in self._pending:
            pending.audio_s = 0.0  # counted here: never again on a final
        if unbilled:
            self.count_for_next_turn(audio_seconds=unbilled)
        await super().stop()

    async def _end_delivery(self) -> float:
        """Let the delivery task push what is queued (a stage downstream may be stuck: ``close_timeout_s`` at most),
        end it, and return the audio seconds carried by finals it never pushed, for :meth:`stop` to count."""
        try:
            async with asyncio.timeout(self.settings.close_timeout_s):
                await self._outbox.join()
        except TimeoutError:
            log.warning("%s: transcripts still undelivered %g s into stop", self.name, self.settings.close_timeout_s)
        if self._deliverer is not None:
            self._deliverer.cancel()
        carried = 0.0
        while not self._outbox.empty():
            frame = self._outbox.get_nowait()
            self._outbox.task_done()
            if isinstance(frame, Transcript):
                carried += sum(amount for _stage, counter, amount in frame.usage if counter == AUDIO_SECONDS)
        return carried


def _finite(seconds: float, what: str) -> float:
    """``seconds`` if it is a finite time (JSON allows 1e400, which Python reads as inf, and NaN in some parsers)
    within any stream's length (:data:`_LONGEST_STREAM_S`)."""
    if not (math.isfinite(seconds) and abs(seconds) <= _LONGEST_STREAM_S):
        raise ValueError(f"{what} is {seconds}")
    return seconds
