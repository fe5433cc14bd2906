"""Every config key reaches the place where it acts, at a non-default value (issue 22, "settings tested only at
their defaults"). Generated from the schema: a key added to schemas/config.schema.yaml without a check here, or
a reason why it has no observable effect, fails test_every_schema_key_is_checked_or_listed.

Two levels:
- the job: one Snakemake DAG of the real workflow is built (no job runs) from a config where every checked key
  has a non-default value, and each key's value is found in the params (or resources) of the jobs of the rule
  that acts on it; a key that selects jobs is found in which jobs exist;
- the library: the fine-tune keys are followed from those params into peft's LoraConfig and TRL's SFTConfig
  (tunelens.training.finetune.lora_config / sft_config), the objects the trainer is built from.
How the scripts pass params on to the libraries (generation kwargs, score files' bootstrap block, rows scored)
is covered by the stage tests (test_decoding, test_score, test_statistics, test_generate, test_probe).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from tunelens.config import _load_schema

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------- the schema's keys
def schema_keys() -> list[str]:
    """Every leaf key of the schema, dotted; `*` = any model name, `[]` = any list item."""
    schema = _load_schema()

    def resolve(node: dict) -> dict:
        while "$ref" in node:
            target: Any = schema
            for part in node["$ref"].split("/")[1:]:
                target = target[part]
            node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return node

    def walk(node: dict, path: list[str]):
        node = resolve(node)
        extra, items = node.get("additionalProperties"), node.get("items")
        if node.get("properties"):
            for key, child in node["properties"].items():
                yield from walk(child, path + [key])
        elif isinstance(extra, dict) and resolve(extra).get("properties"):
            yield from walk(extra, path + ["*"])
        elif isinstance(items, dict) and resolve(items).get("properties"):
            yield from walk(items, path + ["[]"])
        else:
            yield ".".join(path)

    return list(walk(schema, []))


# --------------------------------------------------------------------------------------------- a non-default study
def study_config(tmp_path: Path) -> dict:
    """config.yaml with a non-default value for every checked key (values chosen to be valid together)."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    extra = tmp_path / "extra.jsonl"
    extra.write_text("".join(json.dumps({"q": f"Add {i} and {i}.", "ctx": "", "a": f"{2 * i}"}) + "\n"
                             for i in range(6)))
    baseline = tmp_path / "baseline.csv"
    baseline.write_text("LAYER,P,R,F\n0,0.1,0.1,0.1\n")
    config.update({
        "seed": 77,
        "device": "cuda",
        "dataset": {"name": "demo2", "source": "embedded:demo", "kind": "code", "code_language": "javascript",
                    "test_size": 13, "max_train": 40, "on_bad_rows": "error", "hub_split": "validation",
                    "fields": {"instruction": "instruction", "input": "input", "output": "output"}},
        "evaluation_sets": [{"name": "extra", "source": str(extra), "hub_split": "dev",
                             "fields": {"instruction": "q", "input": "ctx", "output": "a"}, "kind": "code",
                             "code_language": "go", "max_rows": 5}],
        "decoding": {"mode": "list", "beam_mode": "beam_sample", "max_new_tokens": 33, "stop": ["<END>"],
                     "max_test_rows": 9,
                     "configs": [{"name": "wide", "top_k": 7, "num_beams": 1, "temperature": 0.6, "top_p": 0.9,
                                  "repetition_penalty": 1.2},
                                 {"name": "beam", "top_k": 50, "num_beams": 3, "temperature": 0.5}]},
        "generation": {"backend": "hf", "batch_size": 5, "max_prompt_tokens": 900, "vllm_gpu_memory_utilization": 0.5,
                       "vllm_max_lora_rank": 32, "vllm_python": sys.executable, "server": False,
                       "server_idle_timeout_s": 30, "server_start_timeout_s": 45, "agreement_rows": 3,
                       "agreement_max_new_tokens": 11, "static_cache": True, "compile_backend": "cudagraphs",
                       "merge_adapter": False},
        "scoring": {"metrics": ["bleu", "bertscore", "codebleu"], "perplexity": True, "perplexity_batch_size": 3,
                    "bootstrap_samples": 321, "confidence": 0.9, "multiple_comparisons": "holm",
                    "bertscore": {"num_layers": 4, "batch_size": 7, "rescale_with_baseline": True,
                                  "baseline_path": str(baseline), "lang": "de", "gpus": 1},
                    "judge": {"enabled": True, "model": "gemma3", "batch_size": 2},
                    "human": {"enabled": True, "sample_size": 5, "ratings_dir": str(tmp_path / "ratings")}},
        "probe": {"enabled": True, "layers": [0.5, 1.0], "lens_prompts": ["Name a colour."], "lens_test_prompts": 1,
                  "lens_top_k": 3, "lens_new_tokens": 4,
                  "early_exit": {"enabled": True, "max_test_rows": 4, "max_new_tokens": 21,
                                 "decoding": {"top_k": 9, "num_beams": 1, "temperature": 0.7, "top_p": 0.8,
                                              "repetition_penalty": 1.1}}},
        "report": {"default_config": "beam"},
    })
    config["finetune"] = {"enabled": True, "method": "lora", "lora_r": 4, "lora_alpha": 12, "lora_dropout": 0.2,
                          "target_modules": ["q_proj", "v_proj"], "learning_rate": 0.003, "lr_scheduler": "linear",
                          "warmup_ratio": 0.2, "weight_decay": 0.01, "num_epochs": 2, "max_steps": 6, "batch_size": 3,
                          "gradient_accumulation": 2, "max_seq_length": 200, "packing": True, "padding_free": True,
                          "gradient_checkpointing": True, "liger": False, "autotune": False, "cuda_graphs": False,
                          "logging_steps": 3,
                          "save_steps": 4}
    config["models"] = {
        "smollm2": {"source": "embedded:smollm2-135m-instruct", "prompt_format": "chat", "num_layers": 30,
                    "generation_backend": "hf", "probe_layers": [0.25],
                    "resources": {"gpus": 0, "cpus": 2, "mem_mb": 5000, "runtime": 33}},
        # config.yaml's own override for gemma3 (max_steps 8, batch_size 4) stays: the config is merged onto it
        "gemma3": {"source": "embedded:gemma3-270m", "prompt_format": "alpaca", "finetune": {"lora_r": 6}},
    }
    return config


def build_dag(config: dict, workdir: Path) -> dict[str, list]:
    """rule name -> its jobs, from a DAG of the real workflow (nothing runs)."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, DAGSettings, OutputSettings, ResourceSettings, StorageSettings

    workdir.mkdir(parents=True, exist_ok=True)
    with SnakemakeApi(OutputSettings()) as api:
        workflow_api = api.workflow(resource_settings=ResourceSettings(cores=1),
                                    config_settings=ConfigSettings(config=config), storage_settings=StorageSettings(),
                                    snakefile=REPO / "Snakefile", workdir=workdir)
        # `all` and the on-demand generation_agreement job (not part of `all`)
        targets = {"all", "results/agreement/smollm2/base.json"}
        workflow = workflow_api.dag(DAGSettings(targets=targets, forceall=True)).workflow_api._workflow
        workflow._prepare_dag(forceall=True, ignore_incomplete=True, lock_warn_only=True, nolock=True)
        workflow._build_dag()
        jobs: dict[str, list] = {}
        for job in workflow.dag.jobs:
            jobs.setdefault(job.rule.name, []).append(job)
        return jobs


@pytest.fixture(scope="module")
def dag(tmp_path_factory):
    root = tmp_path_factory.mktemp("settings")
    config = study_config(root)
    return config, build_dag(copy.deepcopy(config), root / "work")


def params(jobs: dict, rule: str, **wildcards) -> dict:
    """The params of the first job of `rule` whose wildcards match."""
    for job in jobs.get(rule, []):
        if all(str(job.wildcards.get(k)) == str(v) for k, v in wildcards.items()):
            return dict(job.params.items())
    raise AssertionError(f"no job of rule '{rule}' with {wildcards}; rules: {sorted(jobs)}")


def resources(jobs: dict, rule: str, **wildcards) -> dict:
    for job in jobs.get(rule, []):
        if all(str(job.wildcards.get(k)) == str(v) for k, v in wildcards.items()):
            return dict(job.resources.items())
    raise AssertionError(f"no job of rule '{rule}' with {wildcards}")


# key -> (what is checked, check(jobs, config) -> None). The checks read the study_config values above.
Check = Callable[[dict], None]
SMOL = {"model": "smollm2"}


def _eq(rule: str, path: str, expected: Any, **wildcards) -> Check:
    def check(jobs: dict) -> None:
        value: Any = params(jobs, rule, **wildcards)
        for part in path.split("."):
            value = value[part]
        assert value == expected, f"rule {rule} param {path}: {value!r}, expected {expected!r}"
    check.where = f"{rule}: params.{path}"  # type: ignore[attr-defined]
    return check


def _jobs(rule: str, count: Callable[[int], bool], what: str) -> Check:
    def check(jobs: dict) -> None:
        assert count(len(jobs.get(rule, []))), f"rule {rule}: {len(jobs.get(rule, []))} jobs; expected {what}"
    check.where = f"{rule}: {what}"  # type: ignore[attr-defined]
    return check


def _resource(rule: str, name: str, expected: Any, **wildcards) -> Check:
    def check(jobs: dict) -> None:
        assert resources(jobs, rule, **wildcards)[name] == expected
    check.where = f"{rule}: resources.{name}"  # type: ignore[attr-defined]
    return check


def _configs(jobs: dict) -> set[str]:
    return {str(job.wildcards["decoding"]) for job in jobs["generate"]}


def _decoding_check(field: str, expected: Any) -> Check:
    def check(jobs: dict) -> None:
        decodings = [dict(job.params.items())["decoding"] for job in jobs["generate"]]
        assert any(d[field] == expected for d in decodings), f"generate decoding {field}: {decodings}"
    check.where = f"generate: params.decoding.{field}"  # type: ignore[attr-defined]
    return check


CHECKS: dict[str, Check] = {
    "seed": _eq("finetune", "seed", 77, **SMOL),
    "device": _eq("generate", "device", "cuda", **SMOL),
    "dataset.name": _eq("split", "name", "demo2"),
    "dataset.source": _eq("split", "source", "embedded:demo"),
    "dataset.hub_split": _eq("split", "hub_split", "validation"),
    "dataset.on_bad_rows": _eq("split", "on_bad_rows", "error"),
    "dataset.kind": _eq("score", "context.dataset_kind", "code", **SMOL),
    "dataset.code_language": _eq("score", "context.code_language", "javascript", **SMOL),
    "dataset.test_size": _eq("split", "test_size", 13),
    "dataset.max_train": _eq("split", "max_train", 40),
    "evaluation_sets.[].name": _eq("evalset", "evalset.max_rows", 5, evalset="extra"),  # the job's wildcard
    "evaluation_sets.[].source": lambda jobs: None,  # replaced below (needs the config's path)
    "evaluation_sets.[].hub_split": _eq("evalset", "evalset.hub_split", "dev"),
    "evaluation_sets.[].fields.instruction": _eq("evalset", "evalset.fields.instruction", "q"),
    "evaluation_sets.[].fields.input": _eq("evalset", "evalset.fields.input", "ctx"),
    "evaluation_sets.[].fields.output": _eq("evalset", "evalset.fields.output", "a"),
    "evaluation_sets.[].kind": _eq("score_evalset", "context.dataset_kind", "code", **SMOL),
    "evaluation_sets.[].code_language": _eq("score_evalset", "context.code_language", "go", **SMOL),
    "evaluation_sets.[].max_rows": _eq("evalset", "evalset.max_rows", 5),
    "models.*.source": _eq("materialize_model", "embedded", "smollm2-135m-instruct", **SMOL),
    "models.*.prompt_format": _eq("generate", "prompt_format", "chat", **SMOL),
    "models.*.finetune": _eq("finetune", "settings.lora_r", 6, model="gemma3"),
    "models.*.generation_backend": _eq("generate", "backend", "hf", **SMOL),
    "models.*.probe_layers": _eq("early_exit", "layer_specs", [0.25], **SMOL),
    "models.*.resources.gpus": _resource("finetune", "gpu", 0, **SMOL),
    "models.*.resources.cpus": _resource("finetune", "cpus_per_task", 2, **SMOL),
    "models.*.resources.mem_mb": _resource("finetune", "mem_mb", 5000, **SMOL),
    "models.*.resources.runtime": _resource("finetune", "runtime", 33, **SMOL),
    "decoding.mode": lambda jobs: None,  # replaced below
    "decoding.configs.[].name": lambda jobs: None,  # replaced below
    "decoding.configs.[].top_k": _decoding_check("top_k", 7),
    "decoding.configs.[].num_beams": _decoding_check("num_beams", 3),
    "decoding.configs.[].temperature": _decoding_check("temperature", 0.6),
    "decoding.configs.[].top_p": _decoding_check("top_p", 0.9),
    "decoding.configs.[].repetition_penalty": _decoding_check("repetition_penalty", 1.2),
    "decoding.beam_mode": _eq("generate", "settings.beam_mode", "beam_sample", **SMOL),
    "decoding.max_new_tokens": _eq("generate", "settings.max_new_tokens", 33, **SMOL),
    "decoding.stop": _eq("generate", "settings.stop", ["<END>"], **SMOL),
    "decoding.max_test_rows": _eq("perplexity", "max_rows", 9, **SMOL),
    "generation.backend": _eq("generate", "backend", "hf", model="gemma3"),
    "generation.batch_size": _eq("generate", "settings.batch_size", 5, **SMOL),
    "generation.max_prompt_tokens": _eq("generate", "settings.max_prompt_tokens", 900, **SMOL),
    "generation.static_cache": _eq("generate", "settings.static_cache", True, **SMOL),
    "generation.compile_backend": _eq("generate", "settings.compile_backend", "cudagraphs", **SMOL),
    "generation.merge_adapter": _eq("generate", "settings.merge_adapter", False, **SMOL),
    "generation.vllm_gpu_memory_utilization": _eq("generate", "vllm.gpu_memory_utilization", 0.5, **SMOL),
    "generation.vllm_max_lora_rank": _eq("generate", "vllm.max_lora_rank", 32, **SMOL),
    "generation.agreement_rows": lambda jobs: None,  # replaced below
    "generation.agreement_max_new_tokens": lambda jobs: None,
    "scoring.metrics": _eq("score", "metrics", ["bleu", "bertscore", "codebleu"], **SMOL),
    "scoring.perplexity": _jobs("perplexity", lambda n: n > 0, "perplexity jobs (scoring.perplexity: true)"),
    "scoring.perplexity_batch_size": _eq("perplexity", "batch_size", 3, **SMOL),
    "scoring.bootstrap_samples": _eq("score", "samples", 321, **SMOL),
    "scoring.confidence": _eq("score", "confidence", 0.9, **SMOL),
    "scoring.multiple_comparisons": _eq("report", "multiple_comparisons", "holm"),
    "scoring.bertscore.model": _eq("score", "context.bertscore.model", "results/models/bertscore", **SMOL),
    "scoring.bertscore.num_layers": _eq("score", "context.bertscore.num_layers", 4, **SMOL),
    "scoring.bertscore.batch_size": _eq("score", "context.bertscore.batch_size", 7, **SMOL),
    "scoring.bertscore.rescale_with_baseline": _eq("score", "context.bertscore.rescale_with_baseline", True, **SMOL),
    "scoring.bertscore.baseline_path": lambda jobs: None,  # replaced below
    "scoring.bertscore.lang": _eq("score", "context.bertscore.lang", "de", **SMOL),
    "scoring.bertscore.gpus": _resource("score", "gpu", 1, **SMOL),
    "scoring.judge.enabled": _jobs("judge", lambda n: n > 0, "judge jobs (scoring.judge.enabled: true)"),
    "scoring.judge.model": _eq("judge", "judge_model", "gemma3", **SMOL),
    "scoring.judge.batch_size": _eq("judge", "batch_size", 2, **SMOL),
    "scoring.human.enabled": _jobs("human_sheet", lambda n: n == 1, "one human_sheet job"),
    "scoring.human.sample_size": _eq("human_sheet", "sample_size", 5),
    "probe.enabled": _jobs("logit_lens", lambda n: n > 0, "logit_lens jobs (probe.enabled: true)"),
    "probe.layers": _eq("logit_lens", "layer_specs", [0.5, 1.0], model="gemma3"),
    "probe.lens_prompts": _eq("logit_lens", "lens_prompts", ["Name a colour."], **SMOL),
    "probe.lens_test_prompts": _eq("logit_lens", "lens_test_prompts", 1, **SMOL),
    "probe.lens_top_k": _eq("logit_lens", "top_k", 3, **SMOL),
    "probe.lens_new_tokens": _eq("logit_lens", "new_tokens", 4, **SMOL),
    "probe.early_exit.enabled": _jobs("early_exit", lambda n: n > 0, "early_exit jobs (probe.early_exit.enabled)"),
    "probe.early_exit.max_test_rows": _eq("early_exit", "max_test_rows", 4, **SMOL),
    "probe.early_exit.max_new_tokens": _eq("early_exit", "max_new_tokens", 21, **SMOL),
    "probe.early_exit.decoding.top_k": _eq("early_exit", "decoding.top_k", 9, **SMOL),
    "probe.early_exit.decoding.num_beams": _eq("early_exit", "decoding.num_beams", 1, **SMOL),
    "probe.early_exit.decoding.temperature": _eq("early_exit", "decoding.temperature", 0.7, **SMOL),
    "probe.early_exit.decoding.top_p": _eq("early_exit", "decoding.top_p", 0.8, **SMOL),
    "probe.early_exit.decoding.repetition_penalty": _eq("early_exit", "decoding.repetition_penalty", 1.1, **SMOL),
    "report.default_config": _eq("report", "default_config", "beam"),
}
FINETUNE_KEYS = ["enabled", "method", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "learning_rate",
                 "lr_scheduler", "warmup_ratio", "weight_decay", "num_epochs", "max_steps", "batch_size",
                 "gradient_accumulation", "max_seq_length", "packing", "padding_free", "gradient_checkpointing",
                 "liger", "autotune", "cuda_graphs", "logging_steps", "save_steps"]

# Keys with no effect this test can observe in a job's params, and why.
LISTED: dict[str, str] = {
    "dataset.revision": "only for hub dataset sources (rule download_dataset); this offline test uses the embedded "
                        "demo, which has no revision",
    "dataset.fields.instruction": "the embedded demo has exactly these columns; a renamed column is checked on the "
                                  "evaluation set (evaluation_sets.[].fields.*), through the same mapping code",
    "dataset.fields.input": "as dataset.fields.instruction",
    "dataset.fields.output": "as dataset.fields.instruction",
    "models.*.revision": "only for hub model sources (rules download_model, finetune's revision); embedded models "
                         "have none",
    "models.*.num_layers": "only read when a hub model's config is not available offline, to plan probe layers; "
                           "embedded models have their config",
    "models.*.context_length": "read before any job only (tunelens.preflight: max_new_tokens, early-exit "
                               "max_new_tokens and max_seq_length must fit); tests/test_bad_inputs.py "
                               "context_length-given-in-the-config",
    "decoding.defaults.name": "the canonical config name is derived from the values; a given name is not a "
                              "decoding knob",
    "probe.early_exit.decoding.name": "as decoding.defaults.name",
    "scoring.human.ratings_dir": "selects input files (rated sheets) for human_score jobs, which exist only once "
                                 "sheets are rated",
}


@pytest.fixture(scope="module")
def checks(dag) -> dict[str, Check]:
    config, _ = dag
    extra = config["evaluation_sets"][0]
    out = dict(CHECKS)
    out["evaluation_sets.[].source"] = _eq("evalset", "evalset.source", extra["source"])
    out["scoring.bertscore.baseline_path"] = _eq("score", "context.bertscore.baseline_path",
                                                 config["scoring"]["bertscore"]["baseline_path"], **SMOL)

    def configs_check(jobs: dict) -> None:
        assert _configs(jobs) == {"wide", "beam"}, _configs(jobs)
    configs_check.where = "generate: one job per listed config (wildcard decoding)"  # type: ignore[attr-defined]
    out["decoding.mode"] = out["decoding.configs.[].name"] = configs_check
    out["generation.agreement_rows"] = _eq("generation_agreement", "rows", 3, **SMOL)
    out["generation.agreement_max_new_tokens"] = _eq("generation_agreement", "max_new_tokens", 11, **SMOL)
    out["generation.vllm_python"] = _eq("generation_agreement", "vllm_python", sys.executable, **SMOL)
    for key in FINETUNE_KEYS:
        out[f"finetune.{key}"] = _finetune_check(key, config["finetune"][key])
    return out


def _finetune_check(key: str, expected: Any) -> Check:
    def check(jobs: dict) -> None:
        settings = params(jobs, "finetune", model="smollm2")["settings"]
        assert settings[key] == expected, f"finetune settings.{key}: {settings[key]!r}, expected {expected!r}"
    check.where = "finetune: params.settings (then LoraConfig / SFTConfig)"  # type: ignore[attr-defined]
    return check


def test_every_schema_key_is_checked_or_listed(checks):
    keys = schema_keys()
    checks = {**checks, **{key: _call_where(key) for key in CALL_CHECKS if key not in checks}}
    checks.update({key: _sweep_where() for key in SWEEP_KEYS})
    unchecked = sorted(set(keys) - set(checks) - set(LISTED))
    assert not unchecked, f"schema keys with neither a check nor a listed reason: {unchecked}"
    stale = sorted((set(checks) | set(LISTED)) - set(keys))
    assert not stale, f"checked or listed keys no longer in the schema: {stale}"
    print(f"\n{len(checks)} keys checked at non-default values:")
    for key in keys:
        if key in checks:
            called = f"; script -> {CALL_CHECKS[key][0]} call: {CALL_CHECKS[key][1]}" if key in CALL_CHECKS else ""
            print(f"  {key}: {getattr(checks[key], 'where', 'job')}{called}")
    print(f"{len(LISTED)} keys listed without an observable effect here:")
    for key, reason in LISTED.items():
        print(f"  {key}: {reason}")


def test_non_default_values_reach_the_jobs(dag, checks):
    _, jobs = dag
    failures = []
    for key, check in checks.items():
        try:
            check(jobs)
        except (AssertionError, KeyError) as exc:
            failures.append(f"{key}: {type(exc).__name__}: {exc}")
    assert not failures, "keys that did not reach their job:\n" + "\n".join(failures)


def test_the_judge_settings_reach_the_early_exit_judge_jobs(dag):
    """scoring.judge on: one judge_early_exit job per early_exit job (model, variant, layer; issue 22), with the
    judge's settings, and the report reads their files."""
    _, jobs = dag
    key = lambda job: (job.wildcards.model, job.wildcards.variant, job.wildcards.layer)  # noqa: E731
    planned = sorted(map(key, jobs.get("judge_early_exit", [])))
    assert planned == sorted(map(key, jobs["early_exit"])) and len(planned) == 6  # gemma3 2 layers, smollm2 1
    for job in jobs["judge_early_exit"]:
        values = dict(job.params.items())
        assert (values["judge_model"], values["batch_size"], values["samples"], values["confidence"]) == (
            "gemma3", 2, 321, 0.9)
    report_inputs = set(map(str, jobs["report"][0].input))
    assert {str(job.output.scores) for job in jobs["judge_early_exit"]} <= report_inputs


def test_finetune_settings_reach_lora_and_sft_config(dag):
    """From the fine-tune job's params into the objects the trainer is built from."""
    from tunelens.training.finetune import lora_config, sft_config
    from tunelens.training.plan import resolve_plan

    _, jobs = dag
    settings = dict(params(jobs, "finetune", model="smollm2")["settings"])
    plan = resolve_plan(dict(settings), "cpu", vocab_size=1000)
    assert plan.method == "lora" and plan.gradient_checkpointing is True and plan.liger is False
    lora = lora_config(settings)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, set(lora.target_modules)) == (4, 12, 0.2, {"q_proj", "v_proj"})
    sft = sft_config(settings, plan, "ckpt", 77, max_length=settings["max_seq_length"])
    assert (sft.learning_rate, sft.lr_scheduler_type.value, sft.warmup_steps, sft.weight_decay) == (0.003, "linear",
                                                                                                  0.2, 0.01)
    assert (sft.num_train_epochs, sft.max_steps, sft.per_device_train_batch_size, sft.gradient_accumulation_steps) \
        == (2.0, 6, 3, 2)
    assert (sft.max_length, sft.packing, sft.padding_free, sft.logging_steps, sft.save_steps) == (200, True, True, 3, 4)
    assert sft.seed == sft.data_seed == 77
    gemma = params(jobs, "finetune", model="gemma3")["settings"]
    assert lora_config(dict(gemma)).r == 6  # the per-model override


# --------------------------------------------------------------------------------------------- the scripts
# rule -> (script, module, function the script calls with the job's params)
SCRIPTS = {
    "split": ("split.py", "tunelens.data.data", "split_dataset"),
    "evalset": ("evalset.py", "tunelens.data.data", "prepare_evaluation_set"),
    "finetune": ("finetune.py", "tunelens.training.finetune", "finetune"),
    "generate": ("generate.py", "tunelens.generation.genserver", "run_generation_job"),
    "generation_agreement": ("agreement.py", "tunelens.generation.agreement", "agreement"),
    "score": ("score.py", "tunelens.scoring.score", "score_generation_file"),
    "score_evalset": ("score.py", "tunelens.scoring.score", "score_generation_file"),
    "perplexity": ("perplexity.py", "tunelens.scoring.perplexity", "run_perplexity_job"),
    "judge": ("judge.py", "tunelens.scoring.judge", "judge_generation_file"),
    "human_sheet": ("human_sheet.py", "tunelens.scoring.human", "write_human_sheet"),
    "logit_lens": ("logit_lens.py", "tunelens.probe.lens", "run_logit_lens_job"),
    "early_exit": ("early_exit.py", "tunelens.generation.genserver", "run_early_exit_job"),
    "report": ("report.py", "tunelens.report", "write_report"),
}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf of a call's arguments by dotted name (dicts, dataclasses and plain objects opened)."""
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        out[prefix.rstrip(".")] = value
        return out
    return {prefix.rstrip("."): value}


@pytest.fixture(scope="module")
def calls(dag, tmp_path_factory):
    """rule -> the keyword arguments its script passed to the stage function (the function itself replaced)."""
    import importlib
    import os
    import runpy
    import types

    config, jobs = dag
    work = tmp_path_factory.mktemp("scripts")
    out: dict[str, dict] = {}
    cwd = os.getcwd()
    os.chdir(work)
    jobs_module = importlib.import_module("tunelens.jobs")
    # the scripts' log file and thread settings are not what is tested (and would change this process)
    saved = {name: getattr(jobs_module, name) for name in ("job_log", "use_job_threads")}
    for name in saved:
        setattr(jobs_module, name, lambda *args, **kwargs: None)
    try:
        for rule, (script, module_name, function) in SCRIPTS.items():
            matching = [j for j in jobs.get(rule, []) if j.wildcards.get("model") in (None, "smollm2")]
            job = matching[0]
            module = importlib.import_module(module_name)
            captured: dict = {}

            def fake(*args, _captured=captured, **kwargs):
                _captured.update({f"arg{i}": a for i, a in enumerate(args)}, **kwargs)
                return {}

            original = getattr(module, function)
            setattr(module, function, fake)
            fake_snakemake = types.SimpleNamespace(
                input=job.input, output=job.output, params=job.params, log=job.log, threads=job.threads,
                config=config, wildcards=job.wildcards, resources=job.resources, rule=rule,
                scriptdir=str(REPO / "scripts"))
            for path in job.log:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            stderr = sys.stderr  # scripts/finetune.py sends stderr to its log
            try:
                runpy.run_path(str(REPO / "scripts" / script), init_globals={"snakemake": fake_snakemake})
            except Exception:
                if not captured:
                    raise
            finally:
                setattr(module, function, original)
                sys.stderr = stderr
            out[rule] = _flatten(captured)
    finally:
        os.chdir(cwd)
        for name, value in saved.items():
            setattr(jobs_module, name, value)
    return out


# key -> (rule, argument name as flattened, expected): where each key's value must arrive in the stage call
CALL_CHECKS: dict[str, tuple[str, str, Any]] = {
    "seed": ("score", "seed", 77),
    "device": ("perplexity", "arg0.device", "cuda"),
    "dataset.hub_split": ("split", "hub_split", "validation"),
    "dataset.on_bad_rows": ("split", "on_bad_rows", "error"),
    "dataset.test_size": ("split", "test_size", 13),
    "dataset.max_train": ("split", "max_train", 40),
    "dataset.kind": ("score", "context.dataset_kind", "code"),
    "dataset.code_language": ("score", "context.code_language", "javascript"),
    "evaluation_sets.[].max_rows": ("evalset", "max_rows", 5),
    "evaluation_sets.[].hub_split": ("evalset", "hub_split", "dev"),
    "evaluation_sets.[].fields.instruction": ("evalset", "fields.instruction", "q"),
    "evaluation_sets.[].code_language": ("score_evalset", "context.code_language", "go"),
    "models.*.prompt_format": ("generate", "arg0.prompt_format", "chat"),
    "decoding.beam_mode": ("generate", "arg0.beam_mode", "beam_sample"),
    "decoding.max_new_tokens": ("generate", "arg0.max_new_tokens", 33),
    "decoding.stop": ("generate", "arg0.stop", ["<END>"]),
    "decoding.max_test_rows": ("perplexity", "arg0.max_rows", 9),
    "generation.backend": ("generate", "arg0.backend", "hf"),
    "generation.batch_size": ("generate", "arg0.batch_size", 5),
    "generation.max_prompt_tokens": ("generate", "arg0.max_prompt_tokens", 900),
    "generation.static_cache": ("generate", "arg0.static_cache", True),
    "generation.compile_backend": ("generate", "arg0.compile_backend", "cudagraphs"),
    "generation.merge_adapter": ("generate", "arg0.merge_adapter", False),
    "generation.vllm_gpu_memory_utilization": ("generate", "arg0.vllm_options.gpu_memory_utilization", 0.5),
    "generation.vllm_max_lora_rank": ("generate", "arg0.vllm_options.max_lora_rank", 32),
    "generation.vllm_python": ("generate", "vllm_python", sys.executable),
    "generation.server": ("generate", "server", False),
    "generation.server_idle_timeout_s": ("generate", "idle_timeout_s", 30),
    "generation.server_start_timeout_s": ("generate", "start_timeout_s", 45),
    "generation.agreement_rows": ("generation_agreement", "max_rows", 3),
    "generation.agreement_max_new_tokens": ("generation_agreement", "max_new_tokens", 11),
    "scoring.metrics": ("score", "metrics", ["bleu", "bertscore", "codebleu"]),
    "scoring.perplexity_batch_size": ("perplexity", "arg0.batch_size", 3),
    "scoring.bootstrap_samples": ("score", "samples", 321),
    "scoring.confidence": ("perplexity", "arg0.confidence", 0.9),
    "scoring.multiple_comparisons": ("report", "settings.multiple_comparisons", "holm"),
    "scoring.bertscore.num_layers": ("score", "context.bertscore.num_layers", 4),
    "scoring.bertscore.batch_size": ("score", "context.bertscore.batch_size", 7),
    "scoring.bertscore.rescale_with_baseline": ("score", "context.bertscore.rescale_with_baseline", True),
    "scoring.bertscore.lang": ("score", "context.bertscore.lang", "de"),
    "scoring.judge.batch_size": ("judge", "batch_size", 2),
    "scoring.human.sample_size": ("human_sheet", "sample_size", 5),
    "probe.lens_prompts": ("logit_lens", "arg0.lens_prompts", ["Name a colour."]),
    "probe.lens_test_prompts": ("logit_lens", "arg0.lens_test_prompts", 1),
    "probe.lens_top_k": ("logit_lens", "arg0.top_k", 3),
    "probe.lens_new_tokens": ("logit_lens", "arg0.new_tokens", 4),
    "probe.early_exit.max_test_rows": ("early_exit", "arg0.max_test_rows", 4),
    "probe.early_exit.max_new_tokens": ("early_exit", "arg0.max_new_tokens", 21),
    "probe.early_exit.decoding.top_k": ("early_exit", "arg0.decoding.top_k", 9),
    "report.default_config": ("report", "settings.default_config", "beam"),
    "finetune.learning_rate": ("finetune", "settings.learning_rate", 0.003),
    "finetune.lora_r": ("finetune", "settings.lora_r", 4),
    "finetune.max_seq_length": ("finetune", "settings.max_seq_length", 200),
}


def _sweep_where() -> Check:
    def check(jobs: dict) -> None:  # checked by test_decoding_defaults_and_sweep_reach_the_generate_jobs
        return None
    check.where = "generate: params.decoding of the one_at_a_time configs (second DAG)"  # type: ignore[attr-defined]
    return check


def _call_where(key: str) -> Check:
    def check(jobs: dict) -> None:  # checked by test_scripts_pass_the_values_on_to_the_stage_functions
        return None
    check.where = "read by the script from the config (execution only, not a rule param)"  # type: ignore[attr-defined]
    return check


def test_scripts_pass_the_values_on_to_the_stage_functions(calls):
    """Each rule's script, run on its job with the stage function replaced, passes the non-default value on
    (a setting the script drops or hard-codes fails here)."""
    failures = []
    for key, (rule, name, expected) in CALL_CHECKS.items():
        arguments = calls[rule]
        if name not in arguments:
            failures.append(f"{key}: {rule} call has no argument '{name}' (has {sorted(arguments)[:40]})")
        elif arguments[name] != expected:
            failures.append(f"{key}: {rule} call {name}={arguments[name]!r}, expected {expected!r}")
    assert not failures, "keys that did not reach their stage function:\n" + "\n".join(failures)


# decoding.defaults and decoding.sweep act in the sweep modes: a second DAG (mode one_at_a_time, the default).
SWEEP_DEFAULTS = {"top_k": 20, "num_beams": 1, "temperature": 0.5, "top_p": 0.95, "repetition_penalty": 1.05}
SWEEP = {"top_k": [3], "num_beams": [2], "temperature": [0.3], "top_p": [0.7], "repetition_penalty": [1.3]}


def test_decoding_defaults_and_sweep_reach_the_generate_jobs(tmp_path):
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["decoding"] = {"defaults": dict(SWEEP_DEFAULTS), "sweep": copy.deepcopy(SWEEP), "max_new_tokens": 12}
    config["probe"] = {"enabled": False}
    config["scoring"] = {"metrics": ["bleu"], "perplexity": False, "human": {"enabled": False}}
    jobs = build_dag(config, tmp_path / "work")
    decodings = {dict(job.params.items())["decoding"]["name"]: dict(job.params.items())["decoding"]
                 for job in jobs["generate"] if job.wildcards["model"] == "smollm2"}
    # one_at_a_time: the defaults, then one config per swept value with the other fields at the defaults
    assert len(decodings) == 1 + len(SWEEP)
    default = [d for d in decodings.values() if all(d[k] == v for k, v in SWEEP_DEFAULTS.items())]
    assert len(default) == 1, decodings
    for field, (value,) in SWEEP.items():
        swept = [d for d in decodings.values() if d[field] == value]
        assert len(swept) == 1, (field, decodings)
        assert all(swept[0][k] == v for k, v in SWEEP_DEFAULTS.items() if k != field), swept
    assert params(jobs, "report")["default_config"] == default[0]["name"]


SWEEP_KEYS = [f"decoding.defaults.{field}" for field in SWEEP_DEFAULTS] + [f"decoding.sweep.{field}" for field in SWEEP]
