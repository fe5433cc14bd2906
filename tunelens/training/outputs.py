"""What a fine-tune leaves besides the adapter: the loss log and plot, the divergence check, memory and source records."""

from __future__ import annotations

import json
import math
import resource
from pathlib import Path
from typing import Any

from tunelens.errors import TunelensError
from tunelens.io import save_figure_atomic
from tunelens.settings.finetune import FinetuneSection

# What a train_log.jsonl row holds, in this order (missing values are left out of the row).
LOG_KEYS = ("step", "epoch", "loss", "learning_rate", "grad_norm", "tokens", "tokens_per_s", "mean_token_accuracy")


class DivergenceError(TunelensError):
    """Training diverged: the adapter would be garbage, and its scores would look like real results."""


# The last window's mean loss above this multiple of the first window's (and this much higher) is divergence.
DIVERGENCE_FACTOR = 2.0
DIVERGENCE_MIN_RISE = 0.5
# Share of the logged steps whose mean loss stands for the start and the end of training: one logged step is
# one batch (4 rows in the demo), whose loss alone swings by more than the whole run's improvement.
LOSS_WINDOW_FRACTION = 0.1


def loss_windows(rows: list[dict], fraction: float = LOSS_WINDOW_FRACTION) -> dict:
    """The mean loss over the first and over the last `fraction` of the logged steps (at least one step
    each; rows in step order): {"first", "last" (nats per response token), "size" (steps per window),
    "logged" (steps logged), "first_steps", "last_steps" ((first step, last step) of each window)}."""
    losses = [(row["step"], float(row["loss"])) for row in rows if isinstance(row.get("loss"), (int, float))]
    if not losses:
        raise ValueError("loss_windows: no logged loss")
    size = max(1, math.ceil(fraction * len(losses)))
    first, last = losses[:size], losses[-size:]
    return {"first": math.fsum(v for _, v in first) / size, "last": math.fsum(v for _, v in last) / size,
            "size": size, "logged": len(losses), "fraction": fraction,
            "first_steps": (first[0][0], first[-1][0]), "last_steps": (last[0][0], last[-1][0])}


def loss_window_record(rows: list[dict]) -> dict:
    """metrics.json's windowed loss keys: the first and last windows' mean loss and the window's size."""
    window = loss_windows(rows)
    return {"first_loss_window_mean": round(window["first"], 6), "last_loss_window_mean": round(window["last"], 6),
            "loss_window_steps": window["size"], "loss_window_fraction": window["fraction"],
            "logged_steps": window["logged"]}


def window_text(steps: tuple) -> str:
    """'step 3' for a one-step window, else 'mean of steps 1-4'."""
    return f"step {steps[0]}" if steps[0] == steps[1] else f"mean of steps {steps[0]}-{steps[1]}"


def check_divergence(rows: list[dict], settings: FinetuneSection | dict, name: str, model=None) -> None:
    """Fail when training blew up: a logged loss or gradient norm is not finite, the gradient vanished
    for good (a collapsed model: every logged step after the first has gradient norm 0), the mean loss of the
    last 10% of logged steps ends far above that of the first 10% (loss_windows; single batches are too noisy
    to compare), or (given `model`) a trained parameter is not finite."""
    lr = FinetuneSection.from_dict(settings).learning_rate
    for row in rows:
        for key in ("loss", "grad_norm"):
            if key in row and not math.isfinite(float(row[key])):
                raise DivergenceError(
                    f"fine-tune of '{name}' diverged: {key.replace('grad_norm', 'gradient norm')} is {row[key]} at "
                    f"step {row['step']} (first logged loss {rows[0]['loss']}); lower finetune.learning_rate ({lr}) "
                    "or check the data"
                )
    later = rows[1:]
    if later and all(row.get("grad_norm") == 0.0 for row in later):
        raise DivergenceError(
            f"fine-tune of '{name}' diverged: the gradient norm is 0 from step {later[0]['step']} on, with the loss "
            f"stuck at {float(later[-1]['loss']):.4g} (the model collapsed, e.g. to a uniform prediction); lower "
            f"finetune.learning_rate ({lr})"
        )
    if model is not None:
        for param_name, param in model.named_parameters():
            if param.requires_grad and not bool(param.detach().isfinite().all()):
                raise DivergenceError(f"fine-tune of '{name}' diverged: trained parameter {param_name} holds "
                                      f"non-finite values; lower finetune.learning_rate ({lr})")
    if len(rows) < 2:
        return
    window = loss_windows(rows)
    first, last = window["first"], window["last"]
    if last > DIVERGENCE_FACTOR * first and last - first > DIVERGENCE_MIN_RISE:
        raise DivergenceError(
            f"fine-tune of '{name}' diverged: loss rose from {first:.4g} ({window_text(window['first_steps'])}) to "
            f"{last:.4g} ({window_text(window['last_steps'])}), more than {DIVERGENCE_FACTOR:g}x (windows: the "
            f"first and last {window['size']} of {window['logged']} logged steps); lower finetune.learning_rate ({lr})"
        )


def train_log_rows(log_history: list[dict]) -> list[dict]:
    """The training rows of the trainer's log history (the final summary row has no 'loss')."""
    rows = []
    for entry in log_history:
        if "loss" not in entry:
            continue
        rows.append({key: entry[key] for key in LOG_KEYS if key in entry})
    return rows


def plot_loss(rows: list[dict], png_path: str | Path, title: str) -> None:
    """Loss (nats per response token) and learning rate against optimizer step, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png_path = Path(png_path)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    steps = [row["step"] for row in rows]
    ax.plot(steps, [row["loss"] for row in rows], marker="o", markersize=3, color="tab:blue", label="train loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean cross-entropy per response token, nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if any("learning_rate" in row for row in rows):
        ax_lr = ax.twinx()
        ax_lr.plot(steps, [row.get("learning_rate", float("nan")) for row in rows], color="tab:gray",
                   linestyle="--", linewidth=1, label="learning rate")
        ax_lr.set_ylabel("learning rate")
    fig.tight_layout()
    try:
        save_figure_atomic(fig, png_path)
    finally:
        plt.close(fig)


def _peak_memory() -> dict:
    import torch

    peak = {"cpu_max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        peak["cuda_max_reserved_mib"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    return peak


def _model_source(model_path: str) -> dict:
    """What the base model is: its path plus the materialisation record of embedded models."""
    from tunelens.models import SOURCE_RECORD

    source: dict[str, Any] = {"path": str(model_path)}
    record = Path(model_path) / SOURCE_RECORD
    if record.exists():
        source["record"] = json.loads(record.read_text(encoding="utf-8"))
    return source


def canonical_adapter_config(adapter_dir: str | Path) -> None:
    """Rewrite a saved adapter's adapter_config.json with its list-valued sets in sorted order.

    PEFT keeps `target_modules` (and `modules_to_save`, `layers_to_transform` when given as names) as a Python
    set and writes `list(set)`, whose order follows the process's string hash seed: two fine-tunes of the same
    rows wrote the same weights under a different adapter_config.json, so the adapter's hash in summary.md
    changed run to run. PEFT reads these fields back as sets, so the order carries no meaning."""
    path = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    changed = False
    for key in ("target_modules", "modules_to_save", "exclude_modules"):
        value = config.get(key)
        if isinstance(value, list) and all(isinstance(item, str) for item in value) and value != sorted(value):
            config[key] = sorted(value)
            changed = True
    if changed:
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
