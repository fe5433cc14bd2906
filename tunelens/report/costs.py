"""The compute-cost section of summary.md and its summary.csv rows, from the jobs' benchmark files.

Numbers come from Snakemake's `benchmark:` files (tunelens.cost): wall time and CPU time summed over jobs,
peak memory the largest resident set (max_rss) of one job, GPU-hours = wall time x GPUs the job held.
A job held a GPU when its rule asks for one (rule param `job_gpus`, from the config) and the study ran on
CUDA: `device: cuda`, or `device: auto` with the model's generations made on a CUDA device.

A generation (or BERTScore) server's CPU time is billed to the jobs it served (bill_server_work): the
server's CPU until its last recorded request is split over its requests in proportion to the CPU seconds each
recorded (`execution.server_cpu_s` in the generation and early-exit metas, `metric_servers.bertscore` in score
files); the job that started the server
(its first request) had the server's CPU up to then in its own benchmark, which is taken out first.
Rows carry the evaluation set of the job: an `*_evalset` rule's first wildcard, else the training data's set.
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


def server_requests(files: Sequence[ScoreFile], evaluation_set: str | None = None) -> list[dict]:
    """The served requests recorded in score files (the generation / early-exit meta in `source`, the BERTScore
    request in `metric_servers.bertscore`), each with the job (rule, wildcards) that asked:
    {"rule", "wildcards", "server", "request", "cpu_s", "total_s"}.
    `evaluation_set`: the extra set the files belong to (None: the training data's own test split)."""
    out = []

    def add(execution: dict | None, rule: str, wildcards: str) -> None:
        if not execution or execution.get("mode") != "server" or execution.get("server_cpu_s") is None:
            return
        out.append({"rule": rule, "wildcards": wildcards,
                    "server": (execution.get("server_pid"), execution.get("python")),
                    "request": int(execution.get("request") or 0), "cpu_s": float(execution["server_cpu_s"]),
                    "total_s": float(execution.get("server_cpu_total_s") or execution["server_cpu_s"])})

    for score in files:
        if score.kind == "decoding":
            where = f"{score.model}/{score.variant}/{score.config}"
            if evaluation_set is not None:
                where = f"{evaluation_set}/{where}"
            suffix = "" if evaluation_set is None else "_evalset"
            add((score.source or {}).get("execution"), "generate" + suffix, where)
            add(score.bertscore_server, "score" + suffix, where)
        elif score.kind == "early_exit":
            where = f"{score.model}/{score.variant}/layer_{score.layer}"
            add((score.source or {}).get("execution"), "early_exit", where)
            add(score.bertscore_server, "score_early_exit", where)
    return out


def bill_server_work(records: list[dict], requests: Sequence[dict]) -> list[dict]:
    """Records with each generation server's CPU time billed to the jobs it served (module docstring).
    Adds "server_cpu_s" (what was billed to the job) to every record; a job whose request is not among the
    records (its benchmark file is gone) leaves its share unbilled."""
    by_job = {(r["rule"], r["wildcards"]): dict(r, server_cpu_s=0.0) for r in records}
    servers: dict = {}
    for request in requests:
        servers.setdefault(request["server"], []).append(request)
    for served in servers.values():
        served = sorted(served, key=lambda r: r["request"])
        total = max(r["total_s"] for r in served)
        recorded = sum(r["cpu_s"] for r in served)
        first = by_job.get((served[0]["rule"], served[0]["wildcards"]))
        if first is not None and first["cpu_time_s"] is not None:
            # its benchmark measured the server (its child) until its request ended
            first["cpu_time_s"] = max(0.0, first["cpu_time_s"] - served[0]["total_s"])
        for request in served:
            job = by_job.get((request["rule"], request["wildcards"]))
            if job is None:
                continue
            share = total * request["cpu_s"] / recorded if recorded > 0 else total / len(served)
            job["server_cpu_s"] += share
            job["cpu_time_s"] = (job["cpu_time_s"] or 0.0) + share
    return list(by_job.values())


def study_costs(files: Sequence[ScoreFile], *, bench_dir: str | Path = BENCHMARK_DIR,
                job_gpus: Mapping[str, Mapping[str, int]] | None = None, device: str = "auto",
                requests: Sequence[dict] = ()) -> list[dict]:
    """Job records (tunelens.cost.job_costs) with the generation servers' work billed to the jobs it served
    (`requests`: server_requests of every evaluation set's files)."""
    models = sorted({f.model for f in files})
    return bill_server_work(job_costs(bench_dir, models=models, job_gpus=held_gpus(job_gpus, device, files)),
                            requests)


def job_evaluation_set(record: dict, default_set: str) -> str:
    """The evaluation set a job worked for: an evaluation-set rule's first wildcard, else the training data's."""
    if record["rule"].endswith("_evalset") or record["rule"] == "evalset":
        return Path(record["wildcards"]).parts[0]
    return default_set


def cost_rows(records: Sequence[dict], evaluation_set: str) -> pd.DataFrame:
    """summary.csv rows (statistic 'compute_cost'): per stage and evaluation set (config = rule, model 'all'),
    per model (config 'all', model '' -> 'shared') and the study total (model 'all', config 'all').
    `evaluation_set` is the training data's set (dataset.name); each row carries the set its jobs worked for,
    'all' for a per-model or total row over several sets."""
    rows = []

    def emit(model, stage, totals, sets):
        sets = list(dict.fromkeys(sets))
        for metric, (_, scale) in COST_METRICS.items():
            value = totals[metric]
            rows.append({"evaluation_set": sets[0] if len(sets) == 1 else "all", "model": model, "variant": "",
                         "config": stage, "layer": None, "metric": metric, "statistic": STATISTIC,
                         "value": float(value) if value is not None else float("nan"), "ci_low": float("nan"),
                         "ci_high": float("nan"), "n": totals["jobs"], "scale": scale})

    if not records:
        return pd.DataFrame(columns=list(CSV_COLUMNS))
    sets = {id(r): job_evaluation_set(r, evaluation_set) for r in records}
    by_rule = summarise_costs(records, "rule")
    for rule in by_rule:
        if rule == "all":
            continue
        jobs = [r for r in records if r["rule"] == rule]
        for name in dict.fromkeys(sets[id(r)] for r in jobs):
            emit("all", rule, summarise_costs([r for r in jobs if sets[id(r)] == name], "rule")["all"], [name])
    for model, totals in summarise_costs(records, "model").items():
        if model != "all":
            emit(model or SHARED, "all", totals, [sets[id(r)] for r in records if r["model"] == model])
    emit("all", "all", by_rule["all"], sets.values())
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


def _server_text(records: Sequence[dict]) -> str:
    billed = sum(r.get("server_cpu_s") or 0.0 for r in records)
    return ("Generation and BERTScore servers: their CPU time is billed to the jobs they served, in proportion to the server CPU "
            "seconds each request recorded (the job that started a server had the server's time until then in "
            f"its own benchmark, taken out first); {billed:,.1f} CPU-s billed this way. The BERTScore server is "
            "billed the same way to the score jobs it served.")


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
        + " The report job itself is not counted (it is running). "
        + _server_text(records))
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
