"""Streaming speech with ElevenLabs' stream-input WebSocket, with character alignment turned into word marks.

Which path, and why. The ``elevenlabs`` SDK (2.78) has exactly one client for the stream-input socket,
``convert_realtime``, and it is synchronous: in a thread, a barge-in cannot stop it while it is blocked in
``recv()``. Its async client only has per-request HTTP (``stream`` / ``stream_with_timestamps``). So this stage
speaks the stream-input protocol itself on ``websockets.asyncio``, building and parsing every message with the SDK's
own pydantic types (``InitializeConnection``, ``SendText``, ``CloseConnection``, ``AudioOutput``, ``FinalOutput``)
and the SDK's URL builder and production environment. One socket per reply, opened when the reasoner is asked
(:class:`LLMRequest`), so its TLS and WebSocket handshakes overlap the model's first token instead of delaying the
first audio; each speakable chunk goes out as it arrives, with ``flush`` so its audio starts at once, and the
voice keeps its prosody across the reply's chunks. Per-chunk HTTP would pay a request (and its time to first
byte) per chunk, lose the context between chunks, and its SDK parser silently skips lines it cannot parse, so a
malformed message could not be reported (``docs/providers/elevenlabs.md``).

How it streams. The receiver (a task the pipeline owns, one per reply) connects, sends the BOS message
(voice settings, generation config; the key goes in the ``xi-api-key`` header), then reads: each ``audio`` message
is base64 PCM in the call's rate (``pcm_<rate>``), checked (base64, not a compressed container) and emitted at once,
in whole samples (a message may end in the middle of one: its byte is kept for the next); its ``alignment``
(characters with start times and durations in ms, relative to that message's audio) is matched to the words of the
text that was sent, tolerating the misspellings, cut-short and missing words ElevenLabs puts in it
(:class:`WordAligner`), and placed on the reply's sample timeline. After the reply's last text the stage sends
EOS (``{"text": ""}``); ElevenLabs answers ``isFinal`` and closes with 1000.

Timeouts (all in the settings): the handshake (``connect_timeout_s``), the first audio after the first text
(``first_audio_timeout_s``) and each read while audio is due (``read_timeout_s``: text sent whose characters have
not been aligned yet, or EOS sent; counted from the last message, or from the first text sent since it, so more
text while ElevenLabs is silent does not move the deadline). While the reasoner is thinking no audio is due, and
nothing times out.

How it stops. The protocol has no cancel message: a barge-in cancels the reply's receiver, which closes the socket
on its way out (aborting it if that close is cut short). At the end of the call :meth:`ElevenLabsTTS.stop` cancels
the open reply, waits for the receivers to close their sockets, and from then on no reply connects. Any failure
(refused handshake, stall, disconnect, a message it cannot use) is a :class:`ProviderError` raised in the receiver,
so the stage's error policy decides: STOP ends the call with it, SKIP_TURN abandons the reply; the next reply opens
a new socket either way.

Module layout: settings, connect, stream, cancel, close.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import itertools
import json
import logging
import re
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from voxpipe.config.errors import ConfigError
from voxpipe.config.registry import Package
from voxpipe.pipeline import AudioFormat, WordMark
from voxpipe.pipeline.context import CJK_LETTERS
from voxpipe.stages import tls
from voxpipe.stages.cloud import CloudSettings, ProviderError, abort_unless_closed, require_sdk
from voxpipe.stages.tts import StreamingTTSStage

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection

log = logging.getLogger("voxpipe.stages.elevenlabs_tts")

PROVIDER = "ElevenLabs"
DEFAULT_VOICE = "JBFqnCBsd6RMkjVDRZzb"  # "George", a default voice every account has (the SDK's examples use it)
PCM_RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)  # the pcm_<rate> output formats ElevenLabs offers
CLOSE_TIMEOUT_S = 1.0  # websockets' wait for the server's answer to a close, before it aborts the connection
_REFUSALS = {401: "API key rejected", 403: "API key not allowed to use this voice or model", 429: "rate limited"}
_HINTS = {  # 401's names where the key came from (_refusal)
    403: "; check the key's permissions and the voice_id and model",
    429: "; too many requests or concurrent streams for the plan",
}

# ------------------------------------------------------------------------------------------------ settings


class ElevenLabsVoiceSettings(BaseModel):
    """Per-request voice settings; unset fields keep the voice's stored values."""

    model_config = ConfigDict(extra="forbid")

    stability: float | None = Field(default=None, ge=0, le=1, description="higher is steadier, lower more expressive")
    similarity_boost: float | None = Field(
        default=None, ge=0, le=1, description="how closely to match the original voice"
    )
    style: float | None = Field(default=None, ge=0, le=1, description="style exaggeration (v2+ models)")
    use_speaker_boost: bool | None = Field(default=None, description="boost similarity to the speaker (v2+ models)")
    speed: float | None = Field(default=None, ge=0.7, le=1.2, description="speaking rate, 1.0 is normal")


class ElevenLabsTTSSettings(CloudSettings):
    """ElevenLabs streaming TTS settings. The output format is ``pcm_<the call's sample rate>``."""

    service_name: ClassVar[str] = PROVIDER
    api_key_env: ClassVar[str] = "ELEVENLABS_API_KEY"

    api_key: SecretStr | None = Field(default=None, description="ElevenLabs API key; default: $ELEVENLABS_API_KEY")
    base_url: str | None = Field(
        default=None,
        pattern=r"^(https?|wss?)://\S+$",
        description="API base URL (https/wss, or http/ws for a loopback fake); default: the SDK's production "
        "environment, https://api.elevenlabs.io",
    )
    voice_id: str = Field(default=DEFAULT_VOICE, min_length=1, max_length=64, description="voice to speak with")
    model: str = Field(default="eleven_flash_v2_5", min_length=1, description="model id (flash is the low-latency one)")
    language_code: str | None = Field(
        default=None, min_length=2, max_length=8, description="ISO 639-1 language to enforce (multilingual v2.5 models)"
    )
    voice_settings: ElevenLabsVoiceSettings | None = Field(default=None, description="voice settings for this call")
    flush_each_chunk: bool = Field(
        default=True,
        description="send each speakable chunk with flush, so its audio starts at once; false sends "
        "try_trigger_generation and lets ElevenLabs' chunk_length_schedule buffer text",
    )
    chunk_length_schedule: list[Annotated[int, Field(ge=50, le=500)]] | None = Field(
        default=None, min_length=1, max_length=8, description="characters buffered before each generation (50-500 each)"
    )
    inactivity_timeout_s: int = Field(
        default=20,
        ge=5,
        le=180,
        description="ElevenLabs closes a socket that gets no text for this long (query parameter)",
    )
    connect_timeout_s: float = Field(default=5.0, gt=0, le=60, description="the TLS and WebSocket handshake")
    first_audio_timeout_s: float = Field(
        default=5.0, gt=0, le=60, description="from the reply's first text to its audio"
    )
    read_timeout_s: float = Field(default=5.0, gt=0, le=60, description="longest wait for a message while audio is due")


def _require_sdk() -> None:
    require_sdk(PROVIDER, "elevenlabs", "elevenlabs", "websockets.asyncio.client")


def output_format(audio: AudioFormat) -> str:
    """ElevenLabs' raw-PCM output format at the call's rate, or a config error naming the rates it has."""
    if audio.channels != 1 or audio.sample_rate not in PCM_RATES:
        rates = ", ".join(str(r) for r in PCM_RATES)
        raise ConfigError(
            "audio.sample_rate",
            f"ElevenLabs streams mono PCM at {rates} Hz, not {audio.channels} channel(s) at {audio.sample_rate} Hz",
            "a rate ElevenLabs streams, or a Resample stage after the TTS",
        )
    return f"pcm_{audio.sample_rate}"


# ------------------------------------------------------------------------------------------------ alignment

RESYNC_WORDS = 3  # how far past the cursor's word a lost alignment looks for the word it goes on with
# ... and for a run of this many characters or more, which few words begin with alike, this far ("we have a table
# [for two at eight] tonight"): a longer stretch left out of the alignment does not leave the rest of it unplaced.
RESYNC_FAR_RUN, RESYNC_FAR_WORDS = 4, 8
# A CJK word as the chunker counts it: two characters (one at a run's end), with what is written around them.
_CJK_UNIT = re.compile(rf"[^{CJK_LETTERS}]*[{CJK_LETTERS}]{{1,2}}[^{CJK_LETTERS}]*")


class WordAligner:
    """Places ElevenLabs' per-character alignment on the text that was sent, and turns it into word marks in samples
    from the reply's start.

    The alignment is not always the sent text: Flash v2.5 misspells words in it ("hospitt alized" for "hospitalized":
    a doubled letter and a space inside the word), cuts words short or leaves them out, ``normalizedAlignment``
    starts with a space, and a message may start with a space in the middle of a word. So the alignment's whitespace
    does not end words. A cursor walks the characters of the sent words (whitespace aside; Chinese and Japanese, which
    have no spaces, in units of two characters, as the chunker counts their words), and each alignment character is
    looked for, in this order:

    * at the cursor: it is aligned, and the cursor moves on;
    * just after it: the cursor's character was dropped, and the cursor moves past both; past a word's last
      character only if whitespace came before it in the alignment, or the next word follows it with no space in the
      sent text (two CJK characters after two others): it starts the next word;
    * right after whitespace, at the start of one of the next few sent words (three; eight for a run of four
      characters or more), if the alignment from this character to its next whitespace begins that word: the words
      before it were cut short ("goi" for "going") or left out of the alignment, and the cursor moves on to that word
      (re-synchronised);
    * just before it: a repeat, and the cursor stays (tried after the above: after whitespace, "table [for two at]
      eight" goes on with a word, not with the "e" of "table" again);
    * nowhere near: a substitute for the cursor's character, and the cursor moves on, unless that is the word's
      last character: then it stays, so a garbled stretch is kept in its word, and the next word finds the cursor.

    A word is closed, and marked, when the cursor passes its last character: it spans the alignment characters placed
    in it, and it goes in the frame of the message holding the character that passed it. So a glitch costs at most
    the timing of the words it is in, never a shift of the words after it. A word passed with no character of its own
    (left out of the alignment) is marked, with no length, where the next character starts. The mark takes the sent
    word (with its punctuation), so heard words are exactly the reply's words. Characters that come once all the sent
    text is aligned are ignored (a second pass, as ElevenLabs sends with pronunciation dictionaries, is not followed).
    """

    def __init__(self, sample_rate: int) -> None:
        self.rate = sample_rate
        self._sent = ""  # the sent words' characters, whitespace aside
        self._words: deque[tuple[str, int]] = deque()  # sent words not marked yet, each with the index after its end
        self._unspaced: set[int] = set()  # indices in _sent of words that follow the one before with no space (CJK)
        self._text_start = 0  # index in _sent of the latest text's first character
        self._cursor = 0  # index in _sent of the next character to align
        self._word_start = 0  # index in _sent of the first open word's first character
        self._span: tuple[int, int] | None = None  # samples of the characters placed in the first open word
        self._after_space = True  # the last alignment character was whitespace (or none came yet)

    @property
    def pending_chars(self) -> int:
        """Characters sent (whitespace aside) the alignment has not reached: while above 0, audio is still due, and
        the reply's reads have a deadline (``_Reply.deadline``). Wrong either way costs: above 0 with nothing left
        to say, a reasoner's pause longer than ``read_timeout_s`` reads as a stall (and ends the call under
        ``on_error: stop``); at 0 too early, a stall goes unnoticed until the next text or EOS. So a repeat never
        moves the cursor, and a substitute never past a word's last character. But nothing tells when the audio of
        a text is complete (``isFinal`` comes only after EOS), and the alignment may lack the end of a text: so once
        the alignment has come into the latest text, whitespace after it reached the text's last word counts as the
        text spoken (that word cut short or left out; each text's alignment ends with its trailing space), and so
        does a word lacking only its last character (a letter dropped at the end of a text)."""
        remaining = len(self._sent) - self._cursor
        if remaining and self._after_space and self._cursor > self._text_start:
            last_word, end = self._words[-1]
            if self._cursor >= end - len(last_word):
                return 0
        return 0 if remaining == 1 and self._cursor > self._word_start else remaining

    def expect(self, text: str) -> None:
        self._text_start = len(self._sent)
        for spaced in text.split():
            units = () if spaced.isascii() else _CJK_UNIT.findall(spaced)
            for i, word in enumerate(units or (spaced,)):
                if i:
                    self._unspaced.add(len(self._sent))  # the alignment has no whitespace before it either
                self._sent += word
                self._words.append((word, len(self._sent)))

    def add(
        self, chars: Sequence[str], starts_ms: Sequence[int], durations_ms: Sequence[int], offset: int, limit: int
    ) -> list[WordMark]:
        """Marks of the words completed by one message's alignment; ``offset`` is the reply sample at which the
        message's audio starts and ``limit`` the one after its last (no mark ends past audio it has)."""
        if not len(chars) == len(starts_ms) == len(durations_ms):
            raise ProviderError(
                PROVIDER,
                f"sent an alignment whose lists differ in length ({len(chars)} characters, {len(starts_ms)} start "
                f"times, {len(durations_ms)} durations)",
            )
        marks: list[WordMark] = []
        for at, (char, start_ms, duration_ms) in enumerate(zip(chars, starts_ms, durations_ms, strict=True)):
            if not char.strip():
                self._after_space = True
                continue
            if self._cursor >= len(self._sent):
                continue  # everything sent is aligned: nothing is left for this character to stand for
            start = offset + round(start_ms * self.rate / 1000)
            end = min(limit, offset + round((start_ms + duration_ms) * self.rate / 1000))
            index = self._place(char, chars, at)
            self._after_space = False
            marks += self._close_until(index, at=start)  # the words this character passed the end of
            if index >= self._word_start:  # not a repeat of a word already marked
                self._span = (start, end) if self._span is None else (self._span[0], max(self._span[1], end))
            marks += self._close_until(self._cursor, at=start)
        return marks

    def finish(self, at: int) -> list[WordMark]:
        """At the end of the reply (``isFinal``: all its audio is in), the marks of the words the alignment left open:
        each where its characters were, or with no length at ``at``, the reply's end, if none was placed in it (the
        alignment cut the reply short)."""
        marks = []
        while self._words:
            marks.append(self._close(self._span or (at, at)))
        return marks

    def _place(self, char: str, chars: Sequence[str], at: int) -> int:
        """The index in the sent characters that ``char`` (``chars[at]``) stands for, moving the cursor past it (the
        rules above)."""
        word_end = self._words[0][1]
        next_word_begins = self._after_space or word_end in self._unspaced
        for index in (self._cursor, self._cursor + 1):
            passes_word_end = index >= word_end and not next_word_begins
            if index < len(self._sent) and self._sent[index] == char and not passes_word_end:
                self._cursor = index + 1
                return index
        if self._after_space:  # before a repeat: after whitespace, the last word's last letter again is less likely
            resumed = self._word_beginning(chars, at)  # than a word beginning ("table [for two at] eight")
            if resumed is not None:
                self._cursor = resumed + 1
                return resumed
        if self._cursor > 0 and self._sent[self._cursor - 1] == char:  # a repeat: the cursor stays
            return self._cursor - 1
        if self._cursor + 1 < word_end:  # a substitute; a word's last character is passed only by what matches
            self._cursor += 1
            return self._cursor - 1
        return self._cursor

    def _word_beginning(self, chars: Sequence[str], at: int) -> int | None:
        """Where, in the sent characters, the first of the next ``RESYNC_WORDS`` sent words after the cursor's starts
        that the alignment from ``chars[at]`` to its next whitespace (or the message's end: often a letter or two
        later) begins, if one does. The nearest is taken: a wrong one nearer than the right one only marks the
        words skipped late; one past it (early) needs the right one garbled at its start as well."""
        run = "".join(itertools.takewhile(str.strip, itertools.islice(chars, at, None)))
        reach = RESYNC_WORDS if len(run) < RESYNC_FAR_RUN else RESYNC_FAR_WORDS
        for word, end in itertools.islice(self._words, 1, 1 + reach):
            if word.startswith(run):
                return end - len(word)
        return None

    def _close_until(self, index: int, *, at: int) -> list[WordMark]:
        """Marks of the open words that end at or before ``index`` in the sent characters: each where its characters
        were, or at ``at`` with no length if none was placed in it."""
        marks = []
        while self._words and self._words[0][1] <= index:
            marks.append(self._close(self._span or (at, at)))
        return marks

    def _close(self, span: tuple[int, int]) -> WordMark:
        word, self._word_start = self._words.popleft()
        self._cursor = max(self._cursor, self._word_start)
        self._span = None
        return WordMark(word, *span)


# ------------------------------------------------------------------------------------------------ one reply


class _Reply:
    """One reply's socket, its receiver task, and what is due from it."""

    def __init__(self, epoch: int, settings: ElevenLabsTTSSettings, sample_rate: int) -> None:
        self.epoch = epoch
        self.settings = settings
        self.socket: ClientConnection | None = None
        self.task: asyncio.Task[None] | None = None
        self.opened = asyncio.Event()  # connected and BOS sent (socket set), or failed first (socket None)
        self.ended = asyncio.Event()  # the reply's last audio was emitted, or the reply failed
        self.words = WordAligner(sample_rate)
        self.first_text_at: float | None = None
        self.audio_started = False
        self.eos_sent = False
        self.final = False
        self.samples = 0  # audio received so far, in samples from the reply's start
        self.carry = b""  # a byte of a sample that the next message completes (PCM may be cut mid-sample)
        self.timer: asyncio.Timeout | None = None  # the receiver's current read deadline
        self.sent_at = 0.0  # loop time of the last message sent: ElevenLabs closes a socket idle for its timeout
        self.heard_at = 0.0  # loop time of the last message received
        self.unanswered_since: float | None = None  # the first text or EOS sent since then
        self.flushed_at: float | None = None  # a flush asked for what ElevenLabs buffered, no message since

    def deadline(self) -> float | None:
        """When the receiver's current read must have returned (loop time), or None while no audio is due."""
        now = asyncio.get_running_loop().time()
        if self.final:
            return now + self.settings.read_timeout_s  # only the server's close is due
        if self.first_text_at is None:
            return None
        if not self.audio_started:
            return (self.flushed_at or self.first_text_at) + self.settings.first_audio_timeout_s
        if self.eos_sent or self.words.pending_chars > 0:
            # From the last message, or the first input sent since it: more text pushed while the server is silent
            # does not move the deadline (a stall must not hide behind a reasoner that keeps streaming).
            since = self.unanswered_since if self.unanswered_since is not None else self.heard_at
            return since + self.settings.read_timeout_s
        return None

    def keepalive_at(self) -> float | None:
        """When a keepalive is due: half ElevenLabs' inactivity timeout after the last message sent, whether audio is
        due or not (it may hold text for longer than that: a buffered "Let me check." waits for a flush up to
        ``first_audio_timeout_s``, which may exceed the inactivity timeout). None once EOS is sent: no text may
        follow it."""
        if self.eos_sent or self.final:
            return None
        return self.sent_at + self.settings.inactivity_timeout_s / 2

    def wake_at(self) -> float:
        """When the receiver's read gives up: the earlier of its deadline and when a keepalive is due (one of them
        always is: until EOS a keepalive, after it a deadline)."""
        return min(at for at in (self.deadline(), self.keepalive_at()) if at is not None)

    def may_flush(self) -> bool:
        """Whether a deadline that ran out may be ElevenLabs holding text by design: with ``flush_each_chunk`` off
        it buffers text below its ``chunk_length_schedule`` until more comes, so a reasoner pausing (a tool call
        after "Let me check.") leaves it silent. Then it is asked once to speak what it has, before it is a stall."""
        return not self.settings.flush_each_chunk and not self.eos_sent and self.flushed_at is None

    def flushed(self) -> None:
        self.flushed_at = self.unanswered_since = asyncio.get_running_loop().time()
        self.rearm()

    def rearm(self) -> None:
        """Text or EOS went out: audio is due now, so a read that was waiting for the keepalive gets a deadline."""
        self.sent_at = asyncio.get_running_loop().time()
        if self.unanswered_since is None:
            self.unanswered_since = self.sent_at
        timer = self.timer
        if timer is not None and not timer.expired():
            timer.reschedule(self.wake_at())

    def timeout_problem(self) -> str:
        if not self.audio_started:
            return (
                f"no audio within {self.settings.first_audio_timeout_s:g} s of the reply's first text "
                "(first_audio_timeout_s)"
            )
        return f"stalled: no message for {self.settings.read_timeout_s:g} s while audio was due (read_timeout_s)"


# ------------------------------------------------------------------------------------------------ the stage


class ElevenLabsTTS(StreamingTTSStage):
    """ElevenLabs TTS over the stream-input WebSocket: one socket per reply, word marks from the alignment."""

    Settings: ClassVar[type[BaseModel]] = ElevenLabsTTSSettings

    @classmethod
    def required_packages(cls, settings: ElevenLabsTTSSettings) -> tuple[Package, ...]:
        """The SDK, and websockets, which it depends on and the stage streams over."""
        return (Package("elevenlabs", "elevenlabs", "elevenlabs"), Package("websockets", "websockets", "elevenlabs"))

    @classmethod
    def from_settings(cls, settings: ElevenLabsTTSSettings, context: Any, name: str) -> ElevenLabsTTS:
        key = settings.require_api_key("tts")  # named before anything connects
        return cls(settings, api_key=key, audio=context.audio, name=name)

    def __init__(
        self,
        settings: ElevenLabsTTSSettings | None = None,
        *,
        api_key: str | None = None,
        audio: AudioFormat = AudioFormat(16000),
        name: str | None = None,
    ) -> None:
        self.output_format = output_format(audio)
        _require_sdk()
        super().__init__(audio, name=name or "tts")
        self.settings = settings or ElevenLabsTTSSettings()
        # A missing or blank key given in code (an unset variable read there) is named now, not refused later.
        self._api_key = (api_key or "").strip() or self.settings.require_api_key("tts")
        self._reply: _Reply | None = None
        self._receivers: set[asyncio.Task[None]] = set()  # every reply's, until it has closed its socket
        self._closed = False  # stop() has begun: no reply connects any more

    # ------------------------------------------------------------------------------------------- connect

    def url(self) -> str:
        from elevenlabs.environment import ElevenLabsEnvironment
        from elevenlabs.url_utils import build_ws_url

        s = self.settings
        params: dict[str, str] = {
            "model_id": s.model,
            "output_format": self.output_format,
            "inactivity_timeout": str(s.inactivity_timeout_s),
            "sync_alignment": "true",  # alignment with every audio message, timed from that message's start
        }
        if s.language_code:
            params["language_code"] = s.language_code
        base = s.base_url or ElevenLabsEnvironment.PRODUCTION.value
        return build_ws_url(base, ["v1", "text-to-speech", s.voice_id, "stream-input"], params)

    def _bos(self) -> str:
        from elevenlabs.types import GenerationConfig, InitializeConnection, RealtimeVoiceSettings

        s = self.settings
        voice = RealtimeVoiceSettings(**s.voice_settings.model_dump(exclude_none=True)) if s.voice_settings else None
        schedule = (
            GenerationConfig(chunk_length_schedule=[float(n) for n in s.chunk_length_schedule])
            if s.chunk_length_schedule
            else None
        )
        bos = InitializeConnection(text=" ", voice_settings=voice, generation_config=schedule)
        return json.dumps(bos.model_dump(by_alias=True, exclude_none=True))

    async def _connect(self) -> ClientConnection:
        from elevenlabs.version import __version__
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidHandshake, InvalidStatus

        url = self.url()
        ssl_context = await tls.context_for(url)  # built once per process, off the loop; None for ws://
        options: dict[str, Any] = {"ssl": ssl_context} if ssl_context is not None else {}
        try:
            return await connect(
                url,
                additional_headers={"xi-api-key": self._api_key},
                user_agent_header=f"voxpipe elevenlabs/{__version__}",
                open_timeout=self.settings.connect_timeout_s,
                close_timeout=CLOSE_TIMEOUT_S,
                max_size=2**22,  # a message carries up to a second or two of base64 PCM
                **options,
            )
        except InvalidStatus as exc:
            problem = _refusal(exc.response.status_code, exc.response.body, self.settings)
            raise ProviderError(PROVIDER, problem) from None
        except TimeoutError:
            raise ProviderError(
                PROVIDER, f"no connection within {self.settings.connect_timeout_s:g} s (connect_timeout_s)"
            ) from None
        except (OSError, InvalidHandshake) as exc:
            raise ProviderError(PROVIDER, f"cannot connect to {url.split('?')[0]}: {exc}") from None

    async def open_reply(self, epoch: int) -> None:
        await self.cancel_reply(epoch)  # a reply left open (no ResponseEnd) must not leak its socket
        if self._closed:
            return  # the call is over: a socket opened now would be billed for a reply nobody hears
        assert self.produces is not None
        reply = _Reply(epoch, self.settings, self.produces.sample_rate)
        self._reply = reply
        reply.task = self.spawn(self._serve(reply), name=f"{self.name}-reply-{epoch}", epoch=epoch)
        self._receivers.add(reply.task)
        reply.task.add_done_callback(self._receivers.discard)

    async def _serve(self, reply: _Reply) -> None:
        """The reply's receiver: connect, send BOS, read until the server's close; the socket closes on exit."""
        try:
            socket = await self._connect()
            try:
                await self._send_bos(socket)
                reply.sent_at = asyncio.get_running_loop().time()
                reply.socket = socket
                reply.opened.set()
                await self._receive(reply, socket)
            finally:
                await self._close(socket)
        except ProviderError:
            if reply.epoch < self.epoch:
                return  # a failure of a reply the caller already interrupted concerns no one
            raise
        finally:
            reply.socket = None
            reply.opened.set()
            reply.ended.set()

    async def _send_bos(self, socket: ClientConnection) -> None:
        """BOS: the voice settings and generation config. ElevenLabs refuses some requests right after the upgrade
        by closing the socket (1008, with the reason), which the send then meets."""
        from websockets.exceptions import ConnectionClosed

        try:
            await self._send(socket, self._bos())
        except ConnectionClosed as exc:
            raise ProviderError(
                PROVIDER, f"closed the connection before the reply began ({_close_reason(exc)})"
            ) from None

    async def _send(self, socket: ClientConnection, message: str) -> None:
        try:
            async with asyncio.timeout(self.settings.read_timeout_s):
                await socket.send(message)
        except TimeoutError:
            raise ProviderError(PROVIDER, f"a send took longer than {self.settings.read_timeout_s:g} s") from None

    # -------------------------------------------------------------------------------------------- stream

    def _current(self, epoch: int) -> _Reply | None:
        reply = self._reply
        return reply if reply is not None and reply.epoch == epoch else None

    async def send_text(self, epoch: int, text: str) -> str | None:
        from elevenlabs.types import SendText
        from websockets.exceptions import ConnectionClosed

        reply = self._current(epoch)
        words = text.split()
        if reply is None or not words:
            return None
        if reply.first_text_at is None:
            self.mark("tts.sdk_call", epoch)  # the client's boundary: a socket still opening is the network's time
        await reply.opened.wait()  # bounded: the receiver's connect has its own timeout
        socket = reply.socket
        if socket is None:
            return None  # the receiver failed, and reported it
        text = " ".join(words) + " "  # ElevenLabs wants each text to end with a single space
        if self.settings.flush_each_chunk:
            message = SendText(text=text, flush=True)
        else:
            message = SendText(text=text, try_trigger_generation=True)
        reply.words.expect(text)
        if reply.first_text_at is None:
            reply.first_text_at = asyncio.get_running_loop().time()
        reply.rearm()
        try:
            await self._send(socket, json.dumps(message.model_dump(exclude_none=True)))
        except ConnectionClosed:
            return None  # the receiver reports a closed socket
        return text

    async def finish_reply(self, epoch: int) -> None:
        from elevenlabs.types import CloseConnection
        from websockets.exceptions import ConnectionClosed

        reply = self._current(epoch)
        if reply is None:
            return
        if reply.first_text_at is None:
            await self.cancel_reply(epoch)  # nothing was said: no audio to wait for
            return
        socket = reply.socket
        if socket is not None:
            reply.eos_sent = True
            reply.rearm()
            with contextlib.suppress(ConnectionClosed):
                await self._send(socket, json.dumps(CloseConnection().model_dump()))
        await reply.ended.wait()  # bounded by the receiver's read timeouts
        if self._reply is reply:
            self._reply = None

    async def _receive(self, reply: _Reply, socket: ClientConnection) -> None:
        from websockets.exceptions import ConnectionClosed, ConnectionClosedOK

        while True:
            try:
                async with asyncio.timeout_at(reply.wake_at()) as reply.timer:  # a loop time, not a delay
                    raw = await socket.recv()
            except TimeoutError:
                if reply.final:
                    return  # the reply is complete; the server was slow to close, so we close
                deadline = reply.deadline()
                if deadline is None or asyncio.get_running_loop().time() < deadline:
                    # Woken for a keepalive, not a stall. Sent while audio is due too, rather than rejecting settings
                    # whose inactivity timeout is below the read timeouts: a single space is ElevenLabs' documented
                    # keepalive and adds no word to what it speaks, and a config valid alone stays valid.
                    await self._keep_alive(reply, socket)
                    continue
                if reply.may_flush():
                    await self._keep_alive(reply, socket, flush=True)
                    reply.flushed()
                    continue
                raise ProviderError(PROVIDER, reply.timeout_problem()) from None
            except ConnectionClosedOK:
                if reply.final:
                    return
                if not reply.eos_sent:
                    raise ProviderError(PROVIDER, "closed the connection before the reply was finished") from None
                break  # closed normally after the reply's last text (isFinal is optional before it)
            except ConnectionClosed as exc:
                if reply.final:
                    return  # every audio of the reply is in; how the socket ended no longer matters
                raise ProviderError(PROVIDER, f"connection lost mid-reply ({_close_reason(exc)})") from None
            finally:
                reply.timer = None
            received_at = self.clock.now()  # the client's boundary: the socket delivered the message
            reply.heard_at, reply.unanswered_since, reply.flushed_at = asyncio.get_running_loop().time(), None, None
            message = _parse(raw)
            if message.get("isFinal"):
                self._check_whole_samples(reply)
                await self._finish_words(reply)
                reply.final = True
                reply.ended.set()  # finish_reply may go on; the receiver waits for the server's close
            elif message.get("audio"):
                await self._on_audio(reply, message, received_at)
        # The reply ended with the server's close after EOS, without isFinal: all its audio is in, as at isFinal, so
        # the words the alignment left open are marked too (they were heard).
        await self._finish_words(reply)
        self._check_whole_samples(reply)

    async def _keep_alive(self, reply: _Reply, socket: ClientConnection, *, flush: bool = False) -> None:
        """A single space: ElevenLabs' way to keep a socket open that gets no new text (an empty text would be EOS);
        with ``flush``, it also asks for the audio of the text ElevenLabs holds."""
        from elevenlabs.types import SendText
        from websockets.exceptions import ConnectionClosed

        reply.sent_at = asyncio.get_running_loop().time()
        message = SendText(text=" ", flush=True) if flush else SendText(text=" ")
        with contextlib.suppress(ConnectionClosed):  # the next read reports a closed socket
            await self._send(socket, json.dumps(message.model_dump(exclude_none=True)))

    async def _on_audio(self, reply: _Reply, message: dict[str, Any], received_at: float) -> None:
        from elevenlabs.types import AudioOutput

        try:
            audio = AudioOutput.model_validate(message)
        except ValueError as exc:
            raise ProviderError(PROVIDER, f"sent an audio message of the wrong shape: {exc}") from None
        pcm = reply.carry + self._decode(audio.audio, first=not reply.audio_started)
        whole = len(pcm) - len(pcm) % 2  # only whole 16-bit samples go out; a byte left over starts the next one
        pcm, reply.carry = pcm[:whole], pcm[whole:]
        if not reply.audio_started:
            self.mark("tts.sdk_answer", reply.epoch, received_at)
        reply.audio_started = True
        offset = reply.samples
        reply.samples += len(pcm) // 2
        marks: list[WordMark] = []
        alignment = audio.alignment or audio.normalized_alignment
        if alignment is not None and alignment.chars:
            marks = reply.words.add(
                alignment.chars,
                alignment.char_start_times_ms or [],
                alignment.char_durations_ms or [],
                offset,
                reply.samples,
            )
        if reply.epoch >= self.epoch:  # never let a stale reply touch the stage's reply timeline
            text = "".join(alignment.chars) if alignment is not None and alignment.chars else ""
            await self.emit_audio(reply.epoch, pcm, tuple(marks), text)

    async def _finish_words(self, reply: _Reply) -> None:
        marks = reply.words.finish(at=reply.samples)
        if marks and reply.epoch >= self.epoch:
            await self.emit_audio(reply.epoch, b"", tuple(marks))

    def _decode(self, data: str, *, first: bool) -> bytes:
        try:
            pcm = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ProviderError(PROVIDER, f"sent audio that is not valid base64 ({len(data)} characters)") from None
        container = _container(pcm) if first else None
        if container is not None:
            raise ProviderError(PROVIDER, f"sent {container} audio, not the raw {self.output_format} PCM asked for")
        return pcm

    def _check_whole_samples(self, reply: _Reply) -> None:
        """At the reply's end, a byte no message completed: a byte was lost (everything after it was played a byte
        off), or the audio is not the 16-bit PCM asked for."""
        if reply.carry:
            raise ProviderError(
                PROVIDER,
                f"sent {reply.samples * 2 + len(reply.carry)} bytes of audio in the reply, not a whole number of "
                f"16-bit samples: a stray byte was left at its end ({self.output_format} asked)",
            )

    # -------------------------------------------------------------------------------------------- cancel

    async def cancel_reply(self, epoch: int) -> None:
        """Barge-in: the protocol has no cancel message, so the receiver is cancelled and closes the socket."""
        reply, self._reply = self._reply, None
        if reply is None:
            return
        task = reply.task
        # Not when the receiver itself failed and its error policy is interrupting: it is already finishing.
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()

    # --------------------------------------------------------------------------------------------- close

    async def stop(self) -> None:
        """Cancel the open reply and wait, within the close timeout, for every receiver to close its socket: the
        teardown that follows would cut those closes short. From here on no reply connects."""
        self._closed = True
        reply = self._reply
        if reply is not None:
            await self.cancel_reply(reply.epoch)
        if self._receivers:
            await asyncio.wait(set(self._receivers), timeout=CLOSE_TIMEOUT_S + 0.5)
        await super().stop()

    async def _close(self, socket: ClientConnection) -> None:
        """Close a reply's socket (websockets waits up to ``CLOSE_TIMEOUT_S`` for the server's answer, then aborts);
        a close cut short (the receiver cancelled again, by the call's teardown) or failing aborts the connection
        (:func:`~voxpipe.stages.cloud.abort_unless_closed`)."""
        try:
            await socket.close()
        finally:
            abort_unless_closed(socket)


# ------------------------------------------------------------------------------------------------ messages


def _parse(raw: str | bytes) -> dict[str, Any]:
    """A server message as JSON, or a clear error: ElevenLabs sends only JSON text messages."""
    if isinstance(raw, bytes):
        raise ProviderError(PROVIDER, f"sent a binary message ({len(raw)} bytes); stream-input sends only JSON")
    try:
        message = json.loads(raw)
    except ValueError:
        raise ProviderError(PROVIDER, f"sent a message that is not JSON: {raw[:80]!r}") from None
    if not isinstance(message, dict):
        raise ProviderError(PROVIDER, f"sent a JSON {type(message).__name__}, not an object: {raw[:80]!r}")
    if "audio" in message or "isFinal" in message:
        return message
    if "error" in message or "message" in message:
        detail = message.get("message") or message.get("error")
        raise ProviderError(PROVIDER, f"reported an error: {detail} ({message.get('error', 'no code')})")
    raise ProviderError(PROVIDER, f"sent an unknown message (keys: {', '.join(sorted(message)) or 'none'})")


def _refusal(status: int, body: bytes | None, settings: ElevenLabsTTSSettings) -> str:
    """What a refused handshake means, with ElevenLabs' own message (``{"detail": {"status", "message"}}``)."""
    meaning = _REFUSALS.get(status) or ("server error" if status >= 500 else "refused the connection")
    text = (body or b"").decode("utf-8", "replace")
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = text[:120]
    found = parsed.get("detail", parsed) if isinstance(parsed, dict) else parsed
    detail = str(found.get("message") or found.get("status") or "") if isinstance(found, dict) else str(found)
    hint = _HINTS.get(status, "")
    if status == 401:  # the key the call used: the config's (its own, or a ${VAR} it named), else the environment's
        hint = f"; check {settings.key_source('tts')}"
    return f"{meaning} (HTTP {status}{': ' + detail if detail else ''}){hint}"


def _close_reason(exc: Exception) -> str:
    received = getattr(exc, "rcvd", None)
    if received is None:
        return "no close frame: the connection dropped"
    return f"closed with code {received.code}{': ' + received.reason if received.reason else ''}"


# MPEG audio layer III, by the header's version bits: 3 is MPEG-1, 2 MPEG-2, 0 MPEG-2.5 (1 is reserved).
_MPEG_SAMPLE_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}
_MPEG1_LAYER3_KBPS = (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)  # by bitrate index
_MPEG2_LAYER3_KBPS = (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)


def _container(head: bytes) -> str | None:
    """The compressed or container format ``head`` starts with, if any (raw PCM was asked for)."""
    for magic, name in ((b"ID3", "MP3"), (b"RIFF", "WAV"), (b"OggS", "Ogg/Opus"), (b"fLaC", "FLAC")):
        if head.startswith(magic):
            return name
    # A frame header alone is no proof: raw PCM whose first sample is -1025 (bytes FF FB) starts like one. So MP3
    # only if the next frame's header is where this frame ends, or the audio ends there (one frame in the message).
    length = _mpeg_frame_length(head, 0)
    if length is not None and (len(head) == length or _mpeg_frame_length(head, length) is not None):
        return "MP3"
    return None


def _mpeg_frame_length(data: bytes, at: int) -> int | None:
    """The length in bytes of the MPEG layer III frame whose header starts at ``data[at]``, or None if no valid
    header is there (no frame sync, a reserved version or sample rate, a free-format or bad bitrate)."""
    if len(data) < at + 4 or data[at] != 0xFF or data[at + 1] & 0xE6 != 0xE2:  # frame sync, layer III
        return None
    version, bitrate, rate = (data[at + 1] >> 3) & 0x3, data[at + 2] >> 4, (data[at + 2] >> 2) & 0x3
    if version not in _MPEG_SAMPLE_RATES or bitrate in (0x0, 0xF) or rate == 0x3:
        return None
    padding = (data[at + 2] >> 1) & 0x1
    if version == 3:  # MPEG-1 frames hold 1152 samples, MPEG-2 and 2.5 frames 576
        return 144_000 * _MPEG1_LAYER3_KBPS[bitrate] // _MPEG_SAMPLE_RATES[version][rate] + padding
    return 72_000 * _MPEG2_LAYER3_KBPS[bitrate] // _MPEG_SAMPLE_RATES[version][rate] + padding
