"""The config schema: derived from the typed config sections (tunelens.settings), with the few parts that are
not a section's key in schemas/config.schema.yaml; validation with readable errors, and default filling (as
snakemake.utils.validate(set_default=True) does).

From code (one source each): every config key's type, default and description (tunelens.settings), the decoding
parameters (tunelens.generation.decoding.DecodingConfig: `$defs/decoding_config` and `decoding.sweep`) and the choices and
default of `scoring.metrics` (the metric registry, tunelens.scoring.metrics, read by tunelens.settings.scoring).
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import yaml

from tunelens.generation.decoding import schema_properties
from tunelens.errors import ConfigError
from tunelens.settings import config_schema

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "config.schema.yaml"


@functools.lru_cache(maxsize=1)
def _written_schema() -> dict:
    # Parsed once per process: pure-Python YAML took ~0.5 s per parse of the old hand-written schema, and every
    # Snakemake invocation (and every job, which re-parses the workflow) used to parse it 4 times.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with SCHEMA_PATH.open(encoding="utf-8") as handle:
        return yaml.load(handle, Loader=loader)


def _load_schema() -> dict:
    """The config schema, built on every call (~0.3 ms; a fresh object, callers may modify it): the sections of
    tunelens.settings, the decoding parameters of tunelens.generation.decoding and what
    schemas/config.schema.yaml adds. What code computes is read now, not cached: a metric registered after the
    first load (a plugin's register()) is a `scoring.metrics` choice at once."""
    written = copy.deepcopy(_written_schema())
    schema = {"$schema": written["$schema"], **config_schema(), "$defs": written["$defs"]}
    # Decoding parameters: type, default and description from tunelens.generation.decoding.DecodingConfig.
    schema["$defs"]["decoding_config"]["properties"].update(schema_properties())
    return schema


def _defaults_validator(schema: dict):
    import jsonschema

    base = jsonschema.Draft202012Validator
    validate_properties = base.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, subschema):
        if isinstance(instance, dict):
            for name, property_schema in properties.items():
                if "default" in property_schema:
                    # a copy: the schema is cached, its default objects must never end up in a config
                    instance.setdefault(name, copy.deepcopy(property_schema["default"]))
        yield from validate_properties(validator, properties, instance, subschema)

    return jsonschema.validators.extend(base, {"properties": set_defaults})(schema)


def _fill_defaults(config: dict, schema: dict) -> None:
    """Fill schema defaults into `config` in place, as snakemake.utils.validate(set_default=True) does."""
    _defaults_validator(schema).validate(config)


def fill_defaults_leniently(config: dict) -> None:
    """Fill defaults into a config that has schema errors (already reported), wherever the schema reaches,
    so the other checks can still run and report their problems in the same message."""
    validator = _defaults_validator(_load_schema())
    for _ in range(2):  # nested objects given as `default: {}` get their own defaults on the second pass
        for _ in validator.iter_errors(config):
            pass


def _key_path(parts) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<config root>"


def schema_errors(config: dict) -> list[str]:
    """Readable schema violations: 'key.path: message'. Empty when the config is valid."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(_load_schema())
    messages = []
    for error in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path))):
        where = _key_path(error.absolute_path)
        messages.append(schema_message(error))
    return messages


def schema_message(error, prefix: str = "") -> str:
    """'key.path: problem' for one jsonschema error; bounds say the value and the bound."""
    where = prefix + _key_path(error.absolute_path) if prefix else _key_path(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed)) if isinstance(error.instance, dict) else []
        return f"{where}: unknown key(s) {extra}; allowed: {allowed}"
    if error.validator in ("maximum", "exclusiveMaximum"):
        return f"{where}: {error.instance!r}: at most {error.validator_value}" + (
            " (exclusive)" if error.validator == "exclusiveMaximum" else "")
    return f"{where}: {error.message}"


def validate_schema(config: dict) -> None:
    """Check `config` against the schema and fill defaults in place (as snakemake.utils.validate does)."""
    errors = schema_errors(config)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    schema = _load_schema()
    _fill_defaults(config, schema)
    # Defaults of objects that are present get filled; nested objects given as `default: {}` only get
    # their own defaults on a second pass.
    _fill_defaults(config, schema)
