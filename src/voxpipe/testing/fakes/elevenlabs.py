"""FakeElevenLabs: a loopback ElevenLabs stream-input (WebSocket TTS) server.

It speaks the protocol of ``providers-wire.md`` §3.3: ``GET /v1/text-to-speech/{voice_id}/stream-input?model_id=…
&output_format=pcm_<rate>`` with the key in the ``xi-api-key`` header (401 with ElevenLabs' error body when it is
wrong; without the header, the BOS message must carry it, else a 1008 close). The client sends BOS
(``{"text": " ", "voice_settings", "generation_config"}``), text messages (``try_trigger_generation`` or ``flush``),
keepalives (``{"text": " "}``: they only reset the inactivity timer; with ``"flush": true`` the buffered text is
spoken too) and EOS (``{"text": ""}``); a first message whose text is not a single space is refused with a 1008
close, as ElevenLabs refuses a bad first message (the reason's wording is the fake's). Text is buffered as
ElevenLabs does: a generation starts on ``flush``, on ``try_trigger_generation`` with at least ``trigger_chars``
buffered, when the buffer reaches the next step of the BOS's ``chunk_length_schedule`` (default 120, 160, 250,
290), and at EOS. Each generation is speech-like audio
(:func:`voxpipe.testing.signals.speechlike`) in the asked PCM format, sent as ``{"audio": base64, "alignment":
{chars, charStartTimesMs, charDurationsMs}, "normalizedAlignment": {…}}`` messages of ``chunk_s`` of audio each,
times relative to each message's audio: the first after ``ttfa_s``, then one every ``chunk_s * rtf``. After EOS and
the last audio: ``{"isFinal": true}`` and a 1000 close. A socket that gets no message for the query's
``inactivity_timeout`` seconds (default 20) is closed with 1008.

    async with FakeElevenLabs(rtf=0.5) as fake:
        ...  # point the stage's base_url at fake.ws_url, its api_key at fake.api_key
        await fake.wait_for("close")  # the client closed the socket mid-reply: a barge-in

Faults (:class:`Faults`): ``refuse`` answers the handshake with that status; ``stall_s`` holds the first audio of
each connection that much longer; ``drop_after`` aborts a connection after that many audio messages (only the first
``drop_connections`` connections, when that is set); ``corrupt`` sends, in place of the first audio message (or
the one after ``corrupt_after`` good ones), JSON that does not parse (``malformed-json``), a message of no known
shape (``unknown-event``), or bad audio (``bad-audio``: ``bad_audio="base64"`` does not decode, ``"odd-bytes"``
decodes to an odd byte count, ``"mp3"`` is an MP3 frame where PCM was asked). ``close_on_open=(code, reason)``
closes each socket right after the upgrade, before any message, as ElevenLabs refuses some requests (a quota
exceeded: 1008). ``deaf`` wedges the server at a connection's first generation: it sends nothing more and stops
reading its socket (a dead network path), so the client's close frame is never answered.

Alignment as ElevenLabs really sends it (the audio stays that of the sent text): ``glitch_words`` maps a sent word
(as split on whitespace, punctuation included) to the alignment text sent for it instead, its characters spread
over the word's audio, as Flash v2.5 misspells words in its alignment (``{"hospitalized": "hospitt alized"}``: a
doubled letter and a space inside the word; ``"goi"``: cut short; ``""``: left out, no character for it at all);
``leading_space`` starts each generation's alignment with a space of no length, as ``normalizedAlignment`` starts an
utterance (here both fields do, so a client reading either meets it). ``normalized_words`` makes
``normalizedAlignment`` differ from ``alignment`` as ElevenLabs' text normalisation does: it starts with a space, and
the words it maps are in their spoken form (``{"8": "eight"}``); ``alignment`` stays the sent text.
``null_is_final`` adds ``"isFinal": null`` to every audio message, as ElevenLabs sends them. ``mid_sample_cuts``
re-cuts the audio so that every other message ends in the middle of a 16-bit sample, whose other byte starts the
next message (nothing is lost, unlike ``bad_audio="odd-bytes"``, which drops a byte). ``close_without_final`` ends a
reply with the 1000 close alone, no ``isFinal`` before it (the client must take the close after EOS as the end).
``first_samples`` puts these sample values at the start of each generation's audio, in place of the speech-like
ones there (``(-1025, 144)``: bytes ``FF FB 90 00``, which an MPEG layer III frame header starts with too).

Records: ``connect`` (path, query, headers), ``refused`` (status), ``message`` (connection and the parsed client
message), ``generation`` (connection, text), ``audio`` (connection, bytes), ``final`` (connection), ``close``
(the client closed the socket before its reply was complete — the barge-in signal), ``end`` (the socket closed
after the reply was complete), ``disconnect`` (the client went away without a close frame), ``dropped``,
``corrupted``, ``stall``, ``idle-timeout``, ``keepalive``, ``closed-on-open`` (connection), ``deaf`` (connection),
``bad-first-message`` (connection, text).
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

BadAudio = Literal["base64", "odd-bytes", "mp3"]
DEFAULT_SCHEDULE = (120, 160, 250, 290)  # ElevenLabs' default chunk_length_schedule
_ERROR_STATUS = {401: "invalid_api_key", 403: "permission_denied", 429: "too_many_concurrent_requests"}
_MP3_FRAME = bytes([0xFF, 0xFB, 0x90, 0x64]) + bytes(413)  # MPEG-1 layer III, 128 kb/s, 44.1 kHz
_END = None  # the generation queue's end marker (EOS)


@dataclass
class _Connection:
    """One client socket: its text buffer and generation schedule."""

    number: int
    rate: int
    ws: web.WebSocketResponse
    request: web.Request
    schedule: list[int] = field(default_factory=lambda: list(DEFAULT_SCHEDULE))
    step: int = 0
    buffer: str = ""
    queue: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)
    started: bool = False  # BOS received
    complete: bool = False  # isFinal sent: the reply is over

    def take(self) -> str:
        text, self.buffer = self.buffer, ""
        self.step = min(self.step + 1, len(self.schedule) - 1)
        return text


class FakeElevenLabs(FakeServer):
    """A loopback ElevenLabs stream-input server; see the module docstring for its protocol, options and records."""

    provider = "ElevenLabs"

    def __init__(
        self,
        *,
        faults: Faults | None = None,
        api_key: str = "test-key",
        ttfa_s: float = 0.05,
        rtf: float = 0.2,
        chunk_s: float = 0.1,
        f0: float = 180.0,
        rate: float = 1.15,
        trigger_chars: int = 20,
        bad_audio: BadAudio = "base64",
        drop_connections: int | None = None,
        corrupt_after: int = 0,
        close_on_open: tuple[int, str] | None = None,
        deaf: bool = False,
        glitch_words: dict[str, str] | None = None,
        leading_space: bool = False,
        normalized_words: dict[str, str] | None = None,
        null_is_final: bool = False,
        mid_sample_cuts: bool = False,
        close_without_final: bool = False,
        first_samples: tuple[int, ...] = (),
    ) -> None:
        super().__init__(faults=faults, api_key=api_key)
        self.ttfa_s = ttfa_s
        self.rtf = rtf
        self.chunk_s = chunk_s
        self.f0 = f0
        self.rate = rate
        self.trigger_chars = trigger_chars
        self.bad_audio = bad_audio
        self.drop_connections = drop_connections
        self.corrupt_after = corrupt_after
        self.close_on_open = close_on_open
        self.deaf = deaf
        self.glitch_words = dict(glitch_words or {})
        self.leading_space = leading_space
        self.normalized_words = None if normalized_words is None else dict(normalized_words)
        self.null_is_final = null_is_final
        self.mid_sample_cuts = mid_sample_cuts
        self.close_without_final = close_without_final
        self.first_samples = tuple(first_samples)
        self._numbers = itertools.count(1)

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/text-to-speech/{voice_id}/stream-input", self._stream_input)

    def authorized(self, request: web.Request) -> bool:
        key = request.headers.get("xi-api-key")
        return key is None or key == self.api_key  # without the header, the BOS message must carry the key

    def waits(self) -> list[Wait]:
        """Each connection that spoke: its first text's arrival (after the opening message) and the write of its
        first audio."""
        arrivals: dict[int, float] = {}
        for message in self.of("message"):
            if str(message.data.get("text") or "").strip():
                arrivals.setdefault(message.data["connection"], message.at)
        firsts: dict[int, float] = {}
        for audio in self.of("audio"):
            firsts.setdefault(audio.data["connection"], audio.at)
        return sorted(Wait(arrivals[connection], answered) for connection, answered in firsts.items())

    def error_body(self, status: int) -> dict[str, Any]:
        code = _ERROR_STATUS.get(status, "internal_server_error" if status >= 500 else "bad_request")
        return {"detail": {"status": code, "message": f"fake ElevenLabs: HTTP {status} ({code})"}}

    # --------------------------------------------------------------------------------------- handshake

    async def _stream_input(self, request: web.Request) -> web.StreamResponse:
        refused = self.refusal(request)
        if refused is not None:
            return refused
        output_format = request.query.get("output_format", "mp3_44100_128")
        if not output_format.startswith("pcm_") or not output_format[4:].isdigit():
            self.record("refused", status=422)
            body = {"detail": {"status": "invalid_output_format", "message": f"fake: no {output_format} here"}}
            return web.json_response(body, status=422)
        ws = self.track(web.WebSocketResponse(max_msg_size=2**22))
        if not await self.accept(request, ws):
            return client_left()
        conn = _Connection(next(self._numbers), int(output_format[4:]), ws, request)
        if self.close_on_open is not None:
            code, reason = self.close_on_open
            self.record("closed-on-open", connection=conn.number)
            await ws.close(code=code, message=reason.encode())
            self.untrack(ws)
            return ws
        idle_s = float(request.query.get("inactivity_timeout", "20"))
        speaker = asyncio.create_task(self._speak(conn))
        try:
            await self._listen(conn, idle_s, needs_key="xi-api-key" not in request.headers)
        finally:
            if not conn.complete:
                speaker.cancel()  # the client left mid-reply
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(speaker, 2.0)  # after isFinal: let our close handshake finish
            self.untrack(ws)
        return ws

    # ---------------------------------------------------------------------------------- client messages

    async def _listen(self, conn: _Connection, idle_s: float, *, needs_key: bool) -> None:
        ws = conn.ws
        while True:
            try:
                msg = await asyncio.wait_for(ws.receive(), idle_s)
            except TimeoutError:
                self.record("idle-timeout", connection=conn.number)
                await ws.close(code=1008, message=b"Have not received new text for the inactivity_timeout")
                return
            if msg.type == WSMsgType.TEXT:
                if not await self._on_message(conn, msg.data, needs_key=needs_key):
                    return
            elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING):
                self.record("end" if conn.complete else "close", connection=conn.number)
                return
            elif msg.type == WSMsgType.CLOSED and conn.complete:
                self.record("end", connection=conn.number)  # we closed after isFinal
                return
            else:  # CLOSED or ERROR while the reply was under way: the client vanished
                self.record("disconnect", connection=conn.number)
                return

    async def _on_message(self, conn: _Connection, data: str, *, needs_key: bool) -> bool:
        try:
            message = json.loads(data)
        except ValueError:
            self.record("bad-message", connection=conn.number, data=data[:200])
            await conn.ws.close(code=1008, message=b"Invalid JSON")
            return False
        self.record("message", connection=conn.number, **message)
        text = message.get("text")
        if not isinstance(text, str):
            await conn.ws.close(code=1008, message=b"Field 'text' is required")
            return False
        if not conn.started:  # BOS
            if needs_key and message.get("xi-api-key") != self.api_key:
                self.record("refused", status=401)
                await conn.ws.close(code=1008, message=b"Invalid API key")
                return False
            if text != " ":
                self.record("bad-first-message", connection=conn.number, text=text)
                await conn.ws.close(code=1008, message=b"The first message's text must be a single space")
                return False
            schedule = (message.get("generation_config") or {}).get("chunk_length_schedule")
            if schedule:
                conn.schedule = [int(n) for n in schedule]
            conn.started = True
            return True
        if text.isspace():  # a keepalive: ElevenLabs' "send a single space to keep the socket open"
            self.record("keepalive", connection=conn.number, flush=bool(message.get("flush")))
            if message.get("flush") and conn.buffer.strip():  # ... which may also ask for the buffered text's audio
                await conn.queue.put(conn.take())
            return True
        if text == "":  # EOS: speak what is buffered, then isFinal and close
            if conn.buffer.strip():
                await conn.queue.put(conn.take())
            await conn.queue.put(_END)
            return True
        conn.buffer += text
        due = conn.schedule[conn.step]
        if (
            message.get("flush")
            or (message.get("try_trigger_generation") and len(conn.buffer) >= self.trigger_chars)
            or len(conn.buffer) >= due
        ):
            await conn.queue.put(conn.take())
        return True

    # ------------------------------------------------------------------------------------------ speaking

    async def _speak(self, conn: _Connection) -> None:
        sent = 0
        first = True
        while (text := await conn.queue.get()) is not _END:
            self.record("generation", connection=conn.number, text=text)
            if self.deaf:  # wedged: it reads and says nothing more, until the connection's handler is torn down
                if conn.request.transport is not None:
                    conn.request.transport.pause_reading()
                self.record("deaf", connection=conn.number)
                await asyncio.Future()
            if first:
                await asyncio.sleep(self.ttfa_s)
                await self.stall()
                first = False
            for message in self._messages(text, conn.rate):
                if self.should_drop(sent) and (self.drop_connections is None or conn.number <= self.drop_connections):
                    await self.drop(conn.request)
                    return
                corrupt = self.take_corruption() if sent >= self.corrupt_after else None
                if corrupt is not None:
                    await conn.ws.send_str(self._corrupted(corrupt, message))
                else:
                    # recorded as it is written, as the other fakes' answers are (waits())
                    self.record("audio", connection=conn.number, bytes=len(base64.b64decode(message["audio"])))
                    await conn.ws.send_str(json.dumps(message))
                sent += 1
                await asyncio.sleep(self.chunk_s * self.rtf)
        conn.complete = True
        if not self.close_without_final:
            await conn.ws.send_str(json.dumps({"isFinal": True}))
            self.record("final", connection=conn.number)
        await conn.ws.close(code=1000)

    def _messages(self, text: str, rate: int) -> list[dict[str, Any]]:
        """One generation as audio messages of ``chunk_s`` each, with the alignment of the characters they hold."""
        samples, spans = speechlike(text, rate, f0=self.f0, rate=self.rate)
        if self.first_samples:
            samples = samples.copy()
            samples[: len(self.first_samples)] = self.first_samples
        chars = _characters(spans, len(samples), self.glitch_words, leading_space=self.leading_space)
        normalized = chars
        if self.normalized_words is not None:  # ElevenLabs' normalised text: a leading space, numbers as words
            spoken = {**self.glitch_words, **self.normalized_words}
            normalized = _characters(spans, len(samples), spoken, leading_space=True)
        size = max(1, round(self.chunk_s * rate))
        messages = []
        for start in range(0, len(samples), size):
            end = min(start + size, len(samples))
            pcm = np.ascontiguousarray(samples[start:end], dtype="<i2").tobytes()
            message: dict[str, Any] = {"audio": base64.b64encode(pcm).decode("ascii")}
            if self.null_is_final:
                message["isFinal"] = None
            message["alignment"] = _alignment(chars, start, end, len(samples), rate)
            message["normalizedAlignment"] = _alignment(normalized, start, end, len(samples), rate)
            messages.append(message)
        return _cut_mid_sample(messages) if self.mid_sample_cuts else messages

    def _corrupted(self, how: str, message: dict[str, Any]) -> str:
        if how == "malformed-json":
            return '{"audio": "AAAA", "alignment": '
        if how == "unknown-event":
            return json.dumps({"type": "SpeechSynthesized", "payload": {"ok": True}})
        audio = {
            "base64": "@@ not base64 @@",
            "odd-bytes": base64.b64encode(base64.b64decode(message["audio"])[:-1]).decode("ascii"),
            "mp3": base64.b64encode(_MP3_FRAME).decode("ascii"),
        }[self.bad_audio]
        return json.dumps({**message, "audio": audio})


def _characters(
    spans: list[WordSpan], length: int, spelled: dict[str, str], *, leading_space: bool
) -> list[tuple[str, int, int]]:
    """Each character of a generation's alignment, with its start and end sample: the words as ``spelled`` maps them
    (the sent word if it does not), each spread over its word's audio, with spaces between them and after the last."""
    chars: list[tuple[str, int, int]] = [(" ", 0, 0)] if leading_space else []
    for i, span in enumerate(spans):
        if i:
            chars.append((" ", spans[i - 1].end, span.start))
        aligned = spelled.get(span.word, span.word)  # what the alignment says, over the word's audio
        step = (span.end - span.start) / max(1, len(aligned))
        for k, char in enumerate(aligned):
            chars.append((char, span.start + round(k * step), span.start + round((k + 1) * step)))
    chars.append((" ", length, length))
    return chars


def _alignment(chars: list[tuple[str, int, int]], start: int, end: int, length: int, rate: int) -> dict[str, Any]:
    """The alignment of the characters starting in the audio from sample ``start`` to ``end``, times from ``start``."""
    held = [c for c in chars if start <= c[1] < end or (c[1] == length and end == length)]
    return {
        "chars": [c[0] for c in held],
        "charStartTimesMs": [round((c[1] - start) * 1000 / rate) for c in held],
        "charDurationsMs": [round((c[2] - c[1]) * 1000 / rate) for c in held],
    }


def _cut_mid_sample(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same audio, re-cut so that every other message ends one byte into a sample, whose other byte starts the
    next message: every byte is still sent, once, in order."""
    recut = []
    carry = b""
    for i, message in enumerate(messages):
        pcm = carry + base64.b64decode(message["audio"])
        carry = b""
        if i % 2 == 0 and i + 1 < len(messages):
            pcm, carry = pcm[:-1], pcm[-1:]
        recut.append({**message, "audio": base64.b64encode(pcm).decode("ascii")})
    return recut
