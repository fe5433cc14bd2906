"""What produced the results, as the summary's closing sections: fine-tuning records, skipped metrics and
provenance (config hash, git commit, models and adapters, library versions)."""

from __future__ import annotations

from typing import Any, Sequence

from tunelens.io import library_versions
from tunelens.report.common import ReportSettings, metric_info
from tunelens.report.inputs import ScoreFile
from tunelens.report.tables import Cell, Document, Table
from tunelens.training.outputs import loss_windows, window_text


def finetune_section(doc: Document, finetune: dict[str, dict]) -> None:
    doc.heading(2, "Fine-tuning")
    if not finetune:
        doc.paragraph("No fine-tuned models.")
        return
    for model, record in finetune.items():
        metrics = record.get("metrics") or {}
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}
        chosen = {k: scalars[k] for k in FINETUNE_FIELDS if k in scalars}
        scalars = chosen or scalars  # the finetune stage's key facts; any other metrics.json: all scalars
        doc.heading(3, model)
        log_rows = record.get("train_log") or []
        losses = [r for r in log_rows if isinstance(r.get("loss"), (int, float))]
        items = [f"`{k}`: {_scalar_text(v)}" for k, v in scalars.items()]
        if losses:
            items.append(loss_summary(losses))
        doc.bullets(items or ["metrics.json has no scalar values"])


def loss_summary(losses: list[dict]) -> str:
    """The training loss as the mean of the first and of the last 10% of logged steps (the divergence check's
    windows, tunelens.training.outputs.loss_windows), with the window and the single steps' range stated."""
    window = loss_windows(losses)
    values = [float(r["loss"]) for r in losses]
    return (f"train loss (mean cross-entropy per response token, nats): {window['first']:.4f} "
            f"({window_text(window['first_steps'])}) → {window['last']:.4f} ({window_text(window['last_steps'])}); "
            f"windows: the first and last {window['fraction']:.0%} of {window['logged']} logged steps, "
            f"{window['size']} step(s) each (one logged step is one batch); single steps range "
            f"{min(values):.4f}–{max(values):.4f}")


# Keys of the finetune stage's metrics.json shown in the summary (the rest stays in the file). Its single-step
# first_loss / final_loss are left out: the loss line gives the windowed means.
FINETUNE_FIELDS = ("method", "train_rows", "trainable_params", "trainable_percent", "steps", "epochs",
                   "train_time_s", "tokens_per_s")


def _scalar_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "–" if value is None else str(value)


def notes_section(doc: Document, files: Sequence[ScoreFile], evaluation_set: str = "test",
                  evaluation_sets: Sequence[tuple[str, Sequence[ScoreFile]]] = ()) -> None:
    """Skipped metrics, each with the evaluation set it was skipped on (the training data's own test split
    `evaluation_set`, or an extra set), the reason and the models."""
    skipped: dict[tuple[str, str, str], list[str]] = {}
    for name, scored in [(evaluation_set, files), *evaluation_sets]:
        for score in scored:
            for metric, reason in score.skipped.items():
                skipped.setdefault((metric, name, str(reason)), []).append(score.model)
    if skipped:
        doc.heading(2, "Skipped metrics")
        doc.bullets([f"{metric_info(m).label} on `{name}`: {reason} ({', '.join(dict.fromkeys(models))})"
                     for (m, name, reason), models in skipped.items()])


def provenance(files: Sequence[ScoreFile], settings: ReportSettings,
               finetune: dict[str, dict] | None = None) -> dict[str, Any]:
    """What produced the results: config hash, git commit, models and adapters, library versions.

    Adapter hashes come from the generation meta embedded in the score files (`source.adapter`), so
    they name the adapter that produced the scored text; the finetune stage's hash is listed next to it.
    """
    models = {}
    for score in files:
        source = score.source or {}
        model = source.get("model") or {}
        adapter = source.get("adapter") or {}
        key = (score.model, score.variant)
        entry = models.setdefault(key, {"source": set(), "adapter": set(), "backend": set()})
        if model.get("source"):
            # a hub model's download names the commit it holds (tunelens.hub)
            revision = f"@{model['revision']}" if model.get("revision") else ""
            entry["source"].add(f"{model['source']}{revision}")
        if adapter.get("sha256"):
            entry["adapter"].add(str(adapter["sha256"]))
        if source.get("backend"):
            entry["backend"].add(str(source["backend"]))
    trained = {}
    for model, record in (finetune or {}).items():
        adapter = (record.get("metrics") or {}).get("adapter") or {}
        if adapter.get("sha256"):
            trained[model] = str(adapter["sha256"])
    versions: dict[str, set[str]] = {}
    for score in files:
        for package, version in score.versions.items():
            versions.setdefault(package, set()).add(str(version))
    report_versions = library_versions()
    for package in ("pandas", "numpy", "scipy", "matplotlib"):
        try:
            import importlib.metadata as md

            report_versions[package] = md.version(package)
        except Exception:
            continue
    return {"config_hash": settings.config_hash, "git_commit": settings.git_commit, "models": models,
            "trained_adapters": trained, "score_versions": versions, "report_versions": report_versions}


def provenance_section(doc: Document, files: Sequence[ScoreFile], settings: ReportSettings,
                        finetune: dict[str, dict]) -> None:
    info = provenance(files, settings, finetune)
    doc.heading(2, "Provenance")
    doc.bullets([f"config hash (sha256 of the validated config): `{info['config_hash']}`",
                 f"git commit: `{info['git_commit']}`",
                 f"score files: {len(files)}"])
    rows = []
    for (model, variant), entry in info["models"].items():
        trained = info["trained_adapters"].get(model) if variant != "base" else None
        if trained and trained in entry["adapter"]:
            trained_text = "same"
        elif trained:
            trained_text = f"`{trained[:16]}` (DIFFERS: scores are from another adapter)"
        else:
            trained_text = "–"
        rows.append([Cell(model), Cell(variant), Cell(", ".join(f"`{s}`" for s in sorted(entry["source"])) or "–"),
                     Cell(", ".join(f"`{a[:16]}`" for a in sorted(entry["adapter"])) or "–"), Cell(trained_text),
                     Cell(", ".join(sorted(entry["backend"])) or "–")])
    if rows:
        doc.table(Table(["Model", "Variant", "Source", "Adapter sha256 (16) in generations",
                         "Adapter of the fine-tune run", "Backend"], rows, ["l"] * 6))
    if info["score_versions"]:
        doc.paragraph("Libraries that produced the scores (from the score files; several versions = mixed runs):")
        doc.bullets([f"{p} {', '.join(sorted(v))}" + (" (MIXED)" if len(v) > 1 else "")
                     for p, v in sorted(info["score_versions"].items())])
    doc.paragraph("Libraries of the report job: " + ", ".join(f"{p} {v}" for p, v in sorted(info["report_versions"].items())) + ".")
