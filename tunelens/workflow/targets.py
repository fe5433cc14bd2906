"""Target lists: every file the default target needs, per stage and evaluation set, the human-rating files
found when the DAG is built, and the report's inputs and params (a mixin of tunelens.workflow.Plan: it uses
the Plan's paths, models, variants and probe layers)."""

from __future__ import annotations

import glob
import hashlib
import json
import os
from types import SimpleNamespace

from tunelens.workflow.paths import REPORT_PLOT_GROUPS

# Rules whose jobs run a model (their GPUs: the model's resources.gpus), for the report's GPU-hours.
MODEL_RULES = (
    "finetune", "generate", "generation_agreement", "perplexity", "judge",
    "logit_lens", "early_exit", "judge_early_exit",
    "generate_evalset", "perplexity_evalset", "judge_evalset",
)  # fmt: skip
SCORE_RULES = ("score", "score_early_exit", "score_evalset")


class Targets:
    """The target lists of a Plan."""

    # ------------------------------------------------------------------------------------- human rating
    def human_groups(self):
        """(model, variant, config) of every generation file, in a fixed order (sheet and score outputs)."""
        return [(model, variant, name) for model in self.models for variant in self.variants(model)
                for name in self.decoding]  # fmt: skip

    def human_generation_files(self, wildcards):
        evalset = wildcards.get("evalset")
        if evalset:
            return [self.evalset_generation_file(evalset, *group) for group in self.human_groups()]
        return [self.generation_file(*group) for group in self.human_groups()]

    def human_score_outputs(self, kind, prefix=None):
        """Human score files of every group under `prefix` (results/, or EVAL with its {evalset} wildcard)."""
        prefix = self.results if prefix is None else prefix
        suffix = ".json" if kind == "json" else ".rows.csv"
        return [f"{prefix}/human/scores/{model}/{variant}/{name}{suffix}"
                for model, variant, name in self.human_groups()]  # fmt: skip

    def human_rating_files(self, evalset=None):
        """Filled sheets in scoring.human.ratings_dir, or its <evalset>/ subfolder for an evaluation set's
        sheet (found when the DAG is built)."""
        folder = self.scoring.human.ratings_dir
        if evalset:
            folder = os.path.join(folder, evalset)
        return sorted(glob.glob(os.path.join(folder, "*.csv")))

    def evalset_human_rating_files(self, wildcards):
        return self.human_rating_files(wildcards.evalset)

    def all_human_files(self, evalset=None):
        """Sheet + key when human rating is enabled; the Human scores once filled sheets exist."""
        if not self.human_enabled:
            return []
        prefix = f"{self.results}/eval/{evalset}" if evalset else self.results
        targets = [f"{prefix}/human/sheet.csv", f"{prefix}/human/key.csv"]
        if self.human_rating_files(evalset):
            targets += self.human_score_outputs("json", prefix)
        return targets

    # ------------------------------------------------------------------------------------- targets
    def _groups(self):
        return self.human_groups()  # (model, variant, config) of every generation file

    def _model_variants(self):
        return [(model, variant) for model in self.models for variant in self.variants(model)]

    def all_score_files(self):
        return [self.score_file(*group) for group in self._groups()]

    def all_perplexity_files(self):
        if not self.scoring.perplexity:
            return []
        return [self.out_path("perplexity", model=m, variant=v) for m, v in self._model_variants()]

    def all_judge_files(self):
        if not self.judge_enabled:
            return []
        return [self.out_path("judge", model=m, variant=v, decoding=c) for m, v, c in self._groups()]

    def all_lens_files(self):
        if not self.probe_enabled:
            return []
        return [self.out_path("lens", model=m, variant=v) for m, v in self._model_variants()]

    def _early_exit_files(self, kind):
        return [self.out_path(kind, model=m, variant=v, layer=layer)
                for m, v in self._model_variants() for layer in self.probe_layers(m)]  # fmt: skip

    def all_early_exit_score_files(self):
        return self._early_exit_files("early_exit_scores") if self.early_exit_enabled else []

    def all_early_exit_judge_files(self):
        """The judge's files of every early-exit generation: only when both the judge and early exit are on."""
        on = self.judge_enabled and self.early_exit_enabled
        return self._early_exit_files("early_exit_judge") if on else []

    def all_finetune_metrics(self):
        return [self.out_path("finetune_metrics", model=model) for model, spec in self.models.items()
                if spec.finetuned]  # fmt: skip

    def all_evalset_files(self, kind):
        """Every evaluation set's files of one kind (scores, perplexity, judge, human, human_sheet, manifest)."""
        files = []
        for evalset in self.evalsets:
            at = {"evalset": evalset}
            if kind == "manifest":
                files.append(self.eval_path(evalset, "manifest.json"))
            elif kind == "scores":
                files += [self.out_path("scores", self.EVAL, **at, model=m, variant=v, decoding=c)
                          for m, v, c in self._groups()]  # fmt: skip
            elif kind == "judge" and self.judge_enabled:
                files += [self.out_path("judge", self.EVAL, **at, model=m, variant=v, decoding=c)
                          for m, v, c in self._groups()]  # fmt: skip
            elif kind == "perplexity" and self.scoring.perplexity:
                files += [self.out_path("perplexity", self.EVAL, **at, model=m, variant=v)
                          for m, v in self._model_variants()]  # fmt: skip
            elif kind == "human":
                files += [p for p in self.all_human_files(evalset) if p.endswith(".json")]
            elif kind == "human_sheet":
                files += [p for p in self.all_human_files(evalset) if p.endswith(".csv")]
        return files

    # ------------------------------------------------------------------------------------- report
    @staticmethod
    def report_plot_group(wildcards):
        """Report subcategory of a plot, from its file name prefix (see tunelens.report plot_*)."""
        return REPORT_PLOT_GROUPS[wildcards.plot_kind]

    def report_inputs(self, wildcards):
        """Every file the report summarises, by kind.

        Human scores exist once filled rating sheets are in scoring.human.ratings_dir; the blank sheet
        and lens files are not tabulated but are asked for, so `all` leaves a finished study behind.
        """
        human = self.all_human_files()
        return {
            "scores": self.all_score_files(),
            "perplexity": self.all_perplexity_files(),
            "judge": self.all_judge_files(),
            "human": [path for path in human if path.endswith(".json")],
            "early_exit": self.all_early_exit_score_files(),
            "early_exit_judge": self.all_early_exit_judge_files(),
            "finetune": self.all_finetune_metrics(),
            "human_sheet": [path for path in human if path.endswith(".csv")],
            "lens": self.all_lens_files(),
            "split_manifest": [self.SPLIT["manifest"]],
            # evaluation sets (results/eval/<set>/...): the same kinds of files, per set
            "eval_manifests": self.all_evalset_files("manifest"),
            "eval_scores": self.all_evalset_files("scores"),
            "eval_perplexity": self.all_evalset_files("perplexity"),
            "eval_judge": self.all_evalset_files("judge"),
            "eval_human": self.all_evalset_files("human"),
            "eval_human_sheet": self.all_evalset_files("human_sheet"),
        }

    def report_decoding_configs(self):
        """Decoding config name -> its fields, in study order (the sweep axes of tables and plots)."""
        return {name: {k: v for k, v in decoding.as_dict().items() if k != "name"}
                for name, decoding in self.decoding.items()}  # fmt: skip

    def report_config_hash(self):
        """sha256 of the validated config (defaults filled) as canonical JSON: which study this is."""
        canonical = json.dumps(self.config, sort_keys=True, default=str)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def report_job_gpus(self):
        """Rule -> model -> GPUs its jobs ask for ("*": every model), for the report's GPU-hours
        (tunelens.report.costs counts them only where the study ran on CUDA)."""
        gpus = {rule: {name: self.model_gpus(SimpleNamespace(model=name)) for name in self.models}
                for rule in MODEL_RULES}  # fmt: skip
        for rule in SCORE_RULES:
            gpus[rule] = {"*": self.score_gpus(None)}
        return gpus

    def all_targets(self):
        """The targets of the default target: the report outputs; their inputs pull in every stage."""
        return list(self.REPORT.values())
