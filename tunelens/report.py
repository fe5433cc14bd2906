"""Summary tables, statistics and plots built from score files alone (the `report` rule).

Inputs are only the files other stages write (formats in docs/ARCHITECTURE.md):
- decoding score files  `scores/{model}/{variant}/{config}.json` (+ `{config}.rows.csv`)
- perplexity files      `perplexity/{model}/{variant}.json` (+ `{variant}.rows.csv`)
- judge files           `judge/{model}/{variant}/{config}.json` (+ `.rows.csv`)
- human scores          `human/scores/{model}/{variant}/{config}.json` (+ `.rows.csv`), once sheets are rated
- early-exit scores     `probe/{model}/{variant}/early_exit/layer_{layer}.scores.json` (+ rows)
- fine-tune records     `finetune/{model}/metrics.json` (+ sibling `train_log.jsonl`)

Outputs: `summary.md` (and the same document as `summary.html` for the Snakemake report), the tidy
long table `summary.csv`, and PNG plots. Scales are those of the score files: BLEU 0-100, ROUGE-L,
BERTScore, CodeBLEU, exact match, Judge and Human 0-1 (higher is better), perplexity >= 1 (lower is
better), length in generated tokens (no better direction).

Every number is reproducible from the inputs: bootstrap resamples are seeded (the study seed), rows
and columns have a fixed order, and the only line that changes between two runs on the same inputs is the
`Generated:` date line of the summary.

Kept free of torch imports so the report job starts fast.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import logging
import math
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from tunelens.errors import DataError
from tunelens.io import library_versions, read_json, read_jsonl, write_text_atomic

log = logging.getLogger(__name__)

VARIANT_ORDER = ("base", "finetuned")
DIFF_VARIANT = "finetuned-base"  # `variant` of paired-difference rows in summary.csv
POOLED = "all"  # model/variant/config of statistics pooled over several of them
REFERENCE_METRICS = ("judge", "human")  # what automatic metrics are compared against
CSV_COLUMNS = (
    "model", "variant", "config", "layer", "metric", "statistic", "value", "ci_low", "ci_high", "n", "scale",
)
DATE_PREFIX = "Generated: "


@dataclass(frozen=True)
class MetricInfo:
    """How a metric is shown: label, scale text, better direction (None = none) and decimals."""

    label: str
    scale: str
    higher_is_better: bool | None
    decimals: int


METRICS: dict[str, MetricInfo] = {
    "bleu": MetricInfo("BLEU", "0-100", True, 1),
    "rougeL": MetricInfo("ROUGE-L", "0-1", True, 3),
    "bertscore": MetricInfo("BERTScore", "0-1", True, 3),
    "codebleu": MetricInfo("CodeBLEU", "0-1", True, 3),
    "exact_match": MetricInfo("Exact match", "0-1", True, 3),
    "perplexity": MetricInfo("Perplexity", ">=1, lower is better", False, 2),
    "judge": MetricInfo("Judge", "0-1", True, 3),
    "human": MetricInfo("Human", "0-1", True, 3),
    "length": MetricInfo("Length", "generated tokens", None, 1),
}
CORRELATION = MetricInfo("", "-1..1", True, 3)


def metric_info(metric: str) -> MetricInfo:
    """Display info of a metric; an unknown metric is shown by name with 3 decimals, no direction."""
    return METRICS.get(metric, MetricInfo(metric, "as scored", None, 3))


def metric_order(metrics: Iterable[str]) -> list[str]:
    """Known metrics in the documented order, then unknown ones alphabetically."""
    known = list(METRICS)
    unique = set(metrics)
    return [m for m in known if m in unique] + sorted(unique - set(known))


# ============================================================================================ settings
@dataclass
class ReportSettings:
    """Parameters that change the report (all are rule params).

    decoding_configs: config name -> its fields (top_k, num_beams, temperature, ...), in study order.
    default_config: the config of the model overview and of the paired comparisons.
    bootstrap_samples / confidence / seed: for every CI the report computes itself
    (paired differences, rank correlations); metric CIs come from the score files.
    config_hash / git_commit: provenance, computed by the rule.
    """

    decoding_configs: dict[str, dict]
    default_config: str
    bootstrap_samples: int = 1000
    confidence: float = 0.95
    seed: int = 1234
    config_hash: str = "unknown"
    git_commit: str = "unknown"

    @property
    def ci_label(self) -> str:
        return f"{self.confidence * 100:g}% CI"


# ============================================================================================ loading
@dataclass
class ScoreFile:
    """One score file (any kind) and its per-row table when one was written next to it."""

    path: Path
    kind: str  # decoding | perplexity | judge | human | early_exit
    model: str
    variant: str
    config: str  # "" when not applicable (perplexity)
    layer: int | None
    n: int | None
    metrics: dict[str, dict]
    skipped: dict[str, str]
    source: dict | None
    versions: dict
    rows: pd.DataFrame | None = None  # columns: id, then one per metric


def rows_path_candidates(path: Path) -> list[Path]:
    """Where the per-row table of a score file lies: `X.json` -> `X.rows.csv`;
    early exit `layer_8.scores.json` -> `layer_8.scores.rows.csv` or `layer_8.rows.csv`."""
    path = Path(path)
    stem = path.name[: -len(".json")] if path.name.endswith(".json") else path.name
    candidates = [path.with_name(stem + ".rows.csv")]
    if stem.endswith(".scores"):
        candidates.append(path.with_name(stem[: -len(".scores")] + ".rows.csv"))
    return candidates


def _number(value: Any, where: str) -> float:
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where}: expected a number or null, got {value!r}")
    return float(value)


def read_rows_csv(path: Path, metrics: Iterable[str] = ()) -> pd.DataFrame:
    """A per-row table: `id`, then per-row values (blank = not rated, e.g. human ratings of a sample).

    Columns named in `metrics` (the score file's metrics) must be numeric; other columns are kept when
    numeric and dropped when they hold text (the scoring stage may add text columns after `id`).
    """
    try:
        frame = pd.read_csv(path, dtype={"id": str}, keep_default_na=True)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty file; expected a header 'id,<metric>,...'") from None
    if "id" not in frame.columns:
        raise DataError(f"{path}: no 'id' column; expected a header 'id,<metric>,...', got {list(frame.columns)}")
    if frame["id"].isna().any():
        line = int(frame.index[frame["id"].isna()][0]) + 2
        raise DataError(f"{path}, line {line}: empty id")
    if frame["id"].duplicated().any():
        dup = frame.loc[frame["id"].duplicated(), "id"].iloc[0]
        raise DataError(f"{path}: id '{dup}' appears twice; ids must be unique per file")
    metrics = set(metrics)
    keep = ["id"]
    for column in frame.columns[1:]:
        converted = pd.to_numeric(frame[column], errors="coerce")
        bad = converted.isna() & frame[column].notna()
        if bad.any() and column not in metrics:
            continue  # a text column (e.g. finish_reason), not a metric
        if bad.any():
            line = int(frame.index[bad][0]) + 2
            raise DataError(f"{path}, line {line}, column '{column}': expected a number, got {frame[column][bad].iloc[0]!r}")
        frame[column] = converted.astype(float).replace([np.inf, -np.inf], np.nan)
        keep.append(column)
    return frame[keep]


def load_score_file(path: str | Path, kind: str) -> ScoreFile:
    """Read and check one score file (format in docs/ARCHITECTURE.md), plus its rows table if present."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with 'model', 'variant', 'metrics'")
    for key in ("model", "variant", "metrics"):
        if key not in data:
            raise DataError(f"{path}: missing key '{key}'; expected a score file (see docs/ARCHITECTURE.md)")
    if not isinstance(data["metrics"], dict):
        raise DataError(f"{path}: key 'metrics' must map metric name -> {{value, ci_low, ci_high, n}}")
    metrics = {}
    for name, entry in data["metrics"].items():
        where = f"{path}: metrics.{name}"
        if not isinstance(entry, dict) or "value" not in entry:
            raise DataError(f"{where}: expected an object with 'value', 'ci_low', 'ci_high', 'n'")
        metrics[name] = {
            "value": _number(entry.get("value"), f"{where}.value"),
            "ci_low": _number(entry.get("ci_low"), f"{where}.ci_low"),
            "ci_high": _number(entry.get("ci_high"), f"{where}.ci_high"),
            "n": entry.get("n", data.get("n")),
            "scale": entry.get("scale") or metric_info(name).scale,
        }
    layer = data.get("layer")
    if kind == "early_exit" and layer is None:
        match = re.search(r"layer_(\d+)", path.name)
        if not match:
            raise DataError(f"{path}: key 'layer' is null and the file name has no layer_N; expected the probed layer")
        layer = int(match.group(1))
    score = ScoreFile(
        path=path,
        kind=kind,
        model=str(data["model"]),
        variant=str(data["variant"]),
        config="" if kind == "perplexity" else str(data.get("config") or ""),
        layer=None if layer is None else int(layer),
        n=data.get("n"),
        metrics=metrics,
        skipped=dict(data.get("skipped") or {}),
        source=data.get("source"),
        versions=dict(data.get("versions") or {}),
    )
    for candidate in rows_path_candidates(path):
        if candidate.exists():
            score.rows = read_rows_csv(candidate, metrics)
            break
    return score


def load_score_files(paths_by_kind: dict[str, Sequence[str | Path]]) -> list[ScoreFile]:
    """Load every score file; kinds are 'decoding', 'perplexity', 'judge', 'human', 'early_exit'."""
    files = [load_score_file(path, kind) for kind, paths in paths_by_kind.items() for path in paths]
    seen: dict[tuple, Path] = {}
    for score in files:
        key = (score.kind, score.model, score.variant, score.config, score.layer)
        if key in seen:
            raise DataError(f"{score.path}: same model/variant/config/layer as {seen[key]}; one file per combination")
        seen[key] = score.path
    without_rows = [str(s.path) for s in files if s.rows is None and s.kind != "perplexity"]
    if without_rows:
        log.warning("no per-row table next to %d score file(s), e.g. %s: no paired statistics for them",
                    len(without_rows), without_rows[0])
    return files


# ============================================================================================ tidy table
def _order_index(values: Iterable[str], preferred: Sequence[str] = ()) -> dict[str, int]:
    """Rank of each value: preferred ones first in their order, then others in first-seen order."""
    order: dict[str, int] = {}
    for value in list(preferred) + list(values):
        order.setdefault(value, len(order))
    return order


def tidy_scores(files: Sequence[ScoreFile]) -> pd.DataFrame:
    """Long table of every metric value in the score files (statistic 'score')."""
    records = []
    for score in files:
        for metric, entry in score.metrics.items():
            records.append({
                "model": score.model, "variant": score.variant, "config": score.config, "layer": score.layer,
                "metric": metric, "statistic": "score", "value": entry["value"], "ci_low": entry["ci_low"],
                "ci_high": entry["ci_high"], "n": entry["n"], "scale": entry["scale"], "kind": score.kind,
            })
    return pd.DataFrame.from_records(records, columns=list(CSV_COLUMNS) + ["kind"])


def long_rows(files: Sequence[ScoreFile]) -> pd.DataFrame:
    """Per-row values of every file with a rows table: model, variant, config, layer, id, metric, value.

    Judge rows join decoding rows on (model, variant, config, id), which is what pairs a metric with
    the judge's rating of the same answer.
    """
    frames = []
    for score in files:
        if score.rows is None:
            continue
        # Only the file's metrics: helper columns (perplexity's nll, tokens) are not metrics.
        columns = ["id"] + [c for c in score.rows.columns[1:] if c in score.metrics]
        melted = score.rows[columns].melt(id_vars="id", var_name="metric", value_name="value")
        melted.insert(0, "model", score.model)
        melted.insert(1, "variant", score.variant)
        melted.insert(2, "config", score.config)
        melted.insert(3, "layer", -1 if score.layer is None else score.layer)  # -1: not a layer (groupable)
        frames.append(melted)
    if not frames:
        return pd.DataFrame(columns=["model", "variant", "config", "layer", "id", "metric", "value"])
    rows = pd.concat(frames, ignore_index=True)
    return rows.dropna(subset=["value"]).drop_duplicates(["model", "variant", "config", "layer", "id", "metric"])


# ============================================================================================ statistics
def _rng(seed: int, key: str) -> np.random.Generator:
    """A generator per comparison, so a CI does not depend on which other comparisons ran before it."""
    return np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])


def _percentile_ci(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return math.nan, math.nan
    alpha = (1 - confidence) / 2
    low, high = np.percentile(samples, [100 * alpha, 100 * (1 - alpha)])
    return float(low), float(high)


def paired_difference(a: np.ndarray, b: np.ndarray, *, samples: int, confidence: float,
                      seed: int) -> tuple[float, float, float]:
    """Mean of (b - a) over paired rows (a[i], b[i] = one test row) with a percentile bootstrap CI.

    Delegates to tunelens.score.paired_bootstrap, the scoring stage's bootstrap (same resampling as the
    score files' CIs), so the project has a single bootstrap implementation. Units are the inputs'.
    """
    from tunelens.score import paired_bootstrap

    if len(a) == 0:
        return math.nan, math.nan, math.nan
    result = paired_bootstrap(np.asarray(b, dtype=float), np.asarray(a, dtype=float), samples=samples,
                              confidence=confidence, seed=seed)
    return result["diff"], result["ci_low"], result["ci_high"]


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
    tau_samples = _kendall_tau_b_rows(xs, ys)
    return {
        "kendall_tau": (tau, *_percentile_ci(tau_samples, confidence)),
        "spearman_rho": (rho, *_percentile_ci(rho_samples, confidence)),
    }


def _kendall_tau_b_rows(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
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


def corpus_perplexity_difference(base: pd.DataFrame, tuned: pd.DataFrame, *, samples: int, confidence: float,
                                 seed: int) -> tuple[float, float, float, int]:
    """Fine-tuned minus base corpus perplexity, exp(sum nll / sum tokens), over references paired by id.

    Both variants are resampled with the same rows (tunelens.score.resample_counts), so the CI is that of
    the paired difference of the corpus values shown in the tables. `nll` is a row's summed negative
    log-likelihood (nats), `tokens` its scored token count. Returns (diff, low, high, n pairs).
    """
    from tunelens.score import resample_counts

    pair = base.merge(tuned, on="id", suffixes=("_base", "_tuned")).dropna().sort_values("id")
    if pair.empty:
        return math.nan, math.nan, math.nan, 0

    def perplexity(counts: np.ndarray, side: str) -> np.ndarray:
        return np.exp((counts @ pair[f"nll_{side}"].to_numpy()) / (counts @ pair[f"tokens_{side}"].to_numpy()))

    ones = np.ones((1, len(pair)))
    value = float((perplexity(ones, "tuned") - perplexity(ones, "base"))[0])
    counts = resample_counts(len(pair), samples, seed)
    low, high = _percentile_ci(perplexity(counts, "tuned") - perplexity(counts, "base"), confidence)
    return value, low, high, len(pair)


def _perplexity_rows(score: ScoreFile) -> pd.DataFrame | None:
    if score.kind != "perplexity" or score.rows is None or not {"nll", "tokens"} <= set(score.rows.columns):
        return None
    return score.rows[["id", "nll", "tokens"]]


def paired_differences(rows: pd.DataFrame, settings: ReportSettings,
                       files: Sequence[ScoreFile] = ()) -> pd.DataFrame:
    """Fine-tuned minus base per (model, config, layer, metric), rows paired by id, with bootstrap CIs.

    The difference is the mean of per-row differences, except for perplexity with per-row `nll` and
    `tokens`: there it is the difference of the corpus perplexities (see corpus_perplexity_difference).
    """
    records = []
    corpus = {}
    by_model: dict[str, dict[str, pd.DataFrame]] = {}
    for score in files:
        table = _perplexity_rows(score)
        if table is not None:
            by_model.setdefault(score.model, {})[score.variant] = table
    for model, tables in by_model.items():
        if {"base", "finetuned"} <= set(tables):
            corpus[model] = corpus_perplexity_difference(
                tables["base"], tables["finetuned"], samples=settings.bootstrap_samples,
                confidence=settings.confidence, seed=settings.seed)
    for model, (value, low, high, n) in corpus.items():
        records.append({
            "model": model, "variant": DIFF_VARIANT, "config": "", "layer": None, "metric": "perplexity",
            "statistic": "paired_difference", "value": value, "ci_low": low, "ci_high": high, "n": n,
            "scale": metric_info("perplexity").scale,
        })
    if rows.empty:
        return pd.DataFrame.from_records(records, columns=list(CSV_COLUMNS))
    keys = ["model", "config", "layer", "metric"]
    for (model, config, layer, metric), group in rows.groupby(keys, sort=False):
        if metric == "perplexity" and config == "" and model in corpus:
            continue
        wide = group.pivot(index="id", columns="variant", values="value")
        if not {"base", "finetuned"} <= set(wide.columns):
            continue
        wide = wide[["base", "finetuned"]].dropna().sort_index()
        if wide.empty:
            continue
        value, low, high = paired_difference(
            wide["base"].to_numpy(), wide["finetuned"].to_numpy(),
            samples=settings.bootstrap_samples, confidence=settings.confidence, seed=settings.seed,
        )
        records.append({
            "model": model, "variant": DIFF_VARIANT, "config": config, "layer": None if layer == -1 else layer,
            "metric": metric, "statistic": "paired_difference", "value": value, "ci_low": low, "ci_high": high,
            "n": len(wide), "scale": metric_info(metric).scale,
        })
    return pd.DataFrame.from_records(records, columns=list(CSV_COLUMNS))


def agreement(rows: pd.DataFrame, settings: ReportSettings) -> pd.DataFrame:
    """Rank agreement of each automatic metric with Judge / Human, over answers (rows paired by id).

    Pooled per model over variants and decoding configs (each answer is one observation), and over
    all models (model 'all'). Early-exit rows are left out: they are not rated.
    """
    columns = list(CSV_COLUMNS)
    if rows.empty:
        return pd.DataFrame(columns=columns)
    decoding = rows[rows["layer"] == -1]
    wide = decoding.pivot_table(index=["model", "variant", "config", "id"], columns="metric", values="value",
                                aggfunc="first").sort_index()
    records = []
    models = list(dict.fromkeys(decoding["model"]))
    scopes = [(model, wide.xs(model, level="model", drop_level=False)) for model in models]
    if len(models) > 1:
        scopes.append((POOLED, wide))
    for reference in REFERENCE_METRICS:
        if reference not in wide.columns:
            continue
        automatic = [m for m in metric_order(wide.columns) if m not in REFERENCE_METRICS]
        for scope, table in scopes:
            for metric in automatic:
                pair = table[[metric, reference]].dropna()
                if len(pair) < 3:
                    continue
                result = rank_agreement(
                    pair[metric].to_numpy(), pair[reference].to_numpy(), samples=settings.bootstrap_samples,
                    confidence=settings.confidence, rng=_rng(settings.seed, f"agree|{scope}|{metric}|{reference}"),
                )
                for statistic, (value, low, high) in result.items():
                    records.append({
                        "model": scope, "variant": POOLED, "config": POOLED, "layer": None, "metric": metric,
                        "statistic": f"{statistic}_vs_{reference}", "value": value, "ci_low": low, "ci_high": high,
                        "n": len(pair), "scale": CORRELATION.scale,
                    })
    return pd.DataFrame.from_records(records, columns=columns)


def best_configs(scores: pd.DataFrame, rows: pd.DataFrame, settings: ReportSettings) -> pd.DataFrame:
    """Best decoding config per (model, variant, metric) among the decoding and judge scores.

    Ties keep the earlier config in study order. Also gives the paired difference best - default
    (statistic 'best_minus_default') when both have per-row values.
    """
    order = _order_index(scores["config"], settings.decoding_configs)
    table = scores[scores["kind"].isin(["decoding", "judge", "human"])].copy()
    records = []
    for (model, variant, metric), group in table.groupby(["model", "variant", "metric"], sort=False):
        direction = metric_info(metric).higher_is_better
        group = group.dropna(subset=["value"])
        if direction is None or group.empty:
            continue
        group = group.assign(_order=group["config"].map(order)).sort_values("_order", kind="stable")
        best = group.loc[group["value"].idxmax() if direction else group["value"].idxmin()]
        record = {
            "model": model, "variant": variant, "config": best["config"], "layer": None, "metric": metric,
            "statistic": "best_config", "value": best["value"], "ci_low": best["ci_low"], "ci_high": best["ci_high"],
            "n": best["n"], "scale": best["scale"],
        }
        records.append(record)
        if best["config"] == settings.default_config or rows.empty:
            continue
        selected = rows[(rows["model"] == model) & (rows["variant"] == variant) & (rows["metric"] == metric)
                        & (rows["layer"] == -1)]
        wide = selected.pivot_table(index="id", columns="config", values="value", aggfunc="first")
        if not {best["config"], settings.default_config} <= set(wide.columns):
            continue
        pair = wide[[settings.default_config, best["config"]]].dropna().sort_index()
        if pair.empty:
            continue
        value, low, high = paired_difference(
            pair.iloc[:, 0].to_numpy(), pair.iloc[:, 1].to_numpy(), samples=settings.bootstrap_samples,
            confidence=settings.confidence, seed=settings.seed,
        )
        records.append({**record, "statistic": "best_minus_default", "value": value, "ci_low": low,
                        "ci_high": high, "n": len(pair), "scale": metric_info(metric).scale})
    return pd.DataFrame.from_records(records, columns=list(CSV_COLUMNS))


# ============================================================================================ summary.csv
def summary_table(files: Sequence[ScoreFile], settings: ReportSettings) -> pd.DataFrame:
    """Every number behind every table, as one tidy long table with columns CSV_COLUMNS.

    statistic: 'score' (a metric value from a score file), 'paired_difference' (variant
    'finetuned-base'), 'best_config', 'best_minus_default', 'kendall_tau_vs_judge', ... (model 'all'
    = pooled over models). config '' = not applicable (perplexity); layer empty = not an early-exit row.
    """
    scores = tidy_scores(files)
    rows = long_rows(files)
    parts = [scores.drop(columns="kind"), paired_differences(rows, settings, files),
             best_configs(scores, rows, settings),
             agreement(rows, settings)]
    table = pd.concat([p for p in parts if not p.empty], ignore_index=True)
    return _sort_summary(table, settings)


def _sort_summary(table: pd.DataFrame, settings: ReportSettings) -> pd.DataFrame:
    model_rank = _order_index(table["model"][table["model"] != POOLED]) | {POOLED: 10**6}
    variant_rank = _order_index(table["variant"], list(VARIANT_ORDER) + [DIFF_VARIANT])
    config_rank = _order_index(table["config"], ["", *settings.decoding_configs])
    metric_rank = {m: i for i, m in enumerate(metric_order(table["metric"]))}
    statistic_rank = _order_index(table["statistic"], ["score", "paired_difference", "best_config",
                                                        "best_minus_default"])
    sort_keys = pd.DataFrame({
        "m": table["model"].map(model_rank), "v": table["variant"].map(variant_rank),
        "c": table["config"].map(config_rank), "l": table["layer"].fillna(-1).astype(float),
        "s": table["statistic"].map(statistic_rank), "k": table["metric"].map(metric_rank),
    })
    order = sort_keys.sort_values(["m", "v", "c", "l", "s", "k"], kind="stable").index
    table = table.loc[order].reset_index(drop=True)
    table["layer"] = pd.array(table["layer"].astype("Float64"), dtype="Int64")
    table["n"] = pd.array(pd.to_numeric(table["n"], errors="coerce").astype("Float64"), dtype="Int64")
    for column in ("value", "ci_low", "ci_high"):
        table[column] = table[column].astype(float)
    for column in ("model", "variant", "config", "metric", "statistic", "scale"):
        table[column] = table[column].fillna("").astype(str)
    return table[list(CSV_COLUMNS)]


def write_summary_csv(table: pd.DataFrame, path: str | Path) -> None:
    """Write the tidy table; floats keep full precision (repr) so a read gives the same numbers back."""
    write_text_atomic(path, table.to_csv(index=False, lineterminator="\n"))


def read_summary_csv(path: str | Path) -> pd.DataFrame:
    """Read summary.csv back with the dtypes summary_table() produces."""
    path = Path(path)
    table = pd.read_csv(path, dtype={c: str for c in ("model", "variant", "config", "metric", "statistic", "scale")},
                        keep_default_na=False, na_values={c: [""] for c in ("layer", "value", "ci_low", "ci_high", "n")})
    missing = [c for c in CSV_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; expected {list(CSV_COLUMNS)}")
    table["layer"] = table["layer"].astype("Int64")
    table["n"] = table["n"].astype("Int64")
    for column in ("value", "ci_low", "ci_high"):
        table[column] = table[column].astype(float)
    return table[list(CSV_COLUMNS)]


# ============================================================================================ documents
@dataclass
class Cell:
    text: str
    best: bool = False


@dataclass
class Table:
    header: list[str]
    rows: list[list[Cell]]
    align: list[str]  # 'l' or 'r' per column


@dataclass
class Document:
    """A summary as blocks, rendered to Markdown (summary.md) and HTML (summary.html, for the report)."""

    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def heading(self, level: int, text: str) -> None:
        self.blocks.append((f"h{level}", text))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("p", text))

    def bullets(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("ul", items))

    def table(self, table: Table) -> None:
        self.blocks.append(("table", table))

    def to_markdown(self) -> str:
        out = []
        for kind, content in self.blocks:
            if kind.startswith("h"):
                out.append("#" * int(kind[1:]) + " " + content)
            elif kind == "p":
                out.append(content)
            elif kind == "ul":
                out.append("\n".join(f"- {item}" for item in content))
            elif kind == "table":
                out.append(_markdown_table(content))
        return "\n\n".join(out) + "\n"

    def to_html(self, title: str) -> str:
        body = []
        for kind, content in self.blocks:
            if kind.startswith("h"):
                body.append(f"<{kind}>{_inline_html(content)}</{kind}>")
            elif kind == "p":
                body.append(f"<p>{_inline_html(content)}</p>")
            elif kind == "ul":
                body.append("<ul>\n" + "\n".join(f"<li>{_inline_html(i)}</li>" for i in content) + "\n</ul>")
            elif kind == "table":
                body.append(_html_table(content))
        return (
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n"
        )


_CSS = (
    "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:100em}"
    "table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em}"
    "th,td{border:1px solid #ccc;padding:.25em .6em}th{background:#f0f0f0}"
    "td.r{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}"
    "td.best{background:#e6f4ea}code{background:#f4f4f4;padding:0 .2em}.ci{color:#666;font-size:.85em}"
    "h1{font-size:1.6em}h2{font-size:1.3em;border-bottom:1px solid #ddd}h3{font-size:1.1em}"
)


def _inline_html(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


def _markdown_table(table: Table) -> str:
    def cell(c: Cell) -> str:
        text = c.text.replace("|", "\\|")
        if c.best and text:
            # Bold the point estimate only, so the CI stays readable: **12.3** [8.1, 16.0]
            head, sep, tail = text.partition(" [")
            text = f"**{head}**{sep}{tail}"
        return text

    lines = ["| " + " | ".join(h.replace("|", "\\|") for h in table.header) + " |",
             "|" + "|".join(":---" if a == "l" else "---:" for a in table.align) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in table.rows]
    return "\n".join(lines)


def _html_table(table: Table) -> str:
    def cell(c: Cell, align: str) -> str:
        classes = " ".join(x for x in (align if align == "r" else "", "best" if c.best else "") if x)
        text = _inline_html(c.text)
        head, sep, tail = text.partition(" [")
        if sep and re.fullmatch(r"[-0-9.]+, [-0-9.]+\]( \*)?", tail):
            # value [low, high]: the CI in small grey type so the columns stay narrow
            star = " *" if tail.endswith(" *") else ""
            tail = tail[: -len(star)] if star else tail
            head = f"<strong>{head}</strong>" if c.best else head
            text = f"{head} <span class=\"ci\">[{tail}</span>{star}"
        elif c.best and text:
            text = f"<strong>{text}</strong>"
        return f"<td class=\"{classes}\">{text}</td>" if classes else f"<td>{text}</td>"

    head = "<tr>" + "".join(f"<th>{_inline_html(h)}</th>" for h in table.header) + "</tr>"
    rows = ["<tr>" + "".join(cell(c, a) for c, a in zip(row, table.align)) + "</tr>" for row in table.rows]
    return "<table>\n<thead>" + head + "</thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody>\n</table>"


# ============================================================================================ formatting
def format_number(value: float, decimals: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    text = f"{value:.{decimals}f}"
    return "0." + "0" * decimals if text == "-0." + "0" * decimals else text  # no "-0.000"


def format_estimate(value: float, low: float, high: float, decimals: int, signed: bool = False) -> str:
    """'12.3 [8.1, 16.0]'; the CI is left out when the file has none; '–' when there is no value."""
    if value is None or not math.isfinite(value):
        return "–"
    point = format_number(value, decimals)
    if signed and not point.startswith("-") and float(point) != 0:
        point = "+" + point
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return point
    return f"{point} [{format_number(low, decimals)}, {format_number(high, decimals)}]"


def _estimate_cell(entry: dict | pd.Series | None, metric: str) -> Cell:
    if entry is None:
        return Cell("–")
    return Cell(format_estimate(entry["value"], entry["ci_low"], entry["ci_high"], metric_info(metric).decimals))


def _mark_best(rows: list[list[Cell]], values: list[list[float]], metrics: list[str | None]) -> None:
    """Mark the best value of each column (ties all marked); columns of metrics without direction are not."""
    for column, metric in enumerate(metrics):
        if metric is None:
            continue
        direction = metric_info(metric).higher_is_better
        column_values = [row[column] for row in values]
        finite = [v for v in column_values if v is not None and math.isfinite(v)]
        if direction is None or len(finite) < 2 or len(set(finite)) == 1:
            continue  # nothing to single out when every value is the same
        best = max(finite) if direction else min(finite)
        decimals = metric_info(metric).decimals
        for row, value in zip(rows, column_values):
            # Compare as shown, so two cells that read the same are both marked.
            if value is not None and math.isfinite(value) and format_number(value, decimals) == format_number(best, decimals):
                row[column].best = True


def _lookup(scores: pd.DataFrame) -> dict[tuple, dict]:
    return {
        (r["model"], r["variant"], r["config"], None if pd.isna(r["layer"]) else int(r["layer"]), r["metric"]): r
        for r in scores.to_dict("records")
    }


# ============================================================================================ summary.md
def _config_fields(settings: ReportSettings, files: Sequence[ScoreFile]) -> dict[str, dict]:
    """Fields of each decoding config: from the study (params) or, for others, the generation meta."""
    fields = {name: dict(values) for name, values in settings.decoding_configs.items()}
    for score in files:
        if score.kind == "decoding" and score.config not in fields:
            meta = (score.source or {}).get("decoding_config") or {}
            fields[score.config] = {k: v for k, v in meta.items() if k != "name"}
    return fields


def swept_fields(config_fields: dict[str, dict]) -> list[str]:
    """Decoding fields that take more than one value across the configs, in field order."""
    keys: list[str] = []
    for values in config_fields.values():
        keys += [k for k in values if k not in keys and k != "name"]
    return [k for k in keys if len({json.dumps(v.get(k)) for v in config_fields.values()}) > 1]


def build_summary(files: Sequence[ScoreFile], summary: pd.DataFrame, settings: ReportSettings,
                  finetune: dict[str, dict], generated: str, human_sheets: Sequence[str] = ()) -> Document:
    """The summary document: the six tables of issue 7 plus fine-tuning, notes and provenance."""
    doc = Document()
    scores = summary[summary["statistic"] == "score"]
    by_key = _lookup(scores)
    models = list(dict.fromkeys(scores["model"]))
    default = settings.default_config
    config_fields = _config_fields(settings, files)
    swept = swept_fields({c: config_fields[c] for c in config_fields if c in set(scores["config"])})
    ci = settings.ci_label

    doc.heading(1, "tunelens summary")
    doc.paragraph(DATE_PREFIX + generated)
    scales = ", ".join(f"{metric_info(m).label} {metric_info(m).scale}" for m in metric_order(scores["metric"]))
    doc.paragraph(
        f"Cells read `value [{ci} low, high]`; metric CIs are the score files' bootstrap CIs over test rows. "
        f"**Bold** = best in its column (lowest for perplexity; length is not ranked); – = not available. "
        f"Scales: {scales}. Default decoding config: `{default}`."
    )

    # (1) model overview
    doc.heading(2, "1. Model overview (default decoding config)")
    overview = scores[((scores["config"] == default) | (scores["metric"] == "perplexity")) & scores["layer"].isna()]
    metrics = metric_order(overview["metric"])
    if overview.empty:
        doc.paragraph(f"No scores at the default config `{default}`.")
    else:
        rows, values = [], []
        for model in models:
            for variant in _variants(overview[overview["model"] == model]):
                row, vals = [Cell(model), Cell(variant)], [None, None]
                for metric in metrics:
                    config = "" if metric == "perplexity" else default
                    entry = by_key.get((model, variant, config, None, metric))
                    row.append(_estimate_cell(entry, metric))
                    vals.append(None if entry is None else entry["value"])
                n = _first_n(scores, model, variant, default)
                row.append(Cell(n))
                vals.append(None)
                rows.append(row)
                values.append(vals)
        _mark_best(rows, values, [None, None, *metrics, None])
        header = ["Model", "Variant", *[f"{metric_info(m).label} ({metric_info(m).scale})" for m in metrics], "n"]
        doc.table(Table(header, rows, ["l", "l", *["r"] * len(metrics), "r"]))

    # (2) decoding configs
    doc.heading(2, "2. Decoding configs per model")
    decoding = scores[scores["config"].ne("") & scores["layer"].isna()]
    config_rank = _order_index(decoding["config"], settings.decoding_configs)
    for model in models:
        for variant in _variants(decoding[decoding["model"] == model]):
            part = decoding[(decoding["model"] == model) & (decoding["variant"] == variant)]
            configs = sorted(dict.fromkeys(part["config"]), key=config_rank.get)
            metrics = metric_order(part["metric"])
            doc.heading(3, f"{model} – {variant}")
            rows, values = [], []
            for config in configs:
                label = f"{config} (default)" if config == default else config
                row = [Cell(label)] + [Cell(_field_text(config_fields.get(config, {}).get(k))) for k in swept]
                vals: list = [None] * (1 + len(swept))
                for metric in metrics:
                    entry = by_key.get((model, variant, config, None, metric))
                    row.append(_estimate_cell(entry, metric))
                    vals.append(None if entry is None else entry["value"])
                rows.append(row)
                values.append(vals)
            _mark_best(rows, values, [None] * (1 + len(swept)) + metrics)
            header = ["Config", *swept, *[metric_info(m).label for m in metrics]]
            doc.table(Table(header, rows, ["l", *["r"] * (len(swept) + len(metrics))]))

    # (3) layers
    doc.heading(2, "3. Early exit per layer (base vs fine-tuned)")
    layers = scores[scores["layer"].notna()]
    if layers.empty:
        doc.paragraph("No early-exit scores (probe.early_exit disabled or not run).")
    for model in dict.fromkeys(layers["model"]):
        part = layers[layers["model"] == model]
        variants = _variants(part)
        metrics = metric_order(part["metric"])
        doc.heading(3, model)
        configs = sorted(set(part["config"]) - {""})
        if configs:
            doc.paragraph("Early-exit decoding: " + ", ".join(f"`{c}`" for c in configs) + ".")
        rows, values = [], []
        for layer in sorted(int(x) for x in dict.fromkeys(part["layer"])):
            row, vals = [Cell(str(layer))], [None]
            for metric in metrics:
                for variant in variants:
                    match = part[(part["variant"] == variant) & (part["layer"] == layer) & (part["metric"] == metric)]
                    entry = None if match.empty else match.iloc[0]
                    row.append(_estimate_cell(entry, metric))
                    vals.append(None if entry is None else entry["value"])
            rows.append(row)
            values.append(vals)
        _mark_best(rows, values, [None] + [m for m in metrics for _ in variants])
        header = ["Layer"] + [f"{metric_info(m).label} {v}" for m in metrics for v in variants]
        doc.table(Table(header, rows, ["r"] * len(header)))

    # (4) best config
    doc.heading(2, "4. Best decoding config per model and metric")
    best = summary[summary["statistic"] == "best_config"]
    metric_rank = {m: i for i, m in enumerate(metric_order(best["metric"]))}
    model_rank = _order_index(models)
    best = best.assign(_m=best["model"].map(model_rank), _v=best["variant"].map(_order_index(best["variant"], VARIANT_ORDER)),
                       _k=best["metric"].map(metric_rank)).sort_values(["_m", "_v", "_k"], kind="stable")
    best_diff = summary[summary["statistic"] == "best_minus_default"]
    if best.empty:
        doc.paragraph("No ranked metrics.")
    else:
        rows = []
        for r in best.itertuples(index=False):
            decimals = metric_info(r.metric).decimals
            default_entry = by_key.get((r.model, r.variant, default, None, r.metric))
            diff = best_diff[(best_diff["model"] == r.model) & (best_diff["variant"] == r.variant)
                             & (best_diff["metric"] == r.metric)]
            if r.config == default:
                diff_text = "default is best"
            elif diff.empty:
                diff_text = "– (no per-row values)"
            else:
                d = diff.iloc[0]
                diff_text = format_estimate(d["value"], d["ci_low"], d["ci_high"], decimals, signed=True)
                diff_text += _significance(d["ci_low"], d["ci_high"])
            rows.append([Cell(r.model), Cell(r.variant), Cell(metric_info(r.metric).label), Cell(f"`{r.config}`"),
                         Cell(format_estimate(r.value, r.ci_low, r.ci_high, decimals)),
                         _estimate_cell(default_entry, r.metric), Cell(diff_text)])
        doc.paragraph(f"best − default: mean paired difference over rows (by id) with a bootstrap {ci}; "
                      "* = the CI excludes 0. Ties go to the earlier config in study order.")
        doc.table(Table(["Model", "Variant", "Metric", "Best config", "Best", "Default", "Best − default"], rows,
                        ["l", "l", "l", "l", "r", "r", "r"]))

    # (5) agreement
    doc.heading(2, "5. Agreement of automatic metrics with Judge / Human")
    agree = summary[summary["statistic"].str.contains("_vs_")]
    has_human = bool(scores["metric"].eq("human").any())
    if human_sheets and not has_human:
        doc.paragraph("Human rating sheet: " + ", ".join(f"`{p}`" for p in human_sheets if "sheet" in Path(p).name)
                      + " (fill `correct` with 1/0, put it in `scoring.human.ratings_dir` and rerun for a Human "
                      "column).")
    if agree.empty:
        doc.paragraph("No Judge or Human ratings with per-row values, so no agreement to report.")
    for reference in REFERENCE_METRICS:
        part = agree[agree["statistic"].str.endswith(f"_vs_{reference}")]
        if part.empty:
            continue
        doc.heading(3, f"vs {metric_info(reference).label}")
        doc.paragraph(f"Over rated answers (rows paired by id), pooled over variants and decoding configs per "
                      f"model; `{POOLED}` pools every model. Kendall τ-b and Spearman ρ with a bootstrap {ci} "
                      "over answers; bold = highest per model.")
        rows, values = [], []
        for (model, metric), group in part.groupby(["model", "metric"], sort=False):
            stats = {s.split("_vs_")[0]: r for s, r in zip(group["statistic"], group.itertuples(index=False))}
            tau, rho = stats.get("kendall_tau"), stats.get("spearman_rho")
            rows.append([Cell(model), Cell(metric_info(metric).label), Cell(str(int(group["n"].iloc[0]))),
                         Cell(format_estimate(tau.value, tau.ci_low, tau.ci_high, 3) if tau else "–"),
                         Cell(format_estimate(rho.value, rho.ci_low, rho.ci_high, 3) if rho else "–")])
            values.append((model, tau.value if tau else math.nan, rho.value if rho else math.nan))
        for model in dict.fromkeys(v[0] for v in values):
            for column, index in ((3, 1), (4, 2)):
                candidates = [v[index] for v in values if v[0] == model and math.isfinite(v[index])]
                if len(candidates) < 2:
                    continue
                top = format_number(max(candidates), 3)
                for row, v in zip(rows, values):
                    if v[0] == model and math.isfinite(v[index]) and format_number(v[index], 3) == top:
                        row[column].best = True
        doc.table(Table(["Model", "Metric", "n", "Kendall τ", "Spearman ρ"], rows, ["l", "l", "r", "r", "r"]))

    # (6) fine-tuned vs base
    doc.heading(2, "6. Fine-tuned vs base (paired differences)")
    diffs = summary[(summary["statistic"] == "paired_difference") & summary["layer"].isna()]
    tuned_models = [m for m in models if {"base", "finetuned"} <= set(scores[scores["model"] == m]["variant"])]
    if not tuned_models:
        doc.paragraph("No model has both a base and a fine-tuned variant.")
    else:
        doc.paragraph(f"At the default config: fine-tuned − base, mean of per-row differences with rows paired by "
                      f"id and a bootstrap {ci}; * = the CI excludes 0. Per-row values of corpus metrics (BLEU) are "
                      "sentence-level, so their mean can differ from the corpus value; perplexity is the difference "
                      "of the corpus perplexities (same resampled references for both). Every config and layer is "
                      "in summary.csv.")
        rows = []
        for model in tuned_models:
            part = diffs[(diffs["model"] == model) & diffs["config"].isin([default, ""])]
            metrics = metric_order(list(part["metric"]) + list(scores[(scores["model"] == model)
                                                                       & (scores["metric"] == "perplexity")]["metric"]))
            for metric in metrics:
                decimals = metric_info(metric).decimals
                config = "" if metric == "perplexity" else default
                base = by_key.get((model, "base", config, None, metric))
                tuned = by_key.get((model, "finetuned", config, None, metric))
                match = part[part["metric"] == metric]
                if not match.empty:
                    d = match.iloc[0]
                    diff_text = format_estimate(d["value"], d["ci_low"], d["ci_high"], decimals, signed=True)
                    diff_text += _significance(d["ci_low"], d["ci_high"])
                    n = str(int(d["n"]))
                elif base is not None and tuned is not None:
                    diff_text = format_estimate(tuned["value"] - base["value"], math.nan, math.nan, decimals,
                                                signed=True) + " (no per-row values, no CI)"
                    n = "–"
                else:
                    continue
                rows.append([Cell(model), Cell(metric_info(metric).label), _estimate_cell(base, metric),
                             _estimate_cell(tuned, metric), Cell(diff_text), Cell(n)])
        doc.table(Table(["Model", "Metric", "Base", "Fine-tuned", "Fine-tuned − base", "n pairs"], rows,
                        ["l", "l", "r", "r", "r", "r"]))

    _finetune_section(doc, finetune)
    _notes_section(doc, files)
    _provenance_section(doc, files, settings, finetune)
    return doc


def _variants(part: pd.DataFrame) -> list[str]:
    present = list(dict.fromkeys(part["variant"]))
    return [v for v in VARIANT_ORDER if v in present] + [v for v in present if v not in VARIANT_ORDER]


def _first_n(scores: pd.DataFrame, model: str, variant: str, config: str) -> str:
    match = scores[(scores["model"] == model) & (scores["variant"] == variant) & (scores["config"] == config)]
    ns = match["n"].dropna()
    return "–" if ns.empty else str(int(ns.max()))


def _field_text(value: Any) -> str:
    return "–" if value is None else str(value)


def _significance(low: float, high: float) -> str:
    return " *" if math.isfinite(low) and math.isfinite(high) and (low > 0 or high < 0) else ""


def _finetune_section(doc: Document, finetune: dict[str, dict]) -> None:
    doc.heading(2, "Fine-tuning")
    if not finetune:
        doc.paragraph("No fine-tuned models.")
        return
    for model, record in finetune.items():
        metrics = record.get("metrics") or {}
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}
        chosen = {k: scalars[k] for k in FINETUNE_FIELDS if k in scalars}
        scalars = chosen or scalars  # the finetune stage's key facts; any other metrics.json: all scalars
        doc.heading(3, model)
        log_rows = record.get("train_log") or []
        losses = [r for r in log_rows if isinstance(r.get("loss"), (int, float))]
        items = [f"`{k}`: {_scalar_text(v)}" for k, v in scalars.items()]
        if losses:
            items.append(f"train loss: {losses[0]['loss']:.4f} at step {losses[0].get('step', '?')} → "
                         f"{losses[-1]['loss']:.4f} at step {losses[-1].get('step', '?')} ({len(losses)} logged steps)")
        doc.bullets(items or ["metrics.json has no scalar values"])


# Keys of the finetune stage's metrics.json shown in the summary (the rest stays in the file).
FINETUNE_FIELDS = ("method", "train_rows", "trainable_params", "trainable_percent", "steps", "epochs",
                   "first_loss", "final_loss", "train_time_s", "tokens_per_s")


def _scalar_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "–" if value is None else str(value)


def _notes_section(doc: Document, files: Sequence[ScoreFile]) -> None:
    skipped: dict[tuple[str, str], list[str]] = {}
    for score in files:
        for metric, reason in score.skipped.items():
            skipped.setdefault((metric, str(reason)), []).append(score.model)
    if skipped:
        doc.heading(2, "Skipped metrics")
        doc.bullets([f"{metric_info(m).label}: {reason} ({', '.join(dict.fromkeys(models))})"
                     for (m, reason), models in skipped.items()])


def provenance(files: Sequence[ScoreFile], settings: ReportSettings,
               finetune: dict[str, dict] | None = None) -> dict[str, Any]:
    """What produced the results: config hash, git commit, models and adapters, library versions.

    Adapter hashes come from the generation meta embedded in the score files (`source.adapter`), so
    they name the adapter that produced the scored text; the finetune stage's hash is listed next to it.
    """
    models = {}
    for score in files:
        source = score.source or {}
        model = source.get("model") or {}
        adapter = source.get("adapter") or {}
        key = (score.model, score.variant)
        entry = models.setdefault(key, {"source": set(), "adapter": set(), "backend": set()})
        if model.get("source"):
            entry["source"].add(str(model["source"]))
        if adapter.get("sha256"):
            entry["adapter"].add(str(adapter["sha256"]))
        if source.get("backend"):
            entry["backend"].add(str(source["backend"]))
    trained = {}
    for model, record in (finetune or {}).items():
        adapter = (record.get("metrics") or {}).get("adapter") or {}
        if adapter.get("sha256"):
            trained[model] = str(adapter["sha256"])
    versions: dict[str, set[str]] = {}
    for score in files:
        for package, version in score.versions.items():
            versions.setdefault(package, set()).add(str(version))
    report_versions = library_versions()
    for package in ("pandas", "numpy", "scipy", "matplotlib"):
        try:
            import importlib.metadata as md

            report_versions[package] = md.version(package)
        except Exception:
            continue
    return {"config_hash": settings.config_hash, "git_commit": settings.git_commit, "models": models,
            "trained_adapters": trained, "score_versions": versions, "report_versions": report_versions}


def _provenance_section(doc: Document, files: Sequence[ScoreFile], settings: ReportSettings,
                        finetune: dict[str, dict]) -> None:
    info = provenance(files, settings, finetune)
    doc.heading(2, "Provenance")
    doc.bullets([f"config hash (sha256 of the validated config): `{info['config_hash']}`",
                 f"git commit: `{info['git_commit']}`",
                 f"score files: {len(files)}"])
    rows = []
    for (model, variant), entry in info["models"].items():
        trained = info["trained_adapters"].get(model) if variant != "base" else None
        if trained and trained in entry["adapter"]:
            trained_text = "same"
        elif trained:
            trained_text = f"`{trained[:16]}` (DIFFERS: scores are from another adapter)"
        else:
            trained_text = "–"
        rows.append([Cell(model), Cell(variant), Cell(", ".join(f"`{s}`" for s in sorted(entry["source"])) or "–"),
                     Cell(", ".join(f"`{a[:16]}`" for a in sorted(entry["adapter"])) or "–"), Cell(trained_text),
                     Cell(", ".join(sorted(entry["backend"])) or "–")])
    if rows:
        doc.table(Table(["Model", "Variant", "Source", "Adapter sha256 (16) in generations",
                         "Adapter of the fine-tune run", "Backend"], rows, ["l"] * 6))
    if info["score_versions"]:
        doc.paragraph("Libraries that produced the scores (from the score files; several versions = mixed runs):")
        doc.bullets([f"{p} {', '.join(sorted(v))}" + (" (MIXED)" if len(v) > 1 else "")
                     for p, v in sorted(info["score_versions"].items())])
    doc.paragraph("Libraries of the report job: " + ", ".join(f"{p} {v}" for p, v in sorted(info["report_versions"].items())) + ".")


# ============================================================================================ plots
def _plot_setup():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    # No software/date metadata: the same data gives the same PNG bytes.
    fig.savefig(tmp, dpi=110, metadata={"Software": None})
    tmp.replace(path)


# Variants drawn differently, so a fine-tuned line lying on the base line stays visible.
VARIANT_STYLE = {"base": {"marker": "o", "linestyle": "-"}, "finetuned": {"marker": "s", "linestyle": "--"}}


def _style(variant: str) -> dict:
    return VARIANT_STYLE.get(variant, {"marker": "^", "linestyle": ":"})


def _panels(plt, count: int, width: float = 3.3, height: float = 2.8):
    """A figure with one panel per metric, at most 4 per row (constrained layout: no overlapping labels)."""
    columns = min(count, 4)
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows + 0.4), squeeze=False,
                             layout="constrained")
    flat = list(axes.flat)
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def plot_sweeps(scores: pd.DataFrame, config_fields: dict[str, dict], default: str, out_dir: Path) -> list[Path]:
    """Per model and swept field: metric vs field value (others at default), base vs fine-tuned, CI bars."""
    plt = _plot_setup()
    written = []
    decoding = scores[scores["kind"].isin(["decoding", "judge", "human"])]
    fields_present = {c: config_fields[c] for c in dict.fromkeys(decoding["config"]) if c in config_fields}
    if default not in fields_present:
        return written
    default_fields = fields_present[default]
    for field_name in swept_fields(fields_present):
        # The one-at-a-time slice: configs that differ from the default in this field only.
        slice_configs = {c: f[field_name] for c, f in fields_present.items()
                         if all(f.get(k) == default_fields.get(k) for k in default_fields if k != field_name)}
        if len(set(map(json.dumps, slice_configs.values()))) < 2:
            continue
        for model in dict.fromkeys(decoding["model"]):
            part = decoding[(decoding["model"] == model) & decoding["config"].isin(slice_configs)]
            metrics = metric_order(part["metric"])
            if part.empty:
                continue
            fig, axes = _panels(plt, len(metrics))
            for ax, metric in zip(axes, metrics):
                values = sorted({float(v) for v in slice_configs.values()})
                # Nudge the variants apart (2% of the x range) so overlapping CI bars stay readable.
                nudge = 0.02 * (values[-1] - values[0] or 1.0)
                for index, variant in enumerate(_variants(part)):
                    points = part[(part["variant"] == variant) & (part["metric"] == metric)].copy()
                    points["x"] = points["config"].map(slice_configs).astype(float) + (index - 0.5) * nudge
                    points = points.sort_values("x")
                    low = (points["value"] - points["ci_low"]).clip(lower=0).fillna(0)
                    high = (points["ci_high"] - points["value"]).clip(lower=0).fillna(0)
                    ax.errorbar(points["x"], points["value"], yerr=[low, high], capsize=3, label=variant,
                                **_style(variant))
                ax.axvline(float(default_fields[field_name]), color="grey", lw=0.8, ls=":")
                ax.set_xticks(values)
                info = metric_info(metric)
                ax.set_title(f"{info.label} ({info.scale})", fontsize=9)
                ax.set_xlabel(field_name)
            axes[0].legend(fontsize=8)
            fig.suptitle(f"{model}: metrics vs {field_name} (others at default; dotted = default)", fontsize=10)
            path = out_dir / f"sweep_{_safe(model)}_{_safe(field_name)}.png"
            _save(fig, path)
            plt.close(fig)
            written.append(path)
    return written


def plot_layers(scores: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Per model: early-exit metric vs layer, base vs fine-tuned, with CI bands."""
    plt = _plot_setup()
    written = []
    layers = scores[scores["layer"].notna()]
    for model in dict.fromkeys(layers["model"]):
        part = layers[layers["model"] == model]
        metrics = metric_order(part["metric"])
        fig, axes = _panels(plt, len(metrics))
        for ax, metric in zip(axes, metrics):
            for variant in _variants(part):
                points = part[(part["variant"] == variant) & (part["metric"] == metric)].sort_values("layer")
                x = points["layer"].astype(float)
                line = ax.plot(x, points["value"], label=variant, **_style(variant))[0]
                if points["ci_low"].notna().all():
                    ax.fill_between(x, points["ci_low"], points["ci_high"], alpha=0.2, color=line.get_color())
            info = metric_info(metric)
            ax.set_title(f"{info.label} ({info.scale})", fontsize=9)
            ax.set_xlabel("exit layer")
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{model}: early exit, metric vs layer", fontsize=10)
        path = out_dir / f"layers_{_safe(model)}.png"
        _save(fig, path)
        plt.close(fig)
        written.append(path)
    return written


def plot_loss(finetune: dict[str, dict], out_dir: Path) -> list[Path]:
    """Per fine-tuned model: training loss (and eval loss when logged) and learning rate vs step."""
    plt = _plot_setup()
    written = []
    for model, record in finetune.items():
        rows = record.get("train_log") or []
        train = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), (int, float)) and "step" in r]
        evals = [(r["step"], r["eval_loss"]) for r in rows if isinstance(r.get("eval_loss"), (int, float)) and "step" in r]
        rates = [(r["step"], r["learning_rate"]) for r in rows
                 if isinstance(r.get("learning_rate"), (int, float)) and "step" in r]
        if not train:
            continue
        fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(8, 3.0), layout="constrained")
        ax_loss.plot(*zip(*train), label="train loss")
        if evals:
            ax_loss.plot(*zip(*evals), marker="o", label="eval loss")
        ax_loss.set_xlabel("step")
        ax_loss.set_ylabel("loss (nats/token)")
        ax_loss.legend(fontsize=8)
        if rates:
            ax_lr.plot(*zip(*rates), color="tab:green")
        ax_lr.set_xlabel("step")
        ax_lr.set_ylabel("learning rate")
        fig.suptitle(f"{model}: fine-tuning", fontsize=10)
        path = out_dir / f"loss_{_safe(model)}.png"
        _save(fig, path)
        plt.close(fig)
        written.append(path)
    return written


# ============================================================================================ entry point
def load_finetune_records(metrics_files: Sequence[str | Path]) -> dict[str, dict]:
    """model -> {'metrics': metrics.json, 'train_log': rows of the sibling train_log.jsonl}.

    The model name is the directory of metrics.json (finetune/{model}/metrics.json).
    """
    records = {}
    for path in metrics_files:
        path = Path(path)
        metrics = read_json(path)
        if not isinstance(metrics, dict):
            raise DataError(f"{path}: expected a JSON object of fine-tuning metrics")
        log_path = path.with_name("train_log.jsonl")
        train_log = read_jsonl(log_path, required=("step",)) if log_path.exists() else []
        records[path.parent.name] = {"metrics": metrics, "train_log": train_log}
    return records


def write_report(*, score_files: Sequence[str | Path] = (), perplexity_files: Sequence[str | Path] = (),
                 judge_files: Sequence[str | Path] = (), human_files: Sequence[str | Path] = (),
                 early_exit_files: Sequence[str | Path] = (), human_sheet_files: Sequence[str | Path] = (),
                 finetune_metrics_files: Sequence[str | Path] = (), summary_md: str | Path,
                 summary_csv: str | Path, summary_html: str | Path, plots_dir: str | Path,
                 settings: ReportSettings, now: _dt.datetime | None = None) -> dict[str, Any]:
    """Build every report output from score files. Returns {'rows': n csv rows, 'plots': [paths]}.

    `now` (UTC) only sets the `Generated:` line; everything else depends on the inputs alone.
    """
    files = load_score_files({"decoding": score_files, "perplexity": perplexity_files, "judge": judge_files,
                              "human": human_files, "early_exit": early_exit_files})
    if not files:
        raise DataError("report: no score files given; expected results/scores/{model}/{variant}/{config}.json")
    if settings.default_config not in settings.decoding_configs:
        raise DataError(f"report.default_config: '{settings.default_config}' is not among the decoding configs "
                        f"{list(settings.decoding_configs)}")
    finetune = load_finetune_records(finetune_metrics_files)
    summary = summary_table(files, settings)
    write_summary_csv(summary, summary_csv)
    generated = (now or _dt.datetime.now(_dt.timezone.utc)).strftime("%Y-%m-%d %H:%M:%S UTC")
    document = build_summary(files, summary, settings, finetune, generated,
                             human_sheets=[str(p) for p in human_sheet_files])
    write_text_atomic(summary_md, document.to_markdown())
    write_text_atomic(summary_html, document.to_html("tunelens summary"))

    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    scores = tidy_scores(files)
    plots = plot_sweeps(scores, _config_fields(settings, files), settings.default_config, plots_dir)
    plots += plot_layers(scores, plots_dir)
    plots += plot_loss(finetune, plots_dir)
    log.info("report: %d score files -> %d summary rows, %d plots", len(files), len(summary), len(plots))
    return {"rows": len(summary), "plots": [str(p) for p in plots]}


def workflow_git_commit(workflow_dir: str | Path) -> str:
    """The workflow checkout's commit for the provenance block ("unknown (...)" outside a git checkout)."""
    import subprocess

    try:
        result = subprocess.run(["git", "-C", str(workflow_dir), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (git not available)"
    return result.stdout.strip() if result.returncode == 0 else "unknown (not a git checkout)"
