"""Rerun exactly when a result would change: code edits and the evaluation size (exact dry-run plans).

The plan tests work on a copy of the workflow (Snakefile, rules, scripts, tunelens, ...) in a temp dir, fake a
finished study there (bench_dag.fake_finished_study: empty outputs + Snakemake metadata), edit one file of
the copy, and assert the exact set of (rule, wildcards) the dry run plans. No model is loaded.
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from bench_dag import dry_run, fake_finished_study  # noqa: E402

from tunelens import codehash, codetable  # noqa: E402

WORKFLOW_FILES = ("Snakefile", "config.yaml", "rules", "scripts", "tunelens", "schemas", "profiles", "envs", "report")

# One embedded model, one decoding config, one probe layer: the smallest DAG with every kind of job.
CONFIG = {
    "seed": 1234,
    "device": "cpu",
    "dataset": {"name": "demo", "source": "embedded:demo", "test_size": 6},
    "models": {"smollm2": {"source": "embedded:smollm2-135m-instruct", "prompt_format": "chat"}},
    "decoding": {"mode": "list", "configs": [{"name": "greedy", "temperature": 0.0}], "max_test_rows": 4},
    "probe": {"layers": [1.0]},
}
VARIANTS = ("base", "finetuned")
LAYER = "30"  # 1.0 of SmolLM2-135M's 30 layers


def job(rule: str, **wildcards) -> tuple:
    return (rule, tuple(sorted(wildcards.items())))


def per_variant(rule: str, **extra) -> set:
    return {job(rule, model="smollm2", variant=variant, **extra) for variant in VARIANTS}


GENERATE = per_variant("generate", decoding="greedy")
SCORE = per_variant("score", decoding="greedy")
PERPLEXITY = per_variant("perplexity")
EARLY_EXIT = per_variant("early_exit", layer=LAYER)
SCORE_EARLY_EXIT = per_variant("score_early_exit", layer=LAYER)
AGGREGATES = {job("human_sheet"), job("report"), job("all")}


# ----------------------------------------------------------------------------------------- codehash units
def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_hash_ignores_comments_docstrings_and_formatting(tmp_path):
    script = _write(tmp_path / "s.py", '"""Doc."""\nimport os\n\ndef f(x):\n    """Doc."""\n    return x + 1\n')
    before = codehash.code_hash(script)
    codehash.code_hash.cache_clear()
    codehash._parsed.cache_clear()
    _write(script, '"""Other doc."""\nimport os  # a comment\n\n\n# more\ndef f( x ):\n    """Changed."""\n'
                   '    return (x + 1)\n')
    assert codehash.code_hash(script) == before
    codehash.code_hash.cache_clear()
    codehash._parsed.cache_clear()
    _write(script, '"""Doc."""\nimport os\n\ndef f(x):\n    """Doc."""\n    return x + 2\n')
    assert codehash.code_hash(script) != before


@pytest.fixture
def fixture_package(tmp_path, monkeypatch):
    """codehash pointed at an empty `tunelens` package in tmp_path; returns a function that writes the files
    given ({path under tmp_path: text}, None deletes) and returns the hash of s.py."""
    monkeypatch.setattr(codetable, "PACKAGE_DIR", tmp_path / "tunelens")
    monkeypatch.setattr(codehash, "CACHE_FILE", tmp_path / "cache.json")
    monkeypatch.setattr(codehash, "_disk_cache", None)

    def hash_after(files: dict[str, str | None]) -> str:
        for name, text in files.items():
            if text is None:
                (tmp_path / name).unlink()
            else:
                _write(tmp_path / name, text)
        for clear in (codehash.code_hash.cache_clear, codehash._parsed.cache_clear, codehash._package_data.cache_clear):
            clear()
        return codehash.code_hash(tmp_path / "s.py")

    yield hash_after
    for clear in (codehash.code_hash.cache_clear, codehash._parsed.cache_clear, codehash._package_data.cache_clear):
        clear()


HELPERS = "def f():\n    return 1\n\n\ndef g():\n    return 2\n"
OTHER = "def g():\n    return 2\n"  # the same code as helpers.g, in another module
WORKER = '''import logging

from tunelens{stage} import helpers, other
from tunelens{stage}.{g_from} import g

log = logging.getLogger("tunelens{stage}.worker")


def run():
    cmd = ["python", "-m", "tunelens{stage}.worker"]
    return helpers.f() + helpers.g() + other.g() + g(), cmd
'''


def test_a_pure_move_keeps_the_hash_and_any_other_change_changes_it(fixture_package, tmp_path):
    """Issue 25: `git mv` of modules into a package, with the import lines and the strings that name them
    (a -m command, a logger name) rewritten, changes no hash; the new package's __init__.py (docstring only)
    adds nothing. Editing a reached body, or pointing an import at another module whose code is the same,
    still changes the hash."""
    flat = {"tunelens/__init__.py": '"""Fixture."""\nVERSION = 1\n', "tunelens/helpers.py": HELPERS,
            "tunelens/other.py": OTHER, "tunelens/worker.py": WORKER.format(stage="", g_from="helpers"),
            "s.py": "from tunelens.worker import run\n\nrun()\n"}
    before = fixture_package(flat)
    assert set(codehash.code_modules(tmp_path / "s.py")) == {"tunelens", "tunelens.worker", "tunelens.helpers",
                                                             "tunelens.other"}
    moved = {"tunelens/helpers.py": None, "tunelens/other.py": None, "tunelens/worker.py": None,
             "tunelens/stage/__init__.py": '"""The stage: reads X, writes Y; worker.run."""\n',
             "tunelens/stage/helpers.py": HELPERS, "tunelens/stage/other.py": OTHER,
             "tunelens/stage/worker.py": WORKER.format(stage=".stage", g_from="helpers"),
             "s.py": "from tunelens.stage.worker import run\n\nrun()\n"}
    assert fixture_package(moved) == before
    assert "tunelens.stage.worker#run" in codehash.code_functions(tmp_path / "s.py")  # it did follow the move
    # an edit of a reached body
    assert fixture_package({"tunelens/stage/helpers.py": HELPERS.replace("return 1", "return 3")}) != before
    assert fixture_package({"tunelens/stage/helpers.py": HELPERS}) == before
    # `g` taken from `other` instead: the same code is reached, but run() now calls another module's g
    assert fixture_package({"tunelens/stage/worker.py": WORKER.format(stage=".stage", g_from="other")}) != before
    # a string naming another module
    retargeted = WORKER.format(stage=".stage", g_from="helpers").replace('"tunelens.stage.worker"]',
                                                                         '"tunelens.stage.helpers"]')
    assert fixture_package({"tunelens/stage/worker.py": retargeted}) != before
    # code in the new package's __init__.py runs on import: it counts
    assert fixture_package({"tunelens/stage/worker.py": WORKER.format(stage=".stage", g_from="helpers"),
                            "tunelens/stage/__init__.py": "X = 1\n"}) != before


def test_closure_follows_lazy_and_transitive_tunelens_imports():
    # scripts/score.py imports tunelens.scoring.score, which imports metrics; metrics imports models inside a function.
    modules = codehash.code_modules(REPO / "scripts" / "score.py")
    assert {"tunelens.scoring.score", "tunelens.scoring.metrics", "tunelens.models", "tunelens.io"} <= set(modules)
    assert "tunelens.generation.generate" not in modules and "tunelens.report" not in modules
    generate = codehash.code_modules(REPO / "scripts" / "generate.py")
    assert "tunelens.scoring.metrics" not in generate and "tunelens.report" not in generate
    assert "tunelens.data.data" not in generate  # config.py keeps the embedded dataset registry itself
    # Perplexity and logit-lens jobs are requests to the generation server, which imports their compute code by
    # name: a generate job's hash holds no perplexity code, and a perplexity job's (a thin client of the same
    # server) no generation code.
    assert "tunelens.scoring.perplexity" not in generate and "tunelens.scoring.score" not in generate
    perplexity = codehash.code_modules(REPO / "scripts" / "perplexity.py")
    assert {"tunelens.scoring.perplexity", "tunelens.generation.served"} <= set(perplexity)
    assert "tunelens.generation.generate" not in perplexity and "tunelens.generation.genserver" not in perplexity
    assert "tunelens.report" in codehash.code_modules(REPO / "scripts" / "report.py")


def test_package_templates_count_as_code():
    closure = codehash.code_closure(REPO / "scripts" / "report.py")
    templates = [name for name in closure if ":" in name]
    assert "tunelens.report:summary.html.j2" in templates, templates
    assert not [name for name in codehash.code_closure(REPO / "scripts" / "generate.py") if name.endswith(".j2")]


def test_disk_cache_skips_parsing_unchanged_files_and_is_optional(tmp_path, monkeypatch):
    script = REPO / "scripts" / "score.py"
    monkeypatch.setattr(codehash, "CACHE_FILE", tmp_path / "cache.json")
    monkeypatch.setattr(codehash, "_disk_cache", None)
    for clear in (codehash.code_hash.cache_clear, codehash._parsed.cache_clear):
        clear()
    first = codehash.code_hash(script)
    assert (tmp_path / "cache.json").exists()
    # a new process (fresh in-memory caches) reads the cache: no file is parsed again
    monkeypatch.setattr(codehash, "_disk_cache", None)
    codehash.code_hash.cache_clear()
    codehash._parsed.cache_clear()
    monkeypatch.setattr(codehash.ast, "parse", lambda *a, **k: (_ for _ in ()).throw(AssertionError("parsed")))
    assert codehash.code_hash(script) == first
    monkeypatch.undo()
    # an unwritable cache location changes nothing
    monkeypatch.setattr(codehash, "CACHE_FILE", Path("/proc/no/such/dir/cache.json"))
    monkeypatch.setattr(codehash, "_disk_cache", None)
    codehash.code_hash.cache_clear()
    codehash._parsed.cache_clear()
    assert codehash.code_hash(script) == first


def test_hashing_every_script_is_fast():
    codehash.code_hash.cache_clear()
    codehash._parsed.cache_clear()
    codehash._package_data.cache_clear()
    started = time.perf_counter()
    for script in sorted((REPO / "scripts").glob("*.py")):
        codehash.code_hash(script)
    assert time.perf_counter() - started < 2.0  # ~0.1 s on an idle core; built on every snakemake call


# ----------------------------------------------------------------------------------------- plan tests
@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """(workflow copy, workdir, configfile) of a finished CONFIG study."""
    root = tmp_path_factory.mktemp("reruns")
    flow = root / "flow"
    flow.mkdir()
    for name in WORKFLOW_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, flow / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, flow / name)
    workdir = root / "work"
    workdir.mkdir()
    configfile = root / "config.yaml"
    configfile.write_text(yaml.safe_dump(CONFIG, sort_keys=False))
    fake_finished_study(workdir, configfile, snakefile=flow / "Snakefile")
    return flow, workdir, configfile


def plan(study, config: dict | None = None) -> set:
    flow, workdir, configfile = study
    if config is not None:
        configfile = configfile.parent / "changed.yaml"
        configfile.write_text(yaml.safe_dump(config, sort_keys=False))
    jobs, _ = dry_run(workdir, configfile, snakefile=flow / "Snakefile")
    return {planned.key for planned in jobs}


def module_file(flow: Path, module: str) -> Path:
    """tunelens/<module>.py ("scoring/metrics" for a stage's module), or its package's __init__.py."""
    path = flow / "tunelens" / f"{module}.py"
    return path if path.exists() else flow / "tunelens" / module / "__init__.py"


class appended:
    """Context manager: append `text` to a file of the workflow copy, restore it afterwards."""

    def __init__(self, path: Path, text: str):
        self.path, self.text = path, text

    def __enter__(self):
        self.original = self.path.read_text()
        self.path.write_text(self.original + self.text)

    def __exit__(self, *exc):
        self.path.write_text(self.original)


class edited:
    """Context manager: replace `old` by `new` in a file of the workflow copy, restore it afterwards."""

    def __init__(self, path: Path, old: str, new: str):
        self.path, self.old, self.new = path, old, new

    def __enter__(self):
        self.original = self.path.read_text()
        assert self.old in self.original, f"{self.old!r} not in {self.path}"
        self.path.write_text(self.original.replace(self.old, self.new, 1))

    def __exit__(self, *exc):
        self.path.write_text(self.original)


def test_finished_study_plans_nothing(study):
    assert plan(study) == set()


def test_editing_report_code_reruns_only_the_report(study):
    flow = study[0]
    with appended(module_file(flow, "report"), "\nREPORT_EDIT = 1\n"):
        assert plan(study) == {job("report"), job("all")}


def test_editing_metrics_code_reruns_scoring_and_report_not_generation(study):
    flow = study[0]
    with appended(module_file(flow, "scoring/metrics"), "\nMETRICS_EDIT = 1\n"):
        planned = plan(study)
    # every job whose code imports tunelens.scoring.metrics: scores, early-exit scores, perplexity, the human
    # sheet (tunelens.scoring.human) and the report; generation, fine-tune, probe and split are untouched.
    assert planned == SCORE | SCORE_EARLY_EXIT | PERPLEXITY | AGGREGATES


LOGIT_LENS = per_variant("logit_lens")


def test_editing_lens_plot_code_reruns_only_the_lens_jobs_and_the_report(study):
    """Issue 23: generate imported genserver -> probe -> probe_plots (now probe/plots.py), so a plot fix reran every generation.
    Both kinds of edit: a function body and a new top-level statement."""
    flow = study[0]
    plots = module_file(flow, "probe/plots")
    with edited(plots, '    text = text if len(text) <= width', '    width = max(width, 4)\n    text = text if len(text) <= width'), \
            appended(plots, "\nPLOT_EDIT = 1\n"):
        planned = plan(study)
    assert planned == LOGIT_LENS | {job("report"), job("all")}


def test_editing_one_io_function_reruns_only_the_jobs_that_call_it(study):
    """Issue 23: an io.py edit reran every job, fine-tunes included. tunelens.io.read_json is called by the
    score jobs (scripts/score.py, also run by score_early_exit) and the report only."""
    flow = study[0]
    with edited(module_file(flow, "io"), "def read_json(path: str | Path) -> Any:\n",
                "def read_json(path: str | Path) -> Any:\n    _unused = 0\n"):
        planned = plan(study)
    assert planned == SCORE | SCORE_EARLY_EXIT | AGGREGATES - {job("human_sheet")}
    assert not {rule for rule, _ in planned} & {"split", "finetune", "generate", "early_exit", "logit_lens"}


def test_a_function_no_job_calls_is_no_code_of_any_job(study):
    """A new function in tunelens.io (imported by every job) reruns nothing until something calls it."""
    flow = study[0]
    with appended(module_file(flow, "io"), "\n\ndef describe(path):\n    return str(path)\n"):
        assert plan(study) == set()


def test_closure_is_per_function():
    """What the plans above rest on: read_json is code of the score and report jobs, not of generation or
    fine-tuning; the lens plots are code of the logit_lens job only."""
    functions = {script: codehash.code_functions(REPO / "scripts" / f"{script}.py")
                 for script in ("generate", "early_exit", "finetune", "split", "score", "report", "logit_lens")}
    for script in ("score", "report"):
        assert "tunelens.io#read_json" in functions[script]
    for script in ("generate", "early_exit", "finetune", "split"):
        assert "tunelens.io#read_json" not in functions[script], script
        assert "tunelens.probe.plots" not in codehash.code_modules(REPO / "scripts" / f"{script}.py"), script
    assert "tunelens.probe.plots#plot_lens_heatmap" in functions["logit_lens"]


def test_comment_docstring_edit_and_touch_rerun_nothing(study):
    flow = study[0]
    metrics = module_file(flow, "scoring/metrics")
    text = metrics.read_text()
    with edited(metrics, '"""', '"""Edited docstring.\n\n'), appended(metrics, "\n# a new comment\n\n"):
        later = time.time() + 5
        for script in (flow / "scripts").glob("*.py"):
            os.utime(script, (later, later))
        for module in (flow / "tunelens").rglob("*.py"):
            os.utime(module, (later, later))
        assert plan(study) == set()
    assert metrics.read_text() == text


def test_editing_a_script_reruns_that_rule_and_downstream(study):
    flow = study[0]
    with edited(flow / "scripts/generate.py", "params = snakemake.params\n", "params = snakemake.params\nEDIT = 1\n"):
        planned = plan(study)
    assert planned == GENERATE | SCORE | AGGREGATES


def test_raising_the_evaluation_size_plans_no_finetune(study):
    config = copy.deepcopy(CONFIG)
    config["decoding"]["max_test_rows"] = 6
    planned = plan(study, config)
    # new generations (and what reads them) and the perplexity of the larger evaluation set; the split,
    # the fine-tunes, the probes and the early exits (their own row count) stay.
    assert planned == GENERATE | SCORE | PERPLEXITY | AGGREGATES
    assert not {rule for rule, _ in planned} & {"split", "finetune", "materialize_model"}


def test_turning_the_judge_on_plans_one_judge_job_per_generation_and_exit_layer(study):
    """scoring.judge on, in a finished study: the judge rates every decoding config's generations and every
    early-exit layer's (judge_early_exit, issue 22), and nothing else but the report reruns."""
    config = copy.deepcopy(CONFIG)
    config["scoring"] = {"judge": {"enabled": True, "model": "smollm2", "batch_size": 2}}
    planned = plan(study, config)
    judge_early_exit = per_variant("judge_early_exit", layer=LAYER)
    assert planned == per_variant("judge", decoding="greedy") | judge_early_exit | {job("report"), job("all")}
    config["probe"] = {"layers": [0.5, 1.0]}  # a second exit layer (15 of 30): one judge job per layer
    planned = plan(study, config)
    assert {(rule, wildcards) for rule, wildcards in planned if rule == "judge_early_exit"} == (
        judge_early_exit | per_variant("judge_early_exit", layer="15"))
    assert per_variant("early_exit", layer="15") | per_variant("score_early_exit", layer="15") <= planned


def test_removed_max_test_key_is_rejected_with_its_replacement():
    from tunelens.config import load_config
    from tunelens.errors import ConfigError

    config = copy.deepcopy(CONFIG)
    config["dataset"]["max_test"] = 50
    with pytest.raises(ConfigError, match=r"dataset\.max_test: 50: .*decoding\.max_test_rows"):
        load_config(config)


def test_every_script_rule_carries_its_code_hash():
    """A new rule without the param would rerun on nothing but its outputs: Snakemake's code trigger is off."""
    import re

    rules = []
    for path in sorted((REPO / "rules").glob("*.smk")):
        for block in re.split(r"(?m)^(?=rule )", path.read_text()):
            script = re.search(r'"\.\./scripts/(\w+\.py)"', block)
            if block.startswith("rule ") and script:
                name = block.split()[1].rstrip(":")
                rules.append(name)
                assert f'code=code_version("{script.group(1)}")' in block, f"rule {name} ({path.name})"
    assert len(rules) >= 15
    for profile in (REPO / "profiles").glob("*/config.yaml"):
        triggers = yaml.safe_load(profile.read_text()).get("rerun-triggers")
        assert triggers is None or "code" not in triggers, profile
    assert "code" not in yaml.safe_load((REPO / "profiles/default/config.yaml").read_text())["rerun-triggers"]


def test_a_new_finetune_setting_reruns_no_base_variant_job(study):
    """A setting added to the fine-tune section reruns the fine-tune and what reads its adapter. The base
    variant's generation, probes and scores do not read that section: their scripts parse the generation section
    only, so the new field is no code of theirs (it reran every score job when they parsed the whole config)."""
    flow = study[0]
    with edited(module_file(flow, "settings/finetune"), "    logging_steps: int = setting(5,",
                '    new_knob: bool = setting(False, "A new setting.", schema={"type": "boolean"})\n'
                "    logging_steps: int = setting(5,"):
        planned = plan(study)
    assert job("finetune", model="smollm2") in planned
    assert not {key for key in planned if dict(key[1]).get("variant") == "base"}, sorted(planned)
