"""Load and validate a tunelens config, and derive what the DAG needs from it.

The JSON schema (derived from the typed sections of tunelens.settings, applied by tunelens.schema) checks types
and fills defaults; this package adds what a schema cannot say (model references, layers vs model depth,
decoding combinations, files that must exist) and builds typed views of the config: `ConfigSection` of the
whole config (`Study.settings`), `ModelSpec` per model (tunelens.config.models) and `DecodingConfig` per
decoding config (tunelens.config.sweep), each with a canonical name.

Kept free of torch/transformers imports: Snakemake imports it on every invocation, so it must be fast.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

# re-exported: callers and tests import these from here
from tunelens.config.files import (  # noqa: F401
    OFFLINE_VARIABLES, EvaluationSet, _check_data_source, _evaluation_sets, check_yaml_duplicates,
    load_default_config, prepare_job_environment,
)
from tunelens.config.models import (  # noqa: F401
    HUB_ID, MAX_MICRO_BATCH_TOKENS, MAX_OPTIMIZER_STEPS, MAX_TRAINING_TOKENS, RESERVED_MODEL_NAMES, VARIANTS,
    ModelSpec, _local_num_layers, _model_spec, generation_server_fields, resolve_layers, training_work_problems,
)
from tunelens.config.problems import Problems, _drop_non_finite, config_error, non_finite_numbers  # noqa: F401
from tunelens.config.sweep import MAX_DECODING_CONFIGS, _check_duplicate_parameters, _expand_decoding  # noqa: F401
from tunelens.generation.decoding import DecodingConfig, knob_names
from tunelens.generation.decoding import check as check_decoding_config
from tunelens.errors import ConfigError
from tunelens.schema import (  # noqa: F401
    SCHEMA_PATH, _key_path, _load_schema, fill_defaults_leniently, schema_errors, schema_message, validate_schema,
)
from tunelens.settings import ConfigSection
from tunelens.sources import DATA_EXTENSIONS, EMBEDDED_DATASETS, EMBEDDED_PREFIX, source_kind  # noqa: F401


@dataclass
class Study:
    """A validated config plus the typed views the DAG is built from."""

    config: dict
    models: dict[str, ModelSpec]
    decoding: dict[str, DecodingConfig]
    default_decoding: str
    evaluation_sets: dict[str, EvaluationSet] = field(default_factory=dict)
    # Dataset fields whose column must exist: instruction and output always, input when the config maps it
    # (mapping a column states that it exists; the default mapping of input may find no column: inputs "").
    mapped_fields: tuple[str, ...] = ("instruction", "output")
    # The config typed (tunelens.settings); built from `config` when not given.
    settings: ConfigSection = None  # type: ignore[assignment]
    dataset_kind: str = field(init=False)

    def __post_init__(self):
        if self.settings is None:
            self.settings = ConfigSection.from_dict(self.config)
        self.dataset_kind = source_kind(self.settings.dataset.source)

    @property
    def dataset_name(self) -> str:
        return self.settings.dataset.name


# Keys that were removed, with what to use instead (a clearer message than "unknown key").
REMOVED_KEYS = {
    ("dataset", "max_test"): (
        "was removed: it capped the test split by moving the other test rows into train, so raising the "
        "evaluation size re-fine-tuned every model. The split is now fixed by dataset.test_size and seed; "
        "set how many test rows are evaluated with decoding.max_test_rows (it never changes train.jsonl)"
    ),
}


def check_removed_keys(config: dict) -> None:
    for (section, key), message in REMOVED_KEYS.items():
        holder = config.get(section)
        if isinstance(holder, dict) and key in holder:
            raise ConfigError(f"{section}.{key}: {holder[key]!r}: {section}.{key} {message}")


def load_config(config: dict, *, base_dir: str | Path = ".", problems: list[str] | None = None) -> Study:
    """Validate `config` (defaults are filled in place) and return the Study built from it.

    Every problem is collected (schema, values, references between keys), then raised as one ConfigError
    naming each key and value. With `problems` (a list), they are appended there instead and the Study
    returned holds what could be built (tunelens.preflight adds the machine's checks and raises them all).
    """
    if not isinstance(config, dict) or not config:
        raise ConfigError("the config is empty; pass --configfile or keep config.yaml next to the Snakefile")
    found = Problems(problems)
    for path, value in non_finite_numbers(config):
        found.add(f"{path}: {value!r}: every number in the config must be finite (no .inf or .nan)")
    with found.check():
        check_removed_keys(config)
    # Checked on the config as given: default filling puts [] under every parameter (a config that went
    # through load_config already, every key present and all empty, is not a user's empty axis).
    sweep = config["decoding"].get("sweep") if isinstance(config.get("decoding"), dict) else None
    if isinstance(sweep, dict) and not (set(sweep) == set(knob_names()) and not any(sweep.values())):
        for key, values in sweep.items():
            if values == []:
                found.add(f"decoding.sweep.{key}: empty list; give the values to sweep, or leave the key out")
    given_fields = config["dataset"].get("fields") if isinstance(config.get("dataset"), dict) else None
    given_fields = given_fields if isinstance(given_fields, dict) else {}
    mapped_fields = ("instruction", "output") + (("input",) if given_fields.get("input") is not None else ())
    found.broken = bool(found.messages)
    _drop_non_finite(config)
    given_decoding = config.get("decoding") if isinstance(config.get("decoding"), dict) else {}
    listed = copy.deepcopy(given_decoding.get("configs")) if isinstance(given_decoding.get("configs"), list) else None
    schema_problems = schema_errors(config)
    found.messages += schema_problems
    found.broken = bool(found.messages)
    if schema_problems:
        fill_defaults_leniently(config)
    else:
        validate_schema(config)
    with found.check():
        if listed:
            # The schema filled each list entry with the parameters' own defaults; a parameter an entry leaves
            # out takes decoding.defaults instead (the documented meaning).
            defaults = config["decoding"]["defaults"]
            config["decoding"]["configs"] = [
                {**{key: defaults[key] for key in knob_names() if key in defaults}, **entry} if isinstance(entry, dict)
                else entry for entry in listed]
    base_dir = Path(base_dir)
    # Typed from here on; a config with schema errors leniently (what is there, as it is: the checks below that
    # meet a value of the wrong type drop their exception, the schema error is reported already).
    settings = ConfigSection.from_dict(config, lenient=found.broken)

    dataset = settings.dataset
    with found.check():
        _check_data_source(dataset.source, "dataset.source", base_dir)
    evaluation_sets: dict[str, EvaluationSet] = {}
    with found.check():
        evaluation_sets = _evaluation_sets(settings, base_dir)
    with found.check():
        check_case_collisions("evaluation_sets names", evaluation_sets)
    with found.check():
        test_size = dataset.test_size
        if test_size >= 1 and not float(test_size).is_integer():
            raise ConfigError(f"dataset.test_size: {test_size} is neither a fraction below 1 nor a whole count")
    with found.check():
        fields = dataset.fields
        for field, other in (("input", "instruction"), ("output", "instruction"), ("output", "input")):
            column = getattr(fields, field)
            if column is not None and column == getattr(fields, other):
                raise ConfigError(f"dataset.fields.{field}: '{column}' is the same column as "
                                  f"dataset.fields.{other}; map each field to its own column")

    models: dict[str, ModelSpec] = {}
    with found.check():
        check_case_collisions("models", settings.models)
    with found.check():
        reserved = sorted(set(settings.models) & RESERVED_MODEL_NAMES)
        if reserved:
            raise ConfigError(f"models: name(s) {reserved} are reserved (results/models/bertscore holds the BERTScore "
                              "model)")
    for name in (settings.models if isinstance(settings.models, dict) else ()):
        with found.check():
            models[name] = _model_spec(name, settings)

    decoding = settings.decoding
    backends = {spec.generation_backend for spec in models.values()}
    by_name: dict[str, DecodingConfig] = {}
    with found.check():
        configs = _expand_decoding(decoding)
        for index, decoding_config in enumerate(configs):
            where = f"decoding.configs[{index}]" if decoding.mode == "list" else f"decoding ({decoding_config.name})"
            with found.check():
                check_decoding_config(decoding_config, decoding.beam_mode, backends, where)
            if decoding_config.name in by_name and by_name[decoding_config.name] != decoding_config:
                found.add(f"{where}: name '{decoding_config.name}' is used by two different configs")
            by_name.setdefault(decoding_config.name, decoding_config)
    with found.check():
        check_case_collisions("decoding config names", by_name)
    default_name = None
    with found.check():
        default_name = settings.report.default_config or (next(iter(by_name)) if by_name else None)
        if by_name and default_name not in by_name:
            raise ConfigError(f"report.default_config: '{default_name}' is not a decoding config; known: "
                              f"{sorted(by_name)}")
    with found.check():
        for index, stop in enumerate(decoding.stop):
            if not stop.strip():
                found.add(f"decoding.stop[{index}]: {stop!r} is only whitespace; it would cut every answer at its "
                          "first space or line break")

    with found.check():
        early = settings.probe.early_exit
        check_decoding_config(
            DecodingConfig.from_dict(early.decoding), decoding.beam_mode, backends, "probe.early_exit.decoding"
        )

    with found.check():
        judge = settings.scoring.judge
        if judge.enabled and not judge.model:
            raise ConfigError("scoring.judge.model: required when scoring.judge.enabled is true")

    with found.check():
        bertscore = settings.scoring.bertscore
        if "bertscore" in settings.scoring.metrics and source_kind(bertscore.model) == "embedded":
            from tunelens.models import EMBEDDED_MODELS

            key = bertscore.model[len(EMBEDDED_PREFIX):]
            if EMBEDDED_MODELS.get(key, {}).get("role") != "encoder":
                choices = sorted(k for k, v in EMBEDDED_MODELS.items() if v.get("role") == "encoder")
                raise ConfigError(f"scoring.bertscore.model: unknown embedded encoder '{key}'; choices: {choices}")
            depth = EMBEDDED_MODELS[key]["num_layers"]
            if bertscore.num_layers and bertscore.num_layers > depth:
                raise ConfigError(f"scoring.bertscore.num_layers: {bertscore.num_layers} is beyond the depth of "
                                  f"{bertscore.model} ({depth} layers)")

    if problems is None:
        found.raise_any()
    try:
        return Study(
            config=config, models=models, decoding=by_name, default_decoding=default_name,
            evaluation_sets=evaluation_sets, mapped_fields=mapped_fields, settings=settings,
        )
    except (KeyError, TypeError, AttributeError):
        if not found.broken:
            raise
        raise config_error(found.messages) from None  # too broken for the checks that need a Study


def check_case_collisions(where: str, names) -> None:
    """Names become paths: two that differ only in case are one directory on macOS/Windows filesystems."""
    seen: dict[str, str] = {}
    for name in names:
        other = seen.setdefault(name.lower(), name)
        if other != name:
            raise ConfigError(f"{where}: '{other}' and '{name}' differ only in case; they would share result paths "
                              "on case-insensitive filesystems; rename one")
