"""The machinery of the typed config sections: `setting(...)` declares one config key as a dataclass field (its
default, help text and JSON-schema keywords, like tunelens.generation.decoding's `knob`), `section(...)` a nested section,
and `Section` is the base class that turns a section into its schema and a config dict into a typed object.

A section's schema (`object_schema`) is derived from its fields: each key's type keywords, default and
description; a field without a default is required. Nothing here imports the stages: Snakemake imports it on
every invocation.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import MISSING, field
from typing import Any, Callable

from tunelens.errors import ConfigError

REQUIRED = MISSING  # a key the config must give (the schema's `required`)


def setting(default: Any, help: str, *, schema: dict | Callable[[], dict], **targets: Any):
    """One config key. `schema`: its JSON-schema keywords besides default and description (or a function that
    returns them, for keywords known only at load time). `targets`: where the key goes in a library's own
    config, e.g. `sft="max_grad_norm"` (TRL's SFTConfig) or `lora="r"` (peft's LoraConfig), with an optional
    `sft_value=function` converting the value (see `Section.library_kwargs`)."""
    metadata = {"help": help, "schema": schema, **targets}
    if default is REQUIRED:
        return field(metadata=metadata)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def computed_setting(default: Callable[[], Any], help: str, *, schema: Callable[[], dict]):
    """A key whose default (and schema) is computed at load time (scoring.metrics: from the metric registry)."""
    return field(default_factory=default, metadata={"help": help, "schema": schema})


def section(cls: type, help: str, *, required: bool = False):
    """A nested section: an object in the config, `{}` by default (its keys take their own defaults)."""
    metadata = {"help": help, "section": cls}
    return field(metadata=metadata) if required else field(default_factory=cls, metadata=metadata)


def entries(cls: type, help: str, default: Any = REQUIRED, *, schema: dict, keyed: bool = False):
    """A list (or, `keyed`, a name -> entry mapping) of `cls` entries: evaluation_sets, models."""
    return setting(default, help, schema=schema, **{"values" if keyed else "items": cls})


def _default(spec: dataclasses.Field) -> Any:
    if spec.default is not MISSING:
        return spec.default
    if spec.default_factory is not MISSING:
        value = spec.default_factory()
        return {} if isinstance(value, Section) else value
    return MISSING


def _schema_keywords(spec: dataclasses.Field) -> dict:
    schema = spec.metadata["schema"]
    return dict(schema() if callable(schema) else schema)


def default_of(cls: type, name: str) -> Any:
    """The default of key `name` of section `cls` (a fresh copy of a list or dict), for code outside the config
    that takes the same setting: its default is then the config's."""
    (spec,) = [spec for spec in settings_fields(cls) if spec.name == name]
    return copy.deepcopy(_default(spec))


def field_schema(spec: dataclasses.Field) -> dict:
    """One key's schema: its type keywords, default and description (a nested section: its object schema)."""
    metadata = spec.metadata
    if "section" in metadata:
        node = object_schema(metadata["section"])
    else:
        node = _schema_keywords(spec)
        if "items" in metadata:
            node["items"] = object_schema(metadata["items"])
        if "values" in metadata:
            node["additionalProperties"] = object_schema(metadata["values"])
    default = _default(spec)
    if default is not MISSING:
        node["default"] = copy.deepcopy(default)
    node["description"] = metadata["help"]
    return node


def object_schema(cls: type) -> dict:
    """The schema of a section: an object with exactly its keys; those without a default are required."""
    specs = settings_fields(cls)
    node: dict = {"type": "object", "additionalProperties": False}
    required = [spec.name for spec in specs if _default(spec) is MISSING]
    if required:
        node["required"] = required
    node["properties"] = {spec.name: field_schema(spec) for spec in specs}
    return node


def settings_fields(cls) -> tuple[dataclasses.Field, ...]:
    """The config keys of a section (a class or an instance), in declaration order (the order defaults are
    filled in)."""
    return _fields(cls if isinstance(cls, type) else type(cls))


@functools.lru_cache(maxsize=None)
def _fields(cls: type) -> tuple[dataclasses.Field, ...]:
    return tuple(spec for spec in dataclasses.fields(cls) if "help" in spec.metadata)


def _typed(spec: dataclasses.Field, value: Any, where: str, lenient: bool) -> Any:
    metadata = spec.metadata
    if "section" in metadata:
        return metadata["section"].from_dict(value, where=where, lenient=lenient)
    if "items" in metadata and isinstance(value, list):
        return [metadata["items"].from_dict(entry, where=f"{where}[{index}]", lenient=lenient)
                for index, entry in enumerate(value)]
    if "values" in metadata and isinstance(value, dict):
        return {name: metadata["values"].from_dict(entry, where=f"{where}.{name}", lenient=lenient)
                for name, entry in value.items()}
    return value


class Section:
    """Base of the config sections (dataclasses whose fields are `setting`s and `section`s).

    `from_dict` reads a config section (the keys the schema filled in included); `as_dict` gives it back
    with its keys in the order they were given, then the others in declaration order, which is the order
    schema default filling leaves them in, so records written from a section are the config's bytes.
    """

    _given = ()  # key order of the dict the section was read from

    @classmethod
    def from_dict(cls, values: Any, *, where: str = "", lenient: bool = False):
        """A typed section from a config dict; a missing key takes its default. `lenient` (a config with
        schema errors, reported already): unknown keys are dropped, a missing required key is None and a value
        that is not a section is kept as it is, so that the other checks can still read what is there."""
        if isinstance(values, cls):
            return values
        if not isinstance(values, dict):
            if lenient:
                return values
            raise TypeError(f"{where or cls.__name__}: {values!r} is not a mapping")
        specs = {spec.name: spec for spec in settings_fields(cls)}
        unknown = sorted(set(values) - set(specs))
        if unknown and not lenient:
            raise ConfigError(f"{where or cls.__name__}: unknown key(s) {unknown}; allowed: {sorted(specs)}")
        given = {}
        for name, spec in specs.items():
            key = f"{where}.{name}" if where else name
            if name in values:
                given[name] = _typed(spec, values[name], key, lenient)
            elif _default(spec) is MISSING:
                if not lenient:
                    raise ConfigError(f"{key}: required")
                given[name] = None
        instance = cls(**given)
        object.__setattr__(instance, "_given", tuple(name for name in values if name in specs))
        return instance

    def as_dict(self) -> dict[str, Any]:
        """The section as config values (nested sections as dicts)."""
        names = [spec.name for spec in settings_fields(self)]
        order = [*self._given, *(name for name in names if name not in self._given)]
        return {name: _plain(getattr(self, name)) for name in order}

    def replace(self, **changes):
        """A copy with `changes` (the key order of the original kept)."""
        instance = dataclasses.replace(self, **changes)
        object.__setattr__(instance, "_given", self._given)
        return instance

    def library_kwargs(self, target: str) -> dict[str, Any]:
        """The keys declared with `target=<argument>` as that library's keyword arguments (e.g. `sft`: TRL's
        SFTConfig), each converted by its `<target>_value` function when it has one."""
        kwargs = {}
        for spec in settings_fields(self):
            if target in spec.metadata:
                convert = spec.metadata.get(f"{target}_value", lambda value: value)
                kwargs[spec.metadata[target]] = convert(getattr(self, spec.name))
        return kwargs

    @classmethod
    def schema(cls) -> dict:
        return object_schema(cls)


def _plain(value: Any) -> Any:
    if isinstance(value, Section):
        return value.as_dict()
    if isinstance(value, list):
        return [_plain(entry) for entry in value]
    if isinstance(value, dict):
        return {key: _plain(entry) for key, entry in value.items()}
    return value
