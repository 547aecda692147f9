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
    Message,
    Stage,
    ToolResult,
    ToolUse,
    Transcript,
    TurnPolicy,
    UserSpeechProgress,
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
        self._voiced_until: float | None = None  # how far the VAD has heard it voiced (UserSpeechProgress)
        self._heard_until = 0.0  # the end of the caller audio received
        self._partial = ""
        self._over_bot = False
        self._barged_epoch: int | None = None
        self._awaiting_final: deque[_Utterance] = deque()
        self._resume_owed_in: int | None = None  # the epoch a false interruption left silent, until it is resumed
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
        if isinstance(frame, AudioFrame):  # caller audio ends here: the reasoner works on text
            self._heard_until = (frame.pts + frame.samples) / frame.sample_rate
            if self._voiced_until is None:
                await self._consider_barge_in()  # a speech-event source that reports no progress
        elif isinstance(frame, UserSpeechStarted):
            self._started, self._partial, self._voiced_until = frame, "", None
            self._over_bot, self._barged_epoch = self.bot_speaking, None
        elif isinstance(frame, UserSpeechProgress):
            if self._started is not None:
                self._voiced_until = frame.voiced_until
                await self._consider_barge_in()
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
                await self._consider_barge_in()  # its words may be what the policy waited for: act now
            elif self._awaiting_final:
                await self._end_turn(self._awaiting_final.popleft(), frame, self.clock.now())
            else:
                self._early_finals.append((frame, self.clock.now()))
        else:
            await self.push(frame, direction)

    async def stop(self) -> None:
        # Finals still waiting for their VAD stop end no turn now, but the STT measured (and bills) their audio.
        while self._early_finals:
            final, _ = self._early_finals.popleft()
            self._count(final, None)
        await super().stop()

    async def _consider_barge_in(self) -> None:
        """Cut the bot off if the utterance being spoken over it now passes the policy. Its length runs to the last
        voiced sample the VAD reported — the silence after a cough is not speech — or, from a speech-event source
        that reports no progress (Deepgram's ``SpeechStarted``), to the end of the caller audio received."""
        started = self._started
        if started is None or self._barged_epoch is not None or not self.bot_speaking:
            return
        until = self._voiced_until if self._voiced_until is not None else self._heard_until
        if self.policy.is_barge_in(until - started.at, self._partial):
            self._barged_epoch = (await self.interrupt("barge-in")).epoch

    async def _end_turn(self, utterance: _Utterance, final: Transcript, final_at: float) -> None:
        text = final.text
        if not self.policy.is_turn(text, utterance.over_bot and utterance.barged_epoch is None):
            if self._resume_due(utterance, text):
                await self._resume(utterance, final, final_at)
                return
            self._count(final, None)
            return  # a cough, a click, a backchannel over the bot: not a turn
        epoch = utterance.barged_epoch
        if epoch != self.epoch:
            # Not a barge-in, or one whose epoch a later interrupt has closed (an earlier utterance ended as a turn
            # after it, a turn skipped on an error): an EndOfTurn of a closed epoch would be dropped unanswered.
            epoch = (await self.interrupt("new-turn")).epoch
        self._count(final, epoch)
        self._mark(epoch, utterance, final, final_at)
        self.pipeline.trace.annotate(epoch, user_text=text, barge_in=utterance.barged_epoch is not None)
        self.conversation.add_user(text)
        context = self.conversation.snapshot()
        now = self.clock.now()
        await self.push(EndOfTurn(epoch=epoch, text=text, at=now, system=self.conversation.system, context=context))

    def _resume_due(self, utterance: _Utterance, text: str) -> bool:
        """Whether the bot should carry on now that ``utterance`` ended as no turn. A barge-in that then said
        nothing (a false interruption) owes its epoch a resume while that epoch is the open one; it is paid once no
        other utterance holds the floor (the caller speaking again, or another final still to come: if that one is a
        turn, it is what the bot answers, and if it is none either, the resume comes with it)."""
        if utterance.barged_epoch is not None and self.policy.resumes_after(text):
            self._resume_owed_in = utterance.barged_epoch
        return self._resume_owed_in == self.epoch and self._started is None and not self._awaiting_final

    async def _resume(self, utterance: _Utterance, final: Transcript, final_at: float) -> None:
        """Ask the reasoner to carry on after a false interruption, in the epoch the barge-in opened. The caller's
        side of this turn is the policy's resume prompt, given to the reasoner only: the conversation keeps what
        was said (the cut reply, as heard, then the bot's continuation)."""
        epoch, self._resume_owed_in = self.epoch, None
        self._count(final, epoch)
        self._mark(epoch, utterance, final, final_at)
        self.pipeline.trace.annotate(epoch, user_text="", barge_in=True, resumed=True)
        prompt = self.policy.resume_prompt
        assert prompt is not None  # resumes_after() said so
        context = (*self.conversation.snapshot(), Message("user", prompt))
        now = self.clock.now()
        await self.push(
            EndOfTurn(epoch=epoch, text="", at=now, system=self.conversation.system, context=context, resumed=True)
        )

    def _mark(self, epoch: int, utterance: _Utterance, final: Transcript, final_at: float) -> None:
        """The caller's side of turn ``epoch`` on its trace: the utterance's times, and the final's own marks."""
        trace = self.pipeline.trace
        trace.mark(epoch, "user.speech_start", utterance.started.at)
        trace.mark(epoch, "user.speech_end", utterance.stopped.last_voiced_at)
        trace.mark(epoch, "turn.end_detected", utterance.stopped.at)
        trace.mark(epoch, "stt.final", final_at)
        for name, at in final.marks:
            trace.mark(epoch, name, at)

    def _count(self, final: Transcript, epoch: int | None) -> None:
        """Count the usage the STT measured for the utterance ``final`` ends (:attr:`Transcript.usage`) for the turn
        it ends, or, when it is no turn (``epoch`` None), for the next turn to open."""
        usage = self.pipeline.usage
        for stage, counter, amount in final.usage:
            if epoch is None:
                usage.add_for_next_turn(stage, **{counter: amount})
            else:
                usage.add(stage, epoch, **{counter: amount})
