"""The Snakemake workflow as a whole: lint, formatting, and a DAG for every preset."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import gpu_study_standins

ROOT = Path(__file__).resolve().parent.parent
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
PRESETS = ["config.yaml", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*.yaml"))]


def run(args: list[str], cwd: Path = ROOT, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def test_lint_is_clean():
    result = run([*SNAKEMAKE, "--lint"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_snakefmt_is_clean():
    result = run([sys.executable, "-m", "snakefmt", "--check", "Snakefile", "rules"])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_builds_a_dag(preset, tmp_path):
    # --directory: plan against an empty results/ so the dry run lists every job of the preset. The hub presets'
    # models are not downloaded here: with the hub off their ids are rejected (test below), so the dry run
    # says the hub is on (nothing is downloaded: no job runs).
    if preset.endswith("gpu-study.yaml"):
        gpu_study_standins(tmp_path)  # what bench/bench_gpu_study.py writes beside the checkout
    result = run([*SNAKEMAKE, "-n", "--quiet", "rules", "--configfile", str(ROOT / preset),
                  "--snakefile", str(ROOT / "Snakefile"), "--directory", str(tmp_path)],
                 env={"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "split" in result.stdout


def test_bad_config_stops_before_any_job(tmp_path):
    result = run([*SNAKEMAKE, "-n", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
                  "--configfile", str(ROOT / "config.yaml"), "--config", "seed=-x"])
    assert result.returncode != 0
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "config.yaml").read_text().replace("temperature: [0.0]", "temperature: [-0.5]"))
    result = run([*SNAKEMAKE, "-n", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
                  "--configfile", str(bad)])
    assert result.returncode != 0
    assert "decoding.sweep.temperature[0]" in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()


def _write_jsonl(path: Path, rows) -> str:
    import json

    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_bad_evaluation_set_stops_before_any_job(tmp_path):
    """A missing file or column, a set left empty by the leakage check, a duplicate name: the run stops while
    the DAG is built (no job, no results/), naming the set."""
    import yaml

    from tunelens.data.data import clean_rows, split_rows

    rows = [{"instruction": f"Task {i}", "input": "", "output": f"answer {i}"} for i in range(40)]
    train_file = _write_jsonl(tmp_path / "train.jsonl", rows)
    cleaned, _ = clean_rows(rows, {"instruction": "instruction", "input": "input", "output": "output"}, "ds", "x")
    train, _, _ = split_rows(cleaned, seed=1234, test_size=5)
    good = _write_jsonl(tmp_path / "good.jsonl", [{"instruction": "Other", "input": "", "output": "x"}])
    cases = {
        "missing file": ([{"name": "gone", "source": str(tmp_path / "gone.jsonl")}],
                         ["evaluation_sets[0].source", "gone.jsonl", "does not exist"]),
        "missing column": ([{"name": "qa", "source": good, "fields": {"output": "answer"}}],
                           ["evaluation_sets[name=qa].fields.output", "column 'answer'"]),
        "all rows leaked": ([{"name": "good", "source": good},
                             {"name": "leaky", "source": _write_jsonl(tmp_path / "leaky.jsonl", train[:6])}],
                            ["evaluation set 'leaky'", "no usable rows left after the leakage check",
                             "'in_training_split': 6"]),
        "duplicate name": ([{"name": "good", "source": good}, {"name": "good", "source": good}],
                           ["evaluation_sets[1].name", "duplicate evaluation set name 'good'"]),
    }  # fmt: skip
    for case, (evaluation_sets, fragments) in cases.items():
        config = {"seed": 1234, "dataset": {"name": "ds", "source": train_file, "test_size": 5},
                  "evaluation_sets": evaluation_sets,
                  "models": {"smollm2": {"source": "embedded:smollm2-135m-instruct"}}}  # fmt: skip
        configfile = tmp_path / "bad.yaml"
        configfile.write_text(yaml.safe_dump(config))
        workdir = tmp_path / case.replace(" ", "_")
        workdir.mkdir()
        result = run([*SNAKEMAKE, "-n", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
                      "--configfile", str(configfile)])  # fmt: skip
        output = result.stdout + result.stderr
        assert result.returncode != 0, case
        for fragment in fragments:
            assert fragment in output, f"{case}: {fragment!r} not in {output[-2000:]}"
        assert not (workdir / "results").exists(), case


def test_the_critical_path_goes_first(tmp_path):
    """Materialising a model and fine-tuning it outrank every other job (rules/common.smk,
    CRITICAL_PATH_PRIORITY): on 2 cores the two fine-tunes then start as soon as their models exist, instead of
    waiting behind the base variant's probe and scoring jobs (issue 13)."""
    import re

    result = run([*SNAKEMAKE, "-n", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
                  "--configfile", str(ROOT / "config.yaml")])
    assert result.returncode == 0, result.stdout + result.stderr
    priorities: dict[str, set[int]] = {}
    for block in re.split(r"\n(?=rule \w+:)", result.stdout):
        rule = re.match(r"rule (\w+):", block)
        if rule:
            priority = re.search(r"^\s+priority: (\d+)", block, re.M)
            priorities.setdefault(rule.group(1), set()).add(int(priority.group(1)) if priority else 0)
    critical = {"materialize_model", "finetune"}
    assert critical < set(priorities), priorities
    top = min(min(priorities[rule]) for rule in critical)
    assert top > 0
    assert all(max(levels) < top for rule, levels in priorities.items() if rule not in critical), priorities
    # within a variant, generate goes before the probe and perplexity jobs (GENERATE_PRIORITY)
    assert all(min(priorities["generate"]) > max(priorities[rule]) for rule in ("early_exit", "logit_lens",
                                                                                   "perplexity")), priorities
