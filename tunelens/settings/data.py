"""Config sections of the data: `dataset`, the entries of `evaluation_sets` and of `models`."""

from __future__ import annotations

from dataclasses import dataclass

from tunelens.settings.base import REQUIRED, Section, section, setting


@dataclass(frozen=True, kw_only=True)
class FieldsSection(Section):
    instruction: str = setting("instruction", "Column holding the instruction.",
        schema={"type": "string"})
    input: str | None = setting("input", "null when the dataset has no input column.",
        schema={"type": ["string", "null"]})
    output: str = setting("output", "Column holding the reference answer.",
        schema={"type": "string"})


@dataclass(frozen=True, kw_only=True)
class DatasetSection(Section):
    name: str = setting(REQUIRED, "Directory name under results/data/.",
        schema={"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]*$"})
    source: str = setting(REQUIRED,
        "'embedded:demo', a hub dataset id (org/name), or a path to a .json/.jsonl/.csv/.parquet file.",
        schema={"type": "string", "minLength": 1})
    hub_split: str = setting("train", "Split to read when source is a hub dataset.",
        schema={"type": "string"})
    revision: str | None = setting(None,
        "Hub revision (commit, tag or branch) of a hub dataset; the commit downloaded is recorded either way.",
        schema={"type": ["string", "null"]})
    fields: FieldsSection = section(FieldsSection, "Column names in the source for instruction, input and output.")
    on_bad_rows: str = setting("count",
        "Rows that cannot be used as they are: malformed JSON lines / CSV rows, missing or empty fields, and at "
        "fine-tuning rows whose prompt leaves no response token within finetune.max_seq_length (dropped) or that "
        "exceed it (truncated). count = drop/truncate them and count them by reason in the split manifest, the "
        "fine-tune metrics and the report; error = fail on the first one, naming it.",
        schema={"enum": ["count", "error"]})
    kind: str = setting("text", "code enables CodeBLEU.",
        schema={"enum": ["text", "code"]})
    code_language: str = setting("python", "Language CodeBLEU parses when kind is code.",
        schema={"enum": ["python", "java", "javascript", "c_sharp", "php", "go", "ruby", "rust", "c", "cpp"]})
    test_size: float = setting(0.1,
        "Test prompts as a fraction (< 1) or a count (>= 1, integer). With `seed`, the only keys that fix the split "
        "(train.jsonl and test.jsonl). How many test rows are evaluated is decoding.max_test_rows, which never "
        "changes train.jsonl.",
        schema={"type": "number", "exclusiveMinimum": 0})
    max_train: int | None = setting(None, "Cap on train rows after the split (never changes test.jsonl).",
        schema={"type": ["integer", "null"], "minimum": 1})


@dataclass(frozen=True, kw_only=True)
class EvaluationFieldsSection(FieldsSection):
    input: str | None = setting("input", "null when the set has no input column.",
        schema={"type": ["string", "null"]})


@dataclass(frozen=True, kw_only=True)
class EvaluationSetSection(Section):
    name: str = setting(REQUIRED,
        "Directory name under results/eval/ and the set's label in tables and plots; unique, and not dataset.name.",
        schema={"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]*$"})
    source: str = setting(REQUIRED,
        "A path to a .json/.jsonl/.csv/.parquet file, a hub dataset id (org/name), or 'embedded:demo-holdout'.",
        schema={"type": "string", "minLength": 1})
    hub_split: str = setting("test", "Split to read when source is a hub dataset.",
        schema={"type": "string"})
    fields: EvaluationFieldsSection = section(EvaluationFieldsSection,
                                              "Column names in the source for instruction, input and output.")
    kind: str = setting("text", "code enables CodeBLEU for this set.",
        schema={"enum": ["text", "code"]})
    code_language: str = setting("python", "Language CodeBLEU parses when kind is code.",
        schema={"enum": ["python", "java", "javascript", "c_sharp", "php", "go", "ruby", "rust", "c", "cpp"]})
    max_rows: int | None = setting(None,
        "Cap on the set's rows after the leakage check (a seeded sample; null = all). decoding.max_test_rows still "
        "caps generation on every set.",
        schema={"type": ["integer", "null"], "minimum": 1})


@dataclass(frozen=True, kw_only=True)
class ResourcesSection(Section):
    gpus: int = setting(1,
        "GPUs per job of this model (fine-tune, generation, perplexity, probes), on one node; 0 = CPU. Above 1: hf "
        "shards the model over them, vLLM runs tensor-parallel, the fine-tune runs data-parallel (docs/cluster.md).",
        schema={"type": "integer", "minimum": 0, "maximum": 64})
    cpus: int = setting(4, "CPU cores per job of this model.",
        schema={"type": "integer", "minimum": 1, "maximum": 1024})
    mem_mb: int = setting(32000, "Memory per job of this model, MB.",
        schema={"type": "integer", "minimum": 256, "maximum": 8000000})
    runtime: int = setting(240, "Minutes per job.",
        schema={"type": "integer", "minimum": 1})


@dataclass(frozen=True, kw_only=True)
class ModelSection(Section):
    source: str = setting(REQUIRED,
        "'embedded:smollm2-135m-instruct', 'embedded:gemma3-270m', a hub id (org/name) or a local HF directory.",
        schema={"type": "string", "minLength": 1})
    revision: str | None = setting(None, "Hub revision (commit) to pin.",
        schema={"type": ["string", "null"]})
    prompt_format: str = setting("alpaca", "alpaca = the Alpaca template; chat = the tokenizer's chat template.",
        schema={"enum": ["alpaca", "chat"]})
    num_layers: int | None = setting(None,
        "Decoder depth; only needed for hub models whose config is not available offline (a local model's "
        "config.json must agree).",
        schema={"type": ["integer", "null"], "minimum": 1})
    context_length: int | None = setting(None,
        "Tokens the model takes, prompt and answer together; null = from its config.json (max_position_embeddings). "
        "decoding.max_new_tokens, probe.early_exit.max_new_tokens and finetune.max_seq_length must fit in it.",
        schema={"type": ["integer", "null"], "minimum": 1})
    finetune: dict = setting({}, "Per-model overrides of the top-level `finetune` keys.",
        schema={"type": "object"})
    generation_backend: str | None = setting(None,
        "Overrides generation.backend for this model; null = generation.backend.",
        schema={"enum": [None, "auto", "hf", "vllm"]})
    probe_layers: list | None = setting(None, "Overrides probe.layers for this model.",
        schema={"type": ["array", "null"], "items": {"type": "number", "exclusiveMinimum": 0}})
    resources: ResourcesSection = section(ResourcesSection, "What this model's GPU jobs ask the scheduler for.")
