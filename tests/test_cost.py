"""Job costs: a benchmark file for every rule, and a history of what each result cost across reruns."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tunelens.cost import archive_benchmarks, read_benchmark, read_history

ROOT = Path(__file__).resolve().parent.parent
HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def _rule_blocks():
    for smk in sorted((ROOT / "rules").glob("*.smk")):
        text = smk.read_text()
        # `use rule X as Y with:` (the evaluation-set rules) overrides log and benchmark: checked as rule Y
        starts = [(m.start(), m.group(1) or m.group(2))
                  for m in re.finditer(r"^(?:rule (\w+)|use rule \w+ as (\w+) with):", text, re.M)]
        for index, (start, name) in enumerate(starts):
            end = starts[index + 1][0] if index + 1 < len(starts) else len(text)
            yield name, text[start:end]


def test_every_rule_writes_a_benchmark_per_job():
    blocks = dict(_rule_blocks())
    assert len(blocks) >= 15
    for name, block in blocks.items():
        bench = re.search(r"^    benchmark:\n\s+f?\"([^\"]+)\"", block, re.M)
        log = re.search(r"^    log:\n\s+f?\"([^\"]+)\"", block, re.M)
        assert bench, f"rule {name} has no benchmark: directive"
        assert bench.group(1).startswith(f"benchmarks/{name}/") and bench.group(1).endswith(".tsv"), bench.group(1)
        # one benchmark file per job: the same wildcards as the job's log file
        assert set(re.findall(r"\{(\w+)\}", bench.group(1))) == set(re.findall(r"\{(\w+)\}", log.group(1))), name


def _bench(path: Path, seconds: float, rss: float = 100.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + f"{seconds}\t0:00:01\t{rss}\t200\t90\t95\t1\t2\t0.9\t{seconds * 0.9}\n")


def test_archive_records_each_run_once_and_keeps_reruns(tmp_path):
    bench = tmp_path / "benchmarks"
    _bench(bench / "generate" / "m" / "base" / "c.tsv", 3.0)
    _bench(bench / "split" / "demo.tsv", 1.0, rss="NA")
    assert archive_benchmarks(bench) == 2
    assert archive_benchmarks(bench) == 0  # idempotent
    _bench(bench / "generate" / "m" / "base" / "c.tsv", 5.0)  # the job reran
    assert archive_benchmarks(bench) == 1
    history = read_history(bench)
    generate = [row for row in history if row["rule"] == "generate"]
    assert [row["s"] for row in generate] == [3.0, 5.0]
    assert generate[0]["wildcards"] == "m/base/c"
    split = [row for row in history if row["rule"] == "split"]
    assert split[0]["max_rss"] is None and split[0]["s"] == 1.0
    assert read_benchmark(bench / "generate" / "m" / "base" / "c.tsv")[0]["cpu_time"] == 4.5


def test_a_rerun_keeps_the_earlier_cost_in_the_history(tmp_path):
    """The real workflow: run the split twice (forced); both runs' benchmark rows are in the history."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "snakemake", "results/data/demo/manifest.json", "--cores", "1",
               "--snakefile", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
               "--configfile", str(ROOT / "config.yaml")]
    for extra in ([], ["--forcerun", "split"]):
        result = subprocess.run(command + extra, capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
    current = tmp_path / "benchmarks" / "split" / "demo.tsv"
    assert read_benchmark(current)[0]["s"] > 0
    with (tmp_path / "benchmarks" / "history.tsv").open() as handle:
        rows = [row for row in csv.DictReader(handle, delimiter="\t") if row["rule"] == "split"]
    assert len(rows) == 2, rows
    assert rows[0]["sha256"] != rows[1]["sha256"]
    assert all(row["wildcards"] == "demo" for row in rows)


# ----------------------------------------------------------------------------------------- the report section
sys.path.insert(0, str(Path(__file__).parent))
from test_report import build_study, run, section, table_rows  # noqa: E402


def _bench_study(bench: Path) -> None:
    """Benchmark files of a small study: (path, wall s, max_rss MB, cpu s)."""
    jobs = [
        ("split/demo.tsv", 2.0, 150.0, 1.5),
        ("finetune/smol.tsv", 100.0, 2000.0, 180.0),
        ("finetune/gemma.tsv", 300.0, 3000.0, 500.0),
        ("generate/smol/base/c1.tsv", 20.0, 900.0, 30.0),
        ("generate/smol/finetuned/c1.tsv", 22.0, 950.0, 33.0),
        ("generate/gemma/base/c1.tsv", 40.0, 1500.0, 60.0),
        ("score/smol/base/c1.tsv", 7.0, 800.0, 6.0),
        ("report/report.tsv", 9.0, 400.0, 8.0),  # the previous report: not part of the study's cost
    ]
    for path, wall, rss, cpu in jobs:
        target = bench / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(HEADER + f"{wall}\t0:00:01\t{rss}\t1\t1\t1\t1\t1\t0.9\t{cpu}\n")


def test_cost_section_and_csv_match_the_benchmark_files(tmp_path):
    root = tmp_path
    files = build_study(root)
    _bench_study(root / "benchmarks")
    archive_benchmarks(root / "benchmarks")
    job_gpus = {"finetune": {"smol": 1, "gemma": 2}, "generate": {"smol": 1, "gemma": 1}, "score": {"*": 0}}
    paths = run(root, files, benchmarks_dir=root / "benchmarks", job_gpus=job_gpus, device="cuda")
    text = section(paths["summary_md"].read_text(), "Compute cost")
    tables = [table_rows(block) for block in text.split("\n\n") if block.startswith("| ")]
    by_stage = {row[0]: row[1:] for row in tables[0][1:]}
    assert by_stage["finetune"] == ["2", "400.0", "680.0", "3,000", f"{(100 + 600) / 3600:.3f}"]
    assert by_stage["generate"] == ["3", "82.0", "123.0", "1,500", f"{82 / 3600:.3f}"]
    assert by_stage["split"] == ["1", "2.0", "1.5", "150", "0.000"]
    assert "report" not in by_stage
    assert by_stage["**all**"][:4] == ["7", "491.0", "810.5", "3,000"]
    by_model = {row[0]: row[1:] for row in tables[1][1:]}
    assert by_model["gemma"] == ["2", "340.0", "560.0", "3,000", f"{(600 + 40) / 3600:.3f}"]
    assert by_model["smol"][:2] == ["4", "149.0"] and by_model["shared"][:2] == ["1", "2.0"]
    assert "history.tsv" in text
    csv = pd.read_csv(paths["summary_csv"], keep_default_na=False)
    cost = csv[csv["statistic"] == "compute_cost"]
    value = lambda model, config, metric: float(  # noqa: E731
        cost[(cost.model == model) & (cost.config == config) & (cost.metric == metric)]["value"].iloc[0])
    assert value("all", "finetune", "wall_s") == 400.0 and value("all", "finetune", "cpu_time_s") == 680.0
    assert value("gemma", "all", "gpu_hours") == pytest.approx(640 / 3600)
    assert value("all", "all", "max_rss_mb") == 3000.0 and value("all", "all", "jobs") == 7
    assert value("shared", "all", "wall_s") == 2.0


def test_gpu_hours_only_where_a_job_held_a_gpu(tmp_path):
    root = tmp_path
    files = build_study(root)  # generation sources carry no CUDA device: a CPU run
    _bench_study(root / "benchmarks")
    job_gpus = {"finetune": {"smol": 1, "gemma": 2}, "generate": {"smol": 1, "gemma": 1}}
    for device in ("auto", "cpu"):
        paths = run(root, files, out=device, benchmarks_dir=root / "benchmarks", job_gpus=job_gpus, device=device)
        text = section(paths["summary_md"].read_text(), "Compute cost")
        assert "GPU-hours" not in text.split("\n\n", 2)[2] and "no job held a GPU" in text
        csv = pd.read_csv(paths["summary_csv"], keep_default_na=False)
        gpu = csv[(csv["statistic"] == "compute_cost") & (csv["metric"] == "gpu_hours")]
        assert (gpu["value"].astype(float) == 0).all()
    paths = run(root, files, out="none", benchmarks_dir=root / "nowhere")
    assert "No benchmark files" in section(paths["summary_md"].read_text(), "Compute cost")
