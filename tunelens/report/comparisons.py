"""Statistics the report derives from per-row tables: rows of summary.csv besides the score files' own.

- paired_differences: fine-tuned minus base per model, config, layer and metric (rows paired by id; corpus
                      metrics as differences of corpus values), with p-values adjusted per model;
- best_configs:       best decoding config per model, variant and metric, and its gain over the default;
- agreement:          rank agreement of each automatic metric with Judge / Human ratings.
The bootstrap itself is tunelens.scoring.statistics.
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd

from tunelens.report.common import (
    CORRELATION, CSV_COLUMNS, DIFF_VARIANT, POOLED, REFERENCE_METRICS, ReportSettings, metric_info, metric_order,
    order_index,
)
from tunelens.report.inputs import ScoreFile
from tunelens.scoring.metrics import METRICS
from tunelens.scoring.statistics import (
    adjust_p_values, comparison_rng, paired_corpus_difference, paired_mean_difference, rank_agreement,
)


def corpus_stats_table(score: ScoreFile | None, metric: str) -> pd.DataFrame | None:
    """id + the per-row sufficient statistics of a corpus-level metric (METRICS[metric].corpus_stats) from a
    score file's rows table; None for a metric that is a mean of rows, or a rows table without the columns
    (score files written before the score stage recorded them)."""
    spec = METRICS.get(metric)
    if score is None or score.rows is None or spec is None or not spec.corpus_level:
        return None
    columns = list(spec.corpus_stats)
    if not set(columns) <= set(score.rows.columns):
        return None
    return score.rows[["id", *columns]]


def score_file_index(files: Sequence[ScoreFile]) -> dict[tuple, ScoreFile]:
    """(model, variant, config, layer or -1, metric) -> the score file holding that metric."""
    index = {}
    for score in files:
        for metric in score.metrics:
            index[(score.model, score.variant, score.config, -1 if score.layer is None else score.layer, metric)] = score
    return index


def _paired_result(base_values: pd.Series, tuned_values: pd.Series, base_stats: pd.DataFrame | None,
                   tuned_stats: pd.DataFrame | None, metric: str, settings: ReportSettings) -> dict | None:
    """Fine-tuned (or best) minus base (or default) over the ids both sides have: for a corpus-level metric
    with statistics on both sides the paired bootstrap of the corpus values (paired_corpus_difference),
    else the paired bootstrap of the mean of per-row differences."""
    if base_stats is not None and tuned_stats is not None:
        pair = base_stats.merge(tuned_stats, on="id", suffixes=("_a", "_b")).dropna().sort_values("id")
        if pair.empty:
            return None
        columns = METRICS[metric].corpus_stats
        result = paired_corpus_difference(
            pair[[f"{c}_a" for c in columns]].to_numpy(), pair[[f"{c}_b" for c in columns]].to_numpy(),
            METRICS[metric].corpus_reduce, samples=settings.bootstrap_samples, confidence=settings.confidence,
            seed=settings.seed)
        return {**result, "n": len(pair)}
    wide = pd.concat({"a": base_values, "b": tuned_values}, axis=1).dropna().sort_index()
    if wide.empty:
        return None
    result = paired_mean_difference(wide["a"].to_numpy(), wide["b"].to_numpy(), samples=settings.bootstrap_samples,
                                    confidence=settings.confidence, seed=settings.seed)
    return {**result, "n": len(wide)}


def adjust_family(table: pd.DataFrame, method: str) -> pd.DataFrame:
    """`p_adjusted` over each model's rows of one statistic (one family per model and table)."""
    if table.empty:
        return table
    table = table.copy()
    table["p_adjusted"] = float("nan")
    for _, group in table.groupby(["model", "statistic"], sort=False):
        table.loc[group.index, "p_adjusted"] = adjust_p_values(group["p_value"].to_numpy(dtype=float), method)
    return table


def paired_differences(rows: pd.DataFrame, settings: ReportSettings,
                       files: Sequence[ScoreFile] = ()) -> pd.DataFrame:
    """Fine-tuned minus base per (model, config, layer, metric), rows paired by id, with bootstrap CIs,
    p-values and p-values adjusted over each model's comparisons (settings.multiple_comparisons).

    Corpus-level metrics (BLEU, CodeBLEU, perplexity: METRICS[m].corpus_level) whose rows tables hold their
    statistics: the difference of the corpus values, both recomputed on each joint resample of row ids, so
    the point estimate is the difference of the printed columns. Other metrics: the mean of per-row
    differences (for a mean-of-rows metric the same thing).
    """
    records = []
    index = score_file_index(files)
    if not rows.empty:
        keys = ["model", "config", "layer", "metric"]
        for (model, config, layer, metric), group in rows.groupby(keys, sort=False):
            wide = group.pivot(index="id", columns="variant", values="value")
            if not {"base", "finetuned"} <= set(wide.columns):
                continue
            result = _paired_result(
                wide["base"], wide["finetuned"],
                corpus_stats_table(index.get((model, "base", config, layer, metric)), metric),
                corpus_stats_table(index.get((model, "finetuned", config, layer, metric)), metric), metric, settings)
            if result is None:
                continue
            records.append({
                "model": model, "variant": DIFF_VARIANT, "config": config, "layer": None if layer == -1 else layer,
                "metric": metric, "statistic": "paired_difference", "value": result["diff"],
                "ci_low": result["ci_low"], "ci_high": result["ci_high"], "n": result["n"],
                "scale": metric_info(metric).scale, "p_value": result["p_value"],
            })
    table = pd.DataFrame.from_records(records, columns=list(CSV_COLUMNS))
    return adjust_family(table, settings.multiple_comparisons)


def agreement(rows: pd.DataFrame, settings: ReportSettings) -> pd.DataFrame:
    """Rank agreement of each automatic metric with Judge / Human, over answers (rows paired by id).

    Pooled per model over variants and decoding configs (each answer is one observation), and over
    all models (model 'all'). Early-exit rows are left out (the judge may rate them, but agreement is over the
    decoding configs' answers).
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
                    confidence=settings.confidence, rng=comparison_rng(settings.seed, f"agree|{scope}|{metric}|{reference}"),
                )
                for statistic, (value, low, high) in result.items():
                    records.append({
                        "model": scope, "variant": POOLED, "config": POOLED, "layer": None, "metric": metric,
                        "statistic": f"{statistic}_vs_{reference}", "value": value, "ci_low": low, "ci_high": high,
                        "n": len(pair), "scale": CORRELATION.scale,
                    })
    return pd.DataFrame.from_records(records, columns=columns)


def best_configs(scores: pd.DataFrame, rows: pd.DataFrame, settings: ReportSettings,
                 files: Sequence[ScoreFile] = ()) -> pd.DataFrame:
    """Best decoding config per (model, variant, metric) among the decoding and judge scores.

    Ties keep the earlier config in study order. Also gives the paired difference best - default
    (statistic 'best_minus_default') when both have per-row values, computed as paired_differences does
    (corpus metrics as differences of corpus values), with p-values adjusted over each model's rows.
    """
    index = score_file_index(files)
    order = order_index(scores["config"], settings.decoding_configs)
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
        result = _paired_result(
            wide[settings.default_config], wide[best["config"]],
            corpus_stats_table(index.get((model, variant, settings.default_config, -1, metric)), metric),
            corpus_stats_table(index.get((model, variant, best["config"], -1, metric)), metric), metric, settings)
        if result is None:
            continue
        records.append({**record, "statistic": "best_minus_default", "value": result["diff"],
                        "ci_low": result["ci_low"], "ci_high": result["ci_high"], "n": result["n"],
                        "scale": metric_info(metric).scale, "p_value": result["p_value"]})
    table = pd.DataFrame.from_records(records, columns=list(CSV_COLUMNS))
    best_rows = table["statistic"] == "best_minus_default"
    if best_rows.any():
        table["p_adjusted"] = adjust_family(table[best_rows], settings.multiple_comparisons)["p_adjusted"]
    return table
