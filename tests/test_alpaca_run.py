"""A whole run through Snakemake on an Alpaca-format file the way real files come: a UTF-8 byte-order mark,
a few malformed lines, rows whose prompt alone is longer than finetune.max_seq_length and rows whose response
is. The run completes; the split manifest, the fine-tune metrics and summary.md count what was dropped or cut,
and why. The LLM judge runs through Snakemake too (the tiny model judging its own answers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
# ~390 tokens: far beyond finetune.max_seq_length (96), within the tiny model's 512-token context with the 6 new
# tokens (a longer test prompt is now refused by the generate job, naming its row).
LONG_PROMPT = "Summarise the following notes about the history of the printing press. " + " ".join(
    f"Note {i}: the press spread from Mainz to Venice and Paris within decades." for i in range(20)
)
LONG_ANSWER = " ".join(f"Point {i} of the answer explains one more detail." for i in range(40))


def alpaca_file(path: Path) -> dict:
    rows = [{"instruction": f"Name a colour that starts with the letter {chr(65 + i)}.", "input": "",
             "output": f"A colour for {chr(65 + i)}."} for i in range(26)]
    rows += [{"instruction": f"Translate word {i} into French.", "input": f"word{i}", "output": f"mot{i}"}
             for i in range(8)]
    rows += [{"instruction": LONG_PROMPT, "input": f"Part {i}.", "output": "Short."} for i in range(4)]
    rows += [{"instruction": f"Explain topic {i} at length.", "input": "", "output": LONG_ANSWER} for i in range(3)]
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    malformed = ['{"instruction": "Cut off mid-line", "outp', "this line is not JSON", '{"instruction": "x",}']
    for offset, line in zip((5, 17, 30), malformed):
        lines.insert(offset, line)
    path.write_bytes(b"\xef\xbb\xbf" + ("\n".join(lines) + "\n").encode("utf-8"))
    return {"rows": len(rows), "malformed": len(malformed), "long_prompts": 4}


def alpaca_run_config(model_dir) -> dict:
    """The study this test runs (tests/tools/compare_commits.py runs it too): the tiny model at `model_dir`, the
    file of alpaca_file(), the LLM judge on."""
    return {
        "seed": 5, "device": "cpu",
        "dataset": {"name": "alpaca-mini", "source": "alpaca_data.jsonl", "test_size": 6},
        "models": {"tiny": {"source": str(model_dir), "prompt_format": "alpaca", "num_layers": 4,
                            "resources": {"gpus": 0, "cpus": 1, "mem_mb": 2000, "runtime": 10}}},
        "finetune": {"lora_r": 4, "lora_alpha": 8, "max_steps": 3, "batch_size": 4, "max_seq_length": 96,
                     "logging_steps": 1, "save_steps": 10, "learning_rate": 1e-3},
        "decoding": {"mode": "list", "configs": [{"name": "greedy", "temperature": 0.0}], "max_new_tokens": 6,
                     "max_test_rows": 4},
        "scoring": {"metrics": ["rougeL", "length"], "bootstrap_samples": 100, "perplexity": False,
                    "judge": {"enabled": True, "model": "tiny", "batch_size": 2}, "human": {"enabled": False}},
        "probe": {"enabled": False},
    }


@pytest.mark.slow
def test_alpaca_file_with_bom_malformed_lines_and_long_rows_completes_and_counts(tmp_path, tiny_llama_dir):
    counts = alpaca_file(tmp_path / "alpaca_data.jsonl")
    config = alpaca_run_config(tiny_llama_dir)
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "1", "--snakefile", str(ROOT / "Snakefile"),
         "--directory", str(tmp_path), "--configfile", str(tmp_path / "study.yaml")],
        cwd=tmp_path, capture_output=True, text=True, timeout=1200,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    manifest = json.loads((tmp_path / "results/data/alpaca-mini/manifest.json").read_text())
    assert manifest["counts"]["read"] == counts["rows"] + counts["malformed"]
    assert manifest["counts"]["dropped"] == {"malformed_json_line": counts["malformed"]}
    assert manifest["counts"]["dropped_examples"]["malformed_json_line"] == ["line 6", "line 18", "line 31"]
    assert manifest["counts"]["usable"] == counts["rows"]

    train = [json.loads(line) for line in (tmp_path / "results/data/alpaca-mini/train.jsonl").read_text().splitlines()]
    long_in_train = sum(row["instruction"] == LONG_PROMPT for row in train)
    assert long_in_train >= 1, "the split put every long prompt into test; change the seed"
    metrics = json.loads((tmp_path / "results/finetune/tiny/metrics.json").read_text())
    assert metrics["dropped_rows"] == {"prompt_fills_max_seq_length": long_in_train}
    assert metrics["train_rows"] == len(train) - long_in_train
    assert metrics["truncated_rows"] >= 1  # the long answers are cut at max_seq_length, and counted

    judge = json.loads((tmp_path / "results/judge/tiny/finetuned/greedy.json").read_text())
    assert judge["metrics"]["judge"]["n"] == 4

    summary = (tmp_path / "results/summary.md").read_text()
    checks = summary.split("## Data checks", 1)[1].split("\n## ", 1)[0]
    assert f"dropped: malformed json line {counts['malformed']}" in checks
    assert f"fine-tune tiny: {metrics['train_rows']} rows trained; dropped: prompt fills max seq length {long_in_train}" \
        in checks
    assert f"truncated to max_seq_length: {metrics['truncated_rows']}" in checks

    # the compute-cost section (tunelens.report.costs) is the benchmark files' numbers
    from tunelens.cost import read_benchmark

    cost = summary.split("## Compute cost", 1)[1].split("\n## ", 1)[0]
    finetune_row = next(line for line in cost.splitlines() if line.startswith("| finetune "))
    wall = read_benchmark(tmp_path / "benchmarks/finetune/tiny.tsv")[0]["s"]
    assert finetune_row.split("|")[3].strip() == f"{wall:,.1f}"
    assert "no job held a GPU" in cost
