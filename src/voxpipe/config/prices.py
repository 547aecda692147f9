"""List prices of the built-in cloud providers, in USD per unit of each usage counter — what a call's cost is
computed from unless the config's ``pricing:`` says otherwise.

These are public pay-as-you-go list prices as written down in November 2026, rounded; plans, volume discounts and
model changes move them. Put your own in the config (``pricing: {llm: {input_tokens: 5.0e-6}}``) for figures you
can bill by. Local providers cost nothing here (their cost is the machine).
"""

from __future__ import annotations

from voxpipe.pipeline.usage import (
    AUDIO_SECONDS,
    CACHE_READ_TOKENS,
    CACHE_WRITE_1H_TOKENS,
    CACHE_WRITE_TOKENS,
    CHARACTERS,
    INPUT_TOKENS,
    OUTPUT_TOKENS,
)

LIST_PRICES: dict[str, dict[str, float]] = {
    "stt.deepgram": {AUDIO_SECONDS: 0.0077 / 60},  # Nova-3 streaming, $0.0077 per minute
    # Claude Opus, per million tokens: $5 input, $25 output; prompt-cache writes 1.25x input for the 5-minute cache,
    # $6.25, and 2x input for the 1-hour cache, $10; reads 0.1x input, $0.50.
    "llm.anthropic": {
        INPUT_TOKENS: 5.0e-6,
        OUTPUT_TOKENS: 25.0e-6,
        CACHE_WRITE_TOKENS: 6.25e-6,
        CACHE_WRITE_1H_TOKENS: 10.0e-6,
        CACHE_READ_TOKENS: 0.5e-6,
    },
    "tts.elevenlabs": {CHARACTERS: 0.05e-3},  # Flash v2.5, ~$0.05 per thousand characters
    "tts.cartesia": {CHARACTERS: 0.03e-3},  # Sonic, ~$0.03 per thousand characters
}


def price_table(providers: dict[str, str], overrides: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Prices by stage kind: the list price of each stage's provider, updated with the config's ``pricing``."""
    table: dict[str, dict[str, float]] = {}
    for kind, provider in providers.items():
        table[kind] = {**LIST_PRICES.get(f"{kind}.{provider}", {}), **overrides.get(kind, {})}
    return table
