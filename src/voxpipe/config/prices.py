"""List prices of the built-in cloud providers, in USD per unit of each usage counter — what a call's cost is
computed from unless the config's ``pricing:`` says otherwise.

These are public pay-as-you-go list prices as written down in November 2026, rounded; plans, volume discounts and
model changes move them. Put your own in the config (``pricing: {llm: {input_tokens: 5.0e-6}}``) for figures you
can bill by. Local providers cost nothing here (their cost is the machine).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from voxpipe.pipeline.usage import (
    AUDIO_SECONDS,
    CACHE_READ_TOKENS,
    CACHE_WRITE_1H_TOKENS,
    CACHE_WRITE_TOKENS,
    CHARACTERS,
    INPUT_TOKENS,
    OUTPUT_TOKENS,
)


def _claude(input_per_million: float, output_per_million: float) -> dict[str, float]:
    """A Claude model's prices: prompt-cache writes cost 1.25x the input price (5-minute cache) and 2x (1-hour
    cache), reads 0.1x."""
    per_token = input_per_million * 1e-6
    return {
        INPUT_TOKENS: per_token,
        OUTPUT_TOKENS: output_per_million * 1e-6,
        CACHE_WRITE_TOKENS: 1.25 * per_token,
        CACHE_WRITE_1H_TOKENS: 2.0 * per_token,
        CACHE_READ_TOKENS: 0.1 * per_token,
    }


# By stage kind and provider, then by model. A model id matches its own entry or the entry with one of its
# provider's SAME_MODEL suffixes (a dated snapshot: "claude-haiku-4-5-20251001"). A provider listed here is metered: a
# model it does not list has no list price, and the call says so rather than pricing it as another model.
LIST_PRICES: dict[str, dict[str, dict[str, float]]] = {
    "stt.deepgram": {  # streaming, per minute
        "nova-3": {AUDIO_SECONDS: 0.0077 / 60},
        "nova-2": {AUDIO_SECONDS: 0.0058 / 60},
    },
    "llm.anthropic": {  # per million tokens, input and output
        "claude-opus-4-7": _claude(5, 25),
        "claude-opus-4-6": _claude(5, 25),
        "claude-opus-4-5": _claude(5, 25),
        "claude-opus-4-1": _claude(15, 75),
        "claude-opus-4": _claude(15, 75),
        "claude-sonnet-4-6": _claude(3, 15),
        "claude-sonnet-4-5": _claude(3, 15),
        "claude-sonnet-4": _claude(3, 15),
        "claude-haiku-4-5": _claude(1, 5),
    },
    "tts.elevenlabs": {  # per thousand characters
        "eleven_flash_v2_5": {CHARACTERS: 0.05e-3},
        "eleven_turbo_v2_5": {CHARACTERS: 0.05e-3},
        "eleven_multilingual_v2": {CHARACTERS: 0.10e-3},
        "eleven_v3": {CHARACTERS: 0.10e-3},
    },
    "tts.cartesia": {  # per thousand characters
        "sonic-3": {CHARACTERS: 0.03e-3},
        "sonic-2": {CHARACTERS: 0.03e-3},
        "sonic-turbo": {CHARACTERS: 0.03e-3},
    },
}


# What a provider's model id may add to a listed model and still be that model: a dated snapshot or an alias. Any
# other suffix is another model ("claude-opus-4-8" is not "claude-opus-4"; "nova-3-medical" is not "nova-3").
SAME_MODEL: dict[str, str] = {
    "stt.deepgram": r"-general",  # nova-3-general is nova-3
    "llm.anthropic": r"-\d{8}|-latest",  # claude-haiku-4-5-20251001
    "tts.cartesia": r"-\d{4}-\d{2}-\d{2}|-latest",  # sonic-2-2025-03-07
}


def list_price(kind: str, provider: str, model: str | None) -> dict[str, float] | None:
    """The list prices of ``model`` of the ``kind`` stage's ``provider``: empty for a provider that is not metered
    (local ones), None for a metered one's model this table does not know."""
    models = LIST_PRICES.get(f"{kind}.{provider}")
    if models is None:
        return {}
    if model is None:
        return None
    suffix = SAME_MODEL.get(f"{kind}.{provider}", r"(?!)")  # (?!) matches nothing: a provider with none (ElevenLabs)
    for name, prices in models.items():
        if re.fullmatch(rf"{re.escape(name)}(?:{suffix})?", model):
            return dict(prices)
    return None


# A stage kind -> its provider and (for a provider with models) the model the config chose.
Stages = Mapping[str, tuple[str, str | None]]


def price_table(stages: Stages, overrides: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Prices by stage kind: each stage's list prices, updated with the config's ``pricing``."""
    table: dict[str, dict[str, float]] = {}
    for kind, (provider, model) in stages.items():
        table[kind] = {**(list_price(kind, provider, model) or {}), **overrides.get(kind, {})}
    return table


def unpriced(stages: Stages, overrides: Mapping[str, Mapping[str, float]]) -> dict[str, str]:
    """By stage kind, why some of a metered stage's usage costs 0 here: its model has no list price, and the
    config's ``pricing`` sets none, or not for every counter the provider's models are priced by."""
    problems: dict[str, str] = {}
    for kind, (provider, model) in stages.items():
        if list_price(kind, provider, model) is not None:
            continue
        given = overrides.get(kind, {})
        counters = {counter for prices in LIST_PRICES[f"{kind}.{provider}"].values() for counter in prices}
        free = sorted(counters - set(given))
        if not given:
            problems[kind] = (
                f"{kind}: no list price for {provider} model {model!r}; its usage is counted at no cost (set "
                f"pricing.{kind} in the config)"
            )
        elif free:
            problems[kind] = (
                f"{kind}: no list price for {provider} model {model!r}, and pricing.{kind} sets no price for "
                f"{', '.join(free)}: counted at no cost"
            )
    return problems
