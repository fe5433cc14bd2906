"""Paired fine-tuned - base differences at the level each metric is defined (issue 22), and the p-values and
multiple-comparison adjustment of the paired tables.

Score files are written by the score stage itself (tunelens.scoring.score.score_generation_file) from generation
files, then read by the report; every number is compared with a computation that does not share the
project's code: sacrebleu / codebleu on the resampled rows, statsmodels' definitions worked by hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tunelens.scoring.codebleu_stats import CODEBLEU_STATS
from tunelens.scoring.metrics import ScoringContext
from tunelens.report import ReportSettings, load_score_files, summary_table
from tunelens.scoring.score import score_generation_file
from tunelens.scoring.statistics import adjust_p_values, bootstrap_p_value

CONFIG = "greedy"
SAMPLES = 120
SEED = 11
CODE = ScoringContext(dataset_kind="code", code_language="python")
TEXT = ScoringContext(dataset_kind="text")

OPS = [("add", "+"), ("mul", "*"), ("sub", "-"), ("div", "/"), ("mod", "%"), ("pow", "**"), ("fdiv", "//"),
       ("band", "&")]
CODE_REFERENCES = [f"def {name}(a, b):\n    total = a {op} b\n    return total" for name, op in OPS]
# Base: the right expression without the named variable; a per-row CodeBLEU of about 0.32 on every row.
CODE_BASE = [f"def {name}(a, b):\n    return a {op} b" for name, op in OPS]
# Fine-tuned: one perfect answer, the rest "0". Each "0" row gets a free 0.25 from codebleu's
# `dataflow_match_score or 1`, so the per-row mean (0.34) rises above the base's while the corpus
# CodeBLEU falls from 0.29 to 0.10.
CODE_TUNED = [CODE_REFERENCES[0]] + ["0"] * (len(OPS) - 1)


def settings(method: str = "bh") -> ReportSettings:
    return ReportSettings(decoding_configs={CONFIG: {"temperature": 0.0}}, default_config=CONFIG,
                          bootstrap_samples=SAMPLES, confidence=0.95, seed=SEED, multiple_comparisons=method)


def write_generations(path: Path, variant: str, generated: list[str], references: list[str]) -> Path:
    rows = [{"id": f"row-{i:02d}", "prompt": f"Q{i}", "reference": ref, "generated": gen,
             "num_generated_tokens": len(gen.split()), "finish_reason": "stop"}
            for i, (gen, ref) in enumerate(zip(generated, references))]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    meta = {"backend": "hf", "model": {"name": "tiny"}, "variant": variant, "decoding_config": {"name": CONFIG},
            "n_rows": len(rows)}
    path.with_name(path.name.replace(".jsonl", ".meta.json")).write_text(json.dumps(meta))
    return path


def scored_study(root: Path, base: list[str], tuned: list[str], references: list[str], metrics: list[str],
                 context: ScoringContext) -> list[Path]:
    out = []
    for variant, generated in (("base", base), ("finetuned", tuned)):
        generation = write_generations(root / f"gen/{variant}.jsonl", variant, generated, references)
        score = root / f"scores/tiny/{variant}/{CONFIG}.json"
        score.parent.mkdir(parents=True, exist_ok=True)
        score_generation_file(generation, score, score.with_name(f"{CONFIG}.rows.csv"), metrics=metrics,
                              context=context, samples=SAMPLES, seed=SEED)
        out.append(score)
    return out


def paired_row(table: pd.DataFrame, metric: str) -> pd.Series:
    match = table[(table["statistic"] == "paired_difference") & (table["metric"] == metric)]
    assert len(match) == 1
    return match.iloc[0]


def score_value(table: pd.DataFrame, variant: str, metric: str) -> float:
    match = table[(table["statistic"] == "score") & (table["variant"] == variant) & (table["metric"] == metric)]
    return float(match["value"].iloc[0])


def resampled_indices(n: int) -> np.ndarray:
    """The report's resamples drawn independently: numpy's integers(0, n) per resample, seeded as the report."""
    return np.random.default_rng(SEED).integers(0, n, size=(SAMPLES, n))


# --------------------------------------------------------------------------------------------- CodeBLEU
def test_issue_example_scores_a_free_quarter():
    from codebleu import calc_codebleu

    from tunelens.scoring.metrics import codebleu

    library = calc_codebleu(["ans = a + b\nprint(ans) # 10"], ["0"], lang="python")
    assert library["codebleu"] == pytest.approx(0.25)
    assert library["ngram_match_score"] == library["syntax_match_score"] == library["dataflow_match_score"] == 0
    ours = codebleu(["0"], ["ans = a + b\nprint(ans) # 10"], [], CODE)
    assert ours.per_row[0] == pytest.approx(0.25) and ours.value == pytest.approx(0.25)


def test_codebleu_paired_difference_has_the_corpus_scores_sign(tmp_path):
    """The per-row mean moves up while corpus CodeBLEU moves down: the paired difference must follow the
    corpus value (failed before: the mean of per-row differences, +0.021, not significant)."""
    from codebleu import calc_codebleu

    files = load_score_files({"decoding": scored_study(tmp_path, CODE_BASE, CODE_TUNED, CODE_REFERENCES,
                                                       ["codebleu"], CODE)})
    rows = {score.variant: score.rows for score in files}
    assert set(CODEBLEU_STATS) <= set(rows["base"].columns)
    # The case: per-row means and corpus values move in opposite directions.
    assert rows["finetuned"]["codebleu"].mean() > rows["base"]["codebleu"].mean()
    base_corpus = calc_codebleu(CODE_REFERENCES, CODE_BASE, lang="python")["codebleu"]
    tuned_corpus = calc_codebleu(CODE_REFERENCES, CODE_TUNED, lang="python")["codebleu"]
    assert tuned_corpus < base_corpus

    table = summary_table(files, settings())
    diff = paired_row(table, "codebleu")
    assert diff["value"] == pytest.approx(tuned_corpus - base_corpus, abs=1e-12)
    assert diff["value"] == pytest.approx(score_value(table, "finetuned", "codebleu")
                                          - score_value(table, "base", "codebleu"), abs=1e-12)
    # The CI against codebleu's own corpus value on each resample of row ids (both variants on the same rows).
    index = resampled_indices(len(OPS))
    reference = [calc_codebleu([CODE_REFERENCES[i] for i in rows_], [CODE_TUNED[i] for i in rows_], lang="python")
                 ["codebleu"] - calc_codebleu([CODE_REFERENCES[i] for i in rows_], [CODE_BASE[i] for i in rows_],
                                              lang="python")["codebleu"] for rows_ in index]
    low, high = np.quantile(reference, [0.025, 0.975])
    assert (diff["ci_low"], diff["ci_high"]) == pytest.approx((low, high), abs=1e-9)
    beyond = sum(d >= 0 for d in reference)
    assert diff["p_value"] == pytest.approx(min(1.0, 2 * (1 + beyond) / (1 + SAMPLES)))


# --------------------------------------------------------------------------------------------- BLEU
BLEU_REFERENCES = [
    "the cat sat on the mat", "a dog ran in the park today", "she reads a book every night",
    "we walked to the old bridge", "he plays the piano very well", "they ate fresh bread and cheese",
    "the sun rose over the hills", "my brother fixed the red bike", "rain fell on the quiet town",
    "birds sing in the tall trees",
]
BLEU_BASE = ["the cat sat", "a dog ran", "she reads", "we walked to", "he plays", "they ate bread",
             "the sun rose", "my brother", "rain fell", "birds sing"]
BLEU_TUNED = ["the cat sat on the mat", "a dog ran in the park", "she reads a book", "we walked to the bridge",
              "he plays piano", "they ate fresh bread and cheese", "sun rose over hills", "my brother fixed the bike",
              "rain fell on the town", "birds sing in trees"]


def test_bleu_paired_difference_is_the_gap_between_the_columns(tmp_path):
    """Failed before: the mean of sentence-BLEU differences, which is not the gap between the columns."""
    from sacrebleu.metrics.bleu import BLEU

    files = load_score_files({"decoding": scored_study(tmp_path, BLEU_BASE, BLEU_TUNED, BLEU_REFERENCES,
                                                       ["bleu", "rougeL"], TEXT)})
    table = summary_table(files, settings())
    diff = paired_row(table, "bleu")

    def corpus(generated, rows_):
        return BLEU().corpus_score([generated[i] for i in rows_], [[BLEU_REFERENCES[i] for i in rows_]]).score

    everything = range(len(BLEU_REFERENCES))
    assert diff["value"] == pytest.approx(corpus(BLEU_TUNED, everything) - corpus(BLEU_BASE, everything), abs=1e-9)
    assert diff["value"] == pytest.approx(score_value(table, "finetuned", "bleu") - score_value(table, "base", "bleu"),
                                          abs=1e-9)
    sentence_mean = np.mean([BLEU(effective_order=True).sentence_score(t, [r]).score
                             - BLEU(effective_order=True).sentence_score(b, [r]).score
                             for t, b, r in zip(BLEU_TUNED, BLEU_BASE, BLEU_REFERENCES)])
    assert abs(sentence_mean - diff["value"]) > 1.0  # the old estimate differs: the test can tell them apart
    reference = [corpus(BLEU_TUNED, rows_) - corpus(BLEU_BASE, rows_) for rows_ in resampled_indices(len(BLEU_BASE))]
    low, high = np.quantile(reference, [0.025, 0.975])
    assert (diff["ci_low"], diff["ci_high"]) == pytest.approx((low, high), abs=1e-9)
    # A mean-of-rows metric keeps the mean of per-row differences, which is the gap between its columns too.
    rouge = paired_row(table, "rougeL")
    assert rouge["value"] == pytest.approx(score_value(table, "finetuned", "rougeL")
                                           - score_value(table, "base", "rougeL"), abs=1e-12)


# --------------------------------------------------------------------------------------------- p-values
def test_bootstrap_p_value_by_hand():
    # observed > 0: resamples at or below 0 count; (1 + 2) / (1 + 9), doubled
    assert bootstrap_p_value(np.array([-1.0, 0.0, 1, 2, 3, 4, 5, 6, 7]), 3.0) == pytest.approx(0.6)
    # observed < 0: resamples at or above 0 count; none -> 2 / 10
    assert bootstrap_p_value(-np.arange(1.0, 10.0), -5.0) == pytest.approx(0.2)
    assert bootstrap_p_value(np.array([1.0, 2.0]), 0.0) == 1.0
    assert bootstrap_p_value(np.array([-1.0, -2.0, 3.0]), 1.0) == 1.0  # capped
    assert bootstrap_p_value(np.array([math.nan, 1.0, 2.0, -1.0]), 1.0) == pytest.approx(2 * 2 / 4)  # NaN left out


# p-values and their adjusted values, worked by hand from the definitions statsmodels'
# multipletests(method="holm" / "fdr_bh") implements:
#   Holm: sorted p_(i) * (m - i + 1), running maximum, capped at 1;
#   BH:   sorted p_(i) * m / i, running minimum from the largest, capped at 1.
P = [0.01, 0.04, 0.03, 0.005, 0.2, math.nan]
HOLM = [0.04, 0.09, 0.09, 0.025, 0.2, math.nan]  # 0.005*5, 0.01*4, 0.03*3, max(0.04*2, .09), 0.2*1
BH = [0.025, 0.05, 0.05, 0.025, 0.2, math.nan]  # 0.005*5/1=.025, .01*5/2=.025, .03*5/3=.05, .04*5/4=.05, .2


@pytest.mark.parametrize("method, expected", [("holm", HOLM), ("bh", BH), ("none", P)])
def test_adjustment_matches_the_hand_computation(method, expected):
    assert adjust_p_values(P, method) == pytest.approx(expected, nan_ok=True)


def test_adjustment_rejects_an_unknown_method():
    with pytest.raises(ValueError, match="holm"):
        adjust_p_values([0.1], "bonferroni")


def test_report_adjusts_each_models_paired_table_and_marks_by_adjusted_p(tmp_path):
    """summary.csv's p_adjusted is the chosen adjustment of its p_value column over the model's rows, and
    a paired cell's * follows the adjusted p (failed before: no p-values, * = CI excludes 0)."""
    from tunelens.report import write_report

    scores = scored_study(tmp_path, BLEU_BASE, BLEU_TUNED, BLEU_REFERENCES, ["bleu", "rougeL", "exact_match",
                                                                           "length"], TEXT)
    marked = {}
    for method in ("holm", "bh", "none"):
        out = tmp_path / method
        write_report(score_files=scores, summary_md=out / "summary.md", summary_csv=out / "summary.csv",
                     summary_html=out / "summary.html", plots_dir=out / "plots", settings=settings(method))
        table = pd.read_csv(out / "summary.csv")
        diffs = table[table["statistic"] == "paired_difference"]
        assert len(diffs) == 4 and diffs["p_value"].notna().all()
        assert diffs["p_adjusted"].to_numpy() == pytest.approx(adjust_p_values(diffs["p_value"], method))
        markdown = (out / "summary.md").read_text()
        paired = markdown.split("## 6. Fine-tuned vs base")[1].split("\n## ")[0]
        cells = {row[1]: row for row in ([c.strip() for c in line.strip("|").split("|")]
                                         for line in paired.splitlines() if line.startswith("| tiny"))}
        for metric, label in (("bleu", "BLEU"), ("rougeL", "ROUGE-L"), ("exact_match", "Exact match")):
            p_adjusted = float(diffs[diffs["metric"] == metric]["p_adjusted"].iloc[0])
            assert cells[label][4].endswith(" *") == (p_adjusted < 0.05)
            assert cells[label][6] == f"{p_adjusted:.3f}"
        marked[method] = cells["BLEU"][4].endswith(" *")
        assert {"holm": "Holm", "bh": "Benjamini-Hochberg", "none": "none"}[method] in paired
    # 120 resamples, 4 comparisons: the smallest p (2/121) times 4 is above 0.05, so Holm marks nothing and says
    # so; BH and no adjustment mark BLEU.
    assert marked == {"holm": False, "bh": True, "none": True}
    assert "Holm cannot mark any comparison of tiny" in (tmp_path / "holm/summary.md").read_text()


def test_adjustment_matches_statsmodels_on_random_families_with_ties():
    """statsmodels (dev extra) is the reference implementation; skipped in a venv installed before it was added."""
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    rng = np.random.default_rng(0)
    for _ in range(200):
        p_values = rng.uniform(0.0, 0.2, size=rng.integers(1, 30))
        p_values[rng.random(p_values.size) < 0.2] = p_values[0]  # ties, as bootstrap p-values have
        for method, theirs in (("holm", "holm"), ("bh", "fdr_bh")):
            assert adjust_p_values(p_values, method) == pytest.approx(multitest.multipletests(p_values, method=theirs)[1])


# --------------------------------------------------------------------------------------------- independent references
def test_paired_mean_difference_ci_and_p_value_against_numpy_resampling():
    """paired_bootstrap (mean-of-rows metrics) against a direct numpy computation on the same resampled ids:
    the CI is the percentile interval of mean(b[idx] - a[idx]), the p-value the +1-corrected doubled tail."""
    from tunelens.scoring.statistics import paired_mean_difference

    rng = np.random.default_rng(3)
    base = rng.uniform(0, 1, 25)
    tuned = base + rng.normal(0.04, 0.1, 25)
    result = paired_mean_difference(base, tuned, samples=400, confidence=0.9, seed=5)
    index = np.random.default_rng(5).integers(0, 25, size=(400, 25))
    differences = (tuned[index] - base[index]).mean(axis=1)
    assert result["diff"] == pytest.approx(tuned.mean() - base.mean(), abs=1e-12)
    assert (result["ci_low"], result["ci_high"]) == pytest.approx(tuple(np.quantile(differences, [0.05, 0.95])),
                                                                  abs=1e-12)
    assert result["p_value"] == pytest.approx(min(1.0, 2 * (1 + np.sum(differences <= 0)) / 401))


def test_rank_agreement_cis_against_scipy_on_each_resample():
    from scipy import stats

    from tunelens.scoring.statistics import rank_agreement

    rng = np.random.default_rng(8)
    x = rng.integers(0, 6, 30).astype(float)  # ties, as ratings have
    y = x + rng.normal(0, 2, 30)
    result = rank_agreement(x, y, samples=150, confidence=0.95, rng=np.random.default_rng(21))
    index = np.random.default_rng(21).integers(0, 30, size=(150, 30))
    tau = [stats.kendalltau(x[i], y[i]).statistic for i in index]
    rho = [stats.spearmanr(x[i], y[i]).statistic for i in index]
    assert result["kendall_tau"][0] == pytest.approx(stats.kendalltau(x, y).statistic)
    assert result["kendall_tau"][1:] == pytest.approx(tuple(np.nanquantile(tau, [0.025, 0.975])), abs=1e-9)
    assert result["spearman_rho"][1:] == pytest.approx(tuple(np.nanquantile(rho, [0.025, 0.975])), abs=1e-9)


def test_best_minus_default_bleu_is_the_corpus_gap_against_sacrebleu(tmp_path):
    """The best config's gain over the default for a corpus metric is the gap of corpus BLEU (failed before:
    the mean of sentence-BLEU differences)."""
    from sacrebleu.metrics.bleu import BLEU

    configs = {"default": {"temperature": 0.8}, "better": {"temperature": 0.0}}
    scores = []
    for name, generated in (("default", BLEU_BASE), ("better", BLEU_TUNED)):
        generation = write_generations(tmp_path / f"gen/{name}.jsonl", "base", generated, BLEU_REFERENCES)
        meta = json.loads(generation.with_name(f"{name}.meta.json").read_text())
        meta["decoding_config"] = {"name": name}
        generation.with_name(f"{name}.meta.json").write_text(json.dumps(meta))
        score = tmp_path / f"scores/tiny/base/{name}.json"
        score.parent.mkdir(parents=True, exist_ok=True)
        score_generation_file(generation, score, score.with_name(f"{name}.rows.csv"), metrics=["bleu"], context=TEXT,
                              samples=SAMPLES, seed=SEED)
        scores.append(score)
    table = summary_table(load_score_files({"decoding": scores}),
                          ReportSettings(decoding_configs=configs, default_config="default", bootstrap_samples=SAMPLES,
                                         seed=SEED))
    gain = table[table["statistic"] == "best_minus_default"].iloc[0]

    def corpus(generated, rows_):
        return BLEU().corpus_score([generated[i] for i in rows_], [[BLEU_REFERENCES[i] for i in rows_]]).score

    assert gain["config"] == "better"
    assert gain["value"] == pytest.approx(corpus(BLEU_TUNED, range(10)) - corpus(BLEU_BASE, range(10)), abs=1e-9)
    reference = [corpus(BLEU_TUNED, rows_) - corpus(BLEU_BASE, rows_) for rows_ in resampled_indices(10)]
    assert (gain["ci_low"], gain["ci_high"]) == pytest.approx(tuple(np.quantile(reference, [0.025, 0.975])), abs=1e-9)
    assert gain["p_adjusted"] == pytest.approx(gain["p_value"])  # a family of one


def test_before_after_table_names_the_changed_cells(tmp_path):
    """tunelens.report.compare: a 'before' summary whose BLEU difference was the sentence-level mean (+39.2,
    as the old code gave on these rows) against this code's; BLEU is named changed, ROUGE-L is not."""
    from tunelens.report import write_report
    from tunelens.report.compare import paired_before_after

    scores = scored_study(tmp_path, BLEU_BASE, BLEU_TUNED, BLEU_REFERENCES, ["bleu", "rougeL"], TEXT)
    write_report(score_files=scores, summary_md=tmp_path / "s.md", summary_csv=tmp_path / "after.csv",
                 summary_html=tmp_path / "s.html", plots_dir=tmp_path / "plots", settings=settings())
    after = pd.read_csv(tmp_path / "after.csv", keep_default_na=False)
    before = after.drop(columns=["p_value", "p_adjusted"])
    bleu = (before["statistic"] == "paired_difference") & (before["metric"] == "bleu")
    before.loc[bleu, ["value", "ci_low", "ci_high"]] = [39.2, 24.0, 53.4]
    before.to_csv(tmp_path / "before.csv", index=False)
    lines = {line.split("|")[2].strip(): [c.strip() for c in line.strip("|").split("|")]
             for line in paired_before_after(tmp_path / "before.csv", tmp_path / "after.csv").splitlines()
             if line.startswith("| tiny")}
    assert lines["BLEU"][4] == "+39.2 [24.0, 53.4] *" and lines["BLEU"][7] == "difference, CI"
    assert lines["BLEU"][5].startswith("+63.4")
    assert lines["ROUGE-L"][7] == "–"
