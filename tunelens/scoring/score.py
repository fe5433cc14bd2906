"""Scoring stage: generation file -> score file (corpus metrics with bootstrap CIs) + per-row table.

One pipeline for generation files and early-exit files alike (same row format):
  filter    read and check the rows (fails on a bad file before any metric model is loaded);
  score     each registered metric (tunelens.scoring.metrics) gives per-row values and the corpus value;
  reduce    corpus value as the metric's own library computes it (BLEU from summed n-gram counts, ...);
  aggregate percentile bootstrap CI: rows resampled with replacement, the corpus value recomputed on each
            resample (from per-row sufficient statistics for BLEU/CodeBLEU/perplexity, so it stays cheap).

The bootstrap and CI code is tunelens.scoring.statistics (shared with the report's paired differences).

Score file format: docs/ARCHITECTURE.md ("Score files").
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from tunelens.errors import DataError
from tunelens.io import library_versions, read_json, read_jsonl, write_json_atomic, write_text_atomic
from tunelens.scoring.metrics import METRICS, MetricResult, ScoringContext, check_metric_names
from tunelens.scoring.statistics import BOOTSTRAP_METHOD, bootstrap_distribution, percentile_ci, resample_counts

log = logging.getLogger(__name__)

GENERATION_FIELDS = ("id", "prompt", "reference", "generated", "num_generated_tokens", "finish_reason")


# --------------------------------------------------------------------------------------------- paired rows
def paired_rows(rows_a: str | Path, rows_b: str | Path, metric: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Per-row values of `metric` from two per-row CSVs, matched by id (ids present in both, sorted)."""
    table_a, table_b = read_rows_csv(rows_a), read_rows_csv(rows_b)
    for path, table in ((rows_a, table_a), (rows_b, table_b)):
        if table and metric not in table[next(iter(table))]:
            raise DataError(f"{path}: no column '{metric}'")
    ids = sorted(set(table_a) & set(table_b))
    return (
        np.asarray([table_a[i][metric] for i in ids]), np.asarray([table_b[i][metric] for i in ids]), ids,
    )


# --------------------------------------------------------------------------------------------- filter
def _meta_path(generation_file: Path) -> Path:
    return generation_file.with_name(generation_file.name.removesuffix(".jsonl") + ".meta.json")


def read_generations(generation_file: str | Path) -> list[dict]:
    """Rows of a generation (or early-exit) file, checked: every field present with the right type, ids
    unique, at least one row. Errors name the file, the 1-based line, the key and what was expected."""
    generation_file = Path(generation_file)
    rows = read_jsonl(generation_file, required=GENERATION_FIELDS)
    if not rows:
        raise DataError(f"{generation_file}: no rows; expected one JSON object per test row")
    seen: dict[str, int] = {}
    for line_no, row in enumerate(rows, start=1):
        where = f"{generation_file}, line {line_no}"
        for key in ("id", "reference", "generated"):
            if not isinstance(row[key], str):
                raise DataError(f"{where}: '{key}' is {type(row[key]).__name__}; expected a string")
        tokens = row["num_generated_tokens"]
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise DataError(f"{where}: 'num_generated_tokens' is {tokens!r}; expected an integer >= 0")
        if row["id"] in seen:
            raise DataError(f"{where}: id '{row['id']}' already on line {seen[row['id']]}; ids must be unique")
        seen[row["id"]] = line_no
    return rows


def read_generation_meta(generation_file: str | Path, n_rows: int, meta_file: str | Path | None = None) -> dict:
    """The `.meta.json` sidecar (`meta_file`; by default next to the generation file); its n_rows must match
    the rows read (else the file is truncated)."""
    meta_file = Path(meta_file) if meta_file else _meta_path(Path(generation_file))
    meta = read_json(meta_file)
    expected = meta.get("n_rows")
    if expected is not None and expected != n_rows:
        raise DataError(
            f"{generation_file}: {n_rows} rows, but {meta_file} says n_rows={expected}; truncated or stale file?"
        )
    return meta


# --------------------------------------------------------------------------------------------- aggregate
def summarise(
    results: Sequence[MetricResult], n: int, *, samples: int, confidence: float, seed: int
) -> dict[str, dict]:
    """Score-file `metrics` entries: value, CI, scale, n, and the metric's details."""
    counts = resample_counts(n, samples, seed)
    out = {}
    for result in results:
        if result.stats is not None:
            distribution = bootstrap_distribution(stats=result.stats, reduce=result.reduce, counts=counts)
        else:
            distribution = bootstrap_distribution(result.per_row, counts=counts)
        low, high = percentile_ci(distribution, confidence)
        entry = {"value": float(result.value), "ci_low": low, "ci_high": high, "scale": result.scale, "n": n}
        entry["description"] = METRICS[result.name].description
        entry.update(result.details)
        out[result.name] = entry
    return out


def score_record(*, model: str | None, variant: str | None, config: str | None, layer: int | None,
                 results: Sequence[MetricResult], n: int, samples: int, confidence: float, seed: int,
                 source: dict | None, skipped: dict | None = None, empty_generations: int | None = None,
                 **extra) -> dict:
    """A score file (format: docs/ARCHITECTURE.md, "Score files"), the one builder every stage uses:
    who/what was scored, each metric with its bootstrap CI, skipped metrics, the bootstrap settings, then
    the stage's own keys (`extra`), the source and the library versions. `empty_generations` (answers with
    no text) is recorded for scored generation files."""
    counts = {"n": n} if empty_generations is None else {"n": n, "empty_generations": empty_generations}
    return {
        "model": model, "variant": variant, "config": config, "layer": layer, **counts,
        "metrics": summarise(results, n, samples=samples, confidence=confidence, seed=seed),
        "skipped": dict(skipped or {}),
        "bootstrap": bootstrap_settings(samples, confidence, seed),
        **extra,
        "source": source,
        "versions": library_versions(),
    }


def bootstrap_settings(samples: int, confidence: float, seed: int) -> dict:
    return {"samples": samples, "confidence": confidence, "seed": seed, "method": BOOTSTRAP_METHOD}


def _fmt(value: float) -> str:
    return repr(float(value)) if math.isfinite(value) else str(value)


def rows_columns(results: Sequence[MetricResult]) -> dict[str, np.ndarray]:
    """The per-row table's numeric columns: each metric's per-row values, then the per-row sufficient
    statistics of every corpus-level metric (METRICS[name].corpus_stats), from which the report recomputes
    corpus values on paired resamples."""
    columns: dict[str, np.ndarray] = {r.name: r.per_row for r in results}
    for result in results:
        names = METRICS[result.name].corpus_stats
        if result.stats is None or not names:
            continue
        if result.stats.shape[1] != len(names):
            raise ValueError(f"metric '{result.name}': {result.stats.shape[1]} statistics per row, "
                             f"registered {len(names)} ({names})")
        columns.update({name: result.stats[:, index] for index, name in enumerate(names)})
    return columns


def write_rows_csv(path: str | Path, ids: Sequence[str], columns: dict[str, Sequence[float]], extra: dict | None = None) -> None:
    """Per-row table: `id`, then `extra` text columns, then one column per metric (full float precision)."""
    extra = extra or {}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", *extra, *columns])
    for index, row_id in enumerate(ids):
        writer.writerow(
            [row_id, *(values[index] for values in extra.values()), *(_fmt(v[index]) for v in columns.values())]
        )
    write_text_atomic(path, buffer.getvalue())


def read_rows_csv(path: str | Path) -> dict[str, dict[str, float]]:
    """A per-row table back as {id: {metric: value}} (numeric columns only)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file does not exist")
    out: dict[str, dict[str, float]] = {}
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or reader.fieldnames[0] != "id":
            raise DataError(f"{path}: first column must be 'id', got {reader.fieldnames}")
        for line_no, row in enumerate(reader, start=2):
            values = {}
            for key, text in row.items():
                if key == "id":
                    continue
                try:
                    values[key] = float(text)
                except (TypeError, ValueError):
                    continue
            out[row["id"]] = values
    return out


# --------------------------------------------------------------------------------------------- pipeline
def score_rows(
    rows: list[dict], metrics: Sequence[str], context: ScoringContext
) -> tuple[list[MetricResult], dict[str, str], dict[str, float]]:
    """Run each metric on the rows: (results, skipped {name: reason}, seconds per metric)."""
    check_metric_names(metrics)
    generated = [row["generated"] for row in rows]
    references = [row["reference"] for row in rows]
    results, skipped, seconds = [], {}, {}
    for name in metrics:
        metric = METRICS[name]
        reason = metric.skip_reason(context)
        if reason:
            skipped[name] = reason
            continue
        start = time.perf_counter()
        results.append(metric.compute(generated, references, rows, context))
        seconds[name] = round(time.perf_counter() - start, 4)
        log.info("%s: %.4g (%s) in %.2f s", name, results[-1].value, metric.scale, seconds[name])
    return results, skipped, seconds


def score_generation_file(
    generation_file: str | Path,
    scores_json: str | Path,
    rows_csv: str | Path,
    *,
    metrics: Sequence[str],
    context: ScoringContext | dict,
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 1234,
    model: str | None = None,
    variant: str | None = None,
    config: str | None = None,
    layer: int | None = None,
    meta_file: str | Path | None = None,
) -> dict:
    """Score one generation or early-exit file; write the score JSON and the per-row CSV atomically.

    `meta_file` is the generation's sidecar (default: next to the generation file).
    `model`/`variant`/`config` default to the generation meta's. `layer` is the early-exit layer (None for
    full-depth generations). `context` may be a plain dict (rule params, see ScoringContext.from_dict).
    Returns the score-file dict.
    """
    if isinstance(context, dict):
        context = ScoringContext.from_dict(context)
    rows = read_generations(generation_file)
    meta = read_generation_meta(generation_file, len(rows), meta_file)
    check_metric_names(metrics)
    results, skipped, seconds = score_rows(rows, metrics, context)
    # Where a metric was computed by a server (BERTScore), its record of the request: kept out of `metrics`,
    # which must not depend on where jobs ran; the report bills the server's CPU from it (report.costs).
    servers = {r.name: r.details.pop("server") for r in results if r.details.get("server") is not None}
    for r in results:
        r.details.pop("server", None)
    n = len(rows)
    summary = score_record(
        model=model or (meta.get("model") or {}).get("name"), variant=variant or meta.get("variant"),
        config=config or (meta.get("decoding_config") or {}).get("name"), layer=layer, results=results, n=n,
        samples=samples, confidence=confidence, seed=seed, skipped=skipped, source=meta,
        generation_file=str(generation_file), metric_time_s=seconds, metric_servers=servers,
        # answers with no text (after stop strings): a variant where every answer is empty is flagged in the
        # report, so its scores of 0 are not read as real results
        empty_generations=sum(not str(row.get("generated", "")).strip() for row in rows),
    )
    write_rows_csv(rows_csv, [row["id"] for row in rows], rows_columns(results))
    write_json_atomic(scores_json, summary)
    return summary
