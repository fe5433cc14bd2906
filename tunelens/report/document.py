"""summary.md / summary.html: the summary document, one function per section.

First data_checks_section (tunelens.report.data_checks: empty answers, rows left out by reason), then the
numbered sections (the tables every study reports):
  1 overview_section      model overview at the default decoding config
  2 decoding_section      every decoding config per model and variant
  3 layers_section        early exit per layer
  4 best_config_section   best decoding config per model and metric
  5 agreement_section     automatic metrics vs Judge / Human
  6 paired_section        fine-tuned vs base
  7 evaluation_sets_section  sections 1 and 6 again on each extra evaluation set (when the study has any)
then finetune_section, notes_section (skipped metrics) and provenance_section (tunelens.report.provenance). Every section reads the
same SummaryContext (tunelens.report.context: the summary table and what is derived from it once) and adds blocks to a
Document.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from tunelens.report.common import (
    DATE_PREFIX, POOLED, REFERENCE_METRICS, VARIANT_ORDER, ReportSettings, metric_info, metric_order, order_index,
    variants,
)
from tunelens.scoring.metrics import METRICS
from tunelens.report.comparisons import corpus_stats_table, score_file_index
from tunelens.report.context import EvaluationSetResults, SummaryContext, _context
from tunelens.report.data_checks import data_checks_section
from tunelens.report.inputs import ScoreFile
from tunelens.report.provenance import finetune_section, notes_section, provenance_section
from tunelens.report.tables import (
    Cell, Document, Table, estimate_cell, format_estimate, format_number, format_p, mark_best, significance,
)
from tunelens.scoring.statistics import ADJUSTMENTS


def build_summary(files: Sequence[ScoreFile], summary: pd.DataFrame, settings: ReportSettings,
                  finetune: dict[str, dict], generated: str, human_sheets: Sequence[str] = (),
                  evaluation_sets: Sequence[EvaluationSetResults] = (), split_manifest: dict | None = None) -> Document:
    """The summary document: the six numbered tables (on the training data's own test split), the extra
    evaluation sets (7) when there are any, plus fine-tuning, notes and provenance."""
    ctx = _context(files, summary, settings, finetune, human_sheets)
    doc = Document()
    header_section(doc, ctx, generated)
    data_checks_section(doc, files, finetune, split_manifest, evaluation_sets)
    for section in (overview_section, decoding_section, layers_section, best_config_section, agreement_section,
                    paired_section):
        section(doc, ctx)
    if evaluation_sets:
        evaluation_sets_section(doc, ctx, evaluation_sets)
    finetune_section(doc, finetune)
    notes_section(doc, files, settings.evaluation_set, [(results.name, results.files) for results in evaluation_sets])
    provenance_section(doc, files, settings, finetune)
    return doc


def header_section(doc: Document, ctx: SummaryContext, generated: str) -> None:
    """Title, the generated date (the only line that changes between runs) and how to read the cells."""
    doc.heading(1, "tunelens summary")
    doc.paragraph(DATE_PREFIX + generated)
    scales = ", ".join(f"{metric_info(m).label} {metric_info(m).scale}" for m in metric_order(ctx.scores["metric"]))
    doc.paragraph(
        f"Cells read `value [{ctx.ci} low, high]`; metric CIs are the score files' bootstrap CIs over test rows. "
        f"**Bold** = best in its column (lowest for perplexity; length is not ranked); – = not available. "
        f"Scales: {scales}. Default decoding config: `{ctx.default}`."
    )


def overview_section(doc: Document, ctx: SummaryContext,
                     heading: tuple[int, str] = (2, "1. Model overview (default decoding config)")) -> None:
    """(1) Model overview at the default decoding config: one row per model and variant."""
    scores, by_key, models, default = ctx.scores, ctx.by_key, ctx.models, ctx.default
    doc.heading(*heading)
    overview = scores[((scores["config"] == default) | (scores["metric"] == "perplexity")) & scores["layer"].isna()]
    metrics = metric_order(overview["metric"])
    if overview.empty:
        doc.paragraph(f"No scores at the default config `{default}`.")
    else:
        rows, values = [], []
        for model in models:
            for variant in variants(overview[overview["model"] == model]):
                row, vals = [Cell(model), Cell(variant)], [None, None]
                for metric in metrics:
                    config = "" if metric == "perplexity" else default
                    entry = by_key.get((model, variant, config, None, metric))
                    row.append(estimate_cell(entry, metric))
                    vals.append(None if entry is None else entry["value"])
                n = _first_n(scores, model, variant, default)
                row.append(Cell(n))
                vals.append(None)
                rows.append(row)
                values.append(vals)
        mark_best(rows, values, [None, None, *metrics, None])
        header = ["Model", "Variant", *[f"{metric_info(m).label} ({metric_info(m).scale})" for m in metrics], "n"]
        doc.table(Table(header, rows, ["l", "l", *["r"] * len(metrics), "r"]))


def decoding_section(doc: Document, ctx: SummaryContext) -> None:
    """(2) Every decoding config per model and variant, with the swept fields as columns."""
    scores, by_key, models, default = ctx.scores, ctx.by_key, ctx.models, ctx.default
    config_fields, swept, settings = ctx.config_fields, ctx.swept, ctx.settings
    doc.heading(2, "2. Decoding configs per model")
    decoding = scores[scores["config"].ne("") & scores["layer"].isna()]
    config_rank = order_index(decoding["config"], settings.decoding_configs)
    for model in models:
        for variant in variants(decoding[decoding["model"] == model]):
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
                    row.append(estimate_cell(entry, metric))
                    vals.append(None if entry is None else entry["value"])
                rows.append(row)
                values.append(vals)
            mark_best(rows, values, [None] * (1 + len(swept)) + metrics)
            header = ["Config", *swept, *[metric_info(m).label for m in metrics]]
            doc.table(Table(header, rows, ["l", *["r"] * (len(swept) + len(metrics))]))


def layers_section(doc: Document, ctx: SummaryContext) -> None:
    """(3) Early exit: one row per probed layer, base and fine-tuned side by side."""
    scores = ctx.scores
    doc.heading(2, "3. Early exit per layer (base vs fine-tuned)")
    layers = scores[scores["layer"].notna()]
    if layers.empty:
        doc.paragraph("No early-exit scores (probe.early_exit disabled or not run).")
    for model in dict.fromkeys(layers["model"]):
        part = layers[layers["model"] == model]
        present = variants(part)
        metrics = metric_order(part["metric"])
        doc.heading(3, model)
        configs = sorted(set(part["config"]) - {""})
        if configs:
            doc.paragraph("Early-exit decoding: " + ", ".join(f"`{c}`" for c in configs) + ".")
        rows, values = [], []
        for layer in sorted(int(x) for x in dict.fromkeys(part["layer"])):
            row, vals = [Cell(str(layer))], [None]
            for metric in metrics:
                for variant in present:
                    match = part[(part["variant"] == variant) & (part["layer"] == layer) & (part["metric"] == metric)]
                    entry = None if match.empty else match.iloc[0]
                    row.append(estimate_cell(entry, metric))
                    vals.append(None if entry is None else entry["value"])
            rows.append(row)
            values.append(vals)
        mark_best(rows, values, [None] + [m for m in metrics for _ in present])
        header = ["Layer"] + [f"{metric_info(m).label} {v}" for m in metrics for v in present]
        doc.table(Table(header, rows, ["r"] * len(header)))


def best_config_section(doc: Document, ctx: SummaryContext) -> None:
    """(4) Best decoding config per model, variant and metric, and its paired gain over the default."""
    summary, by_key, models, default, ci = ctx.summary, ctx.by_key, ctx.models, ctx.default, ctx.ci
    doc.heading(2, "4. Best decoding config per model and metric")
    best = summary[summary["statistic"] == "best_config"]
    metric_rank = {m: i for i, m in enumerate(metric_order(best["metric"]))}
    model_rank = order_index(models)
    variant_rank = order_index(best["variant"], VARIANT_ORDER)
    best = best.assign(_m=best["model"].map(model_rank), _v=best["variant"].map(variant_rank),
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
                diff_text += significance(d["p_adjusted"], ctx.settings.alpha)
            rows.append([Cell(r.model), Cell(r.variant), Cell(metric_info(r.metric).label), Cell(f"`{r.config}`"),
                         Cell(format_estimate(r.value, r.ci_low, r.ci_high, decimals)),
                         estimate_cell(default_entry, r.metric), Cell(diff_text)])
        doc.paragraph(f"best − default: paired difference over rows (by id) with a bootstrap {ci}, computed as in "
                      f"section 6 (corpus metrics as differences of corpus values); * = p-value adjusted "
                      f"({_adjustment_text(ctx.settings)} over each model's rows of this table) below "
                      f"{ctx.settings.alpha:g}. Ties go to the earlier config in study order.")
        doc.table(Table(["Model", "Variant", "Metric", "Best config", "Best", "Default", "Best − default"], rows,
                        ["l", "l", "l", "l", "r", "r", "r"]))


def agreement_section(doc: Document, ctx: SummaryContext) -> None:
    """(5) Rank agreement of automatic metrics with Judge / Human ratings."""
    summary, scores, ci, human_sheets = ctx.summary, ctx.scores, ctx.ci, ctx.human_sheets
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


def paired_section(doc: Document, ctx: SummaryContext,
                   heading: tuple[int, str] = (2, "6. Fine-tuned vs base (paired differences)")) -> None:
    """(6) Fine-tuned minus base at the default config, rows paired by id."""
    summary, scores, by_key, models, default, ci = ctx.summary, ctx.scores, ctx.by_key, ctx.models, ctx.default, ctx.ci
    doc.heading(*heading)
    diffs = summary[(summary["statistic"] == "paired_difference") & summary["layer"].isna()]
    tuned_models = [m for m in models if {"base", "finetuned"} <= set(scores[scores["model"] == m]["variant"])]
    if not tuned_models:
        doc.paragraph("No model has both a base and a fine-tuned variant.")
    else:
        settings = ctx.settings
        family = {model: int(diffs[(diffs["model"] == model)]["p_value"].notna().sum()) for model in tuned_models}
        corpus_labels = [metric_info(m).label for m in metric_order(set(diffs["metric"]) | set(scores["metric"]))
                         if m in METRICS and METRICS[m].corpus_level]
        doc.paragraph(
            f"At the default config: fine-tuned − base over the rows both variants have (paired by id), with an "
            f"unadjusted bootstrap {ci}. Corpus metrics ({', '.join(corpus_labels) or 'none here'}) are the "
            "difference of the two corpus values, both recomputed on each bootstrap resample of row ids, so the "
            "difference is the gap between the Base and Fine-tuned columns; the other metrics are means of rows, "
            "and their difference is the mean of per-row differences (the same gap). p: two-sided bootstrap "
            "p-value (twice the share of resampled differences at or beyond 0, opposite the observed one, "
            f"(1 + count) / (1 + resamples)); p adj.: {_adjustment_text(settings)} over each model's "
            "paired comparisons (every config, layer and metric of this evaluation set in summary.csv: "
            + ", ".join(f"{family[m]} for {m}" for m in tuned_models)
            + f"); * = p adj. below {settings.alpha:g}. `scoring.multiple_comparisons` chooses the adjustment "
            "(bh, holm, none; default bh). With "
            f"{settings.bootstrap_samples} resamples the smallest p-value is {2 / (settings.bootstrap_samples + 1):.4f}."
        )
        if settings.multiple_comparisons == "holm":
            blind = [m for m in tuned_models if 2 * family[m] / (settings.bootstrap_samples + 1) >= settings.alpha]
            if blind:
                needed = math.ceil(2 * max(family[m] for m in blind) / settings.alpha)
                doc.paragraph(f"**Holm cannot mark any comparison of {', '.join(blind)}**: {max(family[m] for m in blind)} "
                              f"comparisons times the smallest p-value reach {settings.alpha:g}; raise "
                              f"`scoring.bootstrap_samples` to at least {needed} or use bh.")
        if "codebleu" in set(scores["metric"]):
            doc.paragraph("CodeBLEU: the per-row values in the `.rows.csv` files are calc_codebleu on each row "
                          "alone, where a row whose data-flow match is 0 gets 0.25 for it (codebleu's "
                          "`dataflow_match_score or 1`; e.g. the answer `0` scores 0.25 against any program). Their "
                          "mean is not the corpus value and can move the other way, so the difference here is "
                          "that of the corpus values.")
        rows = []
        fallback = False
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
                p_text = p_adj_text = "–"
                if not match.empty:
                    d = match.iloc[0]
                    diff_text = format_estimate(d["value"], d["ci_low"], d["ci_high"], decimals, signed=True)
                    diff_text += significance(d["p_adjusted"], settings.alpha)
                    if _per_row_fallback(ctx.files, model, config, metric):
                        diff_text += " †"
                        fallback = True
                    p_text, p_adj_text = format_p(d["p_value"]), format_p(d["p_adjusted"])
                    n = str(int(d["n"]))
                elif base is not None and tuned is not None:
                    diff_text = format_estimate(tuned["value"] - base["value"], math.nan, math.nan, decimals,
                                                signed=True) + " (no per-row values, no CI)"
                    n = "–"
                else:
                    continue
                rows.append([Cell(model), Cell(metric_info(metric).label), estimate_cell(base, metric),
                             estimate_cell(tuned, metric), Cell(diff_text), Cell(p_text), Cell(p_adj_text), Cell(n)])
        doc.table(Table(["Model", "Metric", "Base", "Fine-tuned", "Fine-tuned − base", "p", "p adj.", "n pairs"],
                        rows, ["l", "l", "r", "r", "r", "r", "r", "r"]))
        if fallback:
            doc.paragraph("† mean of per-row differences: the rows tables hold no corpus statistics for this corpus "
                          "metric (score files written before they were recorded; rerun the score jobs for the "
                          "corpus-level difference).")


def _adjustment_text(settings: ReportSettings) -> str:
    return ADJUSTMENTS[settings.multiple_comparisons]


def _per_row_fallback(files: Sequence[ScoreFile], model: str, config: str, metric: str) -> bool:
    """A corpus-level metric whose base or fine-tuned rows table lacks its statistics (difference of means)."""
    if metric not in METRICS or not METRICS[metric].corpus_level:
        return False
    index = score_file_index(files)
    return any(corpus_stats_table(index.get((model, variant, config, -1, metric)), metric) is None
               for variant in VARIANT_ORDER)


def _manifest_counts(manifest: dict | None) -> tuple[str, str, str, str]:
    """(source, rows evaluated, rows dropped as in the training split, other drops) of a set's manifest."""
    if not manifest:
        return "–", "–", "–", "–"
    source = manifest.get("source") or {}
    counts = manifest.get("counts") or {}
    dropped = dict(counts.get("dropped") or {})
    leaked = dropped.pop("in_training_split", 0)
    other = ", ".join(f"{reason} {count}" for reason, count in dropped.items()) or "0"
    if counts.get("beyond_max_rows"):
        other += f"; beyond max_rows {counts['beyond_max_rows']}"
    return f"`{source.get('source', '–')}`", str(counts.get("test", "–")), str(leaked), other


def evaluation_sets_section(doc: Document, ctx: SummaryContext, evaluation_sets: Sequence[EvaluationSetResults]) -> None:
    """(7) Every extra evaluation set: what it holds (its manifest), then the model overview and the
    fine-tuned vs base table on it, as sections 1 and 6 for the training data's own test split."""
    doc.heading(2, "7. Evaluation sets")
    doc.paragraph(
        f"Sections 1-6 are on the training data's own test split (`{ctx.settings.evaluation_set}`). Each set "
        "below was evaluated whole, after dropping rows whose exact instruction+input is in the training split "
        "(counted in `results/eval/<set>/manifest.json`). summary.csv has every number, with an "
        "`evaluation_set` column."
    )
    rows = []
    for results in evaluation_sets:
        source, n, leaked, other = _manifest_counts(results.manifest)
        rows.append([Cell(results.name), Cell(source), Cell(n), Cell(leaked), Cell(other)])
    doc.table(Table(["Set", "Source", "Rows evaluated", "Dropped: in training split", "Dropped: other"], rows,
                    ["l", "l", "r", "r", "l"]))
    for results in evaluation_sets:
        sub = _context(results.files, results.summary, ctx.settings, ctx.finetune, results.human_sheets)
        overview_section(doc, sub, heading=(3, f"7. {results.name}: model overview (default decoding config)"))
        paired_section(doc, sub, heading=(3, f"7. {results.name}: fine-tuned vs base (paired differences)"))
        sheets = [p for p in results.human_sheets if Path(p).name == "sheet.csv"]
        if sheets and "human" not in set(sub.scores["metric"]):
            doc.paragraph(f"Human rating sheet of {results.name}: `{sheets[0]}` (filled copies go into "
                          f"`<scoring.human.ratings_dir>/{results.name}/`).")


def _first_n(scores: pd.DataFrame, model: str, variant: str, config: str) -> str:
    match = scores[(scores["model"] == model) & (scores["variant"] == variant) & (scores["config"] == config)]
    ns = match["n"].dropna()
    return "–" if ns.empty else str(int(ns.max()))


def _field_text(value: Any) -> str:
    return "–" if value is None else str(value)
