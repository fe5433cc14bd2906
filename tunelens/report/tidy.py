"""summary.csv: every number behind every table of the summary, as one tidy long table (CSV_COLUMNS)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from tunelens.errors import DataError
from tunelens.io import write_text_atomic
from tunelens.report.common import (
    CSV_COLUMNS, DIFF_VARIANT, POOLED, VARIANT_ORDER, ReportSettings, metric_order, order_index,
)
from tunelens.report.comparisons import agreement, best_configs, paired_differences
from tunelens.report.inputs import ScoreFile, long_rows, tidy_scores


def summary_table(files: Sequence[ScoreFile], settings: ReportSettings,
                  evaluation_set: str | None = None) -> pd.DataFrame:
    """Every number behind every table, as one tidy long table with columns CSV_COLUMNS.

    evaluation_set: the set the files were scored on (default: settings.evaluation_set, the training
    data's own test split); every row of the table carries it.

    statistic: 'score' (a metric value from a score file), 'paired_difference' (variant
    'finetuned-base'), 'best_config', 'best_minus_default', 'kendall_tau_vs_judge', ... (model 'all'
    = pooled over models). config '' = not applicable (perplexity); layer empty = not an early-exit row.
    """
    scores = tidy_scores(files)
    rows = long_rows(files)
    parts = [scores.drop(columns="kind"), paired_differences(rows, settings, files),
             best_configs(scores, rows, settings, files),
             agreement(rows, settings)]
    table = pd.concat([p for p in parts if not p.empty], ignore_index=True)
    table["evaluation_set"] = settings.evaluation_set if evaluation_set is None else evaluation_set
    return _sort_summary(table, settings)


def _sort_summary(table: pd.DataFrame, settings: ReportSettings) -> pd.DataFrame:
    model_rank = order_index(table["model"][table["model"] != POOLED]) | {POOLED: 10**6}
    variant_rank = order_index(table["variant"], list(VARIANT_ORDER) + [DIFF_VARIANT])
    config_rank = order_index(table["config"], ["", *settings.decoding_configs])
    metric_rank = {m: i for i, m in enumerate(metric_order(table["metric"]))}
    statistic_rank = order_index(table["statistic"], ["score", "paired_difference", "best_config",
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
    for column in ("value", "ci_low", "ci_high", "p_value", "p_adjusted"):
        table[column] = table[column].astype(float)
    for column in ("evaluation_set", "model", "variant", "config", "metric", "statistic", "scale"):
        table[column] = table[column].fillna("").astype(str)
    return table[list(CSV_COLUMNS)]


def write_summary_csv(table: pd.DataFrame, path: str | Path) -> None:
    """Write the tidy table; floats keep full precision (repr) so a read gives the same numbers back."""
    write_text_atomic(path, table.to_csv(index=False, lineterminator="\n"))


def read_summary_csv(path: str | Path) -> pd.DataFrame:
    """Read summary.csv back with the dtypes summary_table() produces."""
    path = Path(path)
    table = pd.read_csv(path, dtype={c: str for c in ("evaluation_set", "model", "variant", "config", "metric",
                                                      "statistic", "scale")},
                        keep_default_na=False, na_values={c: [""] for c in ("layer", "value", "ci_low", "ci_high", "n", "p_value",
                                                  "p_adjusted")})
    missing = [c for c in CSV_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; expected {list(CSV_COLUMNS)}")
    table["layer"] = table["layer"].astype("Int64")
    table["n"] = table["n"].astype("Int64")
    for column in ("value", "ci_low", "ci_high", "p_value", "p_adjusted"):
        table[column] = table[column].astype(float)
    return table[list(CSV_COLUMNS)]
