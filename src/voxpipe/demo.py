"""The built-in scripted call: a restaurant booking with a barge-in and a cough."""

from __future__ import annotations

import asyncio

from voxpipe.testing import Noise, Say, ScriptedReply
from voxpipe.testing.caller import Step

SYSTEM = "You are the booking line of Luigi's. Be brief and friendly."

SCRIPT: list[Step] = [
    Say("Hi, I'd like to book a table for two tonight.", pause=0.5),
    Say("Around seven thirty please.", pause=0.6),
    Say("Actually wait, could we make it eight o'clock instead?", barge_in=1.2),
    Noise(pause=0.4, during_reply=0.8),
    Say("The name is Rossi.", pause=0.7),
    Say("No, that's all, thank you. Bye.", pause=0.6),
]


def check_availability(time: str, people: int) -> str:
    """Look up whether a table is free (scripted: always yes).

    Args:
        time: when, e.g. "7:30 pm"
        people: how many people
    """
    return f"a table for {people} at {time} is free"


async def book_table(name: str, people: int, time: str) -> dict[str, object]:
    """Book a table (scripted: always succeeds, after a short wait like a real booking system's).

    Args:
        name: the name the booking is under
        people: how many people
        time: when, e.g. "8 pm"
    """
    await asyncio.sleep(0.4)
    return {"booked": True, "name": name, "people": people, "time": time, "reference": f"LU-{people}{len(name)}"}


REPLIES: list[str | ScriptedReply] = [
    "Of course. What time would you like to come in tonight?",
    ScriptedReply(
        "Let me check. Good news, {result}. Shall I put it under your name? We also have a terrace if you prefer.",
        tool="check_availability",
        arguments={"time": "7:30 pm", "people": 2},
    ),
    "No problem at all, eight o'clock works too. What name should I put the booking under?",
    "Thank you, Mr Rossi, you're booked for two at eight tonight. Anything else I can do for you?",
    "You're welcome. See you tonight, goodbye!",
]

TOOLS = {"check_availability": check_availability}
