"""Report plots (PNG, same bytes for the same data): decoding sweeps, early exit per layer, fine-tune loss."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd

from tunelens.io import save_figure_atomic
from tunelens.report.common import metric_info, metric_order, variants
from tunelens.report.context import swept_fields


def _plot_setup():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    """Write and close the figure; no software/date metadata, so the same data gives the same PNG bytes."""
    save_figure_atomic(fig, path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path


# Variants drawn differently, so a fine-tuned line lying on the base line stays visible.
VARIANT_STYLE = {"base": {"marker": "o", "linestyle": "-"}, "finetuned": {"marker": "s", "linestyle": "--"}}


def _style(variant: str) -> dict:
    return VARIANT_STYLE.get(variant, {"marker": "^", "linestyle": ":"})


def _panels(plt, count: int, width: float = 3.3, height: float = 2.8):
    """A figure with one panel per metric, at most 4 per row (constrained layout: no overlapping labels)."""
    columns = min(count, 4)
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows + 0.4), squeeze=False,
                             layout="constrained")
    flat = list(axes.flat)
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def plot_sweeps(scores: pd.DataFrame, config_fields: dict[str, dict], default: str, out_dir: Path,
                evaluation_set: str | None = None, suffix: str | None = None) -> list[Path]:
    """Per model and swept field: metric vs field value (others at default), base vs fine-tuned, CI bars.

    evaluation_set: named in each title (when the study has several sets); suffix: added to the file names
    (`sweep_<model>_<field>__<suffix>.png`), so each extra set's plots sit beside the default set's.
    """
    plt = _plot_setup()
    written = []
    decoding = scores[scores["kind"].isin(["decoding", "judge", "human"])]
    fields_present = {c: config_fields[c] for c in dict.fromkeys(decoding["config"]) if c in config_fields}
    if default not in fields_present:
        return written
    default_fields = fields_present[default]
    for field_name in swept_fields(fields_present):
        # The one-at-a-time slice: configs that differ from the default in this field only.
        slice_configs = {c: f[field_name] for c, f in fields_present.items()
                         if all(f.get(k) == default_fields.get(k) for k in default_fields if k != field_name)}
        if len(set(map(json.dumps, slice_configs.values()))) < 2:
            continue
        for model in dict.fromkeys(decoding["model"]):
            part = decoding[(decoding["model"] == model) & decoding["config"].isin(slice_configs)]
            metrics = metric_order(part["metric"])
            if part.empty:
                continue
            fig, axes = _panels(plt, len(metrics))
            for ax, metric in zip(axes, metrics):
                values = sorted({float(v) for v in slice_configs.values()})
                # Nudge the variants apart (2% of the x range) so overlapping CI bars stay readable.
                nudge = 0.02 * (values[-1] - values[0] or 1.0)
                for index, variant in enumerate(variants(part)):
                    points = part[(part["variant"] == variant) & (part["metric"] == metric)].copy()
                    points["x"] = points["config"].map(slice_configs).astype(float) + (index - 0.5) * nudge
                    points = points.sort_values("x")
                    low = (points["value"] - points["ci_low"]).clip(lower=0).fillna(0)
                    high = (points["ci_high"] - points["value"]).clip(lower=0).fillna(0)
                    ax.errorbar(points["x"], points["value"], yerr=[low, high], capsize=3, label=variant,
                                **_style(variant))
                ax.axvline(float(default_fields[field_name]), color="grey", lw=0.8, ls=":")
                ax.set_xticks(values)
                info = metric_info(metric)
                ax.set_title(f"{info.label} ({info.scale})", fontsize=9)
                ax.set_xlabel(field_name)
            axes[0].legend(fontsize=8)
            on_set = f" on {evaluation_set}" if evaluation_set else ""
            fig.suptitle(f"{model}{on_set}: metrics vs {field_name} (others at default; dotted = default)",
                         fontsize=10)
            ending = f"__{_safe(suffix)}" if suffix else ""
            written.append(_save(plt, fig, out_dir / f"sweep_{_safe(model)}_{_safe(field_name)}{ending}.png"))
    return written


def plot_layers(scores: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Per model: early-exit metric vs layer, base vs fine-tuned, with CI bands."""
    plt = _plot_setup()
    written = []
    layers = scores[scores["layer"].notna()]
    for model in dict.fromkeys(layers["model"]):
        part = layers[layers["model"] == model]
        metrics = metric_order(part["metric"])
        fig, axes = _panels(plt, len(metrics))
        for ax, metric in zip(axes, metrics):
            for variant in variants(part):
                points = part[(part["variant"] == variant) & (part["metric"] == metric)].sort_values("layer")
                x = points["layer"].astype(float)
                line = ax.plot(x, points["value"], label=variant, **_style(variant))[0]
                if points["ci_low"].notna().all():
                    ax.fill_between(x, points["ci_low"], points["ci_high"], alpha=0.2, color=line.get_color())
            info = metric_info(metric)
            ax.set_title(f"{info.label} ({info.scale})", fontsize=9)
            ax.set_xlabel("exit layer")
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{model}: early exit, metric vs layer", fontsize=10)
        written.append(_save(plt, fig, out_dir / f"layers_{_safe(model)}.png"))
    return written


def plot_loss(finetune: dict[str, dict], out_dir: Path) -> list[Path]:
    """Per fine-tuned model: training loss (and eval loss when logged) and learning rate vs step."""
    plt = _plot_setup()
    written = []
    for model, record in finetune.items():
        rows = record.get("train_log") or []
        train = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), (int, float)) and "step" in r]
        evals = [(r["step"], r["eval_loss"]) for r in rows if isinstance(r.get("eval_loss"), (int, float)) and "step" in r]
        rates = [(r["step"], r["learning_rate"]) for r in rows
                 if isinstance(r.get("learning_rate"), (int, float)) and "step" in r]
        if not train:
            continue
        fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(8, 3.0), layout="constrained")
        ax_loss.plot(*zip(*train), label="train loss")
        if evals:
            ax_loss.plot(*zip(*evals), marker="o", label="eval loss")
        ax_loss.set_xlabel("step")
        ax_loss.set_ylabel("loss (nats/token)")
        ax_loss.legend(fontsize=8)
        if rates:
            ax_lr.plot(*zip(*rates), color="tab:green")
        ax_lr.set_xlabel("step")
        ax_lr.set_ylabel("learning rate")
        fig.suptitle(f"{model}: fine-tuning", fontsize=10)
        written.append(_save(plt, fig, out_dir / f"loss_{_safe(model)}.png"))
    return written
