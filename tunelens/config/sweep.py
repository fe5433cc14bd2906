"""The decoding configs of a study: `decoding.defaults` with the sweeps (mode one_at_a_time or grid) or the
explicit `decoding.configs` (mode list), each a DecodingConfig with its canonical name."""

from __future__ import annotations

import itertools
import math

from tunelens.config.problems import config_error
from tunelens.generation.decoding import DecodingConfig, knob_names
from tunelens.errors import ConfigError
from tunelens.settings import DecodingSection

MAX_DECODING_CONFIGS = 1000  # generation jobs = models x variants x configs (x evaluation sets)


def _expand_decoding(decoding: DecodingSection | dict) -> list[DecodingConfig]:
    decoding = DecodingSection.from_dict(decoding, where="decoding")
    defaults = {key: value for key, value in decoding.defaults.items() if key in knob_names()}
    mode = decoding.mode
    if mode == "list":
        if not decoding.configs:
            raise ConfigError("decoding.configs: empty, but decoding.mode is 'list'; give at least one config")
        configs = [DecodingConfig.from_dict(entry, defaults) for entry in decoding.configs]
        _check_duplicate_parameters(configs)
        return configs
    if decoding.configs:
        raise ConfigError(f"decoding.configs: only used with decoding.mode 'list' (mode is '{mode}')")
    problems = []
    for key, values in decoding.sweep.items():
        repeated = sorted({repr(v) for v in values if values.count(v) > 1})
        if repeated:
            problems.append(f"decoding.sweep.{key}: value(s) {', '.join(repeated)} given more than once")
    if problems:
        raise config_error(problems)
    sweep = {key: values for key, values in decoding.sweep.items() if values}
    count = 1 + sum(map(len, sweep.values())) if mode == "one_at_a_time" else math.prod(map(len, sweep.values()))
    if count > MAX_DECODING_CONFIGS:
        raise ConfigError(
            f"decoding.sweep: mode '{mode}' over {', '.join(f'{k} ({len(v)})' for k, v in sweep.items())} makes "
            f"{count} decoding configs, at most {MAX_DECODING_CONFIGS} (each is a generation and scoring job per "
            "model and variant); sweep fewer values, or use mode one_at_a_time")
    configs = [DecodingConfig.from_dict({}, defaults)]
    if mode == "one_at_a_time":
        for key, values in sweep.items():
            configs += [DecodingConfig.from_dict({key: value}, defaults) for value in values]
    else:  # grid
        keys = list(sweep)
        for combo in itertools.product(*(sweep[key] for key in keys)):
            configs.append(DecodingConfig.from_dict(dict(zip(keys, combo)), defaults))
    return configs


def _check_duplicate_parameters(configs: list[DecodingConfig]) -> None:
    """List mode: two names for the same parameters would generate (and score) the same thing twice."""
    first: dict[tuple, str] = {}
    problems = []
    for config in configs:
        parameters = tuple(value for key, value in config.as_dict().items() if key != "name")
        if parameters in first and first[parameters] != config.name:
            settings = ", ".join(f"{k}={v}" for k, v in config.as_dict().items() if k != "name")
            problems.append(f"decoding.configs: '{first[parameters]}' and '{config.name}' have the same parameters "
                            f"({settings}, after decoding.defaults); keep one")
        first.setdefault(parameters, config.name)
    if problems:
        raise config_error(problems)
