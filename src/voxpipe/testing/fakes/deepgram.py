"""FakeDeepgram: a loopback Deepgram Listen v1 (live streaming STT) server for the official ``deepgram-sdk``.

It speaks the protocol of ``providers-wire.md`` §1.3: ``GET /v1/listen?model=…&encoding=linear16&sample_rate=…``
with ``Authorization: Token <key>`` (401 otherwise); binary linear16 audio and the JSON control messages
``KeepAlive``, ``Finalize``, ``CloseStream`` (and ``Configure``) from the client; ``SpeechStarted`` (with
``vad_events=true``), interim and ``is_final`` ``Results``, ``speech_final`` after ``endpointing`` ms of silence,
``UtteranceEnd`` ``utterance_end_ms`` after the last finalized word (none after an utterance without words; with
``endpointing=false`` the utterance's is_final result comes then too), a ``from_finalize`` result answering each
``Finalize`` (with ``answer_empty_finalize=False``, only one arriving while speech is being heard: real Deepgram may
not answer when little audio is buffered), an empty ``Results`` for each ``silence_results_s`` of audio with nothing
else to say — interim, or with ``interim_results=false`` an ``is_final`` one closing the silent segment — since real
Deepgram keeps sending Results as it processes audio, silence included (a client may take a socket silent through a
long stretch of audio for a stalled one), and ``Metadata`` then a normal close on ``CloseStream`` — or on a
zero-byte binary message, which Deepgram still takes for its legacy close signal (deepgram-python-sdk#146): it
finalizes what it heard, sends ``Metadata`` and closes with 1000 as for ``CloseStream``. After ``idle_timeout_s``
without audio or a message it closes with 1011 and Deepgram's NET-0001 reason.

What it "recognises", detected by an energy threshold on the PCM it receives (one utterance = speech up to
``endpointing`` ms of silence, or up to a ``Finalize`` in silence):

* ``utterances=["Hello there.", …]`` — the n-th utterance's text; its words are revealed ``seconds_per_word``
  apart in interim results and spread over the speech in the final one. The count runs across connections and
  advances when an utterance is finalized, so audio replayed after a reconnect is recognised as the same
  utterance. An utterance a connection ended in the middle of (dropped, gone quiet) is told by its audio: the next
  connection's speech continues it while it is that utterance's audio again, window for window (a replay sends
  the same bytes in the same order); audio that departs from it means the client gave it up (ended it on its
  timeout, say): it is recorded ``abandoned``, and the speech is the next utterance (if it had begun as the old
  one, its ``speech`` record keeps that index, and words of that line may have gone out in its interims);
* ``words=<object with words_between(start_s, end_s)>`` (the :class:`~voxpipe.testing.ScriptedCaller`) — the words
  spoken in the utterance's time span. A client need not stream the silence before the first speech (voxpipe's,
  with a local VAD, keeps only a short pre-roll until its socket is open), so the fake finds where the stream sits
  on the caller's clock at the connection's first speech onset — the first word starting there — and keeps that
  offset while one connection carries the call.

    async with FakeDeepgram(utterances=["Hello there."]) as fake:
        env = DeepgramClientEnvironment(base=fake.url, production=fake.ws_url, agent=fake.ws_url, agent_rest=fake.url)
        ...
        await fake.wait_for("message", lambda s: s.data["type"] == "Finalize")

Faults (``Faults``): ``refuse`` answers the handshake with that status; ``stall_s`` holds every message of a
connection until that long after it opened; ``drop_after`` aborts the first ``drop_connections`` connections after
that many messages sent on each; ``corrupt`` sends one broken message (malformed JSON, an event type Deepgram does
not have, or a binary frame — Listen v1 never sends binary) in place of the first normal one. The first
``deaf_connections`` connections hang at a ``Finalize`` (recorded as ``unanswered``; a ``Finalize`` left
unanswered by ``answer_empty_finalize=False`` is recorded as ``unanswered`` with ``buffered=False``): they recognise
and answer nothing more, but what they had written before, still on its way, arrives — as from a real server that
hangs — recorded as ``in-flight``.
The answers to the first ``late_answers`` ``Finalize`` messages are held back (recorded as ``held``) until the next
``Finalize`` arrives, and go out just before its answer: an answer later than any client's finalize timeout, arriving
while the client waits for the next utterance's.

Records: ``connect`` (path, query, headers), ``refused``, ``audio`` (connection, bytes), ``message`` (connection
and the parsed client message), ``speech`` (connection, utterance index, stream start), ``result`` (connection,
transcript, is_final, speech_final, from_finalize), ``held`` (connection, ``arrived``: a late answer held back),
``answered`` (connection, ``arrived``: when a Finalize arrived,
``due``; recorded as the result answering it is written: :meth:`waits`), ``in-flight`` (connection, type: a
message written by a connection that had gone quiet), ``idle-timeout``, ``dropped``, ``disconnect`` (the client went
away without CloseStream), ``close`` (closed after CloseStream or a zero-byte message), ``utterance`` (connection,
index, start and end of its speech in stream seconds, when it is finalized), ``abandoned`` (connection, index: an
utterance a connection ended in the middle of, which the next connection did not hear again).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from aiohttp import WSMsgType, web

from voxpipe.pipeline import TranscriptWord
from voxpipe.testing.fakes.server import FakeServer, Faults, Wait, client_left

NET_0001 = (
    "Deepgram did not receive audio data or a text message within the timeout window. See https://dpgr.am/net0001"
)
_WINDOW_S = 0.01  # energy analysis window
_PUNCTUATION = ".,!?;:\"'()"


class WordSource(Protocol):
    def words_between(self, start: float, end: float) -> list[TranscriptWord]: ...


@dataclass
class _Word:
    text: str  # as spoken in the script (with punctuation and case: Deepgram's punctuated_word)
    start: float
    end: float

    def json(self, smart_format: bool) -> dict[str, Any]:
        plain = self.text.strip(_PUNCTUATION).lower()
        word: dict[str, Any] = {"word": plain, "start": round(self.start, 3), "end": round(self.end, 3)}
        word["confidence"] = 0.99
        if smart_format:
            word["punctuated_word"] = self.text
        return word


@dataclass
class _Utterance:
    index: int
    connection: int
    start: float  # stream seconds of the first voiced window
    last_voiced: float
    script: list[str]  # utterances mode: the words of the line
    last_word_end: float | None = None  # the end of its last word sent in an is_final result
    voiced: list[int] = field(default_factory=list)  # hashes of its voiced windows' PCM, in order: its audio


@dataclass
class _Replay:
    """An utterance a connection ended in the middle of, and the speech of the next connection compared with it. A
    replay sends its audio again, the same bytes in the same order, from wherever the client's log starts."""

    left: _Utterance
    connection: int  # the connection whose speech is compared
    next: int | None = None  # the index in ``left.voiced`` of the window a replay sends next, once speech came


@dataclass
class _Stream:
    """One client connection: its options and what it has heard, in stream seconds."""

    number: int
    rate: int
    channels: int
    smart_format: bool
    interim_results: bool
    vad_events: bool
    endpointing_s: float | None
    utterance_end_s: float | None
    opened: float = field(default_factory=time.monotonic)
    samples: int = 0
    segment_start: float = 0.0  # start of the audio not yet covered by an is_final result
    utterance: _Utterance | None = None
    last_word_end: float | None = None  # for UtteranceEnd: the end of the last word of a finished utterance
    last_interim: float = 0.0
    last_result: float = 0.0  # where the last Results it sent ended: silence_results_s runs from there
    # (due, payload, for the result answering a Finalize: when that Finalize arrived)
    outbox: asyncio.Queue[tuple[float, str | None, float | None]] = field(default_factory=asyncio.Queue)
    closing: bool = False
    quiet: bool = False  # deaf_connections: it hung at a Finalize (what it had written still arrives)
    held: list[tuple[dict[str, Any], float]] = field(default_factory=list)  # late_answers: (answer, Finalize arrival)
    offset: float | None = None  # words mode: caller clock minus stream time, found at the first speech onset

    @property
    def now(self) -> float:
        return self.samples / self.rate


class FakeDeepgram(FakeServer):
    """A loopback Deepgram Listen v1 server; see the module docstring for what it recognises and records."""

    provider = "Deepgram"

    def __init__(
        self,
        *,
        utterances: list[str] | None = None,
        words: WordSource | None = None,
        latency_s: float = 0.05,
        interim_every_s: float = 0.2,
        seconds_per_word: float = 0.35,
        level: float = 0.01,
        idle_timeout_s: float = 10.0,
        match_margin_s: float = 0.3,
        drop_connections: int = 1,
        deaf_connections: int = 0,
        answer_empty_finalize: bool = True,
        late_answers: int = 0,
        silence_results_s: float | None = 1.0,
        faults: Faults | None = None,
        api_key: str = "test-key",
    ) -> None:
        super().__init__(faults=faults, api_key=api_key)
        if (utterances is None) == (words is None):
            raise ValueError("FakeDeepgram: give exactly one of utterances=[...] or words=<words_between source>")
        self.utterances = list(utterances or [])
        self.words = words
        self.latency_s = latency_s
        self.interim_every_s = interim_every_s
        self.seconds_per_word = seconds_per_word
        self.threshold = int(level * 32767)
        self.idle_timeout_s = idle_timeout_s
        self.match_margin_s = match_margin_s
        self._drops_left = drop_connections
        self.deaf_connections = deaf_connections
        self.answer_empty_finalize = answer_empty_finalize
        self._late_answers_left = late_answers
        self.silence_results_s = silence_results_s
        self._connections = 0
        self._completed = 0  # utterances finalized, across connections: the index of the next one
        self._words_done = 0  # words of utterance ``_completed`` already sent in an is_final result
        self._open: _Utterance | None = None  # the utterance being heard, on whichever connection
        self._replay: _Replay | None = None  # speech on a new connection while another left ``_open`` open

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/listen", self._listen)

    def authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Token {self.api_key}"

    def waits(self) -> list[Wait]:
        """Each Finalize answered: its arrival, and the write of the result answering it."""
        return [Wait(s.data["arrived"], s.at) for s in self.of("answered")]

    def error_body(self, status: int) -> dict[str, Any]:
        codes = {
            401: ("INVALID_AUTH", "Invalid credentials."),
            402: ("ASR_PAYMENT_REQUIRED", "Project does not have enough credits for an ASR request."),
            403: ("INSUFFICIENT_PERMISSIONS", "Project does not have access to the requested model."),
            429: ("TOO_MANY_REQUESTS", "Too many requests."),
        }
        code, message = codes.get(status, ("INTERNAL_SERVER_ERROR", f"Internal server error (fake {status})."))
        return {"err_code": code, "err_msg": message, "request_id": str(uuid.uuid4())}

    def refusal(self, request: web.Request) -> web.Response | None:
        response = super().refusal(request)
        return _with_error_headers(response) if response is not None else None

    # ------------------------------------------------------------------------------ connection

    async def _listen(self, request: web.Request) -> web.StreamResponse:
        refused = self.refusal(request)
        if refused is not None:
            return refused
        query = request.query
        if "model" not in query or query.get("encoding", "linear16") != "linear16":
            body = self.error_body(400) | {"err_code": "Bad Request", "err_msg": _bad_query(query)}
            return _with_error_headers(web.json_response(body, status=400))
        stream = self._open_stream(query)
        socket = self.track(web.WebSocketResponse(autoping=True))
        if not await self.accept(request, socket):
            return client_left()
        dropping = self.faults.drop_after is not None and self._drops_left > 0
        if dropping:
            self._drops_left -= 1
        writer = asyncio.create_task(self._write(request, socket, stream, dropping))
        try:
            await self._read(socket, stream)
        finally:
            await stream.outbox.put((0.0, None, None))  # flush what is due, then stop
            await asyncio.wait({writer}, timeout=2.0)
            writer.cancel()
            await asyncio.wait({writer})
            if not writer.cancelled():
                writer.exception()  # retrieved: a client that vanished mid-write is not the fake's failure
            self.untrack(socket)
        if not socket.closed:
            await socket.close()
        return socket

    def _open_stream(self, query: Any) -> _Stream:
        self._connections += 1

        def flag(name: str) -> bool:
            return query.get(name, "false") == "true"

        endpointing = query.get("endpointing", "10")
        utterance_end = query.get("utterance_end_ms")
        return _Stream(
            number=self._connections,
            rate=int(query.get("sample_rate", "16000")),
            channels=int(query.get("channels", "1")),
            smart_format=flag("smart_format"),
            interim_results=flag("interim_results"),
            vad_events=flag("vad_events"),
            endpointing_s=None if endpointing == "false" else int(endpointing) / 1000,
            utterance_end_s=int(utterance_end) / 1000 if utterance_end else None,
        )

    async def _read(self, socket: web.WebSocketResponse, stream: _Stream) -> None:
        while True:
            try:
                message = await socket.receive(timeout=self.idle_timeout_s)
            except TimeoutError:
                self.record("idle-timeout", connection=stream.number)
                await self._finish(stream)
                await stream.outbox.put((0.0, None, None))
                await socket.close(code=1011, message=NET_0001.encode())
                return
            if message.type is WSMsgType.BINARY:
                self.record("audio", connection=stream.number, bytes=len(message.data))
                if not message.data:  # Deepgram's legacy close signal (deepgram-python-sdk#146)
                    await self._close_stream(stream)
                    return
                self._hear(stream, message.data)
            elif message.type is WSMsgType.TEXT:
                if await self._control(socket, stream, message.data):
                    return
            else:  # CLOSE, CLOSED, ERROR: the client went away
                if not stream.closing:
                    self.record("disconnect", connection=stream.number)
                return

    async def _control(self, socket: web.WebSocketResponse, stream: _Stream, text: str) -> bool:
        """Handle a client JSON message; True when the stream is over."""
        try:
            parsed = json.loads(text)
            kind = parsed["type"]
        except (ValueError, KeyError, TypeError):
            self.record("message", connection=stream.number, type=None, raw=text)
            self._send(stream, self._error("SchemaError", "could not parse the message", text))
            return False
        seen = self.record("message", connection=stream.number, **parsed)
        if kind == "Finalize" and stream.number <= self.deaf_connections:
            stream.quiet = True  # a socket gone quiet: the client must notice it
            self.record("unanswered", connection=stream.number)
        elif kind == "Finalize" and stream.utterance is None and not self.answer_empty_finalize:
            self.record("unanswered", connection=stream.number, buffered=False)  # nothing heard since the last result
        elif kind == "Finalize":
            self._finalize(stream, answering=seen.at)
        elif kind == "CloseStream":
            await self._close_stream(stream)
            return True
        elif kind == "Configure":
            self._send(stream, {"type": "ConfigureSuccess", "features": parsed.get("features", {})})
        elif kind != "KeepAlive":
            self._send(stream, self._error("SchemaError", f"unknown message type {kind!r}", text))
        return False

    async def _close_stream(self, stream: _Stream) -> None:
        """CloseStream (or a zero-byte audio message): the last result, Metadata, then a normal close (1000)."""
        stream.closing = True
        await self._finish(stream)
        self._send(stream, self._metadata(stream))
        self._send(stream, "close")

    async def _finish(self, stream: _Stream) -> None:
        if stream.utterance is not None and not stream.quiet:  # a hung connection finalizes nothing
            self._finalize(stream)

    # ---------------------------------------------------------------------------- recognition

    def _hear(self, stream: _Stream, pcm: bytes) -> None:
        samples = np.frombuffer(pcm[: len(pcm) & ~1], dtype=np.int16)
        if stream.channels > 1:
            samples = samples[: len(samples) - len(samples) % stream.channels].reshape(-1, stream.channels)[:, 0]
        window = max(1, round(_WINDOW_S * stream.rate))
        for offset in range(0, len(samples), window):
            chunk = samples[offset : offset + window]
            start = stream.now
            stream.samples += len(chunk)
            voiced = bool(chunk.size) and int(np.abs(chunk.astype(np.int32)).max()) > self.threshold
            heard = hash(chunk.tobytes()) if voiced and not stream.quiet else None
            if heard is not None:
                self._compare_with_left_open(stream, heard)
            self._step(stream, start, voiced)
            if heard is not None and stream.utterance is not None:
                stream.utterance.voiced.append(heard)

    def _compare_with_left_open(self, stream: _Stream, heard: int) -> None:
        """A voiced window on ``stream`` while an utterance another connection ended in the middle of is open. While
        the windows are that utterance's, in order, they are its replay, and once all have come again the speech
        goes on as it. Other audio (a first word alike is not enough) means the client gave it up, ending it on its
        timeout, say: the speech is the next utterance, whatever the count says."""
        replay = self._replay
        if replay is None or replay.connection != stream.number:
            left = self._open
            if left is None or left.connection == stream.number:
                return
            replay = self._replay = _Replay(left, stream.number)
        voiced = replay.left.voiced
        if replay.next is None and heard in voiced:
            replay.next = voiced.index(heard)  # where the client's log starts
        if replay.next is None or voiced[replay.next] != heard:
            self._abandon(stream, replay.left)
            return
        replay.next += 1
        if replay.next == len(voiced):
            self._replay = None  # all of it came again: the speech goes on as that utterance

    def _abandon(self, stream: _Stream, left: _Utterance) -> None:
        self._replay = None
        self.record("abandoned", connection=left.connection, utterance=left.index)
        self._completed, self._words_done = max(self._completed, left.index + 1), 0
        if self._open is left:
            self._open = None
        utterance = stream.utterance
        if utterance is not None and utterance.index == left.index:  # begun as its replay: it is the next one
            utterance.index, utterance.script = self._completed, self._script(self._completed)

    def _step(self, stream: _Stream, start: float, voiced: bool) -> None:
        """One analysis window: speech start, interim results, endpointing, utterance end."""
        if stream.quiet:
            return  # gone quiet: it recognises nothing more either
        now = stream.now
        utterance = stream.utterance
        if voiced:
            if utterance is None:
                utterance = stream.utterance = self._begin(stream, start)
            utterance.last_voiced = now
            stream.last_word_end = None
        if utterance is None:
            last_word_end, wait = stream.last_word_end, stream.utterance_end_s
            if (
                last_word_end is not None
                and wait is not None
                and stream.interim_results
                and now - last_word_end >= wait
            ):
                self._send(stream, {"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": stream.last_word_end})
                stream.last_word_end = None
            every = self.silence_results_s
            if every is not None and now - stream.last_result >= every:
                # Deepgram transcribes silence too: an empty result (interims leave the segment open, so the next
                # speech's words are looked up as before; without interims the silent segment is finalized).
                final = not stream.interim_results
                self._send(stream, self._results(stream, [], stream.segment_start, now, is_final=final))
                if final:
                    stream.segment_start = now
            return
        if stream.endpointing_s is not None and now - utterance.last_voiced >= stream.endpointing_s:
            self._finalize(stream, speech_final=True)
        elif (
            stream.endpointing_s is None
            and stream.utterance_end_s is not None
            and now - utterance.last_voiced >= stream.utterance_end_s
        ):
            # Without endpointing Deepgram still finalizes its segments (never speech_final); the UtteranceEnd for
            # the words follows at the next window.
            self._finalize(stream)
        elif stream.interim_results and now - stream.last_interim >= self.interim_every_s:
            stream.last_interim = now
            words = self._words(stream, utterance, final=False)
            if words:
                self._send(stream, self._results(stream, words, stream.segment_start, now, is_final=False))

    def _begin(self, stream: _Stream, start: float) -> _Utterance:
        index = self._completed
        script = self._script(index)
        self.record("speech", connection=stream.number, utterance=index, start=start)
        if stream.vad_events:
            self._send(stream, {"type": "SpeechStarted", "channel": [0, 1], "timestamp": round(start, 3)})
        stream.last_interim = start
        self._open = _Utterance(index, stream.number, start, start, script)
        return self._open

    def _script(self, index: int) -> list[str]:
        return self.utterances[index].split() if index < len(self.utterances) else []

    def _words(self, stream: _Stream, utterance: _Utterance, *, final: bool) -> list[_Word]:
        """The words heard in the current segment so far (all of the utterance's remaining words when final)."""
        if self.words is not None:
            margin = self.match_margin_s
            if stream.offset is None:
                stream.offset = self._offset_at(utterance.start)
            shift = stream.offset
            until = (utterance.last_voiced + margin if final else stream.now) + shift
            heard = self.words.words_between(max(stream.segment_start, utterance.start - margin) + shift, until)
            return [_Word(w.word, w.start - shift, w.end - shift) for w in heard]
        remaining = utterance.script[self._words_done :]
        if not remaining:
            return []
        begin = max(stream.segment_start, utterance.start)
        spoken = max(0.0, utterance.last_voiced - begin)
        count = len(remaining) if final else min(len(remaining), 1 + int(spoken / self.seconds_per_word))
        step = max(spoken, 0.01 * count) / (len(remaining) if final else count)
        return [_Word(text, begin + i * step, begin + (i + 0.8) * step) for i, text in enumerate(remaining[:count])]

    def _offset_at(self, onset: float) -> float:
        """Caller clock minus stream time, from a speech onset heard at stream time ``onset``: the stream only ever
        lacks audio (silence not sent), so the onset is the first word spoken at or after that caller time."""
        assert self.words is not None
        later = self.words.words_between(onset - self.match_margin_s, float("inf"))
        return max(0.0, min(w.start for w in later) - onset) if later else 0.0

    def _finalize(self, stream: _Stream, *, answering: float | None = None, speech_final: bool = False) -> None:
        """An is_final result for the audio up to now: at an endpoint, on Finalize (``answering``: when it arrived),
        or at the end of the stream."""
        from_finalize = answering is not None
        utterance, now = stream.utterance, stream.now
        words: list[_Word] = []
        if utterance is not None:
            silent = now - utterance.last_voiced >= 0.1
            words = self._words(stream, utterance, final=silent)
            if silent:  # the utterance is over: the next speech is the next utterance
                speech_final = speech_final or from_finalize
                self.record(
                    "utterance",
                    connection=stream.number,
                    utterance=utterance.index,
                    start=utterance.start,
                    end=utterance.last_voiced,
                )
                stream.utterance = None
                if self._open is utterance:
                    self._open = self._replay = None
                # UtteranceEnd follows the last finalized word; an utterance without words (a noise) has none.
                stream.last_word_end = words[-1].end if words else utterance.last_word_end
                self._completed, self._words_done = utterance.index + 1, 0
            else:
                self._words_done += len(words)
                if words:
                    utterance.last_word_end = words[-1].end
        result = self._results(
            stream,
            words,
            stream.segment_start,
            now,
            is_final=True,
            speech_final=speech_final,
            from_finalize=from_finalize,
        )
        stream.segment_start = now
        if answering is None:
            self._send(stream, result)
        elif self._late_answers_left > 0:
            self._late_answers_left -= 1
            stream.held.append((result, answering))
            self.record("held", connection=stream.number, arrived=answering)
        else:  # the answers held back go out first, in order: the client sees them before this one
            for late, arrived in stream.held:
                self._send(stream, late, answering=arrived)
            stream.held.clear()
            self._send(stream, result, answering=answering)

    # ------------------------------------------------------------------------------- messages

    def _results(
        self,
        stream: _Stream,
        words: list[_Word],
        start: float,
        end: float,
        *,
        is_final: bool,
        speech_final: bool = False,
        from_finalize: bool = False,
    ) -> dict[str, Any]:
        texts = [w.text if stream.smart_format else w.text.strip(_PUNCTUATION).lower() for w in words]
        transcript = " ".join(texts)
        stream.last_result = end
        self.record(
            "result",
            connection=stream.number,
            transcript=transcript,
            is_final=is_final,
            speech_final=speech_final,
            from_finalize=from_finalize,
        )
        return {
            "type": "Results",
            "channel_index": [0, 1],
            "duration": round(end - start, 3),
            "start": round(start, 3),
            "is_final": is_final,
            "speech_final": speech_final,
            "from_finalize": from_finalize,
            "channel": {
                "alternatives": [
                    {
                        "transcript": transcript,
                        "confidence": 0.99 if words else 0.0,
                        "words": [w.json(stream.smart_format) for w in words],
                    }
                ]
            },
            "metadata": {
                "request_id": f"fake-{stream.number}",
                "model_info": {"name": "general-nova-3", "version": "fake", "arch": "nova-3"},
                "model_uuid": "00000000-0000-0000-0000-000000000003",
            },
        }

    def _metadata(self, stream: _Stream) -> dict[str, Any]:
        return {
            "type": "Metadata",
            "transaction_key": "deprecated",
            "request_id": f"fake-{stream.number}",
            "sha256": "0" * 64,
            "created": "2026-01-01T00:00:00.000Z",
            "duration": round(stream.now, 3),
            "channels": stream.channels,
        }

    @staticmethod
    def _error(variant: str, description: str, message: str) -> dict[str, Any]:
        return {"type": "Error", "variant": variant, "description": description, "message": message}

    def _send(self, stream: _Stream, message: dict[str, Any] | str, *, answering: float | None = None) -> None:
        """Queue a message for the writer, due ``latency_s`` from now (``"close"`` closes the socket); ``answering``:
        it is the result answering the Finalize that arrived then. A connection gone quiet queues nothing more."""
        if stream.quiet:
            return
        payload = message if isinstance(message, str) else json.dumps(message)
        stream.outbox.put_nowait((time.monotonic() + self.latency_s, payload, answering))

    async def _write(
        self, request: web.Request, socket: web.WebSocketResponse, stream: _Stream, dropping: bool
    ) -> None:
        """Send queued messages when due (after the injected stall), corrupting or dropping as the faults say."""
        sent = 0
        hold_until = stream.opened + self.faults.stall_s
        if self.faults.stall_s > 0:
            self.record("stall", connection=stream.number, seconds=self.faults.stall_s)
        while True:
            due, payload, answering = await stream.outbox.get()
            if payload is None:
                return
            await asyncio.sleep(max(0.0, max(due, hold_until) - time.monotonic()))
            if socket.closed:
                return
            if payload == "close":
                self.record("close", connection=stream.number)
                await socket.close()
                return
            if stream.quiet:  # hung since it was written: it arrives all the same, as from a real server
                self.record("in-flight", connection=stream.number, type=json.loads(payload).get("type"))
            if dropping and self.should_drop(sent):
                stream.closing = True  # not a client disconnect
                await self.drop(request)
                return
            corrupt = self.take_corruption()
            if corrupt == "malformed-json":
                await socket.send_str('{"type": "Results", "channel": {"alternatives": [')
            elif corrupt == "unknown-event":
                await socket.send_str(json.dumps({"type": "SpeechPaused", "channel": [0, 1], "timestamp": 0.0}))
            elif corrupt == "bad-audio":
                await socket.send_bytes(b"RIFF\x00\x00\x00\x00WAVE")
            else:
                if answering is not None:  # as the answer is written: the wait as served (waits())
                    self.record("answered", connection=stream.number, arrived=answering, due=due)
                await socket.send_str(payload)
            sent += 1


def _with_error_headers(response: web.Response) -> web.Response:
    """A refused handshake as Deepgram answers it: the error body's message in ``dg-error`` and its request id in
    ``dg-request-id``, since WebSocket clients seldom expose a refused handshake's body (the SDK's does not)."""
    body = json.loads(response.body) if isinstance(response.body, bytes) else {}
    response.headers["dg-error"] = str(body.get("err_msg", ""))
    response.headers["dg-request-id"] = str(body.get("request_id", ""))
    return response


def _bad_query(query: Any) -> str:
    if "model" not in query:
        return "Bad Request: no model given."
    return f"Bad Request: unsupported encoding {query.get('encoding')!r}; this fake takes only linear16."
