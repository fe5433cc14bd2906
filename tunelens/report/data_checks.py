"""The summary's "Data checks" section: variants whose answers are all empty, then every row the stages left
out, by reason (the split's and each evaluation set's manifest, each fine-tune's record)."""

from __future__ import annotations

from typing import Sequence

from tunelens.report.context import EvaluationSetResults
from tunelens.report.inputs import ScoreFile
from tunelens.report.tables import Document


def empty_variants(files: Sequence[ScoreFile]) -> dict[tuple[str, str], int]:
    """(model, variant) -> decoding configs, for variants whose answers are all empty in every decoding config."""
    by_variant: dict[tuple[str, str], list[ScoreFile]] = {}
    for score in files:
        if score.kind == "decoding":
            by_variant.setdefault((score.model, score.variant), []).append(score)
    return {
        key: len(scores) for key, scores in by_variant.items()
        if all(s.empty_generations is not None and s.n and s.empty_generations >= s.n for s in scores)
    }


def _reason_counts(counts: dict | None) -> str:
    return ", ".join(f"{reason.replace('_', ' ')} {n}" for reason, n in sorted((counts or {}).items())) or "none"


def data_checks_section(doc: Document, files: Sequence[ScoreFile], finetune: dict[str, dict],
                        split_manifest: dict | None,
                        evaluation_sets: Sequence["EvaluationSetResults"] = ()) -> None:
    """Warnings first (variants with only empty answers), then every row the stages left out, by reason: the
    split, each evaluation set (its manifest) and each fine-tune."""
    named = [("", files)] + [(f"{results.name}: ", results.files) for results in evaluation_sets]
    warnings = [
        f"**{where}{model} / {variant}: every answer is empty** in all {n} decoding config(s): its scores measure "
        "nothing (a collapsed fine-tune? check its loss and the generation log)"
        for where, scored in named for (model, variant), n in empty_variants(scored).items()
    ]
    partly = [f"{where}{s.model} / {s.variant} / {s.config}: {s.empty_generations} of {s.n} answers empty"
              for where, scored in named for s in scored
              if s.kind == "decoding" and s.empty_generations and s.n and s.empty_generations < s.n]
    items = []
    if split_manifest:
        counts = split_manifest.get("counts") or {}
        examples = counts.get("dropped_examples") or {}
        dropped = counts.get("dropped") or {}
        detail = _reason_counts(dropped)
        if examples:
            detail += " (first: " + "; ".join(f"{r.replace('_', ' ')} at {', '.join(at)}" for r, at in
                                               sorted(examples.items())) + ")"
        items.append(f"split: {counts.get('read', '?')} records read, {counts.get('usable', '?')} usable, "
                     f"{counts.get('train', '?')} train / {counts.get('test', '?')} test; dropped: {detail}")
        for field, column in (split_manifest.get("absent_columns") or {}).items():
            items.append(f"split: column '{column}' (dataset.fields.{field}) is not in the data: every {field} is empty")
    for results in evaluation_sets:
        counts = (results.manifest or {}).get("counts")
        if not counts:
            items.append(f"evaluation set {results.name}: no manifest, drops unknown")
            continue
        detail = _reason_counts(counts.get("dropped"))
        if counts.get("beyond_max_rows"):
            detail += f"; beyond max_rows {counts['beyond_max_rows']}"
        items.append(f"evaluation set {results.name}: {counts.get('read', '?')} records read, "
                      f"{counts.get('usable', '?')} usable, {counts.get('test', '?')} evaluated; dropped: {detail}")
    for model, record in finetune.items():
        metrics = record.get("metrics") or {}
        if "train_rows" in metrics:
            items.append(f"fine-tune {model}: {metrics['train_rows']} rows trained; dropped: "
                         f"{_reason_counts(metrics.get('dropped_rows'))}; truncated to max_seq_length: "
                         f"{metrics.get('truncated_rows', 0)}")
    if not (warnings or partly or items):
        return
    doc.heading(2, "Data checks")
    if warnings:
        doc.bullets(warnings)
    if items or partly:
        doc.paragraph("Rows left out or cut, by reason (`dataset.on_bad_rows: error` turns them into failures):"
                      if items else "Answers:")
        doc.bullets(items + partly)
