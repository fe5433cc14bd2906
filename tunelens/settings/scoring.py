"""Config section `scoring` and its `bertscore`, `judge` and `human` parts."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from tunelens.settings.base import Section, computed_setting, section, setting


def _registry():
    # Imported by name on purpose (as tunelens.schema did): a job's code hash (tunelens.codehash) follows import
    # statements, and the metric code must not become code of every job that reads the config.
    return importlib.import_module("tunelens.scoring.metrics")


@dataclass(frozen=True, kw_only=True)
class BertScoreSection(Section):
    model: str = setting("embedded:all-minilm-l6-v2",
        "'embedded:all-minilm-l6-v2' (offline) or a hub id / local path of a BERT-like model.",
        schema={"type": "string"})
    num_layers: int | None = setting(None,
        "Layer to read embeddings from; null = bert-score's default for the model (6 for MiniLM).",
        schema={"type": ["integer", "null"], "minimum": 1})
    batch_size: int = setting(64, "Pairs per BERTScore forward pass.",
        schema={"type": "integer", "minimum": 1, "maximum": 4096})
    rescale_with_baseline: bool = setting(False,
        "Rescale F1 with a baseline file (needs baseline_path) so unrelated texts score near 0.",
        schema={"type": "boolean"})
    baseline_path: str | None = setting(None, "CSV LAYER,P,R,F; required for rescaling with a local model.",
        schema={"type": ["string", "null"]})
    lang: str = setting("en", "Language code bert-score records (needed by its rescaling).",
        schema={"type": "string"})
    gpus: int = setting(0,
        "GPUs a score job asks the scheduler for; 0 suits MiniLM (BERTScore runs on a GPU whenever the job sees one "
        "and device allows).",
        schema={"type": "integer", "minimum": 0})


@dataclass(frozen=True, kw_only=True)
class JudgeSection(Section):
    enabled: bool = setting(False, "Run the LLM judge.",
        schema={"type": "boolean"})
    model: str | None = setting(None,
        "A model name from `models` (its base weights) or a hub id / local path of an instruction-tuned model.",
        schema={"type": ["string", "null"]})
    batch_size: int = setting(8, "Rows per forward pass of the judge.",
        schema={"type": "integer", "minimum": 1, "maximum": 4096})


@dataclass(frozen=True, kw_only=True)
class HumanSection(Section):
    enabled: bool = setting(True, "Write the rating sheet (and read filled sheets back).",
        schema={"type": "boolean"})
    sample_size: int = setting(20, "Answers per model, variant and config on the sheet.",
        schema={"type": "integer", "minimum": 1, "maximum": 100000})
    ratings_dir: str = setting("human_ratings",
        "Folder where filled rating sheets are placed (read back into a Human score).",
        schema={"type": "string"})


@dataclass(frozen=True, kw_only=True)
class ScoringSection(Section):
    metrics: list = computed_setting(lambda: _registry().default_metric_names(),
        "Metrics computed from generation files: any metric registered in tunelens.scoring.metrics with a compute function "
        "(default: bleu, rougeL, bertscore, codebleu, exact_match, length); a metric for other dataset kinds "
        "(codebleu: code) is skipped with a reason.",
        schema=lambda: {"type": "array", "uniqueItems": True, "items": {"enum": _registry().scored_metric_names()}})
    perplexity: bool = setting(True,
        "Perplexity of the test references under each model variant (teacher-forced, response tokens only).",
        schema={"type": "boolean"})
    perplexity_batch_size: int = setting(8, "Rows per forward pass in the perplexity job.",
        schema={"type": "integer", "minimum": 1, "maximum": 4096})
    bootstrap_samples: int = setting(1000,
        "Bootstrap resamples for every CI (seeded with `seed`). Memory grows with resamples x evaluated rows; a "
        "combination over ~4 GiB is rejected before any job.",
        schema={"type": "integer", "minimum": 100, "maximum": 1000000})
    confidence: float = setting(0.95, "Level of the percentile bootstrap CIs.",
        schema={"type": "number", "exclusiveMinimum": 0.5, "exclusiveMaximum": 1})
    multiple_comparisons: str = setting("bh",
        "Adjustment of the bootstrap p-values over each model's fine-tuned vs base comparisons (every decoding "
        "config, layer and metric) before a paired cell is marked significant (adjusted p < 1 - confidence): holm = "
        "Holm (family-wise error rate), bh = Benjamini-Hochberg (false discovery rate), none = each comparison at "
        "its own level. The CIs stay unadjusted. The smallest bootstrap p-value is 2 / (bootstrap_samples + 1), so "
        "holm can mark a cell only when bootstrap_samples > 2 x comparisons / (1 - confidence) - 1 (about 3,100 for "
        "78 comparisons at 95%); the report says so when it cannot.",
        schema={"type": "string", "enum": ["holm", "bh", "none"]})
    bertscore: BertScoreSection = section(BertScoreSection, "BERTScore model and options.")
    judge: JudgeSection = section(JudgeSection,
        "Optional LLM judge that rates each answer 1-5 against the reference.")
    human: HumanSection = section(HumanSection, "Blind human rating sheets and their read-back into a Human score.")
