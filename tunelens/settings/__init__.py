"""Typed config sections: every config key is declared once, as a dataclass field with its default, help text and
JSON-schema keywords (`tunelens.settings.base.setting`), in the section of the stage that reads it:

  data.py        dataset, evaluation_sets[], models.<name> (and its resources)
  finetune.py    finetune (models.<name>.finetune overrides it per model)
  generation.py  decoding (its parameters themselves: tunelens.generation.decoding.DecodingConfig), generation
  scoring.py     scoring (bertscore, judge, human)
  probe.py       probe (early_exit)
  here           report, and `ConfigSection`, the whole config

The config schema's properties are derived from these classes (`config_schema`, used by tunelens.schema), so a
new key is one field: the schema validates it, fills its default and documents it, and `from_dict` reads it.
Code reads attributes (`study.settings.scoring.judge.enabled`, `settings.lora_r`), never string keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunelens.settings.base import Section, entries, object_schema, section, setting
from tunelens.settings.data import (
    DatasetSection, EvaluationFieldsSection, EvaluationSetSection, FieldsSection, ModelSection, ResourcesSection,
)
from tunelens.settings.finetune import FinetuneSection
from tunelens.settings.generation import DecodingSection, GenerationSection
from tunelens.settings.probe import EarlyExitSection, ProbeSection
from tunelens.settings.scoring import BertScoreSection, HumanSection, JudgeSection, ScoringSection

NAME_PATTERN = "^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # names that become paths (models, datasets, evaluation sets)

__all__ = [
    "BertScoreSection", "ConfigSection", "DatasetSection", "DecodingSection", "EarlyExitSection",
    "EvaluationFieldsSection", "EvaluationSetSection", "FieldsSection", "FinetuneSection", "GenerationSection",
    "HumanSection", "JudgeSection", "ModelSection", "ProbeSection", "ReportSection", "ResourcesSection",
    "ScoringSection", "Section", "config_schema",
]


@dataclass(frozen=True, kw_only=True)
class ReportSection(Section):
    default_config: str | None = setting(None,
        "Decoding config name used in the model overview; null = the one built from decoding.defaults.",
        schema={"type": ["string", "null"]})


@dataclass(frozen=True, kw_only=True)
class ConfigSection(Section):
    """A whole tunelens config (after schema validation and default filling)."""

    seed: int = setting(1234, "Seed for the split, fine-tuning, sampling and bootstrap CIs.",
        schema={"type": "integer"})
    device: str = setting("auto", "Where model jobs run. auto = cuda when available, else cpu.",
        schema={"enum": ["auto", "cpu", "cuda"]})
    dataset: DatasetSection = section(DatasetSection,
        "The instruction dataset: where it comes from, its columns and the train/test split.", required=True)
    evaluation_sets: list[EvaluationSetSection] = entries(EvaluationSetSection,
        "Extra held-out sets every model and variant is also evaluated on (generation, scores with CIs, perplexity, "
        "judge, human sheet), under results/eval/<name>/. Each is used whole as test data (never split); rows whose "
        "instruction+input is in the training split are dropped and counted in results/eval/<name>/manifest.json. "
        "The training data's own test split stays the default set.",
        [], schema={"type": "array"})
    models: dict[str, ModelSection] = entries(ModelSection,
        "Model name -> model entry. The name is used in paths and tables.",
        schema={"type": "object", "minProperties": 1, "propertyNames": {"pattern": NAME_PATTERN}}, keyed=True)
    finetune: FinetuneSection = section(FinetuneSection,
        "LoRA / QLoRA fine-tuning settings for every model (models.<name>.finetune overrides per model).")
    decoding: DecodingSection = section(DecodingSection,
        "The decoding configs to compare (sweep or list) and the limits every generation shares.")
    generation: GenerationSection = section(GenerationSection,
        "How answers are generated: backend, batching, prompt limits, vLLM engine options.")
    scoring: ScoringSection = section(ScoringSection,
        "Metrics, bootstrap CIs, perplexity, BERTScore, LLM judge and human ratings.")
    probe: ProbeSection = section(ProbeSection, "Logit lens and early exit per layer.")
    report: ReportSection = section(ReportSection, "The summary tables.")


def config_schema() -> dict:
    """The schema's root object: every key of `ConfigSection`, nested sections included."""
    return object_schema(ConfigSection)
