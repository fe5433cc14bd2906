"""Plan: a study's input functions, params and resources, as the rules call them (rules/common.smk binds
its methods: `model_input = PLAN.model_input`)."""

from __future__ import annotations

from types import SimpleNamespace

from tunelens.workflow.paths import StudyPaths, _accessor
from tunelens.workflow.targets import Targets


class Plan(Targets, StudyPaths):
    """The paths, targets and job functions of one study (a tunelens.config.Study), results under `results`."""

    # ------------------------------------------------------------------------------------- data
    def dataset_file_input(self, wildcards):
        """A local dataset file is an input (editing it reruns the split); hub and embedded sources are params."""
        return [self.settings.dataset.source] if self.study.dataset_kind == "local" else []

    def hub_dataset_input(self, wildcards):
        """A hub dataset's download (rule download_dataset); nothing for local and embedded sources."""
        return [self.HUB_DATASET_DIR] if self.study.dataset_kind == "hub" else []

    def evalset_file_input(self, wildcards):
        """A local evaluation-set file is an input (editing it reruns that set's jobs only)."""
        spec = self.evalsets[wildcards.evalset]
        return [spec.source] if spec.source_kind == "local" else []

    def evalset_params(self, wildcards):
        return self.evalsets[wildcards.evalset].prepare_params()

    # ------------------------------------------------------------------------------------- models
    def model_spec(self, wildcards):
        return self.models[wildcards.model]

    def model_field(self, name: str):
        """A param function giving one field of the `{model}` wildcard's ModelSpec (tunelens.config), e.g.
        model_field("prompt_format"); the one accessor factory, so no stage copies its own."""
        return _accessor(f"model_{name}", lambda wildcards: getattr(self.models[wildcards.model], name))

    def variants(self, model):
        return self.models[model].variants

    def model_dir(self, spec):
        """The directory a job loads: embedded -> materialised, hub -> downloaded, local -> as configured."""
        if spec.source_kind == "embedded":
            return self.out_path("model_dir", model=spec.name)
        if spec.source_kind == "hub":
            return self.out_path("hub_model_dir", model=spec.name)
        return spec.source

    def model_input(self, wildcards):
        """The materialised or downloaded directory of an embedded or hub model (a job input); nothing for local."""
        spec = self.model_spec(wildcards)
        return [] if spec.source_kind == "local" else [self.model_dir(spec)]

    def model_path(self, wildcards):
        """What load_model() gets: always a local directory (hub models load their download, offline)."""
        return self.model_dir(self.model_spec(wildcards))

    def adapter_input(self, wildcards):
        """The LoRA adapter for the finetuned variant; nothing for base."""
        return [self.out_path("adapter", model=wildcards.model)] if wildcards.variant == "finetuned" else []

    def _bertscore_embedded(self) -> bool:
        return self.scoring.bertscore.model.startswith("embedded:")

    def bertscore_model_input(self, wildcards):
        needed = "bertscore" in self.scoring.metrics and self._bertscore_embedded()
        return [f"{self.results}/models/bertscore"] if needed else []

    def bertscore_embedded_name(self, wildcards):
        return self.scoring.bertscore.model.removeprefix("embedded:")

    def bertscore_model_path(self, wildcards):
        embedded = self._bertscore_embedded()
        return f"{self.results}/models/bertscore" if embedded else self.scoring.bertscore.model

    # ------------------------------------------------------------------------------------- resources
    def model_resource(self, key: str):
        """Resource callable for GPU rules: the model entry's `resources.<key>` (a ResourcesSection field)."""

        def get(wildcards, attempt=1):
            value = getattr(self.models[wildcards.model].resource_settings, key)
            # Retries ask for more memory and time (profiles set `retries`).
            return value * attempt if key in ("mem_mb", "runtime") else value

        return get

    def model_threads(self, wildcards):
        """Threads of a job that runs this model: its `resources.cpus` (also the SLURM cpus_per_task).

        On one machine Snakemake lowers it to --cores, so a model job alone may use every local core, and
        jobs whose threads would sum past --cores run one after the other. The job hands the number to
        torch (tunelens.jobs.use_job_threads).
        """
        return self.models[wildcards.model].resource_settings.cpus

    def model_gpus(self, wildcards):
        """GPUs this model's jobs request; 0 when the study runs on CPU."""
        if self.device == "cpu":
            return 0
        return self.models[wildcards.model].resource_settings.gpus

    def score_gpus(self, wildcards):
        if self.device == "cpu" or "bertscore" not in self.scoring.metrics:
            return 0
        return self.scoring.bertscore.gpus

    def server_slots(self, cluster: bool) -> dict:
        """Resource name -> callable: 1 for a job of that model's generation server, else 0.

        On one machine (--cores, no --jobs) a model's generation server (tunelens/generation/genserver.py) runs one
        request at a time, so two of its generate, early_exit, perplexity or logit_lens jobs side by side leave
        a core idle while one waits on the other. A resource per model with a limit of 1 makes Snakemake run
        another model's job or a scoring job beside it instead. A cluster job has its own allocation and
        server: no limit there (`cluster`: {}), and none without servers.
        """
        if cluster or not self.generation_server:
            return {}
        return {f"genserver_{name}": self._server_slot(name) for name in self.models}

    @staticmethod
    def _server_slot(name):
        return _accessor(f"genserver_{name}", lambda wildcards: int(wildcards.model == name))

    def gpu_limit_problem(self, limit) -> str | None:
        """A run's `gpu` limit below a model's resources.gpus (Snakemake would stop only at that job)."""
        wide = [n for n, s in self.models.items() if isinstance(limit, int) and s.resource_settings.gpus > limit]
        if not wide:
            return None
        return (
            f"models.{wide[0]}.resources.gpus is {self.models[wide[0]].resource_settings.gpus}, above this run's gpu "
            f"limit {limit}; run with --resources gpu={max(self.models[n].resource_settings.gpus for n in wide)} "
            "(the machine's GPU count)"
        )

    def gpu_fit_problems(self, memory):
        """Models already on disk against this machine's GPUs (tunelens.preflight.gpu_fit_problems)."""
        from tunelens.preflight import gpu_fit_problems

        return gpu_fit_problems(self.study, {n: self.model_dir(s) for n, s in self.models.items()}, memory)

    # ------------------------------------------------------------------------------------- generate
    def decoding_params(self, wildcards):
        return self.decoding[wildcards.decoding].as_dict()

    def generation_settings(self, wildcards):
        """Everything besides the decoding config that changes a generation file (a params rerun trigger)."""
        decoding = self.settings.decoding
        generation = self.settings.generation
        return {  # keys, order and values are the rule's params: changing them reruns every generate job
            "max_new_tokens": decoding.max_new_tokens,
            "stop": list(decoding.stop),
            "beam_mode": decoding.beam_mode,
            "max_test_rows": decoding.max_test_rows,
            "batch_size": generation.batch_size,
            "max_prompt_tokens": generation.max_prompt_tokens,
            "static_cache": generation.static_cache,
            "compile_backend": generation.compile_backend,
            "merge_adapter": generation.merge_adapter,
        }

    def generation_conda_env(self, wildcards):
        """--sdm conda: backend vllm generates in envs/vllm.yaml (vLLM pins its own torch), others in
        envs/torch.yaml. Without conda, a job without vLLM reaches generation.vllm_python instead."""
        if self.model_spec(wildcards).generation_backend == "vllm":
            return "../envs/vllm.yaml"
        return "../envs/torch.yaml"

    def vllm_options(self, wildcards):
        from tunelens.config import generation_server_fields

        return generation_server_fields(self.settings, wildcards.model)["vllm_options"]

    def finetune_checkpoint_dir(self, wildcards):
        """Resumable trainer checkpoints: not a rule output, so a failed job keeps them for its rerun."""
        return f"{self.results}/checkpoints/{wildcards.model}"

    # ------------------------------------------------------------------------------------- probe
    def probe_layers(self, model):
        return self.models[model].probe_layers if self.probe_enabled else []

    def early_exit_layer(self, wildcards):
        """The `{layer}` wildcard as an int; a layer the config does not plan fails before any job runs."""
        layer = int(wildcards.layer)
        planned = self.probe_layers(wildcards.model)
        if layer not in planned:
            raise ValueError(
                f"early exit: layer {layer} is not a probe layer of model '{wildcards.model}' (planned: {planned})"
            )
        return layer

    def early_exit_decoding(self, wildcards):
        """probe.early_exit.decoding as a full decoding config with its canonical name (greedy by default)."""
        from tunelens.config import DecodingConfig

        return DecodingConfig.from_dict(self.settings.probe.early_exit.decoding).as_dict()

    @staticmethod
    def early_exit_score_layer(wildcards):
        return int(wildcards.layer)

    # ------------------------------------------------------------------------------------- scoring
    def score_metrics(self, wildcards):
        return list(self.scoring.metrics)

    def score_context(self, wildcards):
        """Everything the metrics need besides the text: dataset kind, code language, BERTScore settings."""
        from tunelens.models import EMBEDDED_MODELS

        bertscore = self.scoring.bertscore
        source = bertscore.model
        num_layers = bertscore.num_layers
        if num_layers is None and source.startswith("embedded:"):
            num_layers = EMBEDDED_MODELS[source.removeprefix("embedded:")]["num_layers"]
        kind = self.settings.dataset.kind
        language = self.settings.dataset.code_language
        if wildcards.get("evalset"):  # an evaluation set has its own kind (CodeBLEU or not)
            spec = self.evalsets[wildcards.evalset]
            kind, language = spec.kind, spec.code_language
        return {
            "dataset_kind": kind,
            "code_language": language,
            "device": self.device,
            "bertscore": {
                "model": self.bertscore_model_path(wildcards),
                "num_layers": num_layers,
                "batch_size": bertscore.batch_size,
                "lang": bertscore.lang,
                "rescale_with_baseline": bertscore.rescale_with_baseline,
                "baseline_path": bertscore.baseline_path,
            },
        }

    def judge_model_name(self, wildcards):
        return self.scoring.judge.model

    def judge_model_input(self, wildcards):
        """The judge's materialised or downloaded directory when it is an embedded or hub model of `models`."""
        name = self.judge_model_name(wildcards)
        return self.model_input(SimpleNamespace(model=name)) if name in self.models else []

    def judge_model_path(self, wildcards):
        name = self.judge_model_name(wildcards)
        return self.model_path(SimpleNamespace(model=name)) if name in self.models else name

