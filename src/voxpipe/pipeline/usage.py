"""Usage of metered services: tokens, characters, audio seconds — counted by the stages that use them, per turn
and per call, and priced by a table of unit prices.

A provider stage counts with ``self.count(epoch, input_tokens=120, output_tokens=31)``. Each turn's record in the
trace carries that turn's usage (``data["usage"]``, by stage name); :attr:`UsageMeter.totals` holds the call's.

A streaming STT is billed for all the audio it is sent, which belongs to no reply, and a barge-in opens its turn's
epoch in mid-utterance: so the STT sums each utterance's audio (with the pause before it) and hands the sum over on
the utterance's final ``Transcript`` (``usage``), which the turn-taker counts on the turn that final ends, or with
:meth:`UsageMeter.add_for_next_turn` for a final that is no turn. That goes to the next turn to open; what no turn
took (the audio after the last utterance, counted at the STT's stop) is in :attr:`UsageMeter.unassigned` (and the
totals) only. An epoch that never became a turn (one a skip-turn error opened: no marks, so the tracer drops it)
gives its usage back to :attr:`UsageMeter.unassigned` at the end of the call (:meth:`UsageMeter.close`), so the
turns' usage always adds up to the totals less ``unassigned``.
"""

from __future__ import annotations

from collections.abc import Mapping

from voxpipe.pipeline.trace import Tracer

# Counters the built-in providers use. A price table gives USD per unit of each (per token, per character, per
# second of audio); a provider may count others, which are priced the same way when the table names them.
INPUT_TOKENS = "input_tokens"
OUTPUT_TOKENS = "output_tokens"
# Input tokens written to / read from a provider's prompt cache, billed apart from input_tokens and at other rates
# (Anthropic's cache_creation_input_tokens and cache_read_input_tokens). Writes to a cache kept for an hour cost more
# than to one kept for 5 minutes, so they have a counter of their own; cache_write_tokens are the 5-minute ones.
CACHE_WRITE_TOKENS = "cache_write_tokens"
CACHE_WRITE_1H_TOKENS = "cache_write_1h_tokens"
CACHE_READ_TOKENS = "cache_read_tokens"
CHARACTERS = "characters"
AUDIO_SECONDS = "audio_seconds"
BUILT_IN_COUNTERS = (
    INPUT_TOKENS,
    OUTPUT_TOKENS,
    CACHE_WRITE_TOKENS,
    CACHE_WRITE_1H_TOKENS,
    CACHE_READ_TOKENS,
    CHARACTERS,
    AUDIO_SECONDS,
)

Counts = dict[str, float]
Prices = Mapping[str, Mapping[str, float]]  # stage name -> counter -> USD per unit


class UsageMeter:
    """Accumulates counts per stage, for the call and for each turn (which it writes into the trace)."""

    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer
        self.totals: dict[str, Counts] = {}
        # Counted for the next turn, which has not opened yet; after close(), also what epochs that were no turn held.
        self.unassigned: dict[str, Counts] = {}
        self._turns: dict[int, dict[str, Counts]] = {}

    def add(self, stage: str, turn: int, **amounts: float) -> None:
        _accumulate(self.totals, stage, amounts)
        _accumulate(self._turns.setdefault(turn, {}), stage, amounts)
        self._annotate(turn)

    def add_for_next_turn(self, stage: str, **amounts: float) -> None:
        """Count usage for the turn that opens next (:meth:`open_turn`); the call's totals have it at once."""
        _accumulate(self.totals, stage, amounts)
        _accumulate(self.unassigned, stage, amounts)

    def open_turn(self, turn: int) -> None:
        """``turn`` opened (the pipeline's epoch moved to it): the usage counted for it so far becomes its own."""
        if not self.unassigned:
            return
        counts = self._turns.setdefault(turn, {})
        for stage, amounts in self.unassigned.items():
            _accumulate(counts, stage, amounts)
        self.unassigned = {}
        self._annotate(turn)

    def close(self) -> None:
        """End of the call: the usage of every epoch that is no turn (it has no marks; the tracer drops it) goes
        back to :attr:`unassigned`, so no usage is lost from the per-turn view."""
        for turn in [turn for turn in self._turns if not self._tracer.has_marks(turn)]:
            for stage, amounts in self._turns.pop(turn).items():
                _accumulate(self.unassigned, stage, amounts)

    def _annotate(self, turn: int) -> None:
        self._tracer.annotate(turn, usage={name: dict(counts) for name, counts in self._turns[turn].items()})

    def of_turn(self, turn: int) -> dict[str, Counts]:
        return {name: dict(counts) for name, counts in self._turns.get(turn, {}).items()}


def _accumulate(usage: dict[str, Counts], stage: str, amounts: Mapping[str, float]) -> None:
    counts = usage.setdefault(stage, {})
    for counter, amount in amounts.items():
        if amount < 0:
            raise ValueError(f"stage {stage!r} counted a negative {counter}: {amount}")
        counts[counter] = counts.get(counter, 0) + amount


def amounts_text(counts: Mapping[str, float]) -> str:
    """``"8.74 audio seconds, 292 characters"``: a stage's counts as a person reads them."""
    return ", ".join(f"{_amount(value)} {counter.replace('_', ' ')}" for counter, value in counts.items())


def _amount(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:.4g}"  # "0.04 audio seconds", not "0.0"


def cost(usage: Mapping[str, Mapping[str, float]], prices: Prices) -> dict[str, float]:
    """USD per stage (and ``"total"``) for ``usage`` under ``prices``; counters without a price cost nothing."""
    out: dict[str, float] = {}
    for stage, counts in usage.items():
        table = prices.get(stage, {})
        out[stage] = sum(amount * table.get(counter, 0.0) for counter, amount in counts.items())
    out["total"] = sum(out.values())
    return out
