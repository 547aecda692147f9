"""Compose a pipeline in code: a scripted caller talks to a cascade with one custom stage of your own."""

from voxpipe.pipeline import AudioFormat, Conversation, Pipeline, SpeakableChunk, VirtualClock
from voxpipe.stages.turn import TurnTaker
from voxpipe.testing import Say, ScriptedCaller, ScriptedLLM, ScriptedSTT, ScriptedTTS, ScriptedVAD
from voxpipe.transports.playout import PlayoutOutput
from voxpipe.transports.simulated import SimulatedInput


async def polite(frame):  # your own stage: a plain async function
    if isinstance(frame, SpeakableChunk):
        return SpeakableChunk(epoch=frame.epoch, text=frame.text.replace("Hi", "Good evening"))
    return frame


audio = AudioFormat(16000)
clock = VirtualClock()  # simulated time: the whole call runs in a fraction of a second
caller = ScriptedCaller([Say("Hello, is the restaurant open tonight?")])
conversation = Conversation(system="You answer the phone at Luigi's.")
pipeline = Pipeline(
    [
        SimulatedInput(caller, audio),
        ScriptedVAD(audio),
        ScriptedSTT(caller),
        TurnTaker(conversation),
        ScriptedLLM(["Hi! Yes, we are open until eleven tonight."]),
        polite,
        ScriptedTTS(audio),
        PlayoutOutput(audio),
    ],
    clock=clock,
)

if __name__ == "__main__":
    clock.run(pipeline.run())
    for message in conversation.messages:
        print(f"{message.role:>9}: {message.text}")
    print(f"voice-to-voice: {pipeline.trace.turns[0].voice_to_voice_ms:.0f} ms")
