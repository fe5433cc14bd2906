"""Bad-input corpus: configs, data files and model references a user gets wrong.

Each case is either rejected before any job, with an error (ConfigError/DataError, no traceback) that names the
culprit (key and value, or file and line), or handled and counted (the split manifest says what was dropped
and why). No case may end in another exception type (a traceback for the user) or pass silently.

The config cases run in-process through exactly what Snakemake runs when it builds the DAG (duplicate-key
check of the YAML file, tunelens.config.load_config, tunelens.preflight.preflight), so ~70 cases take seconds;
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

from tunelens.config import check_yaml_duplicates, load_config
from tunelens.data import split_dataset
from tunelens.errors import ConfigError, DataError, TunelensError
from tunelens.preflight import cuda_device_count, preflight

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
    preflight(load_config(config, base_dir=workdir), base_dir=workdir, environ=environ, check_cuda=check_cuda)


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


@pytest.mark.parametrize("case, change, fragments", REJECTED, ids=[case[0] for case in REJECTED])
def test_rejected_before_any_job_naming_the_culprit(case, change, fragments, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths in a config are relative to where snakemake runs
    config = copy.deepcopy(BASE)
    change(config, tmp_path)
    with pytest.raises(TunelensError) as error:  # anything else would reach the user as a traceback
        run_checks(config, tmp_path)
    message = str(error.value)
    for fragment in fragments:
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


def jsonl(rows) -> str:
    return "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)


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
    """Rule `split` on a file with a row missing its output, dataset.on_bad_rows: error (known only in the job)."""
    rows = ROWS + [{"instruction": "no answer", "input": ""}]
    (tmp_path / "rows.jsonl").write_text(jsonl(rows))
    configfile = tmp_path / "study.yaml"
    configfile.write_text(yaml.safe_dump({**BASE, "dataset": {"name": "d", "source": "rows.jsonl", "test_size": 2,
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
