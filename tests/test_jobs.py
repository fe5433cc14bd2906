"""Threads: model jobs declare the model's resources.cpus and pin torch to what Snakemake gave them, so jobs
running side by side on a small machine never use more threads than it has cores."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tunelens.cost import read_benchmark
from tunelens.jobs import THREAD_VARIABLES, use_job_threads

ROOT = Path(__file__).resolve().parent.parent


def test_use_job_threads_pins_torch_and_the_openmp_variables(monkeypatch):
    import torch

    before = torch.get_num_threads()
    for variable in THREAD_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    try:
        assert use_job_threads(1) == 1
        assert torch.get_num_threads() == 1
        assert all(os.environ[variable] == "1" for variable in THREAD_VARIABLES)
        with pytest.raises(ValueError, match="at least 1"):
            use_job_threads(0)
    finally:
        torch.set_num_threads(before)


def _job_threads(log: Path) -> int:
    """The threads a job ran with: torch's in the job, or the OpenMP variables that a server it starts inherits
    (a thin client of the model's generation server: tunelens.jobs.use_job_threads(torch=False))."""
    match = re.search(r"job threads: (\d+) \((?:torch threads: \1|OpenMP/BLAS)\)", log.read_text())
    assert match, f"{log} does not say how many threads the job used"
    return int(match.group(1))


def _interval(bench: Path) -> tuple[float, float]:
    end = bench.stat().st_mtime
    return end - read_benchmark(bench)[0]["s"], end


def test_two_model_jobs_on_two_cores_never_take_two_threads_each(tmp_path, tiny_llama_dir):
    """--cores 2: model `wide` (cpus 4) gets both cores and runs alone; `narrow` (cpus 1) jobs get one each."""
    resources = {"gpus": 0, "mem_mb": 1000, "runtime": 10}
    config = {
        "seed": 1, "device": "cpu",
        "dataset": {"name": "demo", "source": "embedded:demo", "test_size": 4, "max_train": 16},
        "models": {
            name: {"source": str(tiny_llama_dir), "prompt_format": "chat", "num_layers": 4,
                   "resources": {**resources, "cpus": cpus}}
            for name, cpus in (("wide", 4), ("narrow", 1))
        },
        "finetune": {"enabled": False},
        "scoring": {"bootstrap_samples": 100},
        "probe": {"layers": [2, 4], "lens_new_tokens": 1, "lens_test_prompts": 1},
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(config))
    targets = ["results/perplexity/wide/base.json", "results/perplexity/narrow/base.json",
               "results/probe/narrow/base/lens.json"]
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", *targets, "--cores", "2", "--snakefile", str(ROOT / "Snakefile"),
         "--directory", str(tmp_path), "--configfile", str(tmp_path / "study.yaml")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert _job_threads(tmp_path / "logs/perplexity/wide/base.log") == 2  # cpus 4, lowered to --cores
    assert _job_threads(tmp_path / "logs/perplexity/narrow/base.log") == 1
    assert _job_threads(tmp_path / "logs/logit_lens/narrow/base.log") == 1
    wide = _interval(tmp_path / "benchmarks/perplexity/wide/base.tsv")
    for bench in ("benchmarks/perplexity/narrow/base.tsv", "benchmarks/logit_lens/narrow/base.tsv"):
        start, end = _interval(tmp_path / bench)
        # the 2-thread job shares the 2 cores with no other job (1 s slack for file times)
        assert end <= wide[0] + 1 or start >= wide[1] - 1, (bench, (start, end), wide)


def test_a_models_server_jobs_never_run_side_by_side_on_one_machine(tmp_path, tiny_llama_dir):
    """--cores 2, one model: its generate, early_exit, perplexity and logit_lens jobs all go to one generation
    server, which serves one request at a time, so Snakemake runs them one after the other (resource
    genserver_<model> = 1, rules/common.smk) and never leaves a core idle behind a waiting client. That server
    loads the model once: no perplexity or logit_lens job loads one of its own."""
    config = {
        "seed": 1, "device": "cpu",
        "dataset": {"name": "demo", "source": "embedded:demo", "test_size": 4, "max_train": 16},
        "models": {"tiny": {"source": str(tiny_llama_dir), "prompt_format": "chat", "num_layers": 4,
                            "resources": {"gpus": 0, "mem_mb": 1000, "runtime": 10, "cpus": 1}}},
        "finetune": {"enabled": False},
        "decoding": {"sweep": {"temperature": [0.0, 0.7]}, "max_new_tokens": 4},
        "probe": {"layers": [2, 4], "lens_new_tokens": 1, "lens_test_prompts": 1,
                  "early_exit": {"max_new_tokens": 4}},
    }  # fmt: skip
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(config))
    temps = ("0.0", "0.7")
    server_jobs = [f"generations/tiny/base/top_k_50_num_beams_1_temp_{t}" for t in temps] + [
        f"probe/tiny/base/early_exit/layer_{layer}" for layer in (2, 4)]
    targets = [f"results/{job}.jsonl" for job in server_jobs] + ["results/probe/tiny/base/lens.json",
                                                                 "results/perplexity/tiny/base.json"]
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", *targets, "--cores", "2", "--snakefile", str(ROOT / "Snakefile"),
         "--directory", str(tmp_path), "--configfile", str(tmp_path / "study.yaml")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    benches = [f"benchmarks/generate/tiny/base/top_k_50_num_beams_1_temp_{t}.tsv" for t in temps] + [
        f"benchmarks/early_exit/tiny/base/layer_{layer}.tsv" for layer in (2, 4)] + [
        "benchmarks/logit_lens/tiny/base.tsv", "benchmarks/perplexity/tiny/base.tsv"]
    intervals = sorted(_interval(tmp_path / bench) for bench in benches)
    for (_, end), (start, _) in zip(intervals, intervals[1:]):
        assert start >= end - 1, intervals  # 1 s slack for file times
    metas = [json.loads((tmp_path / f"results/{job}.meta.json").read_text()) for job in server_jobs] + [
        json.loads((tmp_path / f"results/{name}.json").read_text()) for name in ("probe/tiny/base/lens",
                                                                                  "perplexity/tiny/base")]
    assert {meta["execution"]["mode"] for meta in metas} == {"server"}
    assert len({meta["execution"]["server_pid"] for meta in metas}) == 1
    assert sum(meta["execution"]["loaded"] for meta in metas) == 1  # one model load for the six jobs
