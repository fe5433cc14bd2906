"""The fine-tuned − base paired table of two summary.csv files side by side, with the changed cells named.

For checking a change to the report's statistics on real results (issue 22: docs/scoring.md shows one):

    python -m tunelens.report.compare before/summary.csv after/summary.csv [--config NAME] [--confidence 0.95]

`--config`: the decoding config of the table (default: the config of the first paired row that has one).
A summary.csv written before p-values existed marks significance by its CI excluding 0 (what its summary
showed); one with `p_adjusted` by the adjusted p-value below 1 − confidence.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd

from tunelens.report.common import metric_info, metric_order
from tunelens.report.tables import Cell, Table, format_estimate, markdown_table


def _read(path: str | Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"config": str, "model": str, "variant": str, "metric": str, "statistic": str},
                       keep_default_na=False, na_values={c: [""] for c in ("layer", "value", "ci_low", "ci_high",
                                                                          "n", "p_value", "p_adjusted")})


def _significant(row: pd.Series, alpha: float) -> bool:
    if "p_adjusted" in row and pd.notna(row.get("p_adjusted")):
        return bool(row["p_adjusted"] < alpha)
    return bool(math.isfinite(row["ci_low"]) and math.isfinite(row["ci_high"])
                and (row["ci_low"] > 0 or row["ci_high"] < 0))


def paired_before_after(before: str | Path, after: str | Path, config: str | None = None,
                        confidence: float = 0.95, evaluation_set: str | None = None) -> str:
    """Markdown: per model and metric, the base and fine-tuned scores and the paired difference before and
    after, and which cells changed (difference, CI, significance) at the table's decimals."""
    old, new = _read(before), _read(after)
    if evaluation_set is not None:
        old, new = old[old["evaluation_set"] == evaluation_set], new[new["evaluation_set"] == evaluation_set]
    alpha = 1.0 - confidence
    paired = new[(new["statistic"] == "paired_difference") & new["layer"].isna()]
    if config is None:
        configs = [c for c in paired["config"] if c]
        config = configs[0] if configs else ""

    def pick(table: pd.DataFrame, statistic: str, model: str, variant: str, metric: str) -> pd.Series | None:
        want = "" if metric == "perplexity" else config
        match = table[(table["statistic"] == statistic) & (table["model"] == model) & (table["variant"] == variant)
                      & (table["metric"] == metric) & (table["config"] == want) & table["layer"].isna()]
        return None if match.empty else match.iloc[0]

    rows = []
    models = list(dict.fromkeys(paired["model"]))
    for model in models:
        metrics = metric_order(set(paired[paired["model"] == model]["metric"]))
        for metric in metrics:
            decimals = metric_info(metric).decimals
            base, tuned = (pick(new, "score", model, v, metric) for v in ("base", "finetuned"))
            was, now = (pick(t, "paired_difference", model, "finetuned-base", metric) for t in (old, new))

            def text(row: pd.Series | None) -> tuple[str, str, str, bool]:
                if row is None:
                    return "–", "–", "–", False
                estimate = format_estimate(row["value"], row["ci_low"], row["ci_high"], decimals, signed=True)
                point, _, interval = estimate.partition(" ")
                return estimate, point, interval, _significant(row, alpha)

            before_text, before_point, before_ci, before_sig = text(was)
            after_text, after_point, after_ci, after_sig = text(now)
            changed = [name for name, a, b in (("difference", before_point, after_point), ("CI", before_ci, after_ci),
                                               ("significance", before_sig, after_sig)) if a != b]
            p_adj = "–" if now is None or pd.isna(now.get("p_adjusted")) else f"{now['p_adjusted']:.3f}"
            rows.append([Cell(model), Cell(metric_info(metric).label),
                         Cell("–" if base is None else format_estimate(base["value"], math.nan, math.nan, decimals)),
                         Cell("–" if tuned is None else format_estimate(tuned["value"], math.nan, math.nan, decimals)),
                         Cell(before_text + (" *" if before_sig else "")), Cell(after_text + (" *" if after_sig else "")),
                         Cell(p_adj), Cell(", ".join(changed) or "–")])
    header = ["Model", "Metric", "Base", "Fine-tuned", "Before: fine-tuned − base", "After: fine-tuned − base",
              "p adj. (after)", "Changed"]
    return (f"Config `{config}`; * = significant (before: the CI excludes 0; after: adjusted p < {alpha:g}).\n\n"
            + markdown_table(Table(header, rows, ["l", "l", "r", "r", "r", "r", "r", "l"])) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--config", default=None)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--evaluation-set", default=None)
    args = parser.parse_args(argv)
    print(paired_before_after(args.before, args.after, args.config, args.confidence, args.evaluation_set), end="")


if __name__ == "__main__":
    main()
