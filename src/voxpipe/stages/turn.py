"""The turn-taker: decides when the caller's turn ends and when caller speech cuts the bot off.

It sits after the VAD and STT. It keeps the :class:`Conversation`: the caller's final transcripts, the bot's
replies as the output reports them heard, and the results of the tools the reasoner ran. Every caller turn opens a
new epoch; if anything of the old epoch is still in flight (a reply being generated or played), the
:class:`Interrupt` cancels it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from voxpipe.pipeline import (
    AudioFrame,
    BotStartedSpeaking,
    BotStoppedSpeaking,
    Conversation,
    Direction,
    EndOfTurn,
    Frame,
    Stage,
    ToolResult,
    ToolUse,
    Transcript,
    TurnPolicy,
    UserSpeechStarted,
    UserSpeechStopped,
)


@dataclass(frozen=True, slots=True)
class _Utterance:
    """A finished caller utterance waiting for its final transcript."""

    started: UserSpeechStarted
    stopped: UserSpeechStopped
    over_bot: bool
    barged_epoch: int | None


class TurnTaker(Stage):
    """Turns VAD events and transcripts into :class:`EndOfTurn` frames and barge-in interrupts.

    An STT sends exactly one final transcript per VAD stop, in order; finished utterances wait in a queue for
    theirs, so a caller who starts speaking again before the previous final arrives loses nothing. (A final that
    comes before its stop, as some cloud STTs' endpointing sends, waits for the stop instead.)
    """

    def __init__(self, conversation: Conversation, policy: TurnPolicy | None = None, *, name: str | None = None):
        super().__init__(name=name)
        self.conversation = conversation
        self.policy = policy or TurnPolicy()
        self.bot_speaking = False
        self._started: UserSpeechStarted | None = None  # the utterance being spoken now
        self._partial = ""
        self._over_bot = False
        self._barged_epoch: int | None = None
        self._awaiting_final: deque[_Utterance] = deque()
        self._early_finals: deque[tuple[Transcript, float]] = deque()

    async def process(self, frame: Frame, direction: Direction) -> None:
        if direction is Direction.UPSTREAM:
            if isinstance(frame, BotStartedSpeaking):
                self.bot_speaking = True
                if self._started is not None:
                    self._over_bot = True
            elif isinstance(frame, BotStoppedSpeaking):
                self.bot_speaking = False
                self.conversation.add_assistant(frame.heard, frame.interrupted)
            elif isinstance(frame, ToolResult):
                use = ToolUse(frame.call_id, frame.name, frame.arguments, frame.result, frame.error)
                self.conversation.add_tool(use)
                return  # recorded: the reasoner's tool results go no further upstream
            await self.push(frame, direction)
            return
        if isinstance(frame, AudioFrame):
            await self._on_audio(frame)  # caller audio ends here: the reasoner works on text
        elif isinstance(frame, UserSpeechStarted):
            self._started, self._partial = frame, ""
            self._over_bot, self._barged_epoch = self.bot_speaking, None
        elif isinstance(frame, UserSpeechStopped):
            if self._started is None:
                return  # a stop without a start (the VAD was reset): nothing to end
            utterance = _Utterance(self._started, frame, self._over_bot, self._barged_epoch)
            self._started, self._partial, self._barged_epoch = None, "", None
            if self._early_finals:
                final, at = self._early_finals.popleft()
                await self._end_turn(utterance, final, at)
            else:
                self._awaiting_final.append(utterance)
        elif isinstance(frame, Transcript):
            if not frame.final:
                self._partial = frame.text
            elif self._awaiting_final:
                await self._end_turn(self._awaiting_final.popleft(), frame, self.clock.now())
            else:
                self._early_finals.append((frame, self.clock.now()))
        else:
            await self.push(frame, direction)

    async def _on_audio(self, frame: AudioFrame) -> None:
        started = self._started
        if started is None or self._barged_epoch is not None or not self.bot_speaking:
            return
        speech_s = (frame.pts + frame.samples) / frame.sample_rate - started.at
        if self.policy.is_barge_in(speech_s, self._partial):
            self._barged_epoch = (await self.interrupt("barge-in")).epoch

    async def _end_turn(self, utterance: _Utterance, final: Transcript, final_at: float) -> None:
        text = final.text
        if not self.policy.is_turn(text, utterance.over_bot and utterance.barged_epoch is None):
            return  # a cough, a click, a backchannel over the bot: not a turn
        epoch = utterance.barged_epoch
        if epoch is None:
            epoch = (await self.interrupt("new-turn")).epoch
        trace = self.pipeline.trace
        trace.mark(epoch, "user.speech_start", utterance.started.at)
        trace.mark(epoch, "user.speech_end", utterance.stopped.last_voiced_at)
        trace.mark(epoch, "turn.end_detected", utterance.stopped.at)
        trace.mark(epoch, "stt.final", final_at)
        for name, at in final.marks:
            trace.mark(epoch, name, at)
        trace.annotate(epoch, user_text=text, barge_in=utterance.barged_epoch is not None)
        self.conversation.add_user(text)
        context = self.conversation.snapshot()
        now = self.clock.now()
        await self.push(EndOfTurn(epoch=epoch, text=text, at=now, system=self.conversation.system, context=context))
