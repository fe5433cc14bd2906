"""Decoding settings: `DecodingConfig` is the one definition of every decoding parameter.

Each parameter is a dataclass field declared with `knob(...)`: its default, help text, JSON-schema type and
the tag it contributes to the config's canonical name. Everything else is derived from the fields:
- the config schema's `$defs/decoding_config` and `decoding.sweep` entries (tunelens.config fills them in at
  load time: default, type and description come from here);
- `from_dict` / `as_dict` (rule params, the generation sidecar's `decoding_config`, the report's sweep table);
- the canonical name (also the generation file name).
The two backends read a config through `hf_generation_kwargs` and `vllm_sampling_kwargs` below. A new decoding
parameter is therefore one field plus one line in each mapping; tests/test_decoding_settings.py adds one that
way and finds it in the schema, the sidecar and the report's sweep table.

Checks that involve other settings (beam_sample needs temperature > 0 and the hf backend) are `check` below,
run once per config when the config is loaded (tunelens.config) and again by library callers of generate.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

from tunelens.errors import ConfigError

BEAM_MODES = ("beam_search", "beam_sample")


def knob(default: Any, help: str, *, schema: dict, tag: str, always_named: bool = False):
    """A decoding parameter: `tag` names it in the canonical config name, always (`always_named`) or only
    when it differs from its default (so adding a parameter does not rename existing files)."""
    return field(default=default, metadata={"help": help, "schema": schema, "tag": tag, "always_named": always_named})


@dataclass(frozen=True)
class DecodingConfig:
    """One decoding configuration (see the module docstring: every parameter is a `knob`)."""

    top_k: int = knob(50, "Sampling: keep only the k most likely tokens; 0 = off. Ignored when not sampling.",
                      schema={"type": "integer", "minimum": 0}, tag="top_k", always_named=True)
    num_beams: int = knob(1, "Beams; > 1 = beam search (decoding.beam_mode says which kind).",
                          schema={"type": "integer", "minimum": 1, "maximum": 64}, tag="num_beams",
                          always_named=True)
    temperature: float = knob(0.8, "Sampling temperature; 0 = greedy (argmax at every step).",
                              schema={"type": "number", "minimum": 0}, tag="temp", always_named=True)
    top_p: float = knob(1.0, "Sampling: keep the smallest token set with this total probability; 1 = off.",
                        schema={"type": "number", "exclusiveMinimum": 0, "maximum": 1}, tag="top_p")
    repetition_penalty: float = knob(
        1.0, "Divide positive / multiply negative logits of tokens already in prompt or output; 1 = off.",
        schema={"type": "number", "exclusiveMinimum": 0}, tag="rep")
    explicit_name: str | None = None

    @property
    def name(self) -> str:
        """Canonical name, e.g. 'top_k_50_num_beams_1_temp_0.8' (also the generation file name)."""
        if self.explicit_name:
            return self.explicit_name
        parts = []
        for spec in knobs():
            value = getattr(self, spec.name)
            if spec.metadata["always_named"] or value != spec.default:
                parts.append(f"{spec.metadata['tag']}_{_name_value(value, spec.default)}")
        return "_".join(parts)

    @property
    def is_beam(self) -> bool:
        return self.num_beams > 1

    @property
    def is_greedy(self) -> bool:
        return self.num_beams == 1 and self.temperature == 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, **{spec.name: getattr(self, spec.name) for spec in knobs()}}

    @classmethod
    def from_dict(cls, values: dict, defaults: dict | None = None) -> "DecodingConfig":
        """From config/params values (`name` = an explicit name); missing parameters take `defaults`, then
        the field defaults. Values are coerced to the field's type (a YAML 1 for a float field is 1.0)."""
        merged = {**(defaults or {}), **values}
        unknown = sorted(set(merged) - set(knob_names()) - {"name"})
        if unknown:
            raise ConfigError(f"decoding config: unknown parameter(s) {unknown}; known: {list(knob_names())}")
        given = {spec.name: type(spec.default)(merged[spec.name]) for spec in knobs() if spec.name in merged}
        return cls(**given, explicit_name=values.get("name"))


def _name_value(value: Any, default: Any) -> str:
    """50 -> '50'; float parameters always carry a decimal point, as users write them: 0.8 -> '0.8', 1 -> '1.0'."""
    return repr(float(value)) if isinstance(default, float) else str(value)


def knobs() -> tuple[dataclasses.Field, ...]:
    """The decoding parameters, in declaration order."""
    return tuple(spec for spec in dataclasses.fields(DecodingConfig) if "help" in spec.metadata)


def knob_names() -> tuple[str, ...]:
    return tuple(spec.name for spec in knobs())


def schema_properties() -> dict[str, dict]:
    """`$defs/decoding_config` properties: type, default and description of each parameter."""
    return {spec.name: {**spec.metadata["schema"], "default": spec.default, "description": spec.metadata["help"]}
            for spec in knobs()}


def sweep_schema_properties() -> dict[str, dict]:
    """`decoding.sweep` properties: a list of values per parameter."""
    return {spec.name: {"type": "array", "items": dict(spec.metadata["schema"]), "default": [],
                        "description": f"Values of {spec.name} to sweep (empty = not swept)."}
            for spec in knobs()}


def check(config: DecodingConfig, beam_mode: str, backends: Sequence[str], where: str) -> None:
    """What a decoding config needs from the other settings: beam_sample needs temperature > 0 and the hf
    backend (vLLM only does deterministic beam search)."""
    if beam_mode not in BEAM_MODES:
        raise ConfigError(f"decoding.beam_mode: '{beam_mode}' is unknown; choices: {BEAM_MODES}")
    if config.is_beam and beam_mode == "beam_sample" and "vllm" in backends:
        raise ConfigError(
            f"{where}: num_beams={config.num_beams} with decoding.beam_mode 'beam_sample' needs the hf backend; "
            "vLLM only does deterministic beam search (set decoding.beam_mode: beam_search or generation.backend: hf)"
        )
    if config.is_beam and config.temperature == 0.0 and beam_mode == "beam_sample":
        raise ConfigError(f"{where}: beam_sample with temperature 0 is undefined; use beam_mode: beam_search")


# --------------------------------------------------------------------------------------------- backends
def hf_generation_kwargs(dc: DecodingConfig, *, sample: bool) -> dict[str, Any]:
    """The parameters as transformers GenerationConfig arguments. Not sampling: neutral values, so no
    warper changes the argmax/beam scores."""
    return {
        "num_beams": dc.num_beams,
        "temperature": dc.temperature if sample else 1.0,
        "top_k": dc.top_k if sample else 0,
        "top_p": dc.top_p if sample else 1.0,
        "repetition_penalty": dc.repetition_penalty,
    }


def vllm_sampling_kwargs(dc: DecodingConfig, *, greedy: bool) -> dict[str, Any]:
    """The parameters as vLLM SamplingParams arguments (sampling and greedy; beam search is separate)."""
    return {
        "temperature": 0.0 if greedy else dc.temperature,
        # vLLM: top_k 0 (or -1) = off; set explicitly so transformers' implicit 50 never leaks in.
        "top_k": 0 if greedy else dc.top_k,
        "top_p": 1.0 if greedy else dc.top_p,
        "repetition_penalty": dc.repetition_penalty,
    }
