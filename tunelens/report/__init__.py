"""Summary tables, statistics and plots built from score files alone (the `report` rule).

Outputs: `summary.md` (and the same document as `summary.html` for the Snakemake report), the tidy
long table `summary.csv`, and PNG plots. Scales are those of the score files: BLEU 0-100, ROUGE-L,
BERTScore, CodeBLEU, exact match, Judge and Human 0-1 (higher is better), perplexity >= 1 (lower is
better), length in generated tokens (no better direction).

Every number is reproducible from the inputs: bootstrap resamples are seeded (the study seed), rows
and columns have a fixed order, and the only line that changes between two runs on the same inputs is the
`Generated:` date line of the summary.

The package, in the order data flows through it:
  inputs       score files, per-row tables and fine-tune records -> tidy_scores / long_rows
  comparisons  paired differences, best configs, agreement (bootstrap: tunelens.scoring.statistics)
  tidy         summary.csv (every number behind every table)
  context      what every section reads (SummaryContext), decoding config fields
  document     summary.md / summary.html, one function per section
  data_checks  its "Data checks" section: empty answers, rows left out by reason
  provenance   closing sections: fine-tuning records, skipped metrics, provenance
  tables       Document, Markdown (pandas + tabulate) and HTML (summary.html.j2) rendering, number formats
  plots        PNG plots
  common       ReportSettings, fixed orders, metric display info

Kept free of torch imports so the report job starts fast.
"""

from __future__ import annotations

import datetime as _dt
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from tunelens.errors import DataError
from tunelens.io import read_json, write_text_atomic
from tunelens.report.common import (
    CSV_COLUMNS, DATE_PREFIX, DIFF_VARIANT, POOLED, MetricInfo, ReportSettings, metric_info, metric_order,
)
from tunelens.report.comparisons import agreement, best_configs, paired_differences
from tunelens.report.context import EvaluationSetResults, config_fields, swept_fields
from tunelens.report.costs import cost_rows, cost_section, server_requests, study_costs
from tunelens.report.document import build_summary
from tunelens.report.inputs import (
    ScoreFile, load_finetune_records, load_score_file, load_score_files, long_rows, read_rows_csv, tidy_scores,
)
from tunelens.report.plots import plot_layers, plot_loss, plot_sweeps
from tunelens.report.provenance import provenance
from tunelens.report.tables import Cell, Document, Table, format_estimate, format_number, mark_best
from tunelens.report.tidy import read_summary_csv, summary_table, write_summary_csv

log = logging.getLogger(__name__)

__all__ = [
    "CSV_COLUMNS", "DATE_PREFIX", "DIFF_VARIANT", "POOLED", "Cell", "Document", "MetricInfo",
    "ReportSettings", "ScoreFile", "Table", "agreement", "best_configs", "build_summary", "config_fields",
    "format_estimate", "format_number", "load_finetune_records", "load_score_file", "load_score_files",
    "long_rows", "mark_best", "metric_info", "metric_order", "paired_differences", "plot_layers", "plot_loss",
    "plot_sweeps", "provenance", "read_rows_csv", "read_summary_csv", "summary_table", "swept_fields",
    "tidy_scores", "workflow_git_commit", "write_report", "write_summary_csv",
]


def write_report(*, score_files: Sequence[str | Path] = (), perplexity_files: Sequence[str | Path] = (),
                 judge_files: Sequence[str | Path] = (), human_files: Sequence[str | Path] = (),
                 early_exit_files: Sequence[str | Path] = (), early_exit_judge_files: Sequence[str | Path] = (),
                 human_sheet_files: Sequence[str | Path] = (),
                 finetune_metrics_files: Sequence[str | Path] = (), summary_md: str | Path,
                 summary_csv: str | Path, summary_html: str | Path, plots_dir: str | Path,
                 settings: ReportSettings, now: _dt.datetime | None = None,
                 evaluation_sets: Mapping[str, Mapping[str, Any]] | None = None,
                 split_manifest: str | Path | None = None, benchmarks_dir: str | Path | None = None,
                 job_gpus: Mapping[str, Mapping[str, int]] | None = None, device: str = "auto") -> dict[str, Any]:
    """Build every report output from score files. Returns {'rows': n csv rows, 'plots': [paths]}.

    The named file lists are the training data's own test split (the default set); `early_exit_judge_files`
    are the judge's files of the early-exit generations (the per-layer table's Judge column). `evaluation_sets`:
    set name -> {"scores", "perplexity", "judge", "human", "human_sheet": [paths], "manifest": path} for each
    extra set (results/eval/<name>/), in study order.
    `split_manifest`: the split's manifest.json (rows dropped by reason, shown under "Data checks").
    `now` (UTC) only sets the `Generated:` line; everything else depends on the inputs alone.
    `benchmarks_dir`: the jobs' benchmark files, for the compute-cost section and its summary.csv rows
    (tunelens.report.costs; `job_gpus` rule -> model -> GPUs asked for, `device` the study's device).
    """
    files = load_score_files({"decoding": score_files, "perplexity": perplexity_files, "judge": judge_files,
                              "human": human_files, "early_exit": early_exit_files,
                              "early_exit_judge": early_exit_judge_files})
    if not files:
        raise DataError("report: no score files given; expected results/scores/{model}/{variant}/{decoding}.json")
    if settings.default_config not in settings.decoding_configs:
        raise DataError(f"report.default_config: '{settings.default_config}' is not among the decoding configs "
                        f"{list(settings.decoding_configs)}")
    finetune = load_finetune_records(finetune_metrics_files)
    summary = summary_table(files, settings)
    extra = [_evaluation_set_results(name, inputs, settings) for name, inputs in (evaluation_sets or {}).items()]
    requests = server_requests(files) + [request for results in extra
                                         for request in server_requests(results.files, results.name)]
    costs = (study_costs(files, bench_dir=benchmarks_dir, job_gpus=job_gpus, device=device, requests=requests)
             if benchmarks_dir else None)
    parts = [summary, *(results.summary for results in extra)]
    if costs:
        parts.append(cost_rows(costs, settings.evaluation_set))
    write_summary_csv(pd.concat(parts, ignore_index=True), summary_csv)
    generated = (now or _dt.datetime.now(_dt.timezone.utc)).strftime("%Y-%m-%d %H:%M:%S UTC")
    document = build_summary(files, summary, settings, finetune, generated,
                             human_sheets=[str(p) for p in human_sheet_files], evaluation_sets=extra,
                             split_manifest=read_json(split_manifest) if split_manifest else None)
    if benchmarks_dir:
        cost_section(document, costs, benchmarks_dir)
    write_text_atomic(summary_md, document.to_markdown())
    write_text_atomic(summary_html, document.to_html("tunelens summary"))

    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    scores = tidy_scores(files)
    # With extra sets, every sweep plot names its set (the default set's file names stay as they were).
    label = settings.evaluation_set if extra else None
    plots = plot_sweeps(scores, config_fields(settings, files), settings.default_config, plots_dir,
                        evaluation_set=label)
    for results in extra:
        plots += plot_sweeps(tidy_scores(results.files), config_fields(settings, results.files),
                             settings.default_config, plots_dir, evaluation_set=results.name, suffix=results.name)
    plots += plot_layers(scores, plots_dir)
    plots += plot_loss(finetune, plots_dir)
    rows = len(summary) + sum(len(results.summary) for results in extra)
    log.info("report: %d score files (%d evaluation sets) -> %d summary rows, %d plots",
             len(files) + sum(len(results.files) for results in extra), 1 + len(extra), rows, len(plots))
    return {"rows": rows, "plots": [str(p) for p in plots]}


def _evaluation_set_results(name: str, inputs: Mapping[str, Any], settings: ReportSettings) -> EvaluationSetResults:
    """Load one extra evaluation set's score files and manifest; its summary rows carry its name."""
    files = load_score_files({"decoding": inputs.get("scores") or (), "perplexity": inputs.get("perplexity") or (),
                              "judge": inputs.get("judge") or (), "human": inputs.get("human") or ()})
    if not files:
        raise DataError(f"report: evaluation set '{name}' has no score files; expected "
                        f"results/eval/{name}/scores/{{model}}/{{variant}}/{{decoding}}.json")
    manifest = read_json(inputs["manifest"]) if inputs.get("manifest") else None
    return EvaluationSetResults(name=name, files=files, summary=summary_table(files, settings, evaluation_set=name),
                                manifest=manifest, human_sheets=[str(p) for p in inputs.get("human_sheet") or ()])


def workflow_git_commit(workflow_dir: str | Path) -> str:
    """The workflow checkout's commit for the provenance block ("unknown (...)" outside a git checkout)."""
    import subprocess

    try:
        result = subprocess.run(["git", "-C", str(workflow_dir), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (git not available)"
    return result.stdout.strip() if result.returncode == 0 else "unknown (not a git checkout)"
