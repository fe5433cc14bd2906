"""Report inputs: score files of every kind, their per-row tables and the fine-tune records.

Inputs are only the files other stages write (formats in docs/ARCHITECTURE.md):
- decoding score files  `scores/{model}/{variant}/{decoding}.json` (+ `{decoding}.rows.csv`)
- perplexity files      `perplexity/{model}/{variant}.json` (+ `{variant}.rows.csv`)
- judge files           `judge/{model}/{variant}/{decoding}.json` (+ `.rows.csv`)
- human scores          `human/scores/{model}/{variant}/{decoding}.json` (+ `.rows.csv`), once sheets are rated
- early-exit scores     `probe/{model}/{variant}/early_exit/layer_{layer}.scores.json` (+ rows)
- early-exit judge      `probe/{model}/{variant}/early_exit/layer_{layer}.judge.json` (+ `.judge.rows.csv`)
- fine-tune records     `finetune/{model}/metrics.json` (+ sibling `train_log.jsonl`)

Loaded into two tables every other part of the report works from: `tidy_scores` (one row per metric
value of a score file) and `long_rows` (one row per test row and metric, for paired statistics).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from tunelens.errors import DataError
from tunelens.io import read_json, read_jsonl
from tunelens.report.common import CSV_COLUMNS, metric_info

log = logging.getLogger(__name__)

LAYER_KINDS = ("early_exit", "early_exit_judge")  # files of one exit layer (score files and the judge's)


@dataclass
class ScoreFile:
    """One score file (any kind) and its per-row table when one was written next to it."""

    path: Path
    kind: str  # decoding | perplexity | judge | human | early_exit | early_exit_judge
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
    empty_generations: int | None = None  # answers with no text (generation score files)
    bertscore_server: dict | None = None  # metric_servers.bertscore: the BERTScore server's record of the request


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
    if kind in LAYER_KINDS and layer is None:
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
        empty_generations=data.get("empty_generations"),
        bertscore_server=(data.get("metric_servers") or {}).get("bertscore"),
    )
    for candidate in rows_path_candidates(path):
        if candidate.exists():
            score.rows = read_rows_csv(candidate, metrics)
            break
    return score


def load_score_files(paths_by_kind: dict[str, Sequence[str | Path]]) -> list[ScoreFile]:
    """Load every score file; kinds are 'decoding', 'perplexity', 'judge', 'human', 'early_exit' and
    'early_exit_judge' (the judge's file of an early-exit generation)."""
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
