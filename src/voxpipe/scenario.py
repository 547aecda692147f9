"""Scenario files: the caller's side of a simulated call, as YAML.

caller:
  voice: piper          # piper (real speech, for real STT) or tones (speech-like bursts, for scripted STT)
  length_scale: 1.2     # piper: slower than the bot's voice, so the two are easy to tell apart
steps:
  - say: Hi, I'd like to book a table for two tonight.
  - say: Around seven thirty please.
    pause: 0.6          # seconds after the bot finished its answer
  - say: Actually, make it eight.
    barge_in: 1.2       # seconds into the bot's reply: cuts it off
  - noise: 0.18         # a cough; during_reply: 0.8 puts it over the bot
  - silence: 2.0
  - wav: caller.wav     # a recording (any rate, mono or stereo); text: what it says, for the transcript
    text: My name is Rossi.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from voxpipe.config.errors import ConfigError
from voxpipe.config.schema import _problems
from voxpipe.testing.caller import Noise, Say, Silence, Step


class CallerVoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    voice: Literal["piper", "tones"] = Field("piper", description="how caller lines are spoken")
    length_scale: float = Field(1.2, gt=0.3, lt=3.0, description="piper: >1 speaks slower than the bot")
    max_words: int = Field(60, ge=1, le=400, description="longest line allowed, in words")


# Besides its action, the keys each kind of step uses: any other is refused rather than silently dropped.
STEP_KEYS = {
    "say": ("pause", "barge_in"),
    "wav": ("text", "pause", "barge_in"),
    "noise": ("pause", "during_reply"),
    "silence": (),
}


class ScenarioStep(BaseModel):
    model_config = ConfigDict(extra="forbid")

    say: str | None = Field(None, min_length=1)
    wav: str | None = None
    text: str | None = None
    noise: float | None = Field(None, gt=0, le=5)
    silence: float | None = Field(None, gt=0, le=600)
    pause: float = Field(0.8, ge=0, le=600)
    barge_in: float | None = Field(None, ge=0, le=60)
    during_reply: float | None = Field(None, ge=0, le=60)

    @model_validator(mode="after")
    def one_action(self) -> ScenarioStep:
        actions = [name for name in STEP_KEYS if getattr(self, name) is not None]
        if len(actions) != 1:
            raise ValueError(f"a step needs exactly one of say, wav, noise, silence (this one has {actions or 'none'})")
        return self

    @property
    def action(self) -> str:
        return next(name for name in STEP_KEYS if getattr(self, name) is not None)

    def keys_that_do_not_apply(self) -> list[str]:
        """Keys given that this step's action does not use (``pause`` on a silence, ``barge_in`` on a noise…)."""
        action = self.action
        return [key for key in sorted(self.model_fields_set) if key != action and key not in STEP_KEYS[action]]


class Scenario(BaseModel):
    model_config = ConfigDict(extra="forbid")

    caller: CallerVoice = Field(default_factory=CallerVoice)
    steps: list[ScenarioStep] = Field(min_length=1)

    def script(self, base: Path) -> list[Step]:
        """The steps as ScriptedCaller steps; WAV paths are relative to the scenario file."""
        out: list[Step] = []
        for step in self.steps:
            if step.say is not None:
                out.append(Say(step.say, pause=step.pause, barge_in=step.barge_in))
            elif step.wav is not None:
                out.append(Say(step.text or "", pause=step.pause, barge_in=step.barge_in, wav=base / step.wav))
            elif step.noise is not None:
                out.append(Noise(step.noise, pause=step.pause, during_reply=step.during_reply))
            elif step.silence is not None:
                out.append(Silence(step.silence))
        return out


def load_scenario(path: str | Path) -> Scenario:
    """Read and check a scenario file; errors name the file, the step and the problem."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("", "file not found", file=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("", f"cannot be read ({exc})", file=str(path)) from None
    except yaml.YAMLError as exc:
        raise ConfigError("", f"not valid YAML ({exc})", file=str(path)) from None
    if not isinstance(data, dict) or not data.get("steps"):
        raise ConfigError(
            "steps", "the scenario is empty: give at least one step", "say, wav, noise, silence", file=str(path)
        )
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as exc:
        raise ConfigError.many(_problems(exc, model=Scenario), file=str(path)) from None
    problems = []
    for i, step in enumerate(scenario.steps):
        uses = ", ".join(STEP_KEYS[step.action])
        for key in step.keys_that_do_not_apply():
            problem = f"does not apply to a {step.action} step" + ("" if uses else ", which takes no other key")
            problems.append((f"steps[{i}].{key}", problem, uses))
        words = len((step.say or step.text or "").split())
        if words > scenario.caller.max_words:
            problems.append(
                (
                    f"steps[{i}].say",
                    f"is {words} words, longer than caller.max_words ({scenario.caller.max_words})",
                    "split it into several steps",
                )
            )
        if step.wav is not None and not (path.parent / step.wav).exists():
            problems.append((f"steps[{i}].wav", f"{path.parent / step.wav} does not exist", ""))
    if problems:
        raise ConfigError.many(problems, file=str(path))
    return scenario
