"""Config section `probe` and its `early_exit` part."""

from __future__ import annotations

from dataclasses import dataclass

from tunelens.settings.base import Section, section, setting


@dataclass(frozen=True, kw_only=True)
class EarlyExitSection(Section):
    enabled: bool = setting(True, "Generate (and score) answers from each probe layer.",
        schema={"type": "boolean"})
    max_test_rows: int | None = setting(16, "Early-exit answers for the first N test rows; null = all.",
        schema={"type": ["integer", "null"], "minimum": 1})
    max_new_tokens: int = setting(64, "Cap on generated tokens per early-exit answer.",
        schema={"type": "integer", "minimum": 1, "maximum": 32768})
    decoding: dict = setting({"temperature": 0.0}, "Decoding config for early-exit generation (greedy by default).",
        schema={"$ref": "#/$defs/decoding_config"})


@dataclass(frozen=True, kw_only=True)
class ProbeSection(Section):
    enabled: bool = setting(True, "Run the logit lens and early-exit generation for every model and variant.",
        schema={"type": "boolean"})
    layers: list = setting([0.25, 0.5, 0.75, 1.0],
        "Absolute layer numbers (integers >= 1, e.g. 8, 16, 24, 32) or fractions of depth (0 < f <= 1.0). Layer L = "
        "output of decoder block L.",
        schema={"type": "array", "minItems": 1, "items": {"type": "number", "exclusiveMinimum": 0}})
    lens_prompts: list = setting(["Calculate the atomic mass for lithium."],
        "Instructions to lens (built into each model's prompt format, like a test row with no input).",
        schema={"type": "array", "items": {"type": "string", "minLength": 1}})
    lens_test_prompts: int = setting(2, "Also lens the first K test prompts.",
        schema={"type": "integer", "minimum": 0, "maximum": 10000})
    lens_top_k: int = setting(5, "Tokens (with probabilities) kept per prompt, position and layer in lens.json.",
        schema={"type": "integer", "minimum": 1, "maximum": 1000})
    lens_new_tokens: int = setting(8,
        "Positions read = the prompt's last token plus this many greedy continuation tokens.",
        schema={"type": "integer", "minimum": 1, "maximum": 4096})
    early_exit: EarlyExitSection = section(EarlyExitSection,
        "Answers generated from intermediate layers (the final norm and LM head applied to a layer's output).")
