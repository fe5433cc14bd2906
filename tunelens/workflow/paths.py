"""Where a study's files go: the output kinds, the results root, the split, report and evaluation-set paths,
and the settings the workflow reads (typed, tunelens.settings; tunelens.workflow.Plan builds on StudyPaths)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tunelens.settings import ScoringSection

RESULTS = "results"

# Output kind -> path under a results root: RESULTS, or Plan.EVAL for an evaluation set. The one place a per-run
# path is spelled; rules (out), input functions and the report's input discovery (out_path) read it.
OUTPUTS = {
    "generation": "generations/{model}/{variant}/{decoding}.jsonl",
    "generation_meta": "generations/{model}/{variant}/{decoding}.meta.json",
    "scores": "scores/{model}/{variant}/{decoding}.json",
    "score_rows": "scores/{model}/{variant}/{decoding}.rows.csv",
    "judge": "judge/{model}/{variant}/{decoding}.json",
    "judge_rows": "judge/{model}/{variant}/{decoding}.rows.csv",
    "perplexity": "perplexity/{model}/{variant}.json",
    "perplexity_rows": "perplexity/{model}/{variant}.rows.csv",
    "lens": "probe/{model}/{variant}/lens.json",
    "early_exit": "probe/{model}/{variant}/early_exit/layer_{layer}.jsonl",
    "early_exit_meta": "probe/{model}/{variant}/early_exit/layer_{layer}.meta.json",
    "early_exit_scores": "probe/{model}/{variant}/early_exit/layer_{layer}.scores.json",
    "early_exit_rows": "probe/{model}/{variant}/early_exit/layer_{layer}.rows.csv",
    "early_exit_judge": "probe/{model}/{variant}/early_exit/layer_{layer}.judge.json",
    "early_exit_judge_rows": "probe/{model}/{variant}/early_exit/layer_{layer}.judge.rows.csv",
    "adapter": "finetune/{model}/adapter",
    "finetune_metrics": "finetune/{model}/metrics.json",
    "human_sheet": "human/sheet.csv",
    "human_key": "human/key.csv",
    "train_log": "finetune/{model}/train_log.jsonl",
    "loss_plot": "finetune/{model}/loss.png",
    "lens_heatmap": "probe/{model}/{variant}/lens_heatmap.png",
    "lens_entropy": "probe/{model}/{variant}/lens_entropy.png",
    "agreement": "agreement/{model}/{variant}.json",
    "model_dir": "models/{model}",
    "hub_model_dir": "hub/models/{model}",
}

REPORT_PLOT_GROUPS = {
    "sweep": "Metric vs decoding parameter",
    "layers": "Metric vs exit layer",
    "loss": "Fine-tuning loss",
}


def alternation(names) -> str:
    """A wildcard constraint matching exactly these names (regex-escaped, sorted); "" for none."""
    return "|".join(sorted(re.escape(name) for name in names))


def _accessor(name: str, fn):
    fn.__name__ = name
    return fn



class StudyPaths:
    """The paths of one study (a tunelens.config.Study), results under `results`, and the settings they follow."""

    def __init__(self, study, results: str = RESULTS):
        self.study = study
        self.config = study.config  # the validated config dict: hashed whole (report_config_hash), never indexed
        self.settings = study.settings  # the same config typed (tunelens.settings.ConfigSection): read by attribute
        self.models = study.models
        self.decoding = study.decoding
        self.evalsets = study.evaluation_sets
        self.dataset = study.dataset_name
        self.results = R = results
        self.EVAL = f"{R}/eval/{{evalset}}"
        self.HUB_DATASET_DIR = f"{R}/hub/datasets/{self.dataset}"
        self.SPLIT = {
            "train": f"{R}/data/{self.dataset}/train.jsonl",
            "test": f"{R}/data/{self.dataset}/test.jsonl",
            "manifest": f"{R}/data/{self.dataset}/manifest.json",
        }
        self.REPORT = {
            "summary_md": f"{R}/summary.md",
            "summary_html": f"{R}/summary.html",
            "summary_csv": f"{R}/summary.csv",
            "plots": f"{R}/plots",
        }
        self.HUB_MODELS = [name for name, spec in self.models.items() if spec.source_kind == "hub"]
        self.FINETUNED_MODELS = [name for name, spec in self.models.items() if spec.finetuned]

    # ------------------------------------------------------------------------------------- settings
    # Settings the targets depend on, read as attributes of the typed config (tunelens.settings).
    @property
    def device(self) -> str:
        return self.settings.device

    @property
    def scoring(self) -> ScoringSection:
        return self.settings.scoring

    @property
    def probe_enabled(self) -> bool:
        return bool(self.settings.probe.enabled)

    @property
    def early_exit_enabled(self) -> bool:
        return bool(self.probe_enabled and self.settings.probe.early_exit.enabled)

    @property
    def judge_enabled(self) -> bool:
        return bool(self.scoring.judge.enabled)

    @property
    def human_enabled(self) -> bool:
        return bool(self.scoring.human.enabled)

    @property
    def generation_server(self) -> bool:
        return bool(self.settings.generation.server)

    def wildcard_constraints(self) -> dict[str, str]:
        """The workflow's global wildcard constraints (rules/common.smk `wildcard_constraints:`)."""
        from tunelens.config import VARIANTS

        return {
            "model": alternation(self.models),
            "variant": "|".join(VARIANTS),
            "decoding": alternation(self.decoding),
            "layer": r"\d+",
            "dataset": re.escape(self.dataset),
            "evalset": alternation(self.evalsets) or "(?!)",
        }

    # ------------------------------------------------------------------------------------- paths
    def out(self, kind: str, root: str | None = None) -> str:
        """A rule's path pattern of an output kind; wildcards stay in braces ({model}, {variant}, ...)."""
        return f"{self.results if root is None else root}/{OUTPUTS[kind]}"

    def out_path(self, kind: str, root: str | None = None, **wildcards) -> str:
        """One concrete path of an output kind (root EVAL needs evalset=...)."""
        return self.out(kind, root).format(**wildcards)

    def eval_path(self, evalset: str, relative: str) -> str:
        """A per-set output path: results/eval/<evalset>/<relative>."""
        return f"{self.results}/eval/{evalset}/{relative}"

    def generation_file(self, model, variant, config_name):
        return self.out_path("generation", model=model, variant=variant, decoding=config_name)

    def evalset_generation_file(self, evalset, model, variant, config_name):
        return self.out_path("generation", self.EVAL, evalset=evalset, model=model, variant=variant,
                             decoding=config_name)  # fmt: skip

    def score_file(self, model, variant, config_name):
        return self.out_path("scores", model=model, variant=variant, decoding=config_name)

