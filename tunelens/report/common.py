"""What every part of the report shares: its settings, the fixed orders and the metric display info."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import pandas as pd

VARIANT_ORDER = ("base", "finetuned")
DIFF_VARIANT = "finetuned-base"  # `variant` of paired-difference rows in summary.csv
POOLED = "all"  # model/variant/config of statistics pooled over several of them
REFERENCE_METRICS = ("judge", "human")  # what automatic metrics are compared against
CSV_COLUMNS = (
    "model", "variant", "config", "layer", "metric", "statistic", "value", "ci_low", "ci_high", "n", "scale",
)
DATE_PREFIX = "Generated: "


@dataclass(frozen=True)
class MetricInfo:
    """How a metric is shown: label, scale text, better direction (None = none) and decimals."""

    label: str
    scale: str
    higher_is_better: bool | None
    decimals: int


METRICS: dict[str, MetricInfo] = {
    "bleu": MetricInfo("BLEU", "0-100", True, 1),
    "rougeL": MetricInfo("ROUGE-L", "0-1", True, 3),
    "bertscore": MetricInfo("BERTScore", "0-1", True, 3),
    "codebleu": MetricInfo("CodeBLEU", "0-1", True, 3),
    "exact_match": MetricInfo("Exact match", "0-1", True, 3),
    "perplexity": MetricInfo("Perplexity", ">=1, lower is better", False, 2),
    "judge": MetricInfo("Judge", "0-1", True, 3),
    "human": MetricInfo("Human", "0-1", True, 3),
    "length": MetricInfo("Length", "generated tokens", None, 1),
}
CORRELATION = MetricInfo("", "-1..1", True, 3)


def metric_info(metric: str) -> MetricInfo:
    """Display info of a metric; an unknown metric is shown by name with 3 decimals, no direction."""
    return METRICS.get(metric, MetricInfo(metric, "as scored", None, 3))


def metric_order(metrics: Iterable[str]) -> list[str]:
    """Known metrics in the documented order, then unknown ones alphabetically."""
    known = list(METRICS)
    unique = set(metrics)
    return [m for m in known if m in unique] + sorted(unique - set(known))


@dataclass
class ReportSettings:
    """Parameters that change the report (all are rule params).

    decoding_configs: config name -> its fields (top_k, num_beams, temperature, ...), in study order.
    default_config: the config of the model overview and of the paired comparisons.
    bootstrap_samples / confidence / seed: for every CI the report computes itself
    (paired differences, rank correlations); metric CIs come from the score files.
    config_hash / git_commit: provenance, computed by the rule.
    """

    decoding_configs: dict[str, dict]
    default_config: str
    bootstrap_samples: int = 1000
    confidence: float = 0.95
    seed: int = 1234
    config_hash: str = "unknown"
    git_commit: str = "unknown"

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
