"""Every bootstrap and confidence interval of the project, in one place.

Used by the scoring stage (corpus metrics with CIs over test rows, tunelens.scoring.score) and by the report
(paired differences between variants/configs, rank agreement with Judge/Human, tunelens.report):
- resample_counts          the seeded resamples: how often each row is drawn in each resample;
- bootstrap_distribution   the statistic on each resample (a mean, or a reduce over summed row statistics);
- percentile_ci            the percentile interval of a distribution;
- bootstrap_ci             value + percentile CI of one corpus statistic;
- paired_bootstrap / paired_difference   mean difference over the same rows, with a CI and a p-value;
- paired_corpus_difference               difference of two corpus statistics (BLEU, CodeBLEU, perplexity)
                                         over the same rows, both recomputed on each joint resample;
- corpus_perplexity_difference           the same for perplexity from id/nll/tokens tables;
- bootstrap_p_value        two-sided bootstrap p-value of a difference;
- adjust_p_values          Holm or Benjamini-Hochberg adjustment over a family of p-values;
- rank_agreement           Kendall tau-b and Spearman rho with CIs.

All of them are deterministic in their seed. numpy/scipy only (no torch), so the report job starts fast.
"""

from __future__ import annotations

import math
import zlib
from typing import Callable, Sequence

import numpy as np

BOOTSTRAP_METHOD = "percentile bootstrap: rows resampled with replacement, corpus value recomputed per resample"


def resample_counts(n: int, samples: int, seed: int) -> np.ndarray:
    """(samples, n) matrix: how often each row is drawn in each bootstrap resample (rows sum to n).

    Deterministic in (n, samples, seed): every metric of a file, and every file with the same rows,
    sees the same resamples, which is what paired comparisons need.
    """
    if n < 1:
        raise ValueError("bootstrap needs at least one row")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(samples, n))
    flat = (draws + np.arange(samples)[:, None] * n).ravel()
    return np.bincount(flat, minlength=samples * n).reshape(samples, n).astype(np.float64)


def comparison_rng(seed: int, key: str) -> np.random.Generator:
    """A generator per comparison, so a CI does not depend on which other comparisons ran before it."""
    return np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])


def percentile_ci(distribution: np.ndarray, confidence: float, *, finite_only: bool = False) -> tuple[float, float]:
    """The central `confidence` interval of a bootstrap distribution (linear interpolation).

    finite_only: drop NaN/inf resamples first (a rank correlation is NaN on a constant resample); NaN
    bounds when nothing is left. Without it a NaN anywhere gives NaN bounds (a metric with NaN rows).
    """
    distribution = np.asarray(distribution, dtype=np.float64)
    if finite_only:
        distribution = distribution[np.isfinite(distribution)]
        if distribution.size == 0:
            return math.nan, math.nan
    alpha = 1.0 - confidence
    low, high = np.quantile(distribution, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def bootstrap_distribution(
    values: Sequence[float] | np.ndarray | None = None,
    *,
    stats: np.ndarray | None = None,
    reduce: Callable[[np.ndarray], float] | None = None,
    samples: int = 1000,
    seed: int = 0,
    counts: np.ndarray | None = None,
) -> np.ndarray:
    """The statistic on each bootstrap resample: the mean of `values`, or `reduce(column sums of stats)`."""
    if stats is not None:
        if reduce is None:
            raise ValueError("stats given without reduce")
        stats = np.asarray(stats, dtype=np.float64)
        n = stats.shape[0]
    else:
        values = np.asarray(values, dtype=np.float64)
        n = values.shape[0]
    counts = resample_counts(n, samples, seed) if counts is None else counts
    if stats is None:
        return counts @ values / n
    return np.asarray([reduce(sums) for sums in counts @ stats], dtype=np.float64)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray | None = None,
    *,
    stats: np.ndarray | None = None,
    reduce: Callable[[np.ndarray], float] | None = None,
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    counts: np.ndarray | None = None,
) -> dict[str, float]:
    """Seeded percentile bootstrap CI of a corpus statistic.

    Either `values` (per-row values; statistic = mean) or `stats` + `reduce` (per-row sufficient statistics;
    statistic = reduce(column sums), e.g. corpus BLEU). Returns {"value", "ci_low", "ci_high"} on the
    statistic's own scale. With all rows equal the CI collapses to the value.
    """
    if stats is not None:
        value = float(reduce(np.asarray(stats, dtype=np.float64).sum(axis=0)))
    else:
        value = float(np.mean(np.asarray(values, dtype=np.float64)))
    distribution = bootstrap_distribution(values, stats=stats, reduce=reduce, samples=samples, seed=seed, counts=counts)
    low, high = percentile_ci(distribution, confidence)
    return {"value": value, "ci_low": low, "ci_high": high}


P_VALUE_METHOD = ("two-sided bootstrap p-value: twice the share of bootstrap differences at or beyond 0 on the "
                  "side opposite the observed difference, with the +1 correction, (1 + count) / (1 + resamples), "
                  "capped at 1; 1 when the observed difference is 0")
ADJUSTMENTS = {
    "holm": "Holm (family-wise error rate)",
    "bh": "Benjamini-Hochberg (false discovery rate)",
    "none": "none (each comparison at its own level)",
}


def bootstrap_p_value(distribution: np.ndarray, observed: float) -> float:
    """Two-sided bootstrap p-value of H0 "difference = 0" (P_VALUE_METHOD).

    `distribution`: the difference on each bootstrap resample (non-finite resamples are left out);
    `observed`: the difference on the rows themselves. NaN when nothing is finite.
    """
    distribution = np.asarray(distribution, dtype=np.float64)
    distribution = distribution[np.isfinite(distribution)]
    if distribution.size == 0 or not math.isfinite(observed):
        return math.nan
    if observed == 0:
        return 1.0
    beyond = np.count_nonzero(distribution <= 0) if observed > 0 else np.count_nonzero(distribution >= 0)
    return float(min(1.0, 2.0 * (1 + beyond) / (1 + distribution.size)))


def adjust_p_values(p_values: Sequence[float] | np.ndarray, method: str) -> np.ndarray:
    """Adjusted p-values over one family of comparisons: 'holm' (step-down, family-wise error rate),
    'bh' (Benjamini-Hochberg step-up, false discovery rate) or 'none'. NaN entries stay NaN and do not
    count in the family. Same definitions as statsmodels.stats.multitest.multipletests."""
    if method not in ADJUSTMENTS:
        raise ValueError(f"multiple-comparison adjustment '{method}': expected one of {list(ADJUSTMENTS)}")
    p_values = np.asarray(p_values, dtype=np.float64)
    out = np.full(p_values.shape, math.nan)
    finite = np.flatnonzero(np.isfinite(p_values))
    m = finite.size
    if m == 0:
        return out
    if method == "none":
        out[finite] = p_values[finite]
        return out
    order = finite[np.argsort(p_values[finite], kind="stable")]
    ranked = p_values[order]
    if method == "holm":
        adjusted = np.maximum.accumulate((m - np.arange(m)) * ranked)
    else:
        adjusted = np.minimum.accumulate((ranked * m / np.arange(1, m + 1))[::-1])[::-1]
    out[order] = np.minimum(adjusted, 1.0)
    return out


def paired_bootstrap(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Paired bootstrap of mean(a) - mean(b) over the same rows (a[i] and b[i] belong to one test row).

    Returns {"diff", "ci_low", "ci_high", "p_value", "n"}; p_value: bootstrap_p_value (P_VALUE_METHOD).
    Units are those of the inputs.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_bootstrap needs two equal-length 1-D arrays, got shapes {a.shape} and {b.shape}")
    diff = a - b
    distribution = bootstrap_distribution(diff, samples=samples, seed=seed)
    low, high = percentile_ci(distribution, confidence)
    observed = float(diff.mean())
    p_value = 1.0 if np.all(distribution == 0) else bootstrap_p_value(distribution, observed)
    return {"diff": observed, "ci_low": low, "ci_high": high, "p_value": float(p_value), "n": int(a.shape[0])}


def paired_difference(a: np.ndarray, b: np.ndarray, *, samples: int, confidence: float,
                      seed: int) -> tuple[float, float, float]:
    """Mean of (b - a) over paired rows (a[i], b[i] = one test row) with a percentile bootstrap CI:
    (difference, low, high), NaN for no rows. Same resampling as the score files' CIs."""
    result = paired_mean_difference(a, b, samples=samples, confidence=confidence, seed=seed)
    return result["diff"], result["ci_low"], result["ci_high"]


def paired_mean_difference(a: np.ndarray, b: np.ndarray, *, samples: int, confidence: float, seed: int) -> dict:
    """paired_bootstrap of mean(b) - mean(a) (b the second, e.g. fine-tuned, a the base), NaN for no rows."""
    if len(a) == 0:
        return {"diff": math.nan, "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan, "n": 0}
    return paired_bootstrap(np.asarray(b, dtype=float), np.asarray(a, dtype=float), samples=samples,
                            confidence=confidence, seed=seed)


def paired_corpus_difference(stats_a: np.ndarray, stats_b: np.ndarray, reduce: Callable[[np.ndarray], float], *,
                             samples: int, confidence: float, seed: int) -> dict:
    """reduce(sums of stats_b) - reduce(sums of stats_a): the difference of two corpus statistics over the
    same rows (row i of both = one test row), e.g. fine-tuned minus base corpus BLEU.

    Each bootstrap resample draws row ids once and recomputes both corpus values on it, so the CI is that of
    the paired difference of the corpus values, and the point estimate is the difference of the two corpus
    values the score files show (on the same rows). Returns {"diff", "ci_low", "ci_high", "p_value", "n"};
    resamples where a corpus value is not finite are left out of the CI and the p-value.
    """
    stats_a = np.asarray(stats_a, dtype=np.float64)
    stats_b = np.asarray(stats_b, dtype=np.float64)
    if stats_a.shape != stats_b.shape or stats_a.ndim != 2:
        raise ValueError(f"paired_corpus_difference needs two (rows, statistics) arrays of one shape, got "
                         f"{stats_a.shape} and {stats_b.shape}")
    n = stats_a.shape[0]
    if n == 0:
        return {"diff": math.nan, "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan, "n": 0}
    observed = float(reduce(stats_b.sum(axis=0))) - float(reduce(stats_a.sum(axis=0)))
    counts = resample_counts(n, samples, seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        distribution = (bootstrap_distribution(stats=stats_b, reduce=reduce, counts=counts)
                        - bootstrap_distribution(stats=stats_a, reduce=reduce, counts=counts))
    low, high = percentile_ci(distribution, confidence, finite_only=True)
    finite = distribution[np.isfinite(distribution)]
    p_value = 1.0 if finite.size and np.all(finite == 0) else bootstrap_p_value(distribution, observed)
    return {"diff": observed, "ci_low": low, "ci_high": high, "p_value": p_value, "n": n}


def corpus_perplexity_difference(base, tuned, *, samples: int, confidence: float,
                                 seed: int) -> tuple[float, float, float, int]:
    """Fine-tuned minus base corpus perplexity, exp(sum nll / sum tokens), over references paired by id.

    `base`/`tuned` are DataFrames with columns id, nll (a row's summed negative log-likelihood, nats) and
    tokens (its scored token count). Both variants are resampled with the same rows, so the CI is that of
    the paired difference of the corpus values. Returns (diff, low, high, n pairs).
    """
    pair = base.merge(tuned, on="id", suffixes=("_base", "_tuned")).dropna().sort_values("id")
    if pair.empty:
        return math.nan, math.nan, math.nan, 0
    result = paired_corpus_difference(
        pair[["nll_base", "tokens_base"]].to_numpy(), pair[["nll_tuned", "tokens_tuned"]].to_numpy(),
        lambda sums: float(np.exp(sums[0] / sums[1])) if sums[1] > 0 else math.nan,
        samples=samples, confidence=confidence, seed=seed)
    return result["diff"], result["ci_low"], result["ci_high"], len(pair)


def rank_agreement(x: np.ndarray, y: np.ndarray, *, samples: int, confidence: float,
                   rng: np.random.Generator) -> dict[str, tuple[float, float, float]]:
    """Kendall tau-b and Spearman rho of x vs y, each with a percentile bootstrap CI over rows.

    Returns {'kendall_tau': (value, low, high), 'spearman_rho': (...)}; NaN where a variable is constant.
    """
    from scipy import stats

    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    n = x.size
    nan = (math.nan, math.nan, math.nan)
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"kendall_tau": nan, "spearman_rho": nan}
    tau = float(stats.kendalltau(x, y).statistic)
    rho = float(stats.spearmanr(x, y).statistic)
    index = rng.integers(0, n, size=(samples, n))
    xs, ys = x[index], y[index]
    # Spearman vectorised: Pearson correlation of the ranks, per resample.
    rx = stats.rankdata(xs, axis=1)
    ry = stats.rankdata(ys, axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    denom = np.sqrt((rx**2).sum(axis=1) * (ry**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho_samples = (rx * ry).sum(axis=1) / denom
    tau_samples = kendall_tau_b_rows(xs, ys)
    return {
        "kendall_tau": (tau, *percentile_ci(tau_samples, confidence, finite_only=True)),
        "spearman_rho": (rho, *percentile_ci(rho_samples, confidence, finite_only=True)),
    }


def kendall_tau_b_rows(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Kendall tau-b of each row pair (xs[i], ys[i]); bootstrap resamples repeat rows, so ties matter.

    tau-b = sum(sx * sy) / sqrt(sum(sx^2) * sum(sy^2)) over all ordered pairs, sx = sign(x_i - x_j).
    Vectorised over pair matrices in chunks for small n (a scipy call per resample is ~100x slower);
    falls back to scipy for large n, where the n^2 matrices would not fit.
    """
    from scipy import stats

    samples, n = xs.shape
    if n > 400:
        return np.array([stats.kendalltau(xs[i], ys[i]).statistic for i in range(samples)], dtype=float)
    out = np.empty(samples)
    chunk = max(1, 4_000_000 // (n * n))
    for start in range(0, samples, chunk):
        x = xs[start:start + chunk]
        y = ys[start:start + chunk]
        sx = np.sign(x[:, :, None] - x[:, None, :])
        sy = np.sign(y[:, :, None] - y[:, None, :])
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start:start + chunk] = (sx * sy).sum(axis=(1, 2)) / np.sqrt(
                (sx * sx).sum(axis=(1, 2)) * (sy * sy).sum(axis=(1, 2)))
    return out
