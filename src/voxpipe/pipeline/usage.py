"""Usage of metered services: tokens, characters, audio seconds — counted by the stages that use them, per turn
and per call, and priced by a table of unit prices.

A provider stage counts with ``self.count(epoch, input_tokens=120, output_tokens=31)``. Each turn's record in the
trace carries that turn's usage (``data["usage"]``, by stage name); :attr:`UsageMeter.totals` holds the call's.
"""

from __future__ import annotations

from collections.abc import Mapping

from voxpipe.pipeline.trace import Tracer

# Counters the built-in providers use. A price table gives USD per unit of each (per token, per character, per
# second of audio); a provider may count others, which are priced the same way when the table names them.
INPUT_TOKENS = "input_tokens"
OUTPUT_TOKENS = "output_tokens"
CHARACTERS = "characters"
AUDIO_SECONDS = "audio_seconds"

Counts = dict[str, float]
Prices = Mapping[str, Mapping[str, float]]  # stage name -> counter -> USD per unit


class UsageMeter:
    """Accumulates counts per stage, for the call and for each turn (which it writes into the trace)."""

    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer
        self.totals: dict[str, Counts] = {}
        self._turns: dict[int, dict[str, Counts]] = {}

    def add(self, stage: str, turn: int, **amounts: float) -> None:
        for counts in (self.totals.setdefault(stage, {}), self._turns.setdefault(turn, {}).setdefault(stage, {})):
            for counter, amount in amounts.items():
                if amount < 0:
                    raise ValueError(f"stage {stage!r} counted a negative {counter}: {amount}")
                counts[counter] = counts.get(counter, 0) + amount
        self._tracer.annotate(turn, usage={name: dict(counts) for name, counts in self._turns[turn].items()})

    def of_turn(self, turn: int) -> dict[str, Counts]:
        return {name: dict(counts) for name, counts in self._turns.get(turn, {}).items()}


def cost(usage: Mapping[str, Mapping[str, float]], prices: Prices) -> dict[str, float]:
    """USD per stage (and ``"total"``) for ``usage`` under ``prices``; counters without a price cost nothing."""
    out: dict[str, float] = {}
    for stage, counts in usage.items():
        table = prices.get(stage, {})
        out[stage] = sum(amount * table.get(counter, 0.0) for counter, amount in counts.items())
    out["total"] = sum(out.values())
    return out
