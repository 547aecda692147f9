"""The voxpipe runtime: frames, stages, the pipeline, clocks, pacing, the conversation and the latency trace.

Nothing here imports from ``voxpipe.stages`` or ``voxpipe.transports``.
"""

from voxpipe.pipeline.audio import AudioFormat
from voxpipe.pipeline.clock import Clock, RealClock, VirtualClock, wrap_thread_job
from voxpipe.pipeline.context import Conversation, Message, ToolUse
from voxpipe.pipeline.errors import (
    AudioFormatError,
    PipelineBuildError,
    StrayCancellation,
    VoxpipeError,
    being_cancelled,
)
from voxpipe.pipeline.frames import (
    AudioFrame,
    BotStartedSpeaking,
    BotStoppedSpeaking,
    Cancel,
    ControlFrame,
    Direction,
    End,
    EndOfTurn,
    ErrorFrame,
    Frame,
    Interrupt,
    LLMRequest,
    ResponseEnd,
    SpeakableChunk,
    Start,
    TextDelta,
    ToolCall,
    ToolResult,
    Transcript,
    TranscriptWord,
    TTSAudioFrame,
    TTSDone,
    UserSpeechProgress,
    UserSpeechStarted,
    UserSpeechStopped,
    WordMark,
)
from voxpipe.pipeline.pacing import Metronome
from voxpipe.pipeline.pipeline import Pipeline
from voxpipe.pipeline.stage import DOWNSTREAM, UPSTREAM, ErrorPolicy, FunctionStage, QueuedStage, Stage
from voxpipe.pipeline.trace import JsonlTraceWriter, Summary, Tracer, TurnRecord
from voxpipe.pipeline.turns import TurnPolicy

__all__ = [
    "DOWNSTREAM",
    "UPSTREAM",
    "AudioFormat",
    "AudioFormatError",
    "AudioFrame",
    "BotStartedSpeaking",
    "BotStoppedSpeaking",
    "Cancel",
    "Clock",
    "ControlFrame",
    "Conversation",
    "Direction",
    "End",
    "EndOfTurn",
    "ErrorFrame",
    "ErrorPolicy",
    "Frame",
    "FunctionStage",
    "Interrupt",
    "JsonlTraceWriter",
    "LLMRequest",
    "Message",
    "Metronome",
    "Pipeline",
    "PipelineBuildError",
    "QueuedStage",
    "RealClock",
    "ResponseEnd",
    "SpeakableChunk",
    "Stage",
    "Start",
    "StrayCancellation",
    "Summary",
    "TTSAudioFrame",
    "TTSDone",
    "TextDelta",
    "ToolCall",
    "ToolResult",
    "ToolUse",
    "Tracer",
    "Transcript",
    "TranscriptWord",
    "TurnPolicy",
    "TurnRecord",
    "UserSpeechStarted",
    "UserSpeechProgress",
    "UserSpeechStopped",
    "VirtualClock",
    "VoxpipeError",
    "WordMark",
    "being_cancelled",
    "wrap_thread_job",
]
