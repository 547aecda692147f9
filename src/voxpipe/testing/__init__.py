"""The public test kit: scripted providers and a scripted caller for testing pipelines without models or keys."""

from voxpipe.testing.caller import Noise, Say, ScriptedCaller, Silence, Step, load_wav
from voxpipe.testing.clip import ClipCaller
from voxpipe.testing.llm import ScriptedLLM, ScriptedReply
from voxpipe.testing.stt import ScriptedSTT
from voxpipe.testing.tts import ScriptedTTS
from voxpipe.testing.vad import ScriptedVAD
from voxpipe.testing.wer import word_error_rate

__all__ = [
    "ClipCaller",
    "Noise",
    "Say",
    "ScriptedCaller",
    "ScriptedLLM",
    "ScriptedReply",
    "ScriptedSTT",
    "ScriptedTTS",
    "ScriptedVAD",
    "Silence",
    "Step",
    "load_wav",
    "word_error_rate",
]
