"""The models of a study: each `models.<name>` entry checked (its source, depth, per-model fine-tune overrides and
probe layers) and turned into a `ModelSpec`."""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path

from tunelens.config.problems import config_error
from tunelens.errors import ConfigError
from tunelens.schema import schema_message
from tunelens.settings import ConfigSection, FinetuneSection, GenerationSection, ModelSection, ResourcesSection
from tunelens.sources import EMBEDDED_PREFIX, source_kind

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
    """A model entry after validation, with per-model fine-tune settings merged over the defaults.

    `finetune` and `resources` are the config values (rule params); `finetune_settings` and `resource_settings`
    read them typed."""

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

    @functools.cached_property
    def finetune_settings(self) -> FinetuneSection:
        return FinetuneSection.from_dict(self.finetune, where=f"models.{self.name}.finetune", lenient=True)

    @functools.cached_property
    def resource_settings(self) -> ResourcesSection:
        return ResourcesSection.from_dict(self.resources, where=f"models.{self.name}.resources", lenient=True)

    @property
    def finetuned(self) -> bool:
        return bool(self.finetune_settings.enabled)

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


def generation_server_fields(config, model: str) -> dict:
    """The config's (a dict, or the typed ConfigSection) part of a model's generation-server key
    (tunelens.generation.genserver.server_key): its generation backend and the vLLM engine options. Generate jobs
    pass them as params; early_exit jobs read them here from the config, so they key the same server (one model
    load) without rerunning when they change."""
    if isinstance(config, dict):  # the two sections only: the others are then no code of the jobs calling this
        generation = GenerationSection.of_config(config)
        backend = ModelSection.from_dict((config.get("models") or {}).get(model) or {}, where=f"models.{model}",
                                         lenient=True).generation_backend
    else:  # the typed config
        generation, backend = config.generation, config.models[model].generation_backend
    return {
        "backend": backend or generation.backend,
        "vllm_options": {"max_lora_rank": generation.vllm_max_lora_rank,
                         "gpu_memory_utilization": generation.vllm_gpu_memory_utilization},
    }


def training_work_problems(where: str, finetune: FinetuneSection | dict, rows: int | None) -> list[str]:
    """A fine-tune's work against MAX_OPTIMIZER_STEPS and MAX_TRAINING_TOKENS: from max_steps when set, else
    from num_epochs and the training rows (`rows`, when known). `where`: the key of these settings
    ('models.<name>.finetune')."""
    finetune = FinetuneSection.from_dict(finetune, where=where, lenient=True)
    rows_per_step = finetune.batch_size * finetune.gradient_accumulation
    if finetune.max_steps:
        steps, basis = finetune.max_steps, f"max_steps {finetune.max_steps}"
    elif rows:
        steps = math.ceil(rows * finetune.num_epochs / rows_per_step)
        basis = (f"num_epochs: {finetune.num_epochs:g} over {rows} training rows / (batch_size "
                 f"{finetune.batch_size} x gradient_accumulation {finetune.gradient_accumulation})")
    else:
        return []
    if steps > MAX_OPTIMIZER_STEPS:
        return [f"{where}.{basis} = {steps} optimizer steps, at most {MAX_OPTIMIZER_STEPS}; "
                "lower num_epochs or max_steps (or raise batch_size)"]
    tokens = steps * rows_per_step * finetune.max_seq_length
    if tokens > MAX_TRAINING_TOKENS:
        return [f"{where}: {basis} = {steps} steps x {rows_per_step} rows x max_seq_length "
                f"{finetune.max_seq_length} = up to {tokens:.2g} training tokens, at most {MAX_TRAINING_TOKENS:.0e}; "
                "lower max_steps, num_epochs, batch_size, gradient_accumulation or max_seq_length"]
    return []


def _model_spec(name: str, config: ConfigSection) -> ModelSpec:
    """models.<name> as a ModelSpec; `config`: the whole config (the fine-tune defaults, probe layers, vLLM
    limit)."""
    from tunelens.models import EMBEDDED_MODELS  # light module-level registry, no torch import

    where = f"models.{name}"
    entry = config.models[name]
    source = entry.source
    kind = source_kind(source)
    num_layers = entry.num_layers
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

    finetune_schema = FinetuneSection.schema()
    overrides = entry.finetune or {}
    unknown = sorted(set(overrides) - set(finetune_schema["properties"]))
    if unknown:
        raise ConfigError(
            f"{where}.finetune: unknown key(s) {unknown}; allowed: {sorted(finetune_schema['properties'])}"
        )
    merged = {**config.finetune.as_dict(), **overrides}
    import jsonschema

    # A bad top-level `finetune` value is the schema's error already; here only this model's overrides.
    errors = [schema_message(error, f"{where}.finetune.")
              for error in jsonschema.Draft202012Validator(finetune_schema).iter_errors(merged)
              if not error.absolute_path or error.absolute_path[0] in overrides]
    if errors:
        raise config_error(errors)
    problems = []
    settings = FinetuneSection.from_dict(merged, where=f"{where}.finetune")
    tokens = settings.batch_size * settings.max_seq_length
    if tokens > MAX_MICRO_BATCH_TOKENS:
        problems.append(
            f"{where}.finetune: batch_size {settings.batch_size} x max_seq_length {settings.max_seq_length} = "
            f"{tokens} tokens per micro-batch (over {MAX_MICRO_BATCH_TOKENS}: activations and logits would not fit "
            "any GPU); lower batch_size and raise gradient_accumulation"
        )
    if settings.enabled and settings.max_steps:
        problems += training_work_problems(f"{where}.finetune", settings, rows=None)
    if isinstance(settings.target_modules, list) and not settings.target_modules:
        problems.append(f"{where}.finetune.target_modules: empty list; name the modules to adapt, or 'all-linear'")
    if problems:
        raise config_error(problems)

    layer_specs = entry.probe_layers or config.probe.layers
    if not isinstance(layer_specs, list):
        raise TypeError("probe layers are not a list")  # a schema error, reported already
    spec = ModelSpec(
        name=name,
        source=source,
        source_kind=kind,
        prompt_format=entry.prompt_format,
        revision=entry.revision,
        num_layers=num_layers,
        finetune=merged,
        resources=entry.resources.as_dict(),
        layer_specs=list(layer_specs),
        generation_backend=generation_server_fields(config, name)["backend"],
    )
    if num_layers:
        spec.probe_layers = resolve_layers(spec.layer_specs, num_layers, name)
    elif config.probe.enabled:
        if any(isinstance(v, float) and v <= 1 for v in spec.layer_specs):
            raise ConfigError(
                f"{where}.num_layers: needed to resolve fractional probe layers {spec.layer_specs} "
                f"(the depth of hub model '{source}' is not known offline); set it or use absolute layers"
            )
        spec.probe_layers = sorted(set(int(v) for v in spec.layer_specs))
    # Cross-stage: the adapter this fine-tune writes must fit the vLLM engine that serves it; checked here,
    # not after hours of training when the generation job loads it.
    max_rank = config.generation.vllm_max_lora_rank
    if spec.finetuned and spec.generation_backend in ("vllm", "auto") and settings.lora_r > max_rank:
        raise ConfigError(
            f"{where}: finetune.lora_r={settings.lora_r} is above generation.vllm_max_lora_rank={max_rank}, and "
            f"generation.backend is '{spec.generation_backend}' (vLLM would refuse the adapter after training); "
            "raise generation.vllm_max_lora_rank or set generation.backend: hf"
        )
    return spec
