"""What every part of the report shares: its settings, the fixed orders and the metric display info."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import pandas as pd

from tunelens.scoring.metrics import METRICS

VARIANT_ORDER = ("base", "finetuned")
DIFF_VARIANT = "finetuned-base"  # `variant` of paired-difference rows in summary.csv
POOLED = "all"  # model/variant/config of statistics pooled over several of them
REFERENCE_METRICS = ("judge", "human")  # what automatic metrics are compared against
CSV_COLUMNS = (
    "evaluation_set", "model", "variant", "config", "layer", "metric", "statistic", "value", "ci_low", "ci_high", "n",
    "scale", "p_value", "p_adjusted",
)  # p_value / p_adjusted: paired differences only (tunelens.scoring.statistics.P_VALUE_METHOD, adjust_p_values)
DATE_PREFIX = "Generated: "


@dataclass(frozen=True)
class MetricInfo:
    """How a metric is shown: label, scale text, better direction (None = none) and decimals."""

    label: str
    scale: str
    higher_is_better: bool | None
    decimals: int


CORRELATION = MetricInfo("", "-1..1", True, 3)


def metric_info(metric: str) -> MetricInfo:
    """Display info of a metric from the registry (tunelens.scoring.metrics); an unregistered metric is shown by
    name with 3 decimals and no direction (not ranked)."""
    spec = METRICS.get(metric)
    if spec is None:
        return MetricInfo(metric, "as scored", None, 3)
    return MetricInfo(spec.label, spec.shown_scale, spec.higher_is_better, spec.decimals)


def metric_order(metrics: Iterable[str]) -> list[str]:
    """Registered metrics in registry order, then unregistered ones alphabetically."""
    unique = set(metrics)
    known = [m for m in METRICS if m in unique]
    return known + sorted(unique - set(known))


@dataclass
class ReportSettings:
    """Parameters that change the report (all are rule params).

    decoding_configs: config name -> its fields (top_k, num_beams, temperature, ...), in study order.
    default_config: the config of the model overview and of the paired comparisons.
    bootstrap_samples / confidence / seed: for every CI the report computes itself
    (paired differences, rank correlations); metric CIs come from the score files.
    config_hash / git_commit: provenance, computed by the rule.
    evaluation_set: label of the training data's own test split (the default set; dataset.name), the
    `evaluation_set` of its summary.csv rows.
    multiple_comparisons: scoring.multiple_comparisons, the p-value adjustment over each model's paired
    comparisons ('bh' (default), 'holm' or 'none'; tunelens.scoring.statistics.adjust_p_values); a paired cell is marked
    significant when its adjusted p-value is below 1 - confidence.
    """

    decoding_configs: dict[str, dict]
    default_config: str
    bootstrap_samples: int = 1000
    confidence: float = 0.95
    seed: int = 1234
    config_hash: str = "unknown"
    git_commit: str = "unknown"
    evaluation_set: str = "test"
    multiple_comparisons: str = "bh"

    def __post_init__(self) -> None:
        from tunelens.scoring.statistics import ADJUSTMENTS

        if self.multiple_comparisons not in ADJUSTMENTS:
            raise ValueError(f"scoring.multiple_comparisons: '{self.multiple_comparisons}'; expected one of "
                             f"{list(ADJUSTMENTS)}")

    @property
    def alpha(self) -> float:
        """The significance level of the paired tables: 1 - confidence."""
        return 1.0 - self.confidence

    @property
    def ci_label(self) -> str:
        return f"{self.confidence * 100:g}% CI"


def order_index(values: Iterable[str], preferred: Sequence[str] = ()) -> dict[str, int]:
    """Rank of each value: preferred ones first in their order, then others in first-seen order."""
    order: dict[str, int] = {}
    for value in list(preferred) + list(values):
        order.setdefault(value, len(order))
    return order


def variants(part: pd.DataFrame) -> list[str]:
    """The variants present in a table, base and finetuned first."""
    present = list(dict.fromkeys(part["variant"]))
    return [v for v in VARIANT_ORDER if v in present] + [v for v in present if v not in VARIANT_ORDER]
