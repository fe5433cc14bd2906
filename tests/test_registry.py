"""One registration per metric: a metric added with tunelens.scoring.metrics.register alone is accepted by the
config, computed by the score stage, ranked (with a CI) in summary.md and listed in summary.csv."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import numpy as np
import pytest

from tunelens.scoring import metrics
from tunelens.config import load_config
from tunelens.errors import ConfigError
from tunelens.scoring.metrics import METRICS, MetricResult, register
from tunelens.report import ReportSettings, read_summary_csv, write_report
from tunelens.scoring.score import score_generation_file

CONFIGS = {"greedy": {"temperature": 0.0}, "warm": {"temperature": 0.8}}


@pytest.fixture
def registry():
    """Restore the registry after a test registers a metric."""
    saved = dict(METRICS)
    yield METRICS
    METRICS.clear()
    METRICS.update(saved)


def register_shout():
    @register("shout", label="Shout", scale="0-1", higher_is_better=True, decimals=2,
              sentence_level="1 if the output is all capitals, else 0", description="share of all-caps outputs")
    def shout(generated, references, rows, context):
        per_row = np.asarray([float(text.isupper()) for text in generated])
        return MetricResult("shout", per_row, float(per_row.mean()))


def write_generation(path: Path, variant: str, config: str, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"r{i:02d}", "prompt": "p", "reference": "ref", "generated": text,
             "num_generated_tokens": 1, "finish_reason": "stop"} for i, text in enumerate(texts)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    meta = {"model": {"name": "m"}, "variant": variant, "decoding_config": {"name": config, **CONFIGS[config]},
            "n_rows": len(rows)}
    path.with_name(path.stem + ".meta.json").write_text(json.dumps(meta))
    return path


def test_registered_metric_is_a_config_choice(registry):
    config = {"dataset": {"name": "demo", "source": "embedded:demo"},
              "models": {"smollm2": {"source": "embedded:smollm2-135m-instruct"}},
              "scoring": {"metrics": ["exact_match", "shout"]}}
    with pytest.raises(ConfigError, match="shout"):
        load_config(json.loads(json.dumps(config)))
    register_shout()
    assert load_config(json.loads(json.dumps(config))).config["scoring"]["metrics"] == ["exact_match", "shout"]
    defaults = load_config({k: v for k, v in config.items() if k != "scoring"}).config["scoring"]["metrics"]
    assert "shout" in defaults  # a new metric is computed by default unless registered with default=False


def test_registered_metric_reaches_score_files_summary_md_and_csv(registry, tmp_path):
    register_shout()
    # 20 rows; the share of capitals: base greedy 0.2, base warm 0.5, finetuned greedy 0.6, finetuned warm 0.9
    shares = {("base", "greedy"): 4, ("base", "warm"): 10, ("finetuned", "greedy"): 12, ("finetuned", "warm"): 18}
    score_files = []
    for (variant, config), caps in shares.items():
        gen = write_generation(tmp_path / f"gen/{variant}/{config}.jsonl", variant, config,
                               ["LOUD"] * caps + ["quiet"] * (20 - caps))
        out = tmp_path / f"scores/m/{variant}/{config}"
        score = score_generation_file(gen, f"{out}.json", f"{out}.rows.csv", metrics=["exact_match", "shout"],
                                      context={"dataset_kind": "text"}, samples=200, seed=3)
        entry = score["metrics"]["shout"]
        assert entry["value"] == pytest.approx(caps / 20) and entry["scale"] == "0-1"
        assert entry["ci_low"] <= entry["value"] <= entry["ci_high"] and entry["ci_low"] < entry["ci_high"]
        assert entry["description"] == "share of all-caps outputs"
        score_files.append(f"{out}.json")

    paths = {"summary_md": tmp_path / "summary.md", "summary_csv": tmp_path / "summary.csv",
             "summary_html": tmp_path / "summary.html", "plots_dir": tmp_path / "plots"}
    write_report(score_files=score_files, **paths, now=dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc),
                 settings=ReportSettings(decoding_configs=CONFIGS, default_config="greedy", bootstrap_samples=200))

    table = read_summary_csv(paths["summary_csv"])
    shout = table[table["metric"] == "shout"]
    scores = shout[shout["statistic"] == "score"]
    assert sorted(scores["value"]) == pytest.approx([0.2, 0.5, 0.6, 0.9]) and scores["ci_low"].notna().all()
    best = shout[shout["statistic"] == "best_config"].set_index("variant")["config"].to_dict()
    assert best == {"base": "warm", "finetuned": "warm"}  # ranked: higher is better
    diff = shout[shout["statistic"] == "paired_difference"]
    assert diff["value"].tolist() == pytest.approx([0.4, 0.4])  # finetuned - base per config, paired by id

    markdown = paths["summary_md"].read_text()
    overview = re.search(r"## 1\..*?(?=\n## )", markdown, re.S).group(0)
    assert "Shout (0-1)" in overview  # label and scale from the registration
    assert re.search(r"\*\*0\.60\*\* \[0\.\d\d, 0\.\d\d\]", overview)  # 2 decimals, bold = best, with a CI
    best_table = re.search(r"## 4\..*?(?=\n## )", markdown, re.S).group(0)
    assert re.search(r"\| m\s+\| base\s+\| Shout\s+\| `warm`", best_table)
    assert list(Path(paths["plots_dir"]).glob("sweep_m_temperature.png"))


def test_metric_for_one_dataset_kind_is_skipped_with_a_reason(registry, tmp_path):
    register("codey", label="Codey", scale="0-1", higher_is_better=True, decimals=3, sentence_level="x",
             description="x", dataset_kinds=("code",),
             compute=lambda g, r, rows, c: MetricResult("codey", np.ones(len(g)), 1.0))
    gen = write_generation(tmp_path / "g.jsonl", "base", "greedy", ["a", "b"])
    score = score_generation_file(gen, tmp_path / "s.json", tmp_path / "s.rows.csv", metrics=["codey"],
                                  context={"dataset_kind": "text"}, samples=100)
    assert score["skipped"] == {"codey": "dataset kind is text (Codey needs dataset.kind: code)"}
    with pytest.raises(ValueError, match="unknown dataset kind"):
        register("bad", label="B", scale="0-1", higher_is_better=True, decimals=1, sentence_level="x",
                 description="x", dataset_kinds=("audio",))
    assert metrics.METRICS["codebleu"].skip_reason(metrics.ScoringContext(dataset_kind="text")) == (
        "dataset kind is text (CodeBLEU needs dataset.kind: code)")
