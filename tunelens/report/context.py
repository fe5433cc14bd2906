"""What every section of the summary document reads: SummaryContext (the summary table and the views of it
derived once), the extra evaluation sets' results, and the decoding configs' fields (the sweep plots use them too).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

import pandas as pd

from tunelens.report.common import ReportSettings
from tunelens.report.inputs import ScoreFile


def config_fields(settings: ReportSettings, files: Sequence[ScoreFile]) -> dict[str, dict]:
    """Fields of each decoding config: from the study (params) or, for others, the generation meta."""
    fields = {name: dict(values) for name, values in settings.decoding_configs.items()}
    for score in files:
        if score.kind == "decoding" and score.config not in fields:
            meta = (score.source or {}).get("decoding_config") or {}
            fields[score.config] = {k: v for k, v in meta.items() if k != "name"}
    return fields


def swept_fields(config_fields: dict[str, dict]) -> list[str]:
    """Decoding fields that take more than one value across the configs, in field order."""
    keys: list[str] = []
    for values in config_fields.values():
        keys += [k for k in values if k not in keys and k != "name"]
    return [k for k in keys if len({json.dumps(v.get(k)) for v in config_fields.values()}) > 1]


def _lookup(scores: pd.DataFrame) -> dict[tuple, dict]:
    return {
        (r["model"], r["variant"], r["config"], None if pd.isna(r["layer"]) else int(r["layer"]), r["metric"]): r
        for r in scores.to_dict("records")
    }


@dataclass
class SummaryContext:
    """What the sections share: the inputs, the summary table and the views of it derived once."""

    files: Sequence[ScoreFile]
    summary: pd.DataFrame
    settings: ReportSettings
    finetune: dict[str, dict]
    human_sheets: Sequence[str]
    scores: pd.DataFrame  # summary rows with statistic 'score'
    by_key: dict[tuple, dict]  # (model, variant, config, layer, metric) -> score row
    models: list[str]
    config_fields: dict[str, dict]
    swept: list[str]  # decoding fields that vary across the configs present

    @property
    def default(self) -> str:
        return self.settings.default_config

    @property
    def ci(self) -> str:
        return self.settings.ci_label


@dataclass
class EvaluationSetResults:
    """One extra evaluation set (results/eval/<name>/): its score files, summary rows and manifest."""

    name: str
    files: Sequence[ScoreFile]
    summary: pd.DataFrame
    manifest: dict | None = None
    human_sheets: Sequence[str] = ()


def _context(files: Sequence[ScoreFile], summary: pd.DataFrame, settings: ReportSettings,
             finetune: dict[str, dict], human_sheets: Sequence[str]) -> SummaryContext:
    scores = summary[summary["statistic"] == "score"]
    fields = config_fields(settings, files)
    return SummaryContext(
        files=files, summary=summary, settings=settings, finetune=finetune, human_sheets=human_sheets,
        scores=scores, by_key=_lookup(scores), models=list(dict.fromkeys(scores["model"])), config_fields=fields,
        swept=swept_fields({c: fields[c] for c in fields if c in set(scores["config"])}),
    )
