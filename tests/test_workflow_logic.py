"""tunelens.workflow: what rules/common.smk computes from a config (paths, targets, input functions, resources,
human-rating files), tested without Snakemake's globals (issue 25)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from snakemake.iocontainers import Wildcards
from conftest import apply_changes

from tunelens.config import load_config
from tunelens.workflow import OUTPUTS, Plan, alternation

ROOT = Path(__file__).resolve().parent.parent
HUB = "NousResearch/Llama-2-7b-hf"


def wc(**values) -> Wildcards:
    """Wildcards as Snakemake hands them to an input function."""
    return Wildcards(fromdict=values)


def small_config(**changes) -> dict:
    """Two models (an embedded one fine-tuned, a hub one base only), two decoding configs, two probe layers."""
    config = {
        "device": "cuda",
        "dataset": {"name": "demo", "source": "embedded:demo"},
        "models": {
            "smol": {"source": "embedded:smollm2-135m-instruct", "prompt_format": "chat",
                     "resources": {"gpus": 1, "cpus": 2, "mem_mb": 8000, "runtime": 30}},
            "llama": {"source": HUB, "num_layers": 32, "finetune": {"enabled": False},
                      "resources": {"gpus": 2, "cpus": 8, "mem_mb": 64000, "runtime": 120}},
        },
        "decoding": {"sweep": {"temperature": [0.0, 0.8]}},
        "probe": {"layers": [0.5, 1.0]},
        "scoring": {"judge": {"enabled": True, "model": "smol"}},
    }  # fmt: skip
    return apply_changes(config, changes)


def plan_of(config: dict, results: str = "results") -> Plan:
    return Plan(load_config(copy.deepcopy(config)), results=results)


@pytest.fixture
def plan() -> Plan:
    return plan_of(small_config())


# ----------------------------------------------------------------------------------------- targets
def test_groups_are_every_model_variant_and_config_in_study_order(plan):
    configs = list(plan.decoding)
    assert len(configs) == 2
    assert plan.human_groups() == [
        ("smol", "base", configs[0]), ("smol", "base", configs[1]),
        ("smol", "finetuned", configs[0]), ("smol", "finetuned", configs[1]),
        ("llama", "base", configs[0]), ("llama", "base", configs[1]),
    ]  # fmt: skip
    assert plan.all_score_files() == [f"results/scores/{m}/{v}/{c}.json" for m, v, c in plan.human_groups()]
    assert plan.all_judge_files() == [f"results/judge/{m}/{v}/{c}.json" for m, v, c in plan.human_groups()]


def test_per_model_targets(plan):
    assert plan.all_perplexity_files() == ["results/perplexity/smol/base.json", "results/perplexity/smol/finetuned.json",
                                           "results/perplexity/llama/base.json"]  # fmt: skip
    assert plan.all_lens_files() == ["results/probe/smol/base/lens.json", "results/probe/smol/finetuned/lens.json",
                                     "results/probe/llama/base/lens.json"]  # fmt: skip
    assert plan.all_finetune_metrics() == ["results/finetune/smol/metrics.json"]
    assert plan.probe_layers("llama") == [16, 32]
    smol = plan.probe_layers("smol")
    assert len(smol) == 2
    early = plan.all_early_exit_score_files()
    assert len(early) == 2 * 2 + 2  # smol: 2 variants x 2 layers; llama: base x 2 layers
    assert "results/probe/llama/base/early_exit/layer_16.scores.json" in early
    assert f"results/probe/smol/finetuned/early_exit/layer_{smol[1]}.scores.json" in early
    judged = plan.all_early_exit_judge_files()
    assert [p.replace(".judge.json", ".scores.json") for p in judged] == early


@pytest.mark.parametrize("change, empty", [
    ({"probe__enabled": False}, ["all_lens_files", "all_early_exit_score_files", "all_early_exit_judge_files"]),
    ({"probe__early_exit__enabled": False}, ["all_early_exit_score_files", "all_early_exit_judge_files"]),
    ({"scoring__judge__enabled": False}, ["all_judge_files", "all_early_exit_judge_files"]),
    ({"scoring__perplexity": False}, ["all_perplexity_files"]),
])  # fmt: skip
def test_switched_off_stages_have_no_targets(change, empty):
    on = plan_of(small_config())
    off = plan_of(small_config(**change))
    for name in empty:
        assert getattr(on, name)(), name
        assert getattr(off, name)() == [], name
    assert off.all_score_files() == on.all_score_files()
    if "probe__enabled" in change:
        assert off.probe_layers("llama") == []


def test_report_inputs_name_every_kind_and_the_defaults_are_the_report(plan):
    inputs = plan.report_inputs(wc())
    assert inputs["scores"] == plan.all_score_files()
    assert inputs["split_manifest"] == ["results/data/demo/manifest.json"]
    assert inputs["human_sheet"] == ["results/human/sheet.csv", "results/human/key.csv"]
    assert inputs["human"] == []  # no filled sheets
    assert all(inputs[k] == [] for k in inputs if k.startswith("eval_"))  # no evaluation sets
    assert plan.all_targets() == ["results/summary.md", "results/summary.html", "results/summary.csv",
                                  "results/plots"]  # fmt: skip


def test_evaluation_set_targets(tmp_path):
    source = tmp_path / "extra.jsonl"
    source.write_text(json.dumps({"instruction": "a", "input": "", "output": "b"}) + "\n")
    plan = plan_of(small_config(evaluation_sets=[{"name": "extra", "source": str(source), "kind": "code"}]))
    groups = plan.human_groups()
    assert plan.all_evalset_files("manifest") == ["results/eval/extra/manifest.json"]
    assert plan.all_evalset_files("scores") == [f"results/eval/extra/scores/{m}/{v}/{c}.json" for m, v, c in groups]
    assert plan.all_evalset_files("judge") == [f"results/eval/extra/judge/{m}/{v}/{c}.json" for m, v, c in groups]
    assert plan.all_evalset_files("perplexity")[-1] == "results/eval/extra/perplexity/llama/base.json"
    assert plan.all_evalset_files("human_sheet") == ["results/eval/extra/human/sheet.csv",
                                                     "results/eval/extra/human/key.csv"]  # fmt: skip
    assert plan.evalset_file_input(wc(evalset="extra")) == [str(source)]
    assert plan.evalset_params(wc(evalset="extra"))["source"] == str(source)
    # the set's own kind reaches the metrics; the training split's elsewhere
    assert plan.score_context(wc(evalset="extra", model="smol"))["dataset_kind"] == "code"
    assert plan.score_context(wc(model="smol"))["dataset_kind"] == "text"
    generation = plan.human_generation_files(wc(evalset="extra"))
    assert generation[0] == f"results/eval/extra/generations/smol/base/{groups[0][2]}.jsonl"
    assert plan.human_generation_files(wc())[0] == f"results/generations/smol/base/{groups[0][2]}.jsonl"
    # switched-off stages: none of their per-set files either
    sets = [{"name": "extra", "source": str(source)}]
    off = plan_of(small_config(evaluation_sets=sets, scoring__judge__enabled=False, scoring__perplexity=False,
                               scoring__human__enabled=False))  # fmt: skip
    assert [off.all_evalset_files(k) for k in ("judge", "perplexity", "human", "human_sheet")] == [[]] * 4
    assert off.all_evalset_files("scores") == plan.all_evalset_files("scores")


# ----------------------------------------------------------------------------------------- human rating files
def test_human_rating_files_are_found_when_the_dag_is_built(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = plan_of(small_config(scoring__human__ratings_dir="ratings"))
    assert plan.human_rating_files() == [] and plan.all_human_files() == ["results/human/sheet.csv",
                                                                          "results/human/key.csv"]  # fmt: skip
    (tmp_path / "ratings" / "extra").mkdir(parents=True)
    for name in ("b.csv", "a.csv", "notes.txt"):
        (tmp_path / "ratings" / name).write_text("x\n")
    assert plan.human_rating_files() == ["ratings/a.csv", "ratings/b.csv"]
    assert plan.human_rating_files("extra") == []  # an evaluation set's sheets: their own subfolder
    (tmp_path / "ratings" / "extra" / "r.csv").write_text("x\n")
    assert plan.evalset_human_rating_files(wc(evalset="extra")) == ["ratings/extra/r.csv"]
    # filled sheets: the Human scores become targets (json only; rows are a side output)
    human = plan.all_human_files()
    assert human[:2] == ["results/human/sheet.csv", "results/human/key.csv"]
    assert human[2:] == plan.human_score_outputs("json") == [
        f"results/human/scores/{m}/{v}/{c}.json" for m, v, c in plan.human_groups()]
    assert plan.human_score_outputs("rows", plan.EVAL)[0].startswith("results/eval/{evalset}/human/scores/smol/base/")
    assert plan.human_score_outputs("rows")[0].endswith(".rows.csv")
    assert plan.all_human_files("extra")[2].startswith("results/eval/extra/human/scores/")


def test_human_rating_off_asks_for_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "human_ratings").mkdir()
    (tmp_path / "human_ratings" / "a.csv").write_text("x\n")
    plan = plan_of(small_config(scoring__human__enabled=False))
    assert plan.all_human_files() == []
    assert plan.report_inputs(wc())["human_sheet"] == []


# ----------------------------------------------------------------------------------------- resources
def test_model_resources_grow_with_retries_except_gpus_and_cpus(plan):
    assert plan.model_resource("mem_mb")(wc(model="llama")) == 64000
    assert plan.model_resource("mem_mb")(wc(model="llama"), attempt=3) == 192000
    assert plan.model_resource("runtime")(wc(model="smol"), attempt=2) == 60
    assert plan.model_resource("gpus")(wc(model="llama"), attempt=3) == 2
    assert plan.model_resource("cpus")(wc(model="llama"), attempt=3) == 8
    assert plan.model_threads(wc(model="smol")) == 2
    assert plan.model_gpus(wc(model="llama")) == 2
    assert plan_of(small_config(device="cpu")).model_gpus(wc(model="llama")) == 0


def test_score_gpus_only_with_bertscore_off_cpu():
    assert plan_of(small_config(scoring__bertscore__gpus=1)).score_gpus(None) == 1
    assert plan_of(small_config(scoring__bertscore__gpus=1, device="cpu")).score_gpus(None) == 0
    no_bertscore = small_config(scoring__bertscore__gpus=1, scoring__metrics=["bleu"])
    assert plan_of(no_bertscore).score_gpus(None) == 0
    assert plan_of(no_bertscore).bertscore_model_input(wc()) == []
    assert plan_of(small_config()).bertscore_model_input(wc()) == ["results/models/bertscore"]


def test_report_job_gpus(plan):
    gpus = plan.report_job_gpus()
    assert gpus["generate"] == {"smol": 1, "llama": 2}
    assert gpus["judge_early_exit"] == gpus["finetune"] == gpus["generate"]
    assert gpus["score_evalset"] == {"*": 0}
    assert len(gpus) == 14
    assert plan_of(small_config(device="cpu")).report_job_gpus()["generate"] == {"smol": 0, "llama": 0}


def test_server_slots_one_per_model_on_one_machine_only(plan):
    slots = plan.server_slots(cluster=False)
    assert list(slots) == ["genserver_smol", "genserver_llama"]
    assert slots["genserver_smol"](wc(model="smol")) == 1
    assert slots["genserver_smol"](wc(model="llama")) == 0
    assert slots["genserver_llama"].__name__ == "genserver_llama"
    assert plan.server_slots(cluster=True) == {}
    assert plan_of(small_config(generation__server=False)).server_slots(cluster=False) == {}


def test_gpu_limit_problem(plan):
    assert plan.gpu_limit_problem(2) is None
    assert plan.gpu_limit_problem(None) is None  # no --resources gpu: Snakemake's own check
    problem = plan.gpu_limit_problem(1)
    assert "models.llama.resources.gpus is 2, above this run's gpu limit 1" in problem
    assert "--resources gpu=2" in problem
    assert "--resources gpu=2" in plan.gpu_limit_problem(0)  # the widest model


# ----------------------------------------------------------------------------------------- paths and params
def test_paths_under_the_results_root():
    plan = plan_of(small_config(), results="out")
    assert plan.out("scores") == "out/scores/{model}/{variant}/{decoding}.json"
    assert plan.out("scores", plan.EVAL) == "out/eval/{evalset}/scores/{model}/{variant}/{decoding}.json"
    assert plan.out_path("lens", model="m", variant="base") == "out/probe/m/base/lens.json"
    assert plan.SPLIT["test"] == "out/data/demo/test.jsonl"
    assert plan.REPORT["summary_csv"] == "out/summary.csv"
    for kind, pattern in OUTPUTS.items():  # every pattern formats with the wildcards the rules give it
        names = set(re.findall(r"{(\w+)}", pattern))
        assert names <= {"model", "variant", "decoding", "layer"}, kind


def test_model_directories_by_source_kind(tmp_path):
    local = tmp_path / "tiny"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 4}))
    config = small_config()
    config["models"]["tiny"] = {"source": str(local), "finetune": {"enabled": False}}
    plan = plan_of(config)
    assert plan.model_path(wc(model="smol")) == "results/models/smol"
    assert plan.model_path(wc(model="llama")) == "results/hub/models/llama"
    assert plan.model_path(wc(model="tiny")) == str(local)
    assert plan.model_input(wc(model="smol")) == ["results/models/smol"]
    assert plan.model_input(wc(model="tiny")) == []  # a local directory is not a job's output
    assert plan.HUB_MODELS == ["llama"] and plan.FINETUNED_MODELS == ["smol"]
    assert plan.adapter_input(wc(model="smol", variant="finetuned")) == ["results/finetune/smol/adapter"]
    assert plan.adapter_input(wc(model="smol", variant="base")) == []
    field = plan.model_field("prompt_format")
    assert field.__name__ == "model_prompt_format" and field(wc(model="smol")) == "chat"
    # the judge: a model of the study loads its directory; any other name is passed through
    assert plan.judge_model_input(wc()) == ["results/models/smol"]
    assert plan.judge_model_path(wc()) == "results/models/smol"
    other = plan_of(small_config(scoring__judge__model=HUB))
    assert other.judge_model_input(wc()) == [] and other.judge_model_path(wc()) == HUB


def test_dataset_inputs_by_source_kind(tmp_path):
    embedded = plan_of(small_config())
    assert embedded.dataset_file_input(wc()) == [] and embedded.hub_dataset_input(wc()) == []
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"t{i}", "input": "", "output": "o"}) + "\n" for i in range(30)))
    local = plan_of(small_config(dataset={"name": "mine", "source": str(data)}))
    assert local.dataset_file_input(wc()) == [str(data)] and local.hub_dataset_input(wc()) == []
    hub = plan_of(small_config(dataset={"name": "alpaca", "source": "tatsu-lab/alpaca"}))
    assert hub.hub_dataset_input(wc()) == ["results/hub/datasets/alpaca"] == [hub.HUB_DATASET_DIR]


def test_early_exit_layer_must_be_planned(plan):
    assert plan.early_exit_layer(wc(model="llama", layer="16")) == 16
    with pytest.raises(ValueError, match="layer 17 is not a probe layer of model 'llama'"):
        plan.early_exit_layer(wc(model="llama", layer="17"))
    assert plan.early_exit_decoding(wc())["temperature"] == 0.0  # greedy by default


def test_generation_settings_and_conda_env(plan):
    settings = plan.generation_settings(wc())
    # The generate rule's params (a rerun trigger): these keys in this order, the config's values.
    assert list(settings) == ["max_new_tokens", "stop", "beam_mode", "max_test_rows", "batch_size",
                              "max_prompt_tokens", "static_cache", "compile_backend", "merge_adapter"]  # fmt: skip
    config = plan.study.config
    assert settings == {key: config["generation" if key in config["generation"] else "decoding"][key]
                        for key in settings}  # fmt: skip
    assert isinstance(settings["stop"], list)
    assert plan.generation_conda_env(wc(model="smol")) == "../envs/torch.yaml"
    vllm = plan_of(small_config(generation__backend="vllm"))
    assert vllm.generation_conda_env(wc(model="smol")) == "../envs/vllm.yaml"


def test_report_params(plan):
    configs = plan.report_decoding_configs()
    assert list(configs) == list(plan.decoding)
    assert all("name" not in fields and "temperature" in fields for fields in configs.values())
    digest = plan.report_config_hash()
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert plan_of(small_config(seed=7)).report_config_hash() != digest
    assert plan_of(small_config()).report_config_hash() == digest
    assert plan.report_plot_group(SimpleNamespace(plot_kind="layers")) == "Metric vs exit layer"


# ----------------------------------------------------------------------------------------- wildcard constraints
def test_wildcard_constraints_match_exactly_the_planned_names():
    plan = plan_of(small_config(models={"a.b": {"source": "embedded:smollm2-135m-instruct"},
                                        "ab": {"source": "embedded:gemma3-270m"}}))  # fmt: skip
    constraints = plan.wildcard_constraints()
    assert constraints["model"] == alternation(["ab", "a.b"]) == r"a\.b|ab"
    assert re.fullmatch(constraints["model"], "a.b") and not re.fullmatch(constraints["model"], "aXb")
    assert constraints["variant"] == "base|finetuned"
    assert constraints["evalset"] == "(?!)"  # no evaluation set: matches nothing
    assert not re.fullmatch(constraints["evalset"], "")
    assert all(re.fullmatch(constraints["decoding"], name) for name in plan.decoding)
    assert alternation([]) == ""


# ----------------------------------------------------------------------------------------- code hashes
def test_no_job_script_reaches_the_workflow_module():
    """Only the Snakefile side imports tunelens.workflow: moving logic there leaves every job's code hash."""
    from tunelens.codehash import code_modules

    for script in sorted((ROOT / "scripts").glob("*.py")):
        assert not [m for m in code_modules(script) if m.startswith("tunelens.workflow")], script.name


# ----------------------------------------------------------------------------------------- settings access
# Settings are read as attributes of the typed config (tunelens.settings), never by string key (issue 25). The
# check is syntactic: a subscript or .get/.setdefault/.pop with a string literal on an expression whose root
# name is one a settings object goes by here. JSON records, rows and frames go by other names; where a file uses
# one of these names for something else, ALLOWED says what it is.
SETTINGS_NAMES = {"config", "cfg", "settings", "scoring", "resources", "finetune", "decoding", "generation",
                  "probe", "bertscore", "judge", "human", "early_exit", "dataset"}  # fmt: skip
ALLOWED = {
    # The raw user config before schema validation (removed keys, empty sweep axes, given field mappings).
    ("tunelens/config/__init__.py", "config"),
    ("tunelens/modelfiles.py", "config"),  # a model's config.json
    # The raw config's sections that jobs read, typed on their own (GenerationSection.of_config, and the model's
    # entry in generation_server_fields): typing the whole ConfigSection made every section code of those jobs
    # (tunelens.codehash)
    ("tunelens/settings/generation.py", "config"),
    ("tunelens/config/models.py", "config"),
    ("tunelens/report/comparisons.py", "decoding"),  # a DataFrame of score rows
    ("tunelens/report/document.py", "decoding"),  # a DataFrame of score rows
    ("tunelens/report/plots.py", "decoding"),  # a DataFrame of score rows
    ("tunelens/training/speed.py", "dataset"),  # a tokenized datasets.Dataset
}


def _root_name(node):
    import ast

    while isinstance(node, ast.Subscript):
        node = node.value
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and node.args:
        return _root_name(node.args[0])
    return node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None


def string_key_settings_reads(source: str) -> list[tuple[int, str, str]]:
    """(line, root name, expression) of every string-key read on a settings-named expression in `source`."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and isinstance(
                node.slice.value, str):
            target = node.value
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("get", "setdefault", "pop") and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            target = node.func.value
        else:
            continue
        name = _root_name(target)
        if name in SETTINGS_NAMES:
            found.append((node.lineno, name, ast.unparse(node)))
    return found


def test_the_settings_check_finds_string_key_reads():
    source = (
        'a = self.config["probe"]["enabled"]\n'
        'b = self.models[m].resources["gpus"]\n'
        'c = spec.finetune.get("lora_r")\n'
        'd = self.scoring["bertscore"]["model"]\n'
        'e = row["device"]; f = self.settings.probe.enabled; g = wildcards.get("evalset")\n'
        'h = generation_server_fields(settings, model)["vllm_options"]\n'
    )
    assert [line for line, _, _ in string_key_settings_reads(source)].count(1) == 2  # config["probe"], [...]["enabled"]
    assert {line for line, _, _ in string_key_settings_reads(source)} == {1, 2, 3, 4}


def test_tunelens_reads_no_setting_by_string_key():
    package = ROOT / "tunelens"
    offenders = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        for line, name, expression in string_key_settings_reads(path.read_text(encoding="utf-8")):
            if (relative, name) not in ALLOWED:
                offenders.append(f"{relative}:{line}: {expression}")
    assert not offenders, "settings read by string key (read the typed attribute instead):\n" + "\n".join(offenders)
