"""The seeds' per-layer judge (issue 22): with scoring.judge on, the judge rates every early-exit layer's answers
(rule judge_early_exit) and the report's per-layer table gains a Judge column with CIs.

One Snakemake run of a tiny study (a 4-layer random Llama, base variant only, 6 early-exit rows sampled at each
layer): the judge file of each exit layer is checked against the per-config judge file's format and against a
bootstrap computed here with numpy alone from its per-row scores, and the per-layer table's Judge cell against the
same. A random model rates every answer alike (as SmolLM2-135M does), which would make the check hollow; the judge
here is the tiny model with its rating-token rows of the LM head turned so that the rating follows the prompt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SAMPLES, CONFIDENCE, SEED = 150, 0.9, 11
LAYERS = (2, 4)


def varied_judge(source: Path, out: Path, seed: int = 3) -> Path:
    """The tiny model with an untied LM head whose rows for the rating tokens are random directions orthogonal to
    the mean last hidden state of a few judge prompts: the ratings then depend on how a prompt differs from the
    mean, i.e. they vary between answers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelens.scoring.judge import judge_prompt, rating_token_ids

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source)
    answers = ["", "7", "three", "The answer is 12.", "print(5)", "x" * 20, "Blue.", "\n"]
    prompts = [judge_prompt(f"Task {i}: add {i} and {2 * i}.", str(3 * i), answer, tokenizer)
               for i, answer in enumerate(answers)]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False, padding_side="left")
    with torch.no_grad():
        mean = model(**batch, output_hidden_states=True).hidden_states[-1][:, -1, :].mean(0)
    weight = model.lm_head.weight.detach().clone()
    generator = torch.Generator().manual_seed(seed)
    for ids in rating_token_ids(tokenizer):
        direction = torch.randn(weight.shape[1], generator=generator)
        direction -= (direction @ mean) / (mean @ mean) * mean
        weight[ids] = 50 * direction / direction.norm()
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(weight)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def hand_bootstrap(values: np.ndarray) -> tuple[float, float, float]:
    """Mean and percentile CI: rows drawn with replacement by numpy's generator seeded with the study seed (the
    documented resampling, docs/scoring.md), without tunelens.scoring.statistics."""
    draws = np.random.default_rng(SEED).integers(0, len(values), size=(SAMPLES, len(values)))
    means = values[draws].mean(axis=1)
    alpha = 1 - CONFIDENCE
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(values.mean()), float(low), float(high)


def layer_table(summary: str) -> tuple[list[str], dict[str, list[str]]]:
    """Header and rows (by layer) of the per-layer table of the summary's section 3."""
    section = summary.split("## 3. Early exit per layer", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    cells = [[cell.strip() for cell in line.strip().strip("|").split(" | ")] for line in lines]
    return cells[0], {row[0]: row for row in cells[1:] if not set(row[0]) <= set("-:")}


@pytest.mark.slow
def test_judge_rates_each_exit_layer_and_the_layer_table_shows_it(tmp_path, tiny_llama_dir):
    judge_dir = varied_judge(tiny_llama_dir, tmp_path / "judge")
    config = {
        "seed": SEED, "device": "cpu",
        "dataset": {"name": "demo", "source": "embedded:demo", "test_size": 8, "max_train": 16},
        "models": {"tiny": {"source": str(tiny_llama_dir), "prompt_format": "chat", "num_layers": 4,
                            "resources": {"gpus": 0, "mem_mb": 1000, "runtime": 10, "cpus": 1}}},
        "finetune": {"enabled": False},
        "decoding": {"mode": "list", "configs": [{"name": "greedy", "temperature": 0.0}], "max_new_tokens": 4,
                     "max_test_rows": 3},
        "scoring": {"metrics": ["length"], "perplexity": False, "bootstrap_samples": SAMPLES,
                    "confidence": CONFIDENCE, "judge": {"enabled": True, "model": str(judge_dir), "batch_size": 4},
                    "human": {"enabled": False}},
        "probe": {"layers": list(LAYERS), "lens_new_tokens": 1, "lens_test_prompts": 1,
                  "early_exit": {"max_new_tokens": 4, "max_test_rows": 6,
                                 "decoding": {"temperature": 1.0, "top_k": 50}}},
    }  # fmt: skip
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "1", "--snakefile", str(ROOT / "Snakefile"),
         "--directory", str(tmp_path), "--configfile", str(tmp_path / "study.yaml")],
        capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    results = tmp_path / "results"
    # one judge job per exit layer, billed in the compute-cost section under its own rule
    for layer in LAYERS:
        assert (tmp_path / f"benchmarks/judge_early_exit/tiny/base/layer_{layer}.tsv").is_file()
    cost = (results / "summary.md").read_text().split("## Compute cost", 1)[1].split("\n## ", 1)[0]
    row = next(line for line in cost.splitlines() if line.startswith("| judge_early_exit "))
    assert row.split("|")[2].strip() == str(len(LAYERS)), row
    per_config = json.loads((results / "judge/tiny/base/greedy.json").read_text())
    header, rows = layer_table((results / "summary.md").read_text())
    assert "Judge base" in header, header
    summary_csv = pd.read_csv(results / "summary.csv", keep_default_na=False)
    answers = {}
    for layer in LAYERS:
        stem = results / f"probe/tiny/base/early_exit/layer_{layer}"
        judged = json.loads(stem.with_name(stem.name + ".judge.json").read_text())
        scored = json.loads(stem.with_name(stem.name + ".scores.json").read_text())
        generations = [json.loads(line) for line in stem.with_suffix(".jsonl").read_text().splitlines()]
        table = pd.read_csv(stem.with_name(stem.name + ".judge.rows.csv"), dtype={"id": str})

        # scored like the per-config judge file: same keys, rubric, judge and bootstrap; this layer's rows
        assert judged.keys() == per_config.keys()
        assert (judged["judge"]["rubric_version"], judged["judge"]["model"]) == (
            per_config["judge"]["rubric_version"], str(judge_dir))
        assert judged["bootstrap"] == per_config["bootstrap"]
        assert (judged["model"], judged["variant"], judged["layer"]) == ("tiny", "base", layer)
        assert judged["config"] == scored["config"]  # the early-exit decoding's name, as the layer's score file
        assert list(table["id"]) == [row["id"] for row in generations] and judged["n"] == len(generations) == 6
        assert np.allclose(table["judge"], (table["judge_rating"] - 1) / 4)
        assert table["judge_rating"].nunique() > 1, table  # the ratings vary: the CI below is not a point
        answers[layer] = ([row["generated"] for row in generations], list(table["judge_expected"]))

        # value and CI: the bootstrap of the per-row scores, computed here
        value, low, high = hand_bootstrap(table["judge"].to_numpy(dtype=float))
        entry = judged["metrics"]["judge"]
        assert (entry["value"], entry["ci_low"], entry["ci_high"]) == pytest.approx((value, low, high), abs=1e-12)

        # the per-layer table's Judge column and its summary.csv row
        cell = rows[str(layer)][header.index("Judge base")]
        assert cell.replace("**", "") == f"{value:.3f} [{low:.3f}, {high:.3f}]", cell
        row = summary_csv[(summary_csv["metric"] == "judge") & (summary_csv["layer"] == str(layer))]
        assert len(row) == 1
        assert (float(row["value"].iloc[0]), float(row["ci_low"].iloc[0]), float(row["ci_high"].iloc[0])) == \
            pytest.approx((value, low, high), abs=1e-9)
    # each layer's own answers were judged: other answers, other rating distributions
    assert answers[LAYERS[0]][0] != answers[LAYERS[1]][0] and answers[LAYERS[0]][1] != answers[LAYERS[1]][1]
