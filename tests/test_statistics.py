"""The confidence intervals are right, not only reproducible and ordered.

- Percentile bootstrap CIs equal scipy.stats.bootstrap(method="percentile") on the same data: both draw the
  resample indices as `default_rng(seed).integers(0, n, (samples, n))`, so with the same seed they agree to
  rounding, for a mean and for a corpus statistic of per-row sums (paired resampling of several columns).
- Coverage: over 500 seeded samples from a known distribution, the 95% interval contains the true value
  in 92-97.5% of them (binomial standard error at 95% is 1 point; a percentile bootstrap at n=60 on a
  symmetric distribution covers close to nominal; the 90% quantiles, a common slip, cover ~89%).
- Perplexity's CI is the percentile interval of exp(sum nll / sum tokens) recomputed on resampled rows
  of the per-row file, not a CI of the mean of per-row perplexities.
- Paired differences pair rows by id: with shuffled rows and ids missing on one side, a paired CI is as
  narrow as the per-row noise, and the value is the mean over the shared ids only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from tunelens.scoring.score import paired_rows, read_rows_csv, write_rows_csv
from tunelens.scoring.statistics import bootstrap_ci, corpus_perplexity_difference


# --------------------------------------------------------------------------------------------- scipy
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
@pytest.mark.parametrize("n", [7, 40])
def test_mean_ci_equals_scipy_percentile_bootstrap(confidence, n):
    data = np.random.default_rng(n).exponential(size=n)  # skewed: a symmetric-interval slip would show
    ours = bootstrap_ci(data, samples=3000, confidence=confidence, seed=5)
    theirs = scipy_stats.bootstrap((data,), np.mean, method="percentile", n_resamples=3000,
                                   confidence_level=confidence, rng=np.random.default_rng(5))
    assert ours["value"] == pytest.approx(data.mean(), abs=1e-12)
    assert (ours["ci_low"], ours["ci_high"]) == pytest.approx(tuple(theirs.confidence_interval), abs=1e-9)


def test_corpus_statistic_ci_equals_scipy_paired_bootstrap():
    """A ratio of sums (corpus perplexity, BLEU-like): rows resampled as units, statistic recomputed."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, 30, size=25).astype(float)
    nll = tokens * rng.gamma(2.0, 1.5, size=25)
    ours = bootstrap_ci(stats=np.stack([nll, tokens], axis=1), reduce=lambda s: math.exp(s[0] / s[1]),
                        samples=3000, seed=5)

    def corpus_perplexity(a, b, axis=-1):
        return np.exp(a.sum(axis=axis) / b.sum(axis=axis))

    theirs = scipy_stats.bootstrap((nll, tokens), corpus_perplexity, paired=True, method="percentile",
                                   n_resamples=3000, rng=np.random.default_rng(5))
    assert ours["value"] == pytest.approx(math.exp(nll.sum() / tokens.sum()), rel=1e-12)
    assert (ours["ci_low"], ours["ci_high"]) == pytest.approx(tuple(theirs.confidence_interval), rel=1e-9)


# --------------------------------------------------------------------------------------------- coverage
def coverage(draw, true_value: float, confidence: float, reps: int = 500) -> float:
    hits = 0
    for rep in range(reps):
        sample = draw(np.random.default_rng(10_000 + rep))
        ci = bootstrap_ci(sample, samples=1000, confidence=confidence, seed=rep)
        hits += ci["ci_low"] <= true_value <= ci["ci_high"]
    return hits / reps


def test_95_percent_interval_covers_the_true_mean_95_percent_of_the_time():
    # A per-row metric on a 0-1 scale (Beta(2, 5), mean 2/7), 60 rows per sample.
    rate = coverage(lambda rng: rng.beta(2.0, 5.0, size=60), 2.0 / 7.0, 0.95)
    assert 0.92 <= rate <= 0.975, rate


def test_99_percent_interval_covers_more_than_95_percent():
    rate = coverage(lambda rng: rng.normal(3.0, 2.0, size=60), 3.0, 0.99, reps=300)
    assert rate >= 0.97, rate


# --------------------------------------------------------------------------------------------- perplexity
def test_perplexity_ci_is_recomputed_from_resampled_rows(tmp_path, tiny_llama_dir):
    from tunelens.scoring.perplexity import reference_perplexity

    rows = [{"id": f"p-{i}", "instruction": f"Say item {i}.", "input": "", "output": " ".join(["word"] * (1 + i % 5))}
            for i in range(12)]
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out, rows_csv = tmp_path / "ppl.json", tmp_path / "ppl.rows.csv"
    reference_perplexity(test_file, out, rows_csv, model_name="tiny", model_path=tiny_llama_dir, device="cpu",
                         samples=500, confidence=0.9, seed=21)
    entry = json.loads(out.read_text())["metrics"]["perplexity"]
    table = read_rows_csv(rows_csv)
    ids = [row["id"] for row in rows]
    nll = np.asarray([table[i]["nll"] for i in ids])
    tokens = np.asarray([table[i]["tokens"] for i in ids])
    # Independently: resample row indices, recompute the corpus perplexity, take the 5th/95th percentiles.
    index = np.random.default_rng(21).integers(0, len(ids), size=(500, len(ids)))
    resampled = np.exp(nll[index].sum(axis=1) / tokens[index].sum(axis=1))
    assert entry["value"] == pytest.approx(math.exp(nll.sum() / tokens.sum()), rel=1e-6)
    assert (entry["ci_low"], entry["ci_high"]) == pytest.approx(tuple(np.percentile(resampled, [5, 95])), rel=1e-6)
    # Not the CI of the mean of per-row perplexities (a plausible slip; it differs on these rows).
    per_row_mean = np.percentile(np.exp(nll / tokens)[index].mean(axis=1), [5, 95])
    assert abs(per_row_mean[0] - entry["ci_low"]) > 1e-3 * entry["value"]


def test_report_perplexity_difference_is_recomputed_from_resampled_paired_rows():
    rng = np.random.default_rng(4)
    ids = [f"r-{i:02d}" for i in range(30)]
    tokens = rng.integers(4, 40, size=30).astype(float)
    # Rows differ widely in difficulty (per-token NLL 1-3); fine-tuning lowers each by ~0.3 nats.
    difficulty = rng.uniform(1.0, 3.0, size=30)
    base = pd.DataFrame({"id": ids, "nll": tokens * difficulty, "tokens": tokens})
    tuned = base.assign(nll=tokens * (difficulty - 0.3 + rng.normal(0.0, 0.05, size=30)))
    # Shuffled rows, and ids missing on either side: pairing must be by id.
    shuffled = tuned.sample(frac=1.0, random_state=0).iloc[2:]
    base_missing = base.drop(index=[5, 6])
    value, low, high, n = corpus_perplexity_difference(base_missing, shuffled, samples=800, confidence=0.95, seed=3)
    common = sorted(set(base_missing["id"]) & set(shuffled["id"]))
    assert n == len(common) == 26
    b = base.set_index("id").loc[common]
    t = tuned.set_index("id").loc[common]
    assert value == pytest.approx(math.exp(t["nll"].sum() / t["tokens"].sum())
                                  - math.exp(b["nll"].sum() / b["tokens"].sum()), rel=1e-9)
    # A paired resample moves both corpora together: the difference's CI is close around the value and
    # excludes 0; resampling the two sides independently would give a much wider interval.
    index = np.random.default_rng(99).integers(0, n, size=(800, n))

    def ppl(frame, idx):
        return np.exp(frame["nll"].to_numpy()[idx].sum(axis=1) / frame["tokens"].to_numpy()[idx].sum(axis=1))

    paired = np.percentile(ppl(t, index) - ppl(b, index), [2.5, 97.5])
    unpaired = np.percentile(ppl(t, index) - ppl(b, np.random.default_rng(98).integers(0, n, size=(800, n))),
                             [2.5, 97.5])
    assert low <= value <= high < 0
    assert (high - low) == pytest.approx(paired[1] - paired[0], rel=0.25)
    assert (high - low) < 0.5 * (unpaired[1] - unpaired[0])


# --------------------------------------------------------------------------------------------- paired ids
def paired_study(seed: int = 0, n: int = 40):
    """Per-row values where finetuned = base + 0.1 + small noise; base values spread widely."""
    rng = np.random.default_rng(seed)
    ids = [f"row-{i:03d}" for i in range(n)]
    base = rng.uniform(0.0, 1.0, size=n)
    tuned = base + 0.1 + rng.normal(0.0, 0.01, size=n)
    return ids, base, tuned


def test_paired_rows_match_shuffled_and_missing_ids(tmp_path):
    ids, base, tuned = paired_study()
    order = np.random.default_rng(1).permutation(len(ids))
    write_rows_csv(tmp_path / "base.rows.csv", ids[3:], {"rougeL": base[3:]})  # 3 ids only in finetuned
    kept = [i for i in order if i != 10]  # 1 id only in base; shuffled
    write_rows_csv(tmp_path / "ft.rows.csv", [ids[i] for i in kept], {"rougeL": tuned[kept]})
    a, b, common = paired_rows(tmp_path / "base.rows.csv", tmp_path / "ft.rows.csv", "rougeL")
    expected_ids = sorted(set(ids[3:]) - {ids[10]})
    assert common == expected_ids
    lookup_base, lookup_tuned = dict(zip(ids, base)), dict(zip(ids, tuned))
    assert a.tolist() == pytest.approx([lookup_base[i] for i in expected_ids], abs=1e-6)
    assert b.tolist() == pytest.approx([lookup_tuned[i] for i in expected_ids], abs=1e-6)


def test_report_paired_difference_pairs_by_id_with_shuffled_and_missing_rows():
    from tunelens.report.common import ReportSettings
    from tunelens.report.comparisons import paired_differences

    ids, base, tuned = paired_study()
    order = np.random.default_rng(2).permutation(len(ids))
    frames = [
        pd.DataFrame({"model": "m", "variant": "base", "config": "c", "layer": -1, "id": ids[:-4],
                      "metric": "rougeL", "value": base[:-4]}),
        pd.DataFrame({"model": "m", "variant": "finetuned", "config": "c", "layer": -1,
                      "id": [ids[i] for i in order if i != 0], "metric": "rougeL",
                      "value": [tuned[i] for i in order if i != 0]}),
    ]
    rows = pd.concat(frames, ignore_index=True)
    settings = ReportSettings(decoding_configs={"c": {}}, default_config="c", bootstrap_samples=1000, seed=7)
    table = paired_differences(rows, settings)
    assert len(table) == 1
    result = table.iloc[0]
    common = list(range(1, len(ids) - 4))
    assert result["n"] == len(common)
    assert result["value"] == pytest.approx(float(np.mean(tuned[common] - base[common])), abs=1e-12)
    # Paired by id the per-row differences are 0.1 +- 0.01: a narrow interval around 0.1. Paired by
    # position (shuffled rows) they would spread over +-1, and the interval would be ~20x wider.
    assert result["ci_low"] < 0.1 < result["ci_high"]
    assert result["ci_high"] - result["ci_low"] < 0.02
