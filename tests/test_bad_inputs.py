"""Bad-input corpus: configs, data files and model references a user gets wrong.

Each case is either rejected before any job, with an error (ConfigError/DataError, no traceback) that names the
culprit (key and value, or file and line), or handled and counted (the split manifest says what was dropped
and why). No case may end in another exception type (a traceback for the user) or pass silently.

The config cases run in-process through exactly what Snakemake runs when it builds the DAG (duplicate-key
check of the YAML file, then tunelens.preflight.check_config: load_config and preflight), so ~70 cases take seconds;
a few go through `snakemake -n` to show the same errors reach the user as one clean message, before any job.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tunelens.config import check_yaml_duplicates
from tunelens.data.data import split_dataset
from tunelens.errors import ConfigError, DataError, TunelensError
from tunelens.preflight import check_config, cuda_device_count

ROOT = Path(__file__).resolve().parent.parent
BASE = {
    "dataset": {"name": "demo", "source": "embedded:demo", "test_size": 6},
    "models": {"smollm2": {"source": "embedded:smollm2-135m-instruct"}},
}
ROWS = [{"instruction": f"Task {i}", "input": f"x{i}", "output": f"answer {i}"} for i in range(10)]


def run_checks(config: dict, workdir: Path, *, check_cuda: bool = False) -> None:
    """What rules/common.smk does before any job, in-process (the hub off, an empty hub cache)."""
    environ = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(workdir / "hf-home")}
    configfile = workdir / "config.yaml"
    configfile.write_text(yaml.safe_dump(config, sort_keys=False))
    check_yaml_duplicates(configfile)
    check_config(config, base_dir=workdir, environ=environ, check_cuda=check_cuda, results=workdir / "results")


def at(path: str, value):
    """A change: set the dotted `path` (list indices as integers) to `value`."""

    def change(config, workdir):
        node, keys = config, path.split(".")
        for key in keys[:-1]:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        node[keys[-1]] = value

    return change


def data_file(name: str, content: str | bytes | list | dict, *, fields: dict | None = None, **dataset):
    """A change: write a data file into the workdir and point dataset.source at it (relative path)."""

    def change(config, workdir):
        path = workdir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content)
        else:
            path.write_text(json.dumps(content))
        config["dataset"].update({"source": name, **dataset})
        if fields is not None:
            config["dataset"]["fields"] = fields

    return change


def mkdir(name: str, then):
    def change(config, workdir):
        (workdir / name).mkdir(parents=True, exist_ok=True)
        then(config, workdir)

    return change


def models(entries: dict):
    return at("models", entries)


def jsonl(rows) -> str:
    return "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)


SMOL = {"source": "embedded:smollm2-135m-instruct"}
JSONL = "\n".join(json.dumps(row) for row in ROWS) + "\n"

# (id, change, fragments the message must contain)
REJECTED = [
    # ---- schema: unknown/removed keys, types, ranges
    ("unknown-top-level-key", at("finetuning", {}), ["unknown key(s) ['finetuning']"]),
    ("unknown-nested-key", at("decoding.temprature", 0.5), ["decoding", "'temprature'"]),
    ("removed-dataset-max_test", at("dataset.max_test", 50), ["dataset.max_test: 50", "decoding.max_test_rows"]),
    ("seed-not-int", at("seed", "abc"), ["seed", "'abc'"]),
    ("device-unknown", at("device", "gpu"), ["device", "'gpu'"]),
    ("negative-temperature", at("decoding.sweep", {"temperature": [-0.5]}), ["decoding.sweep.temperature[0]", "-0.5"]),
    ("top_p-zero", at("decoding.defaults", {"top_p": 0}), ["decoding.defaults.top_p", "0"]),
    ("num_beams-zero", at("decoding.defaults", {"num_beams": 0}), ["decoding.defaults.num_beams", "0"]),
    ("test_size-fractional-count", at("dataset.test_size", 2.5), ["dataset.test_size: 2.5"]),
    ("test_size-zero", at("dataset.test_size", 0), ["dataset.test_size", "0"]),
    ("confidence-above-1", at("scoring", {"confidence": 1.5}), ["scoring.confidence", "1.5"]),
    ("unknown-metric", at("scoring", {"metrics": ["bleurt"]}), ["scoring.metrics[0]", "'bleurt'"]),
    ("duplicate-metric", at("scoring", {"metrics": ["bleu", "bleu"]}), ["scoring.metrics", "non-unique"]),
    ("vllm-lora-rank-not-allowed", at("generation", {"vllm_max_lora_rank": 48}), ["generation.vllm_max_lora_rank", "48"]),
    ("dataset-name-with-space", at("dataset.name", "my data"), ["dataset.name", "'my data'"]),
    ("model-name-with-slash", models({"org/model": SMOL}), ["'org/model'"]),
    ("no-models", models({}), ["models", "{}"]),
    ("reserved-model-name", models({"bertscore": SMOL}), ["models", "'bertscore'", "reserved"]),
    # ---- upper bounds and memory estimates (keys that can exhaust memory)
    ("num_beams-huge", at("decoding.defaults", {"num_beams": 1000}), ["decoding.defaults.num_beams", "1000"]),
    ("lora_r-huge", at("finetune", {"lora_r": 100000}), ["finetune.lora_r", "100000"]),
    ("bootstrap-samples-huge", at("scoring", {"bootstrap_samples": 10**7}), ["scoring.bootstrap_samples", "10000000"]),
    ("bootstrap-memory-estimate", lambda c, w: (at("scoring", {"bootstrap_samples": 10**6})(c, w),
                                                at("dataset.test_size", 500)(c, w)),
     ["scoring.bootstrap_samples: 1000000", "500 evaluated rows", "GiB"]),
    ("finetune-micro-batch-tokens", at("finetune", {"batch_size": 4096, "max_seq_length": 4096}),
     ["models.smollm2.finetune", "batch_size 4096 x max_seq_length 4096"]),
    ("max_seq_length-huge", at("finetune", {"max_seq_length": 10**7}), ["finetune.max_seq_length", "10000000"]),
    ("max_new_tokens-huge", at("decoding.max_new_tokens", 10**6), ["decoding.max_new_tokens", "1000000"]),
    ("generation-batch-huge", at("generation", {"batch_size": 10**5}), ["generation.batch_size", "100000"]),
    ("perplexity-batch-huge", at("scoring", {"perplexity_batch_size": 10**5}), ["scoring.perplexity_batch_size"]),
    ("human-sample-huge", at("scoring", {"human": {"sample_size": 10**7}}), ["scoring.human.sample_size"]),
    ("lens-top-k-huge", at("probe", {"lens_top_k": 10**5}), ["probe.lens_top_k", "100000"]),
    ("model-mem-huge", models({"smollm2": {**SMOL, "resources": {"mem_mb": 10**9}}}),
     ["models.smollm2.resources.mem_mb", "1000000000"]),
    # ---- names
    ("model-names-differ-in-case", models({"Smol": SMOL, "smol": SMOL}), ["'Smol' and 'smol' differ only in case"]),
    ("decoding-names-differ-in-case",
     at("decoding", {"mode": "list", "configs": [{"name": "Greedy", "temperature": 0.0}, {"name": "greedy"}]}),
     ["decoding config names", "'Greedy' and 'greedy'"]),
    ("evaluation-set-names-differ-in-case",
     at("evaluation_sets", [{"name": "Extra", "source": "embedded:demo-holdout"},
                            {"name": "extra", "source": "embedded:demo-holdout"}]),
     ["evaluation_sets names", "'Extra' and 'extra' differ only in case"]),
    ("report-default-unknown", at("report", {"default_config": "nope"}), ["report.default_config: 'nope'"]),
    ("list-mode-without-configs", at("decoding", {"mode": "list"}), ["decoding.configs: empty"]),
    ("beam-sample-greedy", at("decoding", {"beam_mode": "beam_sample", "defaults": {"num_beams": 2, "temperature": 0.0}}),
     ["beam_sample with temperature 0"]),
    ("probe-layer-beyond-depth", at("probe", {"layers": [40]}), ["probe layer 40", "beyond its depth (30"]),
    ("per-model-finetune-unknown-key", models({"smollm2": {**SMOL, "finetune": {"lr": 1}}}),
     ["models.smollm2.finetune: unknown key(s) ['lr']"]),
    ("per-model-finetune-bad-value", models({"smollm2": {**SMOL, "finetune": {"lora_r": 0}}}),
     ["models.smollm2.finetune.lora_r", "0"]),
    # ---- model references
    ("unknown-embedded-model", models({"smollm2": {"source": "embedded:nope"}}), ["models.smollm2.source", "'nope'"]),
    ("local-model-missing-dot-slash", models({"smollm2": {"source": "./ckpts/model"}}),
     ["models.smollm2.source", "./ckpts/model", "does not exist"]),
    ("local-model-missing-absolute", models({"smollm2": {"source": "/nonexistent/ckpt"}}),
     ["models.smollm2.source", "/nonexistent/ckpt"]),
    ("local-model-path-typo-no-dot", mkdir("mymodels", models({"smollm2": {"source": "mymodels/ckpt"}})),
     ["models.smollm2.source: 'mymodels/ckpt'", "'mymodels' exists here"]),
    ("local-model-without-config-json", mkdir("emptymodel", models({"smollm2": {"source": "./emptymodel"}})),
     ["models.smollm2.source", "./emptymodel", "config.json"]),
    ("hub-model-not-cached-offline", models({"smollm2": {"source": "someorg/some-model", "num_layers": 30}}),
     ["models.smollm2.source: 'someorg/some-model'", "offline cache", "HF_HUB_OFFLINE=0"]),
    ("model-source-garbage", models({"smollm2": {"source": "not a model!"}}), ["models.smollm2.source", "'not a model!'"]),
    ("judge-enabled-without-model", at("scoring", {"judge": {"enabled": True}}), ["scoring.judge.model: required"]),
    ("judge-model-name-typo", at("scoring", {"judge": {"enabled": True, "model": "smolm2"}}),
     ["scoring.judge.model: 'smolm2'", "(smollm2)"]),
    ("judge-local-path-missing", at("scoring", {"judge": {"enabled": True, "model": "./judges/j1"}}),
     ["scoring.judge.model", "./judges/j1", "does not exist"]),
    ("judge-hub-not-cached", at("scoring", {"judge": {"enabled": True, "model": "org/judge-7b"}}),
     ["scoring.judge.model: 'org/judge-7b'", "offline cache"]),
    ("judge-path-typo", mkdir("judges", at("scoring", {"judge": {"enabled": True, "model": "judges/j1"}})),
     ["scoring.judge.model: 'judges/j1'", "'judges' exists here"]),
    ("bertscore-hub-not-cached", at("scoring", {"bertscore": {"model": "roberta-large"}}),
     ["scoring.bertscore.model: 'roberta-large'", "offline cache"]),
    ("bertscore-unknown-embedded", at("scoring", {"bertscore": {"model": "embedded:nope"}}),
     ["scoring.bertscore.model", "'nope'"]),
    ("bertscore-baseline-missing", at("scoring", {"bertscore": {"baseline_path": "baselines/roberta.csv"}}),
     ["scoring.bertscore.baseline_path: 'baselines/roberta.csv'"]),
    ("vllm-python-missing", at("generation", {"vllm_python": ".venv-vllm/bin/python"}),
     ["generation.vllm_python: '.venv-vllm/bin/python'"]),
    # ---- dataset references and files
    ("dataset-missing-dot-slash", at("dataset.source", "./data/rows.jsonl"), ["dataset.source", "./data/rows.jsonl"]),
    ("dataset-missing-no-dot", at("dataset.source", "data/rows.jsonl"), ["dataset.source", "data/rows.jsonl"]),
    ("dataset-path-without-extension", mkdir("data", at("dataset.source", "data/rows")),
     ["dataset.source: 'data/rows'", "'data' exists here"]),
    ("dataset-hub-not-cached", at("dataset.source", "someorg/some-dataset"),
     ["dataset.source: 'someorg/some-dataset'", "offline caches"]),
    ("evaluation-set-hub-not-cached", at("evaluation_sets", [{"name": "extra", "source": "someorg/eval-set"}]),
     ["evaluation_sets[name=extra].source: 'someorg/eval-set'", "offline caches"]),
    ("unknown-embedded-dataset", at("dataset.source", "embedded:nope"), ["dataset.source", "'nope'"]),
    ("dataset-wrong-suffix", data_file("rows.txt", JSONL), ["dataset.source", "rows.txt"]),
    ("test_size-count-vs-rows", data_file("rows.jsonl", JSONL, test_size=10),
     ["dataset.test_size: 10", "only 10 rows"]),
    ("test_size-fraction-vs-rows", data_file("rows.jsonl", JSONL, test_size=0.99),
     ["dataset.test_size: 0.99", "only 10 rows"]),
    ("mapped-instruction-missing", data_file("rows.json", ROWS, fields={"instruction": "question"}),
     ["dataset.fields.instruction: column 'question'", "columns found"]),
    ("mapped-output-missing", data_file("rows.json", ROWS, fields={"output": "answer"}),
     ["dataset.fields.output: column 'answer'"]),
    ("mapped-input-missing", data_file("rows.json", ROWS, fields={"input": "context"}),
     ["dataset.fields.input: column 'context'", "null"]),
    ("csv-mapped-column-missing", data_file("rows.csv", "q,a\nx,y\nz,w\n"), ["dataset.fields.instruction", "'q'"]),
    ("non-utf8-data", data_file("latin1.jsonl", '{"instruction": "caf\u00e9", "output": "x"}\n'.encode("latin-1")),
     ["latin1.jsonl", "not UTF-8 at line 1", "byte offset 20"]),
    ("invalid-json", data_file("broken.json", '[{"instruction": "a", "output": "b"},'),
     ["broken.json", "not valid JSON", "line 1"]),
    ("json-object-not-list", data_file("obj.json", {"rows": ROWS}), ["obj.json", "expected a JSON list"]),
    ("empty-data-file", data_file("empty.jsonl", ""), ["empty.jsonl", "no rows"]),
]


def _parquet(config, workdir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"q": ["a", "b", "c"], "a": ["x", "y", "z"]}), workdir / "rows.parquet")
    config["dataset"]["source"] = "rows.parquet"


REJECTED.append(("parquet-mapped-column-missing", _parquet, ["dataset.fields.instruction: column 'instruction'",
                                                             "['a', 'q']"]))


# ----------------------------------------------------------------------------------------- issue 23 cases
# The twelve cases (and the misleading messages) a skeptical trial found, then cases of our own. Written before
# the code that handles them.
def tiny_config(**overrides) -> dict:
    """config.json of a 2-layer Llama-shaped causal LM with a 512-token context."""
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 16,
            "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
            "max_position_embeddings": 512, "vocab_size": 64, **overrides}


TINY_TENSORS = {
    "model.embed_tokens.weight": [64, 16],
    **{f"model.layers.{i}.self_attn.{p}.weight": [16, 16] for i in range(2) for p in ("q_proj", "k_proj", "v_proj",
                                                                                          "o_proj")},
    **{f"model.layers.{i}.mlp.{p}.weight": shape for i in range(2)
       for p, shape in (("gate_proj", [32, 16]), ("up_proj", [32, 16]), ("down_proj", [16, 32]))},
    "model.norm.weight": [16],
    "lm_head.weight": [64, 16],
}


def safetensors_bytes(tensors: dict = TINY_TENSORS, *, cut: int = 0) -> bytes:
    """A float32 safetensors file of zeros (8-byte little-endian header length, JSON header, data), less
    its last `cut` bytes."""
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = 4
        for dim in shape:
            size *= dim
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    data = len(text).to_bytes(8, "little") + text + bytes(offset)
    return data[:len(data) - cut] if cut else data


def model_dir(name: str, config: dict | str | bytes | None = None, files: dict | None = None, *, model="tiny",
              then=None):
    """A change: write a local model directory `name` (config.json + model.safetensors unless `files` says
    otherwise: name -> bytes, or None to leave a file out) and make it models.<model>.source."""

    def change(cfg, workdir):
        directory = workdir / name
        directory.mkdir(parents=True, exist_ok=True)
        contents = {"config.json": tiny_config() if config is None else config,
                    "model.safetensors": safetensors_bytes(), **(files or {})}
        for file_name, content in contents.items():
            if content is None:
                continue
            if isinstance(content, (dict, list)):
                content = json.dumps(content)
            (directory / file_name).write_bytes(content if isinstance(content, bytes) else content.encode())
        if model is not None:
            cfg["models"] = {model: {"source": f"./{name}"}}
        if then is not None:
            then(cfg, workdir)

    return change


def changes(*steps):
    def change(config, workdir):
        for step in steps:
            step(config, workdir)

    return change


def numbered_rows(count: int) -> str:
    return "".join(json.dumps({"instruction": f"Task number {i}", "input": "", "output": f"answer {i}"}) + "\n"
                   for i in range(count))


BERT_CONFIG = {"model_type": "bert", "architectures": ["BertForMaskedLM"], "hidden_size": 16,
               "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
               "max_position_embeddings": 512, "vocab_size": 64}
SURROGATE_ROW = '{"instruction": "Say \\ud800", "input": "", "output": "o"}'  # a lone surrogate escape
GRID_8000 = {"top_k": list(range(1, 21)), "temperature": [round(0.05 * i, 2) for i in range(1, 21)],
             "top_p": [round(0.05 * i, 2) for i in range(1, 21)]}

# A fragment starting with "!" must NOT be in the message.
REJECTED += [
    # ---- the trial's cases
    ("issue-bert-encoder-as-model", model_dir("bert", BERT_CONFIG, model="enc"),
     ["models.enc.source", "'bert'", "encoder-only", "not a causal language model"]),
    ("issue-temperature-inf", at("decoding.defaults", {"temperature": float("inf")}),
     ["decoding.defaults.temperature: inf", "finite"]),
    ("issue-num_epochs-1e9", at("finetune", {"num_epochs": 1e9}), ["finetune.num_epochs: 1000000000", "at most 1000"]),
    ("issue-max_new_tokens-beyond-context", model_dir("tiny", then=at("decoding.max_new_tokens", 1000)),
     ["decoding.max_new_tokens: 1000", "models.tiny", "context length 512"]),
    ("issue-max_new_tokens-beyond-embedded-context", at("decoding.max_new_tokens", 20000),
     ["decoding.max_new_tokens: 20000", "models.smollm2", "context length 8192"]),
    ("issue-grid-empty-axis", at("decoding", {"mode": "grid", "sweep": {"top_k": [], "temperature": [0.5, 1.0]}}),
     ["decoding.sweep.top_k", "empty"]),
    ("issue-list-duplicate-parameters",
     at("decoding", {"mode": "list", "configs": [{"name": "a", "temperature": 0.0}, {"name": "b", "temperature": 0.0}]}),
     ["'a'", "'b'", "same parameters"]),
    ("issue-learning_rate-nan", at("finetune", {"learning_rate": float("nan")}), ["finetune.learning_rate: nan", "finite"]),
    ("issue-bertscore-num_layers-beyond-depth", at("scoring", {"bertscore": {"num_layers": 12}}),
     ["scoring.bertscore.num_layers: 12", "6 layers"]),
    ("issue-lone-surrogate-on-bad-rows-error", data_file("rows.jsonl", JSONL + SURROGATE_ROW + "\n", on_bad_rows="error"),
     ["rows.jsonl", "line 11", "row 11", "lone surrogate"]),
    ("issue-corrupt-config-json", model_dir("tiny", '{"model_type": "llama",'),
     ["tiny/config.json", "not valid JSON", "line 1"]),
    ("issue-config-json-a-list", model_dir("tiny", [tiny_config()]), ["tiny/config.json", "JSON object", "list"]),
    ("issue-truncated-safetensors", model_dir("tiny", files={"model.safetensors": safetensors_bytes(cut=100)}),
     ["tiny/model.safetensors", "truncated"]),
    ("issue-lora_alpha-inf", at("finetune", {"lora_alpha": float("inf")}),
     ["finetune.lora_alpha: inf", "finite", "!learning rate", "!learning_rate"]),
    ("issue-directory-as-data-source", mkdir("mydata", at("dataset.source", "./mydata")),
     ["dataset.source: './mydata'", "is a directory", "!does not exist"]),
    ("issue-all-identical-rows", data_file("rows.jsonl", jsonl([ROWS[0]] * 10), test_size=2),
     ["rows.jsonl", "1 usable row", "duplicate 9", "dataset.test_size: 2"]),
    ("issue-all-numeric-outputs",
     data_file("rows.jsonl", jsonl([{"instruction": f"t{i}", "input": "", "output": i} for i in range(10)])),
     ["rows.jsonl", "0 usable rows", "non_string_output 10"]),
    ("issue-three-errors-at-once",
     changes(at("seed", "abc"), at("probe", {"layers": [40]}), at("scoring", {"judge": {"enabled": True, "model": "smolm2"}}),
             at("dataset.source", "data/rows.jsonl")),
     ["seed", "'abc'", "probe layer 40", "scoring.judge.model: 'smolm2'", "dataset.source: 'data/rows.jsonl'"]),
    # ---- our own: every number finite
    ("confidence-nan", at("scoring", {"confidence": float("nan")}), ["scoring.confidence: nan", "finite"]),
    ("probe-layer-nan", at("probe", {"layers": [0.5, float("nan")]}), ["probe.layers[1]: nan"]),
    ("warmup_ratio-nan", at("finetune", {"warmup_ratio": float("nan")}), ["finetune.warmup_ratio: nan"]),
    ("weight_decay-inf", at("finetune", {"weight_decay": float("inf")}), ["finetune.weight_decay: inf"]),
    ("top_p-nan", at("decoding.defaults", {"top_p": float("nan")}), ["decoding.defaults.top_p: nan"]),
    ("test_size-inf", at("dataset.test_size", float("inf")), ["dataset.test_size: inf"]),
    ("per-model-learning_rate-inf", models({"smollm2": {**SMOL, "finetune": {"learning_rate": float("inf")}}}),
     ["models.smollm2.finetune.learning_rate: inf"]),
    ("sweep-value-nan", at("decoding.sweep", {"temperature": [0.5, float("nan")]}),
     ["decoding.sweep.temperature[1]: nan"]),
    ("early-exit-temperature-inf", at("probe", {"early_exit": {"decoding": {"temperature": float("-inf")}}}),
     ["probe.early_exit.decoding.temperature: -inf"]),
    ("vllm-memory-fraction-nan", at("generation", {"vllm_gpu_memory_utilization": float("nan")}),
     ["generation.vllm_gpu_memory_utilization: nan"]),
    # ---- our own: work bounded or estimated
    ("max_steps-huge", at("finetune", {"max_steps": 10**9}), ["finetune.max_steps: 1000000000", "at most"]),
    ("num_epochs-above-bound", at("finetune", {"num_epochs": 2000}), ["finetune.num_epochs: 2000", "at most 1000"]),
    ("training-token-estimate",
     at("finetune", {"max_steps": 10**6, "batch_size": 64, "gradient_accumulation": 64, "max_seq_length": 512}),
     ["models.smollm2.finetune", "training tokens"]),
    ("optimizer-steps-estimate-from-rows",
     changes(data_file("rows.jsonl", numbered_rows(2000), test_size=100),
             at("finetune", {"num_epochs": 1000, "batch_size": 1})),
     ["finetune.num_epochs: 1000", "1900 training rows", "optimizer steps"]),
    ("grid-too-many-configs", at("decoding", {"mode": "grid", "sweep": GRID_8000}), ["8000 decoding configs", "at most"]),
    # ---- our own: decoding configs
    ("one-at-a-time-empty-axis", at("decoding.sweep", {"num_beams": [], "top_k": [10]}),
     ["decoding.sweep.num_beams", "empty"]),
    ("sweep-axis-duplicate-value", at("decoding", {"mode": "grid", "sweep": {"top_k": [10, 10, 40]}}),
     ["decoding.sweep.top_k", "10", "more than once"]),
    ("list-duplicate-through-defaults",
     at("decoding", {"mode": "list", "defaults": {"temperature": 0.7},
                     "configs": [{"name": "warm", "temperature": 0.7}, {"name": "plain"}]}),
     ["'warm'", "'plain'", "same parameters"]),
    ("list-same-name-twice",
     at("decoding", {"mode": "list", "configs": [{"name": "greedy", "temperature": 0.0},
                                                 {"name": "greedy", "temperature": 0.5}]}), ["'greedy'"]),
    ("stop-string-whitespace", at("decoding.stop", [" "]), ["decoding.stop[0]", "whitespace"]),
    # ---- our own: models
    ("encoder-decoder-t5", model_dir("t5", {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"],
                                             "is_encoder_decoder": True, "num_layers": 2, "d_model": 16}, model="t5"),
     ["models.t5.source", "'t5'", "encoder-decoder"]),
    ("sequence-classification-checkpoint",
     model_dir("cls", tiny_config(architectures=["LlamaForSequenceClassification"]), model="cls"),
     ["models.cls.source", "LlamaForSequenceClassification", "not a causal language model"]),
    ("config-json-empty", model_dir("tiny", ""), ["tiny/config.json", "empty"]),
    ("safetensors-header-length-beyond-file",
     model_dir("tiny", files={"model.safetensors": (10**9).to_bytes(8, "little") + b'{"a": 1}'}),
     ["tiny/model.safetensors", "header"]),
    ("safetensors-header-not-json",
     model_dir("tiny", files={"model.safetensors": (12).to_bytes(8, "little") + b"not json at!" + bytes(64)}),
     ["tiny/model.safetensors", "header", "not valid JSON"]),
    ("safetensors-empty", model_dir("tiny", files={"model.safetensors": b""}), ["tiny/model.safetensors", "truncated"]),
    ("sharded-index-names-a-missing-shard",
     model_dir("tiny", files={"model.safetensors": None,
                              "model-00001-of-00002.safetensors": safetensors_bytes(),
                              "model.safetensors.index.json": {"metadata": {}, "weight_map": {
                                  "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                                  "lm_head.weight": "model-00002-of-00002.safetensors"}}}),
     ["model.safetensors.index.json", "model-00002-of-00002.safetensors", "missing"]),
    ("no-weight-files", model_dir("tiny", files={"model.safetensors": None}), ["models.tiny.source", "no weight files"]),
    ("model-source-is-a-file",
     lambda c, w: ((w / "weights.safetensors").write_bytes(safetensors_bytes()),
                   models({"tiny": {"source": "./weights.safetensors"}})(c, w)),
     ["models.tiny.source", "not a directory"]),
    ("judge-is-an-encoder",
     model_dir("bert", BERT_CONFIG, model=None, then=at("scoring", {"judge": {"enabled": True, "model": "./bert"}})),
     ["scoring.judge.model", "'bert'", "encoder-only"]),
    ("num_layers-contradicts-config-json",
     model_dir("tiny", then=lambda c, w: c["models"]["tiny"].update(num_layers=5)),
     ["models.tiny.num_layers: 5", "config.json", "2 layers"]),
    ("early-exit-max_new_tokens-beyond-context",
     model_dir("tiny", then=at("probe", {"early_exit": {"max_new_tokens": 600}})),
     ["probe.early_exit.max_new_tokens: 600", "context length 512"]),
    ("max_seq_length-beyond-context", model_dir("tiny", then=at("finetune", {"max_seq_length": 1024})),
     ["finetune.max_seq_length: 1024", "models.tiny", "context length 512"]),
    ("context_length-given-in-the-config",
     model_dir("tiny", then=lambda c, w: (c["models"]["tiny"].update(context_length=256),
                                          at("decoding.max_new_tokens", 300)(c, w))),
     ["decoding.max_new_tokens: 300", "models.tiny", "context length 256"]),
    ("bertscore-local-model-num_layers-beyond-depth",
     model_dir("enc", BERT_CONFIG, model=None,
               then=at("scoring", {"bertscore": {"model": "./enc", "num_layers": 4}})),
     ["scoring.bertscore.num_layers: 4", "2 layers", "!encoder-only"]),
    ("hub-model-in-the-cache-is-an-encoder",
     lambda c, w: (model_dir("hf-home/hub/models--someorg--bert/snapshots/" + "a" * 40, BERT_CONFIG, model=None)(c, w),
                   models({"bert": {"source": "someorg/bert", "num_layers": 2}})(c, w)),
     ["models.bert.source", "models--someorg--bert", "'bert'", "encoder-only"]),
    ("hub-model-in-the-offline-cache-truncated",
     lambda c, w: (model_dir("hf-home/hub/models--someorg--tiny/snapshots/" + "a" * 40, model=None,
                             files={"model.safetensors": safetensors_bytes(cut=1)})(c, w),
                   models({"tiny": {"source": "someorg/tiny", "num_layers": 2}})(c, w)),
     ["models.tiny.source", "models--someorg--tiny", "model.safetensors: truncated"]),
    ("target-module-typo", model_dir("tiny", then=at("finetune", {"target_modules": ["q_proj", "qproj"]})),
     ["finetune.target_modules", "'qproj'", "models.tiny", "!'q_proj'"]),
    ("target-modules-empty", at("finetune", {"target_modules": []}), ["finetune.target_modules", "empty"]),
    ("two-models-beyond-depth",
     models({"smollm2": {**SMOL, "probe_layers": [40]}, "gemma": {"source": "embedded:gemma3-270m", "probe_layers": [40]}}),
     ["beyond its depth (30", "beyond its depth (18"]),
    # ---- our own: data
    ("fields-same-column", data_file("rows.jsonl", JSONL, fields={"instruction": "output", "output": "output"}),
     ["dataset.fields.output: 'output'", "same column as dataset.fields.instruction"]),
    ("all-lines-malformed", data_file("rows.jsonl", '{"instruction": "a", "out\n[1, 2\nnot json\n'),
     ["rows.jsonl", "0 usable rows", "malformed_json_line 3"]),
    ("bad-row-with-on-bad-rows-error-before-any-job",
     data_file("rows.jsonl", jsonl([*ROWS, {"instruction": "no answer", "input": ""}]), on_bad_rows="error"),
     ["rows.jsonl", "row 11: missing output"]),
    ("evaluation-set-is-a-directory",
     mkdir("evaldir", at("evaluation_sets", [{"name": "extra", "source": "./evaldir"}])),
     ["evaluation_sets[0].source: './evaldir'", "is a directory"]),
    ("evaluation-set-without-usable-rows",
     lambda c, w: ((w / "extra.jsonl").write_text(jsonl([{"instruction": f"q{i}", "output": ""} for i in range(4)])),
                   at("evaluation_sets", [{"name": "extra", "source": "extra.jsonl"}])(c, w)),
     ["evaluation_sets[name=extra]", "extra.jsonl", "0 usable rows"]),
    ("ratings-dir-is-a-file",
     lambda c, w: ((w / "ratings").write_text("x"), at("scoring", {"human": {"ratings_dir": "ratings"}})(c, w)),
     ["scoring.human.ratings_dir: 'ratings'", "not a directory"]),
    ("probe-fraction-above-one", at("probe", {"layers": [0.5, 2.5]}), ["probe", "2.5"]),
]


def _numeric_parquet(config, workdir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"instruction": [1, 2, 3], "input": ["", "", ""], "output": ["x", "y", "z"]}),
                   workdir / "rows.parquet")
    config["dataset"]["source"] = "rows.parquet"


REJECTED.append(("numeric-parquet-instructions", _numeric_parquet,
                 ["rows.parquet", "0 usable rows", "non_string_instruction 3"]))


@pytest.mark.parametrize("case, change, fragments", REJECTED, ids=[case[0] for case in REJECTED])
def test_rejected_before_any_job_naming_the_culprit(case, change, fragments, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths in a config are relative to where snakemake runs
    config = copy.deepcopy(BASE)
    change(config, tmp_path)
    with pytest.raises(TunelensError) as error:  # anything else would reach the user as a traceback
        run_checks(config, tmp_path)
    message = str(error.value)
    for fragment in fragments:
        if fragment.startswith("!"):
            assert fragment[1:] not in message, f"{case}: {fragment[1:]!r} in: {message}"
        else:
            assert fragment in message, f"{case}: {fragment!r} not in: {message}"
    assert "Traceback" not in message


YAML_CASES = [
    ("duplicate-model-key", "models:\n  smollm2: {source: embedded:smollm2-135m-instruct}\n"
                            "  smollm2: {source: embedded:gemma3-270m}\n", ["line 3", "duplicate key 'smollm2'"]),
    ("duplicate-nested-key", "finetune:\n  lora_r: 8\n  lora_r: 16\n", ["line 3", "duplicate key 'lora_r'"]),
    ("duplicate-top-level-key", "seed: 1\nseed: 2\n", ["duplicate key 'seed'"]),
    ("invalid-yaml", "models: [unclosed\n", ["not valid YAML"]),
]


@pytest.mark.parametrize("case, text, fragments", YAML_CASES, ids=[case[0] for case in YAML_CASES])
def test_yaml_file_problems_are_rejected(case, text, fragments, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        check_yaml_duplicates(path)
    for fragment in fragments:
        assert fragment in str(error.value), str(error.value)


@pytest.mark.skipif(cuda_device_count() > 0, reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_rejected(tmp_path):
    config = {**copy.deepcopy(BASE), "device": "cuda"}
    with pytest.raises(ConfigError, match=r"device: 'cuda', but this machine has no usable CUDA device"):
        run_checks(config, tmp_path, check_cuda=True)


def test_the_same_configs_pass_when_fixed(tmp_path, monkeypatch):
    """The checks are not rejecting everything: the base config and a good local dataset pass."""
    monkeypatch.chdir(tmp_path)
    run_checks(copy.deepcopy(BASE), tmp_path)
    config = copy.deepcopy(BASE)
    data_file("rows.jsonl", JSONL, test_size=3, fields={"input": "input"})(config, tmp_path)
    run_checks(config, tmp_path)
    config = copy.deepcopy(BASE)
    config["scoring"] = {"judge": {"enabled": True, "model": "smollm2"}}  # a model name of `models`
    run_checks(config, tmp_path)


# ----------------------------------------------------------------------------------------- handled and counted
def split(tmp_path: Path, name: str, content, **options) -> dict:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    kwargs = dict(fields={"instruction": "instruction", "input": "input", "output": "output"}, seed=1,
                  test_size=2, max_train=None, hub_split="train")
    kwargs.update(options)
    out = tmp_path / "out"
    return split_dataset(source=str(path), name="ds", train_path=out / "train.jsonl", test_path=out / "test.jsonl",
                         manifest_path=out / "manifest.json", **kwargs)


HANDLED = [
    # (id, file name, content, {reason: count} expected in counts.dropped)
    ("bom-json", "rows.json", b"\xef\xbb\xbf" + json.dumps(ROWS).encode(), {}),
    ("bom-jsonl", "rows.jsonl", b"\xef\xbb\xbf" + JSONL.encode(), {}),
    ("bom-csv-from-excel", "rows.csv", b"\xef\xbb\xbf" + "\r\n".join(
        ["instruction,input,output"] + [f"{r['instruction']},{r['input']},{r['output']}" for r in ROWS]).encode(), {}),
    ("malformed-jsonl-lines", "rows.jsonl", jsonl([*ROWS, '{"instruction": "x", "outp', "not json at all"]),
     {"malformed_json_line": 2}),
    ("jsonl-line-not-an-object", "rows.jsonl", jsonl([*ROWS, "[1, 2]"]), {"not_an_object": 1}),
    ("json-item-not-an-object", "rows.json", json.dumps([*ROWS, "just a string"]), {"not_an_object": 1}),
    ("csv-row-with-extra-cells", "rows.csv", "instruction,input,output\n" + "".join(
        f"{r['instruction']},{r['input']},{r['output']}\n" for r in ROWS) + "a,b,c,d\n", {"malformed_csv_row": 1}),
    ("missing-output", "rows.jsonl", jsonl([*ROWS, {"instruction": "no answer", "input": ""}]), {"missing_output": 1}),
    ("empty-instruction", "rows.jsonl", jsonl([*ROWS, {"instruction": "  ", "input": "", "output": "o"}]),
     {"empty_instruction": 1}),
    ("non-string-output", "rows.jsonl", jsonl([*ROWS, {"instruction": "n", "input": "", "output": 42}]),
     {"non_string_output": 1}),
    ("duplicate-rows", "rows.jsonl", jsonl([*ROWS, ROWS[0], ROWS[1]]), {"duplicate": 2}),
    # issue 23: a lone surrogate escape is valid JSON but no UTF-8 text (a raw UnicodeEncodeError before)
    ("lone-surrogate-jsonl", "rows.jsonl", jsonl([*ROWS, '{"instruction": "Say \\ud800", "input": "", "output": "o"}']),
     {"lone_surrogate": 1}),
    ("lone-surrogate-json", "rows.json", "[" + ", ".join([*(json.dumps(r) for r in ROWS),
                                                         '{"instruction": "i", "input": "", "output": "\\udfff x"}']) + "]",
     {"lone_surrogate": 1}),
]


@pytest.mark.parametrize("case, name, content, dropped", HANDLED, ids=[case[0] for case in HANDLED])
def test_handled_and_counted(case, name, content, dropped, tmp_path):
    manifest = split(tmp_path, name, content)
    assert manifest["counts"]["dropped"] == dropped
    assert manifest["counts"]["usable"] == len(ROWS)
    for reason in dropped:
        assert manifest["counts"]["dropped_examples"].get(reason) or reason == "duplicate"


def test_absent_input_column_under_the_default_mapping_is_recorded(tmp_path):
    manifest = split(tmp_path, "rows.json", json.dumps([{"instruction": r["instruction"], "output": r["output"]}
                                                        for r in ROWS]))
    assert manifest["absent_columns"] == {"input": "input"}
    rows = [json.loads(line) for line in (tmp_path / "out/train.jsonl").read_text().splitlines()]
    assert {row["input"] for row in rows} == {""}


@pytest.mark.parametrize("case, name, content, dropped", [c for c in HANDLED if c[3] and c[3] != {"duplicate": 2}],
                         ids=[c[0] for c in HANDLED if c[3] and c[3] != {"duplicate": 2}])
def test_on_bad_rows_error_turns_each_into_an_error_naming_the_row(case, name, content, dropped, tmp_path):
    with pytest.raises(DataError) as error:
        split(tmp_path, name, content, on_bad_rows="error")
    reason = next(iter(dropped)).replace("_", " ")
    assert reason in str(error.value) and name in str(error.value)
    assert "line " in str(error.value) or "row " in str(error.value) or "item " in str(error.value)


def test_lone_surrogate_error_names_file_line_and_row(tmp_path):
    with pytest.raises(DataError) as error:
        split(tmp_path, "rows.jsonl", jsonl([*ROWS, '{"instruction": "ok", "input": "", "output": "o"}',
                                             '{"instruction": "Say \\ud800", "input": "", "output": "o"}']),
              on_bad_rows="error")
    message = str(error.value)
    assert "rows.jsonl" in message and "line 12" in message and "row 12" in message, message
    assert "lone surrogate" in message and "instruction" in message, message


def test_a_good_local_model_directory_passes(tmp_path, monkeypatch):
    """The model checks are not rejecting every local directory: a 2-layer causal LM with an intact
    safetensors file, a context long enough and a target module it has pass."""
    monkeypatch.chdir(tmp_path)
    config = copy.deepcopy(BASE)
    model_dir("tiny", then=at("finetune", {"target_modules": ["q_proj", "v_proj"], "max_seq_length": 256}))(
        config, tmp_path)
    config["decoding"] = {"max_new_tokens": 200}
    config["probe"] = {"layers": [1, 2]}
    run_checks(config, tmp_path)


@pytest.mark.parametrize("change, fragments", [
    (changes(at("dataset.fields", "x"), at("probe", {"layers": [40]})), ["dataset.fields: 'x'", "probe layer 40"]),
    (changes(at("decoding", {"mode": "list", "configs": [1, {"name": "a"}]}), at("finetune", {"lora_alpha": -1}),
             at("models.smollm2.resources", 1), at("scoring", {"judge": {"enabled": True, "model": "smolm2"}})),
     ["decoding.configs[0]: 1", "finetune.lora_alpha: -1", "models.smollm2.resources: 1", "scoring.judge.model"]),
    (changes(at("probe", {"layers": "all"}), at("scoring", {"confidence": float("nan")}),
             at("decoding.sweep", {"top_k": []})),
     ["probe.layers: 'all'", "scoring.confidence: nan", "decoding.sweep.top_k: empty"]),
], ids=["fields-a-string", "list-entry-not-an-object", "layers-a-string"])
def test_schema_errors_come_with_the_other_problems_and_never_a_traceback(change, fragments, tmp_path, monkeypatch):
    """Values of the wrong type leave the other checks a half-valid config: they still run, and only
    ConfigErrors come out, all in one message."""
    monkeypatch.chdir(tmp_path)
    config = copy.deepcopy(BASE)
    change(config, tmp_path)
    with pytest.raises(ConfigError) as error:
        run_checks(config, tmp_path)
    for fragment in fragments:
        assert fragment in str(error.value), f"{fragment!r} not in: {error.value}"


def test_corpus_size():
    assert len(REJECTED) + len(YAML_CASES) + 1 + len(HANDLED) + 1 >= 60


# ----------------------------------------------------------------------------------------- through snakemake
def snakemake(workdir: Path, configfile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "snakemake", *args, "--snakefile", str(ROOT / "Snakefile"), "--directory",
         str(workdir), "--configfile", str(configfile)],
        cwd=workdir, capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(workdir / "hf")},
    )


@pytest.mark.parametrize("case, text, fragment", [
    ("duplicate-key", "dataset: {name: demo, source: embedded:demo, test_size: 6}\nmodels:\n"
                      "  smollm2: {source: embedded:smollm2-135m-instruct}\n  smollm2: {source: embedded:gemma3-270m}\n",
     "duplicate key 'smollm2'"),
    ("judge-typo", "dataset: {name: demo, source: embedded:demo, test_size: 6}\nmodels:\n"
                   "  smollm2: {source: embedded:smollm2-135m-instruct}\nscoring: {judge: {enabled: true, model: smolm2}}\n",
     "scoring.judge.model: 'smolm2'"),
    ("data-path-typo", "dataset: {name: d, source: data/rows, test_size: 2}\nmodels:\n"
                       "  smollm2: {source: embedded:smollm2-135m-instruct}\n", "dataset.source: 'data/rows'"),
])
def test_snakemake_reports_one_clean_message_and_runs_nothing(case, text, fragment, tmp_path):
    (tmp_path / "data").mkdir()
    configfile = tmp_path / "study.yaml"
    configfile.write_text(text)
    result = snakemake(tmp_path, configfile, "-n")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert fragment in output and "tunelens: ConfigError" in output
    assert "Traceback" not in output and 'File "' not in output
    assert not (tmp_path / "results").exists()


def test_snakemake_reports_every_error_of_a_config_in_one_message(tmp_path):
    """Schema, semantic and file errors together (issue 23: they came one per run, schema errors first)."""
    configfile = tmp_path / "study.yaml"
    configfile.write_text("seed: abc\ndataset: {name: d, source: data/rows.jsonl, test_size: 2}\nmodels:\n"
                          "  smollm2: {source: embedded:smollm2-135m-instruct}\nprobe: {layers: [40]}\n"
                          "finetune: {learning_rate: .nan}\nscoring: {judge: {enabled: true, model: smolm2}}\n")
    result = snakemake(tmp_path, configfile, "-n")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert output.count("tunelens: ConfigError") == 1, output
    for fragment in ("seed", "'abc'", "probe layer 40", "finetune.learning_rate: nan",
                     "scoring.judge.model: 'smolm2'", "dataset.source: 'data/rows.jsonl'"):
        assert fragment in output, f"{fragment!r} not in: {output}"
    assert "Traceback" not in output and 'File "' not in output
    assert not (tmp_path / "results").exists()


@pytest.mark.skipif(cuda_device_count() > 0, reason="this machine has CUDA")
def test_device_cuda_without_cuda_stops_a_real_run_before_any_job(tmp_path):
    configfile = tmp_path / "study.yaml"
    configfile.write_text(yaml.safe_dump({**BASE, "device": "cuda"}))
    assert snakemake(tmp_path, configfile, "-n").returncode == 0  # a dry run plans (jobs may go to a GPU node)
    result = snakemake(tmp_path, configfile, "--cores", "1")
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "device: 'cuda', but this machine has no usable CUDA device" in output
    assert "Traceback" not in output
    assert not (tmp_path / "results").exists() and not (tmp_path / "logs").exists()


# ----------------------------------------------------------------------------------------- logs
def test_every_rule_script_sends_errors_to_its_log():
    for script in sorted((ROOT / "scripts").glob("*.py")):
        text = script.read_text()
        if script.name == "finetune.py":  # stderr (tracebacks included) is the log file there
            assert "sys.stderr = log_file" in text
        else:
            assert "job_log(snakemake.log[0])" in text, f"{script.name} does not call tunelens.jobs.job_log"


def test_job_log_holds_the_traceback_of_a_failed_job(tmp_path):
    log = tmp_path / "rule.log"
    code = (f"from tunelens.jobs import job_log\njob_log({str(log)!r})\nimport logging\n"
            "logging.getLogger('x').info('started')\nraise ValueError('boom in the job')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode != 0 and "boom in the job" in result.stderr  # still on stderr
    text = log.read_text()
    assert "started" in text and "Traceback (most recent call last)" in text and "ValueError: boom in the job" in text


def test_a_failing_rule_writes_its_error_to_its_own_log(tmp_path):
    """Rule `split` on a row missing its output, dataset.on_bad_rows: error. A local file's rows are checked
    before any job (issue 23), so the rows come from a hub dataset already downloaded into results/hub/: only
    the split job reads those."""
    rows = ROWS + [{"instruction": "no answer", "input": ""}]
    download = tmp_path / "results/hub/datasets/d"
    download.mkdir(parents=True)
    (download / "train.jsonl").write_text(jsonl(rows))
    (download / "tunelens_source.json").write_text(json.dumps({"hub_id": "someorg/rows", "repo_type": "dataset",
                                                               "revision": "0" * 40, "from": "cache"}))
    configfile = tmp_path / "study.yaml"
    configfile.write_text(yaml.safe_dump({**BASE, "dataset": {"name": "d", "source": "someorg/rows", "test_size": 2,
                                                              "on_bad_rows": "error"}}))
    result = snakemake(tmp_path, configfile, "--cores", "1", "results/data/d/manifest.json")
    assert result.returncode != 0
    text = (tmp_path / "logs/split/d.log").read_text()
    assert "Traceback (most recent call last)" in text
    assert "DataError" in text and "row 11: missing output" in text and "on_bad_rows" in text


# ----------------------------------------------------------------------------------------- report
def test_report_flags_an_all_empty_variant_and_counts_dropped_rows(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from test_report import build_study, run

    files = build_study(tmp_path, models=("smol",), judge=False, layers=())
    for path in files["score_files"]:  # the fine-tuned variant answered nothing, in every config
        data = json.loads(path.read_text())
        data["empty_generations"] = data["n"] if data["variant"] == "finetuned" else 0
        path.write_text(json.dumps(data))
    first = json.loads(files["score_files"][0].read_text())  # smol/base, default config: 3 of n empty
    first["empty_generations"] = 3
    files["score_files"][0].write_text(json.dumps(first))
    metrics_file = files["finetune_metrics_files"][0]
    metrics = json.loads(metrics_file.read_text())
    metrics.update(train_rows=205, dropped_rows={"prompt_fills_max_seq_length": 1}, truncated_rows=4)
    metrics_file.write_text(json.dumps(metrics))
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"counts": {
        "read": 215, "usable": 212, "train": 206, "test": 6,
        "dropped": {"malformed_json_line": 2, "missing_output": 1},
        "dropped_examples": {"malformed_json_line": ["line 7", "line 90"], "missing_output": ["row 12"]}}}))
    summary = run(tmp_path, files, split_manifest=manifest)["summary_md"].read_text()
    checks = summary.split("## Data checks", 1)[1].split("\n## ", 1)[0]
    assert "**smol / finetuned: every answer is empty** in all 3 decoding config(s)" in checks
    assert "smol / base" not in checks.split("Rows left out")[0]  # base is not flagged as all-empty
    assert "3 of 12 answers empty" in checks
    assert "split: 215 records read, 212 usable, 206 train / 6 test; dropped: malformed json line 2, missing output 1" in checks
    assert "malformed json line at line 7, line 90" in checks
    assert "fine-tune smol: 205 rows trained; dropped: prompt fills max seq length 1; truncated to max_seq_length: 4" in checks
    # without empty answers or dropped rows, there is no such section
    clean = build_study(tmp_path / "clean", models=("smol",), judge=False, layers=(), finetune=False)
    assert "## Data checks" not in run(tmp_path / "clean", clean)["summary_md"].read_text()
