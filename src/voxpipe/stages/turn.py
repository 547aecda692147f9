"""The turn-taker: decides when the caller's turn ends and when caller speech cuts the bot off.

It sits after the VAD and STT. It keeps the :class:`Conversation`: the caller's final transcripts, and the bot's
replies as the output reports them heard. Every caller turn opens a new epoch; if anything of the old epoch is
still in flight (a reply being generated or played), the :class:`Interrupt` cancels it.
"""

from __future__ import annotations

from voxpipe.pipeline import (
    AudioFrame,
    BotStartedSpeaking,
    BotStoppedSpeaking,
    Conversation,
    Direction,
    EndOfTurn,
    Frame,
    Stage,
    Transcript,
    TurnPolicy,
    UserSpeechStarted,
    UserSpeechStopped,
)


class TurnTaker(Stage):
    """Turns VAD events and transcripts into :class:`EndOfTurn` frames and barge-in interrupts."""

    def __init__(self, conversation: Conversation, policy: TurnPolicy | None = None, *, name: str | None = None):
        super().__init__(name=name)
        self.conversation = conversation
        self.policy = policy or TurnPolicy()
        self.bot_speaking = False
        self._started: UserSpeechStarted | None = None
        self._stopped: UserSpeechStopped | None = None
        self._partial = ""
        self._final: str | None = None
        self._final_at = 0.0
        self._over_bot = False
        self._barged_epoch: int | None = None

    async def process(self, frame: Frame, direction: Direction) -> None:
        if direction is Direction.UPSTREAM:
            if isinstance(frame, BotStartedSpeaking):
                self.bot_speaking = True
                if self._started is not None:
                    self._over_bot = True
            elif isinstance(frame, BotStoppedSpeaking):
                self.bot_speaking = False
                self.conversation.add_assistant(frame.heard, frame.interrupted)
            await self.push(frame, direction)
            return
        if isinstance(frame, AudioFrame):
            await self._on_audio(frame)  # caller audio ends here: the reasoner works on text
        elif isinstance(frame, UserSpeechStarted):
            self._started, self._stopped, self._partial, self._final = frame, None, "", None
            self._over_bot, self._barged_epoch = self.bot_speaking, None
        elif isinstance(frame, Transcript):
            if frame.final:
                self._final = frame.text if self._final is None else f"{self._final} {frame.text}".strip()
                self._final_at = self.clock.now()
                await self._maybe_end_turn()
            else:
                self._partial = frame.text
        elif isinstance(frame, UserSpeechStopped):
            self._stopped = frame
            await self._maybe_end_turn()
        else:
            await self.push(frame, direction)

    async def _on_audio(self, frame: AudioFrame) -> None:
        started = self._started
        if started is None or self._stopped is not None or self._barged_epoch is not None or not self.bot_speaking:
            return
        speech_s = (frame.pts + frame.samples) / frame.sample_rate - started.at
        if self.policy.is_barge_in(speech_s, self._partial):
            self._barged_epoch = (await self.interrupt("barge-in")).epoch

    async def _maybe_end_turn(self) -> None:
        started, stopped, text = self._started, self._stopped, self._final
        if started is None or stopped is None or text is None:
            return
        self._started = self._stopped = self._final = None
        if not self.policy.is_turn(text, self._over_bot and self._barged_epoch is None):
            return  # a cough, a click, a backchannel over the bot: not a turn
        epoch = self._barged_epoch
        if epoch is None:
            epoch = (await self.interrupt("new-turn")).epoch
        trace = self.pipeline.trace
        trace.mark(epoch, "user.speech_start", started.at)
        trace.mark(epoch, "user.speech_end", stopped.last_voiced_at)
        trace.mark(epoch, "turn.end_detected", stopped.at)
        trace.mark(epoch, "stt.final", self._final_at)
        now = self.clock.now()
        trace.annotate(epoch, user_text=text, barge_in=self._barged_epoch is not None)
        self.conversation.add_user(text)
        await self.push(
            EndOfTurn(
                epoch=epoch, text=text, at=now, system=self.conversation.system, context=self.conversation.snapshot()
            )
        )
