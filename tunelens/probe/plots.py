"""Logit-lens plots: the top-token heatmap and the entropy per layer (PNG, through io.save_figure_atomic).
Used through tunelens.probe.lens (write_logit_lens)."""

from __future__ import annotations

import logging
from pathlib import Path

from tunelens.io import save_figure_atomic

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- plots
def _label(text: str, width: int = 10) -> str:
    """A token as a readable, short plot label (whitespace made visible, mathtext '$' escaped)."""
    text = text.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "\u2423")
    text = text if len(text) <= width else text[: width - 1] + "\u2026"
    return text.replace("$", r"\$") or "''"


def plot_lens_heatmap(lens: dict, path: str | Path) -> None:
    """One panel per prompt: layers (rows, last on top) x positions (columns, labelled by the input token);
    each cell shows the layer's top-1 token, coloured by its probability (0-1)."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    prompts = lens["prompts"]
    layers = lens["layers"]
    n_pos = max(len(p["positions"]) for p in prompts)
    fig, axes = plt.subplots(
        len(prompts), 1, squeeze=False, layout="constrained",
        figsize=(max(6.0, 1.1 * n_pos + 2), max(2.5, (0.45 * len(layers) + 1.3)) * len(prompts)),
    )
    image = None
    for ax, prompt in zip(axes[:, 0], prompts):
        positions = prompt["positions"]
        grid = np.full((len(layers), len(positions)), np.nan)
        for col, entry in enumerate(positions):
            for row, cell in enumerate(reversed(entry["layers"])):
                grid[row, col] = cell["top"][0]["prob"]
                ax.text(col, row, _label(cell["top"][0]["token"], 8), ha="center", va="center", fontsize=7,
                        color="white" if cell["top"][0]["prob"] > 0.6 else "black")
        image = ax.imshow(grid, aspect="auto", cmap="Blues", vmin=0.0, vmax=1.0)
        ax.set_yticks(range(len(layers)), [f"layer {layer}" for layer in reversed(layers)], fontsize=8)
        ax.set_xticks(range(len(positions)), [_label(e["token"]) for e in positions], fontsize=7, rotation=45,
                      ha="right")
        ax.set_title(_label(prompt["instruction"], 70), fontsize=9, loc="left")
    fig.suptitle(f"Logit lens, top-1 next token per layer: {lens['model']['name']} ({lens['variant']})", fontsize=10)
    fig.colorbar(image, ax=axes[:, 0].tolist(), label="top-1 probability", shrink=0.8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # missing glyphs for some tokens are expected
        save_figure_atomic(fig, path, dpi=120)
    plt.close(fig)


def plot_lens_entropy(lens: dict, path: str | Path) -> None:
    """Entropy (nats) and KL(final || layer) (nats) by layer: one thin line per prompt (mean over its
    positions) and their mean in bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = lens["layers"]
    fig, (ax_entropy, ax_kl) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    for key, ax, ylabel in (
        ("entropy", ax_entropy, "entropy of next-token distribution (nats)"),
        ("kl_to_final", ax_kl, "KL(final layer || layer) (nats)"),
    ):
        curves = []
        for prompt in lens["prompts"]:
            values = np.array([[cell[key] for cell in entry["layers"]] for entry in prompt["positions"]])
            curves.append(values.mean(axis=0))
            ax.plot(layers, curves[-1], color="grey", alpha=0.5, linewidth=1)
        ax.plot(layers, np.mean(curves, axis=0), color="C0", linewidth=2.5, marker="o", label="mean over prompts")
        ax.set_xlabel(f"layer (of {lens['num_layers']})")
        ax.set_ylabel(ylabel)
        ax.set_xticks(layers)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Logit lens by layer: {lens['model']['name']} ({lens['variant']})", fontsize=10)
    save_figure_atomic(fig, path, dpi=120)
    plt.close(fig)
