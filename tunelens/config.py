"""Load and validate a tunelens config, and derive what the DAG needs from it.

The JSON schema (schemas/config.schema.yaml, loaded and applied by tunelens.schema) checks types and fills
defaults; this module adds what a schema cannot say (model references, layers vs
model depth, decoding combinations, files that must exist) and builds typed views of the config:
`ModelSpec` per model and `DecodingConfig` per decoding config, each with a canonical name.

Kept free of torch/transformers imports: Snakemake imports it on every invocation, so it must be fast.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tunelens.decoding import DecodingConfig, knob_names
from tunelens.decoding import check as check_decoding_config
from tunelens.errors import ConfigError
# re-exported: callers and tests import the schema helpers from here
from tunelens.schema import SCHEMA_PATH, _key_path, _load_schema, schema_errors, validate_schema  # noqa: F401
from tunelens.sources import DATA_EXTENSIONS, EMBEDDED_DATASETS, EMBEDDED_PREFIX, source_kind  # noqa: F401


HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
VARIANTS = ("base", "finetuned")
RESERVED_MODEL_NAMES = {"bertscore"}
# Tokens of one fine-tune micro-batch (batch_size x max_seq_length): above this, logits alone
# (tokens x vocabulary x 4 bytes) exceed any GPU's memory for a 32k vocabulary.
MAX_MICRO_BATCH_TOKENS = 1_048_576


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
        return [DecodingConfig.from_dict(entry, defaults) for entry in decoding["configs"]]
    if decoding["configs"]:
        raise ConfigError(f"decoding.configs: only used with decoding.mode 'list' (mode is '{mode}')")
    sweep = {key: values for key, values in decoding["sweep"].items() if values}
    configs = [DecodingConfig.from_dict({}, defaults)]
    if mode == "one_at_a_time":
        for key, values in sweep.items():
            configs += [DecodingConfig.from_dict({key: value}, defaults) for value in values]
    else:  # grid
        keys = list(sweep)
        for combo in itertools.product(*(sweep[key] for key in keys)):
            configs.append(DecodingConfig.from_dict(dict(zip(keys, combo)), defaults))
    return configs


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


def _local_num_layers(path: Path) -> int | None:
    config_file = path / "config.json"
    if not config_file.exists():
        return None
    data = json.loads(config_file.read_text())
    for holder in (data, data.get("text_config") or {}):
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(holder.get(key), int):
                return holder[key]
    return None


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
        if not path.is_dir():
            raise ConfigError(f"{where}.source: local model directory '{source}' does not exist")
        if not (path / "config.json").exists():
            raise ConfigError(f"{where}.source: '{source}' has no config.json; expected a Hugging Face model directory")
        num_layers = num_layers or _local_num_layers(path)
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

    for error in jsonschema.Draft202012Validator(finetune_schema).iter_errors(merged):
        raise ConfigError(f"{where}.finetune.{_key_path(error.absolute_path)}: {error.message}")
    tokens = merged["batch_size"] * merged["max_seq_length"]
    if tokens > MAX_MICRO_BATCH_TOKENS:
        raise ConfigError(
            f"{where}.finetune: batch_size {merged['batch_size']} x max_seq_length {merged['max_seq_length']} = "
            f"{tokens} tokens per micro-batch (over {MAX_MICRO_BATCH_TOKENS}: activations and logits would not fit "
            "any GPU); lower batch_size and raise gradient_accumulation"
        )

    layer_specs = entry.get("probe_layers") or config["probe"]["layers"]
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
        if not path.is_file():
            raise ConfigError(f"{where}: file '{source}' does not exist")
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


def load_config(config: dict, *, base_dir: str | Path = ".") -> Study:
    """Validate `config` (defaults are filled in place) and return the Study built from it.

    Raises ConfigError naming the key and value at fault, before any job runs.
    """
    if not isinstance(config, dict) or not config:
        raise ConfigError("the config is empty; pass --configfile or keep config.yaml next to the Snakefile")
    check_removed_keys(config)
    given_fields = ((config.get("dataset") or {}).get("fields") or {}) if isinstance(config.get("dataset"), dict) else {}
    mapped_fields = ("instruction", "output") + (("input",) if given_fields.get("input") is not None else ())
    validate_schema(config)
    schema = _load_schema()
    base_dir = Path(base_dir)

    dataset = config["dataset"]
    _check_data_source(dataset["source"], "dataset.source", base_dir)
    evaluation_sets = _evaluation_sets(config, base_dir)
    check_case_collisions("evaluation_sets names", evaluation_sets)
    test_size = dataset["test_size"]
    if test_size >= 1 and not float(test_size).is_integer():
        raise ConfigError(f"dataset.test_size: {test_size} is neither a fraction below 1 nor a whole count")

    check_case_collisions("models", config["models"])
    reserved = sorted(set(config["models"]) & RESERVED_MODEL_NAMES)
    if reserved:
        raise ConfigError(f"models: name(s) {reserved} are reserved (results/models/bertscore holds the BERTScore model)")
    models = {
        name: _model_spec(name, entry, config, schema["$defs"]["finetune"]) for name, entry in config["models"].items()
    }

    decoding = config["decoding"]
    backends = {spec.generation_backend for spec in models.values()}
    configs = _expand_decoding(decoding)
    by_name: dict[str, DecodingConfig] = {}
    for index, decoding_config in enumerate(configs):
        where = f"decoding.configs[{index}]" if decoding["mode"] == "list" else f"decoding ({decoding_config.name})"
        check_decoding_config(decoding_config, decoding["beam_mode"], backends, where)
        if decoding_config.name in by_name and by_name[decoding_config.name] != decoding_config:
            raise ConfigError(f"{where}: name '{decoding_config.name}' is used by two different configs")
        by_name.setdefault(decoding_config.name, decoding_config)

    check_case_collisions("decoding config names", by_name)
    default_name = config["report"]["default_config"] or configs[0].name
    if default_name not in by_name:
        raise ConfigError(f"report.default_config: '{default_name}' is not a decoding config; known: {sorted(by_name)}")

    early = config["probe"]["early_exit"]
    check_decoding_config(
        DecodingConfig.from_dict(early["decoding"]), decoding["beam_mode"], backends, "probe.early_exit.decoding"
    )

    judge = config["scoring"]["judge"]
    if judge["enabled"] and not judge["model"]:
        raise ConfigError("scoring.judge.model: required when scoring.judge.enabled is true")

    bertscore_model = config["scoring"]["bertscore"]["model"]
    if "bertscore" in config["scoring"]["metrics"] and source_kind(bertscore_model) == "embedded":
        from tunelens.models import EMBEDDED_MODELS

        key = bertscore_model[len(EMBEDDED_PREFIX):]
        if EMBEDDED_MODELS.get(key, {}).get("role") != "encoder":
            choices = sorted(k for k, v in EMBEDDED_MODELS.items() if v.get("role") == "encoder")
            raise ConfigError(f"scoring.bertscore.model: unknown embedded encoder '{key}'; choices: {choices}")

    return Study(
        config=config, models=models, decoding=by_name, default_decoding=default_name, evaluation_sets=evaluation_sets,
        mapped_fields=mapped_fields,
    )


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
