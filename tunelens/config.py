"""Load and validate a tunelens config, and derive what the DAG needs from it.

The JSON schema (schemas/config.schema.yaml, loaded and applied by tunelens.schema) checks types and fills
defaults; this module adds what a schema cannot say (model references, layers vs
model depth, decoding combinations, files that must exist) and builds typed views of the config:
`ModelSpec` per model and `DecodingConfig` per decoding config, each with a canonical name.

Kept free of torch/transformers imports: Snakemake imports it on every invocation, so it must be fast.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tunelens.decoding import DecodingConfig, knob_names
from tunelens.decoding import check as check_decoding_config
from tunelens.errors import ConfigError
from tunelens.settings import FinetuneSection
# re-exported: callers and tests import the schema helpers from here
from tunelens.schema import (  # noqa: F401
    SCHEMA_PATH, _key_path, _load_schema, fill_defaults_leniently, schema_errors, schema_message, validate_schema,
)
from tunelens.sources import DATA_EXTENSIONS, EMBEDDED_DATASETS, EMBEDDED_PREFIX, source_kind  # noqa: F401


HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
VARIANTS = ("base", "finetuned")
RESERVED_MODEL_NAMES = {"bertscore"}
# Tokens of one fine-tune micro-batch (batch_size x max_seq_length): above this, logits alone
# (tokens x vocabulary x 4 bytes) exceed any GPU's memory for a 32k vocabulary.
MAX_MICRO_BATCH_TOKENS = 1_048_576
# Work bounds: a fine-tune of more optimizer steps or training tokens than these is a typo (1e9 epochs), not
# a study: 1e11 tokens is ~a year of QLoRA on one H200 for a 7B model.
MAX_OPTIMIZER_STEPS = 1_000_000
MAX_TRAINING_TOKENS = 10**11
MAX_DECODING_CONFIGS = 1000  # generation jobs = models x variants x configs (x evaluation sets)


# --------------------------------------------------------------------------------------------- problems
def config_error(problems: list[str]) -> ConfigError:
    """One ConfigError listing every problem (its `.problems`), so a user fixes them all in one run."""
    problems = list(dict.fromkeys(problems))
    message = problems[0] if len(problems) == 1 else f"{len(problems)} problems:\n  " + "\n  ".join(problems)
    error = ConfigError(message)
    error.problems = problems
    return error


class Problems:
    """Collects the problems of a config instead of stopping at the first one.

    `with problems.check():` around one independent check records its ConfigError. Once the config has
    schema errors (`broken`), a later check may meet a value of the wrong type or a missing key; such an
    exception is the schema error's consequence, already reported, and is dropped.
    """

    def __init__(self, messages: list[str] | None = None):
        self.messages: list[str] = messages if messages is not None else []
        self.broken = False

    def add(self, message: str) -> None:
        self.messages.append(message)

    @contextlib.contextmanager
    def check(self):
        try:
            yield
        except ConfigError as exc:
            self.messages.extend(getattr(exc, "problems", None) or [str(exc)])
        except (KeyError, TypeError, ValueError, AttributeError, IndexError):
            if not self.broken:
                raise

    def raise_any(self) -> None:
        if self.messages:
            raise config_error(self.messages)


def non_finite_numbers(node, path: str = "") -> list[tuple[str, float]]:
    """(key path, value) of every NaN or infinite number anywhere in the config."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            found += non_finite_numbers(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += non_finite_numbers(value, f"{path}[{index}]")
    elif isinstance(node, float) and not math.isfinite(node):
        found.append((path, node))
    return found


def _drop_non_finite(node) -> None:
    """Remove NaN/infinite values (already reported) so the other checks see defaults, not NaN."""
    if isinstance(node, dict):
        for key in [k for k, v in node.items() if isinstance(v, float) and not math.isfinite(v)]:
            del node[key]
        for value in node.values():
            _drop_non_finite(value)
    elif isinstance(node, list):
        node[:] = [v for v in node if not (isinstance(v, float) and not math.isfinite(v))]
        for value in node:
            _drop_non_finite(value)


# --------------------------------------------------------------------------------------------- jobs
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def prepare_job_environment(workflow_dir: str) -> None:
    """Environment every job inherits (local, conda or SLURM: Snakemake re-imports common.smk in each).

    Jobs import tunelens from the workflow's checkout whichever Python runs them, and run offline unless
    the user exported HF_HUB_OFFLINE=0 (and friends) to allow hub downloads.
    """
    paths = [workflow_dir, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    for variable in OFFLINE_VARIABLES:
        os.environ.setdefault(variable, "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# --------------------------------------------------------------------------------------------- decoding
def _expand_decoding(decoding: dict) -> list[DecodingConfig]:
    defaults = {key: decoding["defaults"][key] for key in knob_names()}
    mode = decoding["mode"]
    if mode == "list":
        if not decoding["configs"]:
            raise ConfigError("decoding.configs: empty, but decoding.mode is 'list'; give at least one config")
        configs = [DecodingConfig.from_dict(entry, defaults) for entry in decoding["configs"]]
        _check_duplicate_parameters(configs)
        return configs
    if decoding["configs"]:
        raise ConfigError(f"decoding.configs: only used with decoding.mode 'list' (mode is '{mode}')")
    problems = []
    for key, values in decoding["sweep"].items():
        repeated = sorted({repr(v) for v in values if values.count(v) > 1})
        if repeated:
            problems.append(f"decoding.sweep.{key}: value(s) {', '.join(repeated)} given more than once")
    if problems:
        raise config_error(problems)
    sweep = {key: values for key, values in decoding["sweep"].items() if values}
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


# --------------------------------------------------------------------------------------------- layers
def resolve_layers(layers: list, num_layers: int, model_name: str) -> list[int]:
    """Turn layer specs into sorted unique 1-based layer numbers for a model of `num_layers` blocks.

    Integers are absolute (8 = output of block 8); floats in (0, 1] are fractions of depth
    (0.5 of 30 -> 15, rounding half up, at least 1). A layer beyond the model's depth is an error.
    """
    resolved = []
    for spec in layers:
        if isinstance(spec, bool):
            raise ConfigError(f"model '{model_name}': probe layer {spec!r} is not a number")
        if isinstance(spec, int):
            layer = spec
        elif isinstance(spec, float) and 0 < spec <= 1:
            layer = max(1, math.floor(spec * num_layers + 0.5))
        elif isinstance(spec, float) and spec.is_integer():
            layer = int(spec)
        else:
            raise ConfigError(
                f"model '{model_name}': probe layer {spec!r} is neither an integer layer nor a fraction in (0, 1]"
            )
        if not 1 <= layer <= num_layers:
            raise ConfigError(
                f"model '{model_name}': probe layer {spec!r} is beyond its depth ({num_layers} decoder layers)"
            )
        resolved.append(layer)
    return sorted(set(resolved))


# --------------------------------------------------------------------------------------------- models
@dataclass
class ModelSpec:
    """A model entry after validation, with per-model fine-tune settings merged over the defaults."""

    name: str
    source: str
    source_kind: str  # embedded | local | hub
    prompt_format: str
    revision: str | None
    num_layers: int | None
    finetune: dict
    resources: dict
    layer_specs: list
    generation_backend: str
    probe_layers: list[int] | None = None  # resolved when num_layers is known

    @property
    def finetuned(self) -> bool:
        return bool(self.finetune["enabled"])

    @property
    def variants(self) -> tuple[str, ...]:
        return VARIANTS if self.finetuned else ("base",)

    @property
    def embedded_name(self) -> str | None:
        return self.source[len(EMBEDDED_PREFIX):] if self.source_kind == "embedded" else None


def _local_num_layers(path: Path, where: str) -> int | None:
    """Depth from a local model's config.json; an unreadable or corrupt one fails naming its path."""
    from tunelens.modelfiles import ModelFileProblem, num_layers, read_config_json

    try:
        return num_layers(read_config_json(path))
    except ModelFileProblem as exc:
        raise ConfigError(f"{where}: {exc}") from None


def generation_server_fields(config: dict, model: str) -> dict:
    """The config's part of a model's generation-server key (tunelens.genserver.server_key): its generation
    backend and the vLLM engine options. Generate jobs pass them as params; early_exit jobs read them here
    from the config, so they key the same server (one model load) without rerunning when they change."""
    generation = config["generation"]
    return {
        "backend": config["models"][model].get("generation_backend") or generation["backend"],
        "vllm_options": {"max_lora_rank": generation["vllm_max_lora_rank"],
                         "gpu_memory_utilization": generation["vllm_gpu_memory_utilization"]},
    }


def training_work_problems(where: str, finetune: dict, rows: int | None) -> list[str]:
    """A fine-tune's work against MAX_OPTIMIZER_STEPS and MAX_TRAINING_TOKENS: from max_steps when set, else
    from num_epochs and the training rows (`rows`, when known). `where`: the key of these settings
    ('models.<name>.finetune')."""
    rows_per_step = finetune["batch_size"] * finetune["gradient_accumulation"]
    if finetune["max_steps"]:
        steps, basis = finetune["max_steps"], f"max_steps {finetune['max_steps']}"
    elif rows:
        steps = math.ceil(rows * finetune["num_epochs"] / rows_per_step)
        basis = (f"num_epochs: {finetune['num_epochs']:g} over {rows} training rows / (batch_size "
                 f"{finetune['batch_size']} x gradient_accumulation {finetune['gradient_accumulation']})")
    else:
        return []
    if steps > MAX_OPTIMIZER_STEPS:
        return [f"{where}.{basis} = {steps} optimizer steps, at most {MAX_OPTIMIZER_STEPS}; "
                "lower num_epochs or max_steps (or raise batch_size)"]
    tokens = steps * rows_per_step * finetune["max_seq_length"]
    if tokens > MAX_TRAINING_TOKENS:
        return [f"{where}: {basis} = {steps} steps x {rows_per_step} rows x max_seq_length "
                f"{finetune['max_seq_length']} = up to {tokens:.2g} training tokens, at most {MAX_TRAINING_TOKENS:.0e}; "
                "lower max_steps, num_epochs, batch_size, gradient_accumulation or max_seq_length"]
    return []


def _model_spec(name: str, entry: dict, config: dict, finetune_schema: dict) -> ModelSpec:
    from tunelens.models import EMBEDDED_MODELS  # light module-level registry, no torch import

    where = f"models.{name}"
    source = entry["source"]
    kind = source_kind(source)
    num_layers = entry.get("num_layers")
    if kind == "embedded":
        key = source[len(EMBEDDED_PREFIX):]
        if key not in EMBEDDED_MODELS or EMBEDDED_MODELS[key].get("role") != "causal-lm":
            choices = sorted(k for k, v in EMBEDDED_MODELS.items() if v.get("role") == "causal-lm")
            raise ConfigError(f"{where}.source: unknown embedded model '{key}'; choices: {choices}")
        num_layers = num_layers or EMBEDDED_MODELS[key]["num_layers"]
    elif kind == "local":
        path = Path(source).expanduser()
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{where}.source: '{source}' is a file, not a directory; give the Hugging Face model "
                              "directory that holds it (config.json, weights, tokenizer)")
        if not path.is_dir():
            raise ConfigError(f"{where}.source: local model directory '{source}' does not exist")
        if not (path / "config.json").exists():
            raise ConfigError(f"{where}.source: '{source}' has no config.json; expected a Hugging Face model directory")
        depth = _local_num_layers(path, f"{where}.source")
        if num_layers and depth and num_layers != depth:
            raise ConfigError(f"{where}.num_layers: {num_layers}, but {path / 'config.json'} says {depth} layers; "
                              "leave num_layers out for a local model")
        num_layers = num_layers or depth
    elif not HUB_ID.match(source):
        raise ConfigError(f"{where}.source: '{source}' is neither an embedded model, an existing path nor a hub id")
    elif "/" in source and Path(source.split("/", 1)[0]).exists():
        raise ConfigError(
            f"{where}.source: '{source}': '{source.split('/', 1)[0]}' exists here, but '{source}' does not (a local "
            f"path with a typo? relative paths are resolved from {Path.cwd()})"
        )

    overrides = entry.get("finetune") or {}
    unknown = sorted(set(overrides) - set(finetune_schema["properties"]))
    if unknown:
        raise ConfigError(
            f"{where}.finetune: unknown key(s) {unknown}; allowed: {sorted(finetune_schema['properties'])}"
        )
    merged = {**config["finetune"], **overrides}
    import jsonschema

    # A bad top-level `finetune` value is the schema's error already; here only this model's overrides.
    errors = [schema_message(error, f"{where}.finetune.")
              for error in jsonschema.Draft202012Validator(finetune_schema).iter_errors(merged)
              if not error.absolute_path or error.absolute_path[0] in overrides]
    if errors:
        raise config_error(errors)
    problems = []
    tokens = merged["batch_size"] * merged["max_seq_length"]
    if tokens > MAX_MICRO_BATCH_TOKENS:
        problems.append(
            f"{where}.finetune: batch_size {merged['batch_size']} x max_seq_length {merged['max_seq_length']} = "
            f"{tokens} tokens per micro-batch (over {MAX_MICRO_BATCH_TOKENS}: activations and logits would not fit "
            "any GPU); lower batch_size and raise gradient_accumulation"
        )
    if merged["enabled"] and merged["max_steps"]:
        problems += training_work_problems(f"{where}.finetune", merged, rows=None)
    if isinstance(merged["target_modules"], list) and not merged["target_modules"]:
        problems.append(f"{where}.finetune.target_modules: empty list; name the modules to adapt, or 'all-linear'")
    if problems:
        raise config_error(problems)

    layer_specs = entry.get("probe_layers") or config["probe"]["layers"]
    if not isinstance(layer_specs, list):
        raise TypeError("probe layers are not a list")  # a schema error, reported already
    spec = ModelSpec(
        name=name,
        source=source,
        source_kind=kind,
        prompt_format=entry["prompt_format"],
        revision=entry.get("revision"),
        num_layers=num_layers,
        finetune=merged,
        resources=dict(entry["resources"]),
        layer_specs=list(layer_specs),
        generation_backend=generation_server_fields(config, name)["backend"],
    )
    if num_layers:
        spec.probe_layers = resolve_layers(spec.layer_specs, num_layers, name)
    elif config["probe"]["enabled"]:
        if any(isinstance(v, float) and v <= 1 for v in spec.layer_specs):
            raise ConfigError(
                f"{where}.num_layers: needed to resolve fractional probe layers {spec.layer_specs} "
                f"(the depth of hub model '{source}' is not known offline); set it or use absolute layers"
            )
        spec.probe_layers = sorted(set(int(v) for v in spec.layer_specs))
    # Cross-stage: the adapter this fine-tune writes must fit the vLLM engine that serves it; checked here,
    # not after hours of training when the generation job loads it.
    max_rank = config["generation"]["vllm_max_lora_rank"]
    if spec.finetuned and spec.generation_backend in ("vllm", "auto") and merged["lora_r"] > max_rank:
        raise ConfigError(
            f"{where}: finetune.lora_r={merged['lora_r']} is above generation.vllm_max_lora_rank={max_rank}, and "
            f"generation.backend is '{spec.generation_backend}' (vLLM would refuse the adapter after training); "
            "raise generation.vllm_max_lora_rank or set generation.backend: hf"
        )
    return spec


# --------------------------------------------------------------------------------------------- study
@dataclass(frozen=True)
class EvaluationSet:
    """An entry of `evaluation_sets`: a held-out set evaluated whole (results/eval/<name>/)."""

    name: str
    source: str
    source_kind: str  # embedded | local | hub
    fields: dict
    kind: str  # text | code
    code_language: str
    max_rows: int | None
    hub_split: str

    def prepare_params(self) -> dict:
        """What the `evalset` rule's output depends on besides the training split (its params)."""
        return {"source": self.source, "fields": dict(self.fields), "max_rows": self.max_rows, "hub_split": self.hub_split}


def _check_data_source(source: str, where: str, base_dir: Path) -> str:
    """The kind of a dataset source (embedded/local/hub); an unknown embedded name, a missing or
    unsupported file, or a malformed hub id fails naming `where` (a config key)."""
    kind = source_kind(source)
    if kind == "embedded":
        key = source[len(EMBEDDED_PREFIX):]
        if key not in EMBEDDED_DATASETS:
            raise ConfigError(f"{where}: unknown embedded dataset '{key}'; choices: {sorted(EMBEDDED_DATASETS)}")
    elif kind == "local":
        path = Path(source).expanduser()
        path = path if path.is_absolute() else base_dir / path
        if path.is_dir():
            raise ConfigError(f"{where}: '{source}' is a directory; expected a .json/.jsonl/.csv/.parquet file")
        if not path.is_file():
            raise ConfigError(f"{where}: '{source}': file does not exist ({path.resolve()})")
        if path.suffix not in DATA_EXTENSIONS:
            raise ConfigError(f"{where}: '{source}' has suffix '{path.suffix}'; expected one of {DATA_EXTENSIONS}")
    elif not HUB_ID.match(source):
        raise ConfigError(f"{where}: '{source}' is neither embedded:NAME, an existing file nor a hub id")
    return kind


def _evaluation_sets(config: dict, base_dir: Path) -> dict[str, EvaluationSet]:
    """`evaluation_sets` by name, in config order. A duplicate name, or the training dataset's own name
    (its test split is the default set), fails naming the entry."""
    sets: dict[str, EvaluationSet] = {}
    dataset_name = config["dataset"]["name"]
    for index, entry in enumerate(config["evaluation_sets"]):
        where = f"evaluation_sets[{index}]"
        name = entry["name"]
        if name == dataset_name:
            raise ConfigError(
                f"{where}.name: '{name}' is dataset.name (its test split is already the default evaluation set); "
                "give the set another name"
            )
        if name in sets:
            first = [e["name"] for e in config["evaluation_sets"]].index(name)
            raise ConfigError(f"{where}.name: duplicate evaluation set name '{name}' (also evaluation_sets[{first}])")
        kind = _check_data_source(entry["source"], f"{where}.source", base_dir)
        sets[name] = EvaluationSet(
            name=name,
            source=entry["source"],
            source_kind=kind,
            fields=dict(entry["fields"]),
            kind=entry["kind"],
            code_language=entry["code_language"],
            max_rows=entry["max_rows"],
            hub_split=entry["hub_split"],
        )
    return sets


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
    dataset_kind: str = field(init=False)

    def __post_init__(self):
        self.dataset_kind = source_kind(self.config["dataset"]["source"])

    @property
    def dataset_name(self) -> str:
        return self.config["dataset"]["name"]


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

    dataset = config.get("dataset") if isinstance(config.get("dataset"), dict) else {}
    with found.check():
        _check_data_source(dataset["source"], "dataset.source", base_dir)
    evaluation_sets: dict[str, EvaluationSet] = {}
    with found.check():
        evaluation_sets = _evaluation_sets(config, base_dir)
    with found.check():
        check_case_collisions("evaluation_sets names", evaluation_sets)
    with found.check():
        test_size = dataset["test_size"]
        if test_size >= 1 and not float(test_size).is_integer():
            raise ConfigError(f"dataset.test_size: {test_size} is neither a fraction below 1 nor a whole count")
    with found.check():
        fields = dataset["fields"]
        for field, other in (("input", "instruction"), ("output", "instruction"), ("output", "input")):
            if fields.get(field) is not None and fields.get(field) == fields.get(other):
                raise ConfigError(f"dataset.fields.{field}: '{fields[field]}' is the same column as "
                                  f"dataset.fields.{other}; map each field to its own column")

    models: dict[str, ModelSpec] = {}
    with found.check():
        check_case_collisions("models", config["models"])
    with found.check():
        reserved = sorted(set(config["models"]) & RESERVED_MODEL_NAMES)
        if reserved:
            raise ConfigError(f"models: name(s) {reserved} are reserved (results/models/bertscore holds the BERTScore "
                              "model)")
    for name, entry in (config["models"].items() if isinstance(config.get("models"), dict) else ()):
        with found.check():
            models[name] = _model_spec(name, entry, config, FinetuneSection.schema())

    decoding = config.get("decoding") or {}
    backends = {spec.generation_backend for spec in models.values()}
    by_name: dict[str, DecodingConfig] = {}
    with found.check():
        configs = _expand_decoding(decoding)
        for index, decoding_config in enumerate(configs):
            where = f"decoding.configs[{index}]" if decoding["mode"] == "list" else f"decoding ({decoding_config.name})"
            with found.check():
                check_decoding_config(decoding_config, decoding["beam_mode"], backends, where)
            if decoding_config.name in by_name and by_name[decoding_config.name] != decoding_config:
                found.add(f"{where}: name '{decoding_config.name}' is used by two different configs")
            by_name.setdefault(decoding_config.name, decoding_config)
    with found.check():
        check_case_collisions("decoding config names", by_name)
    default_name = None
    with found.check():
        default_name = config["report"]["default_config"] or (next(iter(by_name)) if by_name else None)
        if by_name and default_name not in by_name:
            raise ConfigError(f"report.default_config: '{default_name}' is not a decoding config; known: "
                              f"{sorted(by_name)}")
    with found.check():
        for index, stop in enumerate(decoding["stop"]):
            if not stop.strip():
                found.add(f"decoding.stop[{index}]: {stop!r} is only whitespace; it would cut every answer at its "
                          "first space or line break")

    with found.check():
        early = config["probe"]["early_exit"]
        check_decoding_config(
            DecodingConfig.from_dict(early["decoding"]), decoding["beam_mode"], backends, "probe.early_exit.decoding"
        )

    with found.check():
        judge = config["scoring"]["judge"]
        if judge["enabled"] and not judge["model"]:
            raise ConfigError("scoring.judge.model: required when scoring.judge.enabled is true")

    with found.check():
        bertscore = config["scoring"]["bertscore"]
        if "bertscore" in config["scoring"]["metrics"] and source_kind(bertscore["model"]) == "embedded":
            from tunelens.models import EMBEDDED_MODELS

            key = bertscore["model"][len(EMBEDDED_PREFIX):]
            if EMBEDDED_MODELS.get(key, {}).get("role") != "encoder":
                choices = sorted(k for k, v in EMBEDDED_MODELS.items() if v.get("role") == "encoder")
                raise ConfigError(f"scoring.bertscore.model: unknown embedded encoder '{key}'; choices: {choices}")
            depth = EMBEDDED_MODELS[key]["num_layers"]
            if bertscore["num_layers"] and bertscore["num_layers"] > depth:
                raise ConfigError(f"scoring.bertscore.num_layers: {bertscore['num_layers']} is beyond the depth of "
                                  f"{bertscore['model']} ({depth} layers)")

    if problems is None:
        found.raise_any()
    try:
        return Study(
            config=config, models=models, decoding=by_name, default_decoding=default_name,
            evaluation_sets=evaluation_sets, mapped_fields=mapped_fields,
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


def check_yaml_duplicates(path: str | Path) -> None:
    """Reject a YAML file with a key given twice in one mapping (YAML loaders keep the last one silently)."""
    path = Path(path)

    class Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
        pass

    def construct_mapping(loader, node, deep=False):
        loader.flatten_mapping(node)
        seen: dict = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(
                    f"{path}, line {key_node.start_mark.line + 1}: duplicate key '{key}' (first at line {seen[key]}); "
                    "YAML would silently keep only the last one"
                )
            seen[key] = key_node.start_mark.line + 1
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc}") from None
    try:
        yaml.load(text, Loader=Loader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def load_default_config(workflow_dir: str | Path, overrides: dict | None = None) -> dict:
    """config.yaml next to the Snakefile, deep-updated with `overrides` (the command line's --config)."""
    from snakemake.common.configfile import load_configfile
    from snakemake.utils import update_config

    config = load_configfile(str(Path(workflow_dir) / "config.yaml"))
    update_config(config, copy.deepcopy(overrides or {}))
    return config
