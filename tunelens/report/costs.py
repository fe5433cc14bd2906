"""The compute-cost section of summary.md and its summary.csv rows, from the jobs' benchmark files.

Numbers come from Snakemake's `benchmark:` files (tunelens.cost): wall time and CPU time summed over jobs,
peak memory the largest resident set (max_rss) of one job, GPU-hours = wall time x GPUs the job held.
A job held a GPU when its rule asks for one (rule param `job_gpus`, from the config) and the study ran on
CUDA: `device: cuda`, or `device: auto` with the model's generations made on a CUDA device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from tunelens.cost import BENCHMARK_DIR, COST_METRICS, job_costs, read_history, summarise_costs
from tunelens.report.common import CSV_COLUMNS
from tunelens.report.inputs import ScoreFile
from tunelens.report.tables import Cell, Document, Table

STATISTIC = "compute_cost"
SHARED = "shared"  # jobs that serve the whole study (split, BERTScore model, human sheets)


def held_gpus(job_gpus: Mapping[str, Mapping[str, int]] | None, device: str,
              files: Sequence[ScoreFile]) -> dict[str, dict[str, int]]:
    """job_gpus restricted to the jobs that really held a GPU (see the module docstring)."""
    if not job_gpus or device == "cpu":
        return {}
    if device == "cuda":
        return {rule: dict(gpus) for rule, gpus in job_gpus.items()}
    on_cuda = {f.model for f in files if str((f.source or {}).get("device") or "").startswith("cuda")}
    held = {}
    for rule, gpus in job_gpus.items():
        held[rule] = {model: n for model, n in gpus.items() if model in on_cuda or (model == "*" and on_cuda)}
    return held


def study_costs(files: Sequence[ScoreFile], *, bench_dir: str | Path = BENCHMARK_DIR,
                job_gpus: Mapping[str, Mapping[str, int]] | None = None, device: str = "auto") -> list[dict]:
    models = sorted({f.model for f in files})
    return job_costs(bench_dir, models=models, job_gpus=held_gpus(job_gpus, device, files))


def cost_rows(records: Sequence[dict], evaluation_set: str) -> pd.DataFrame:
    """summary.csv rows (statistic 'compute_cost'): per stage (config = rule, model 'all'), per model
    (config 'all', model '' -> 'shared') and the study total (model 'all', config 'all')."""
    rows = []

    def emit(model, stage, totals):
        for metric, (_, scale) in COST_METRICS.items():
            value = totals[metric]
            rows.append({"evaluation_set": evaluation_set, "model": model, "variant": "", "config": stage,
                         "layer": None, "metric": metric, "statistic": STATISTIC,
                         "value": float(value) if value is not None else float("nan"), "ci_low": float("nan"),
                         "ci_high": float("nan"), "n": totals["jobs"], "scale": scale})

    if not records:
        return pd.DataFrame(columns=list(CSV_COLUMNS))
    by_rule = summarise_costs(records, "rule")
    for rule, totals in by_rule.items():
        if rule != "all":
            emit("all", rule, totals)
    for model, totals in summarise_costs(records, "model").items():
        if model != "all":
            emit(model or SHARED, "all", totals)
    emit("all", "all", by_rule["all"])
    return pd.DataFrame(rows, columns=list(CSV_COLUMNS))


def _seconds(value) -> str:
    return "–" if value is None else f"{value:,.1f}"


def _row(name: str, totals: dict, gpu: bool) -> list[Cell]:
    cells = [Cell(name), Cell(str(totals["jobs"])), Cell(_seconds(totals["wall_s"])),
             Cell(_seconds(totals["cpu_time_s"])),
             Cell("–" if totals["max_rss_mb"] is None else f"{totals['max_rss_mb']:,.0f}")]
    if gpu:
        cells.append(Cell(f"{totals['gpu_hours']:.3f}"))
    return cells


def cost_section(doc: Document, records: Sequence[dict], bench_dir: str | Path = BENCHMARK_DIR) -> None:
    doc.heading(2, "Compute cost")
    if not records:
        doc.paragraph(f"No benchmark files under `{bench_dir}/` (every rule writes "
                      "`benchmarks/<rule>/<wildcards>.tsv` when it runs through Snakemake).")
        return
    gpu = any(r["gpus"] for r in records)
    doc.paragraph(
        f"From the {len(records)} job benchmark files under `{bench_dir}/` (Snakemake's `benchmark:`). Wall and CPU "
        "time are summed over jobs; peak memory is the largest resident set (max_rss) of one job"
        + ("; GPU-hours = wall time × GPUs the job held." if gpu else "; no job held a GPU (CPU run).")
        + " The report job itself is not counted (it is running).")
    header = ["Stage (rule)", "Jobs", "Wall (s)", "CPU time (s)", "Peak memory (MB)"] + (["GPU-hours"] if gpu else [])
    align = ["l"] + ["r"] * (len(header) - 1)
    by_rule = summarise_costs(records, "rule")
    doc.table(Table(header, [_row(rule if rule != "all" else "**all**", totals, gpu)
                             for rule, totals in by_rule.items()], align))
    by_model = summarise_costs(records, "model")
    header = ["Model"] + header[1:]
    doc.table(Table(header, [_row({"": SHARED, "all": "**all**"}.get(model, model), totals, gpu)
                             for model, totals in by_model.items()], align))
    history = read_history(bench_dir)
    if history:
        wall = sum(row["s"] or 0.0 for row in history if isinstance(row.get("s"), float))
        doc.paragraph(f"`{bench_dir}/history.tsv` keeps every job run archived so far, reruns included: "
                      f"{len(history)} rows, {wall:,.1f} s wall in all.")
