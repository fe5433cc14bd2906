"""Job costs: a benchmark file for every rule, and a history of what each result cost across reruns."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

from tunelens.cost import archive_benchmarks, read_benchmark, read_history

ROOT = Path(__file__).resolve().parent.parent
HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def _rule_blocks():
    for smk in sorted((ROOT / "rules").glob("*.smk")):
        text = smk.read_text()
        starts = [(m.start(), m.group(1)) for m in re.finditer(r"^rule (\w+):", text, re.M)]
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
