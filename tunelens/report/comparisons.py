"""Statistics the report derives from per-row tables: rows of summary.csv besides the score files' own.

- paired_differences: fine-tuned minus base per model, config, layer and metric (rows paired by id);
- best_configs:       best decoding config per model, variant and metric, and its gain over the default;
- agreement:          rank agreement of each automatic metric with Judge / Human ratings.
The bootstrap itself is tunelens.statistics.
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd

from tunelens.report.common import (
    CORRELATION, CSV_COLUMNS, DIFF_VARIANT, POOLED, REFERENCE_METRICS, ReportSettings, metric_info, metric_order,
    order_index,
)
from tunelens.report.inputs import ScoreFile
from tunelens.statistics import comparison_rng, corpus_perplexity_difference, paired_difference, rank_agreement


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
                    confidence=settings.confidence, rng=comparison_rng(settings.seed, f"agree|{scope}|{metric}|{reference}"),
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
