"""Human ratings through Snakemake: the blank sheet comes out of the DAG, a filled copy dropped into
scoring.human.ratings_dir is found on the next run, and the report gets a Human column and an agreement table
whose rows pair each rating with the metrics of the same answer.

A tiny random model on a few rows, no fine-tuning or probe. The stop string "e" cuts the random answers at
different lengths, so the `length` metric varies; the rater marks the longer half of the answers correct,
so Kendall tau of length vs Human must be clearly positive: a rating attached to another answer (or another
model, variant or config) would break that.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def snakemake(workdir: Path, *targets: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", *targets, "--cores", "1", "--snakefile", str(ROOT / "Snakefile"),
         "--directory", str(workdir), "--configfile", str(workdir / "study.yaml")],
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_filled_sheet_in_ratings_dir_gives_human_column_and_agreement(tmp_path, tiny_llama_dir):
    config = {
        "seed": 3, "device": "cpu",
        "dataset": {"name": "demo", "source": "embedded:demo", "test_size": 8, "max_train": 16},
        "models": {"tiny": {"source": str(tiny_llama_dir), "prompt_format": "alpaca", "num_layers": 4,
                            "resources": {"gpus": 0, "cpus": 1, "mem_mb": 2000, "runtime": 10}}},
        "finetune": {"enabled": False},
        "decoding": {"sweep": {"temperature": [0.0]}, "max_new_tokens": 12, "stop": ["e"], "max_test_rows": 8},
        "scoring": {"metrics": ["rougeL", "length"], "bootstrap_samples": 100,
                    "human": {"enabled": True, "sample_size": 8, "ratings_dir": "ratings"}},
        "probe": {"enabled": False},
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(config))
    snakemake(tmp_path, "results/human/sheet.csv")
    with (tmp_path / "results/human/sheet.csv").open(encoding="utf-8", newline="") as handle:
        sheet = list(csv.DictReader(handle))
    assert len(sheet) == 16  # 8 rows x (default config + the temperature 0 config)
    lengths = sorted(len(row["answer"]) for row in sheet)
    median = lengths[len(lengths) // 2]
    assert lengths[0] < median, f"answers of one length; the stop string did not vary them: {lengths}"
    (tmp_path / "ratings").mkdir()
    with (tmp_path / "ratings/alice.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(sheet[0]))
        writer.writeheader()
        for row in sheet:
            writer.writerow({**row, "correct": "1" if len(row["answer"]) >= median else "0"})
    correct = sum(len(row["answer"]) >= median for row in sheet)

    snakemake(tmp_path)  # the whole DAG: the rated file is found, human_score and the report run
    summary = (tmp_path / "results/summary.md").read_text()
    table = pd.read_csv(tmp_path / "results/summary.csv")
    human = table[(table["metric"] == "human") & (table["statistic"] == "score")]
    assert len(human) == 2 and human["n"].tolist() == [8, 8]
    assert human["value"].mean() == pytest.approx(correct / 16)
    header = next(line for line in summary.splitlines() if line.startswith("| Model") or line.startswith("| Config"))
    assert "Human" in header, header
    assert "### vs Human" in summary
    tau = table[(table["statistic"] == "kendall_tau_vs_human") & (table["metric"] == "length")]
    assert len(tau) == 1 and tau["n"].iloc[0] == 16
    assert tau["value"].iloc[0] > 0.5, tau
    assert "Human rating sheet" not in summary  # the "fill the sheet" hint is gone once ratings exist
