# The only place that turns the config into paths, wildcards and targets (see docs/ARCHITECTURE.md).
import re
import sys

sys.path.insert(0, workflow.basedir)  # tunelens from this checkout, installed or not

from tunelens.codehash import code_hash
from tunelens.config import (
    VARIANTS,
    check_yaml_duplicates,
    load_config,
    load_default_config,
    prepare_job_environment,
)
from tunelens.errors import TunelensError

prepare_job_environment(workflow.basedir)


def _load_study():
    # A key given twice in a config file would silently drop, e.g., a model.
    files = workflow.overwrite_configfiles or [f"{workflow.basedir}/config.yaml"]
    for path in files:
        check_yaml_duplicates(path)
    if not workflow.overwrite_configfiles:
        # No --configfile: the embedded default, with any --config key=value overrides on top.
        with_defaults = load_default_config(workflow.basedir, overrides=config)
        config.clear()
        config.update(with_defaults)
    if not workflow.is_main_process:
        # Validates (schema + semantic checks) and fills defaults; the main process checked everything.
        return load_config(config)
    # Once, in the main process (jobs re-parse the workflow): the config, then its files, model references,
    # hub cache, usable rows, evaluation sets, memory estimates. Every problem in one message, before any job.
    # Hub models/datasets already downloaded into results/hub/ need neither the hub nor its cache.
    # CUDA: check_device_before_jobs (onstart), once the executor is known.
    from tunelens.preflight import check_config

    return check_config(config, check_cuda=False, results="results")


try:
    STUDY = _load_study()
except TunelensError as error:
    # The message names the key and value (or file and line); a stack trace would only bury it.
    print(f"tunelens: {type(error).__name__}: {error}", file=sys.stderr)
    raise SystemExit(1)


def check_device_before_jobs():
    """onstart (Snakefile): a real local run is about to start jobs; device: cuda must find CUDA here.

    Not at parse time: the executor (a cluster's GPU node, or a dry run) is not known then.
    """
    if workflow.local_exec and STUDY.config["device"] == "cuda":
        from tunelens.preflight import cuda_problem

        problem = cuda_problem()
        if problem:
            print(f"tunelens: ConfigError: {problem}", file=sys.stderr)
            raise SystemExit(1)
    if workflow.local_exec and STUDY.config["device"] != "cpu":
        # Snakemake itself would stop only when it reaches the first such job, after the others ran.
        limit = workflow.global_resources.get("gpu")
        limit = getattr(
            limit, "value", limit
        )  # a snakemake Resource (9.x) or a plain int
        wide = [
            n
            for n, s in MODELS.items()
            if isinstance(limit, int) and s.resources["gpus"] > limit
        ]
        if wide:
            print(
                f"tunelens: ConfigError: models.{wide[0]}.resources.gpus is "
                f"{MODELS[wide[0]].resources['gpus']}, above this run's gpu limit {limit}; run with "
                f"--resources gpu={max(MODELS[n].resources['gpus'] for n in wide)} (the machine's GPU count)",
                file=sys.stderr,
            )
            raise SystemExit(1)
        # Models already on disk against this machine's GPUs (the others: in the job, tunelens.models.load_model).
        from tunelens.preflight import cuda_memory, gpu_fit_problems

        problems = gpu_fit_problems(
            STUDY, {n: model_dir(s) for n, s in MODELS.items()}, cuda_memory()
        )
        if problems:
            print("tunelens: ConfigError: " + "\n  ".join(problems), file=sys.stderr)
            raise SystemExit(1)


R = "results"
DATASET = STUDY.dataset_name
MODELS = STUDY.models
DECODING = STUDY.decoding
EVALSETS = STUDY.evaluation_sets


def code_version(script):
    """A rule's `code` param: hash of the normalised source its script runs (script + tunelens imports).

    Snakemake's own code trigger is off (profiles/*/config.yaml): it reruns on a script's mtime and
    misses edits in tunelens/. This param reruns a rule's jobs exactly when code they execute changes;
    comments, docstrings and formatting do not count (tunelens/codehash.py).
    """
    return code_hash(f"{workflow.basedir}/scripts/{script}")


def _alternation(names):
    return "|".join(sorted(re.escape(name) for name in names))


wildcard_constraints:
    model=_alternation(MODELS),
    variant="|".join(VARIANTS),
    decoding=_alternation(DECODING),
    layer=r"\d+",
    dataset=re.escape(DATASET),
    evalset=_alternation(EVALSETS) or "(?!)",


# ----------------------------------------------------------------------------------------- paths
# Output kind -> path under a results root: R, or EVAL for an evaluation set. The one place a per-run path
# is spelled; rules (out), input functions and the report's input discovery (out_path) read it.
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


def out(kind, root=R):
    """A rule's path pattern of an output kind; wildcards stay in braces ({model}, {variant}, ...)."""
    return f"{root}/{OUTPUTS[kind]}"


def out_path(kind, root=R, **wildcards):
    """One concrete path of an output kind (root EVAL needs evalset=...)."""
    return out(kind, root).format(**wildcards)


# ----------------------------------------------------------------------------------------- data
def dataset_file_input(wildcards):
    """A local dataset file is an input (editing it reruns the split); hub and embedded sources are params."""
    source = STUDY.config["dataset"]["source"]
    return [source] if STUDY.dataset_kind == "local" else []


HUB_DATASET_DIR = f"{R}/hub/datasets/{DATASET}"


def hub_dataset_input(wildcards):
    """A hub dataset's download (rule download_dataset); nothing for local and embedded sources."""
    return [HUB_DATASET_DIR] if STUDY.dataset_kind == "hub" else []


SPLIT = {
    "train": f"{R}/data/{DATASET}/train.jsonl",
    "test": f"{R}/data/{DATASET}/test.jsonl",
    "manifest": f"{R}/data/{DATASET}/manifest.json",
}


# evaluation sets (the evalset rule) - results/eval/{evalset}/ holds the set's test rows, manifest and every
# per-set output; the training data's own test split (SPLIT["test"]) stays the default set.
EVAL = f"{R}/eval/{{evalset}}"


def eval_path(evalset, relative):
    """A per-set output path: results/eval/<evalset>/<relative>."""
    return f"{R}/eval/{evalset}/{relative}"


def evalset_file_input(wildcards):
    """A local evaluation-set file is an input (editing it reruns that set's jobs only)."""
    spec = EVALSETS[wildcards.evalset]
    return [spec.source] if spec.source_kind == "local" else []


def evalset_params(wildcards):
    return EVALSETS[wildcards.evalset].prepare_params()


# ----------------------------------------------------------------------------------------- models
def model_spec(wildcards):
    return MODELS[wildcards.model]


def model_field(name):
    """A param function giving one field of the `{model}` wildcard's ModelSpec (tunelens.config), e.g.
    model_field("prompt_format"); the one accessor factory, so no stage copies its own.
    """

    def get(wildcards):
        return getattr(MODELS[wildcards.model], name)

    get.__name__ = f"model_{name}"
    return get


HUB_MODELS = [name for name, spec in MODELS.items() if spec.source_kind == "hub"]


def model_dir(spec):
    """The directory a job loads: embedded -> materialised, hub -> downloaded, local -> as configured."""
    if spec.source_kind == "embedded":
        return out_path("model_dir", model=spec.name)
    if spec.source_kind == "hub":
        return out_path("hub_model_dir", model=spec.name)
    return spec.source


def model_input(wildcards):
    """The materialised or downloaded directory of an embedded or hub model (a job input); nothing for local."""
    spec = model_spec(wildcards)
    return [] if spec.source_kind == "local" else [model_dir(spec)]


def model_path(wildcards):
    """What load_model() gets: always a local directory (hub models load their download, offline)."""
    return model_dir(model_spec(wildcards))


def adapter_input(wildcards):
    """The LoRA adapter for the finetuned variant; nothing for base."""
    return (
        [out_path("adapter", model=wildcards.model)]
        if wildcards.variant == "finetuned"
        else []
    )


def bertscore_model_input(wildcards):
    source = STUDY.config["scoring"]["bertscore"]["model"]
    needed = "bertscore" in STUDY.config["scoring"]["metrics"] and source.startswith(
        "embedded:"
    )
    return [f"{R}/models/bertscore"] if needed else []


def bertscore_embedded_name(wildcards):
    return STUDY.config["scoring"]["bertscore"]["model"].removeprefix("embedded:")


def bertscore_model_path(wildcards):
    source = STUDY.config["scoring"]["bertscore"]["model"]
    return f"{R}/models/bertscore" if source.startswith("embedded:") else source


def model_resource(key):
    """Resource callable for GPU rules: the model entry's `resources.<key>`."""

    def get(wildcards, attempt=1):
        value = MODELS[wildcards.model].resources[key]
        # Retries ask for more memory and time (profiles set `retries`).
        return value * attempt if key in ("mem_mb", "runtime") else value

    return get


def model_threads(wildcards):
    """Threads of a job that runs this model: its `resources.cpus` (also the SLURM cpus_per_task).

    On one machine Snakemake lowers it to --cores, so a model job alone may use every local core, and
    jobs whose threads would sum past --cores run one after the other. The job hands the number to
    torch (tunelens.jobs.use_job_threads).
    """
    return MODELS[wildcards.model].resources["cpus"]


# On one machine (--cores, no --jobs) a model's generation server (tunelens/generation/genserver.py) runs one request at a
# time, so two of its generate, early_exit, perplexity or logit_lens jobs side by side leave a core idle while
# one waits on the other.
# A resource per model with a limit of 1 makes Snakemake run another model's job or a scoring job beside it
# instead. A cluster job has its own allocation and server: no limit there, and none without servers.
def _server_slot(name):
    def slot(wildcards):
        return int(wildcards.model == name)

    slot.__name__ = f"genserver_{name}"
    return slot


SERVER_SLOTS = {}
if STUDY.config["generation"]["server"] and workflow.nodes is None:
    for _name in MODELS:
        SERVER_SLOTS[f"genserver_{_name}"] = _server_slot(_name)
        workflow.register_resource(f"genserver_{_name}", 1)


# On a cluster, profiles/slurm puts each (model, variant)'s generate, early_exit, logit_lens and perplexity jobs
# into one group (`groups`, `group-components`): one allocation, one model load (docs/cluster.md). Snakemake
# sums the resources of jobs it could run side by side in a group and takes the largest over jobs that run
# one after the other; a limit of one `model_job` per group (scope local: each group's own, not the run's)
# makes every member its own layer, so the group asks for its members' largest CPUs, memory and GPUs (its
# runtime is their sum). Not registered on one machine, where it would serialise every model's jobs.
MODEL_JOB = {}
if workflow.nodes is not None:
    MODEL_JOB["model_job"] = 1
    workflow.register_resource("model_job", 1)


resource_scopes:
    model_job="local",


# The allocation's Snakemake process tells the jobs it starts whether it runs more than them (tunelens.servers).
from tunelens.servers import announce_job_runner

announce_job_runner(remote=workflow.remote_exec, argv=sys.argv)


# The critical path of a study is model -> fine-tune -> the fine-tuned variant's jobs, and a fine-tune is its
# longest job. Snakemake starts ready jobs in priority order, so the model's download or materialisation
# and its fine-tune go before the base variant's jobs that are ready as soon as the model is: the
# fine-tunes then start at once, side by side, instead of after the base jobs (BENCHMARKS.md, issue 13).
CRITICAL_PATH_PRIORITY = 10


# Score jobs are short and spend most of their time starting up; one thread each lets two run side by
# side (and matches the profiles' default cpus_per_task of 1).
SCORE_THREADS = 1


def model_gpus(wildcards):
    """GPUs this model's jobs request; 0 when the study runs on CPU."""
    if STUDY.config["device"] == "cpu":
        return 0
    return MODELS[wildcards.model].resources["gpus"]


# ----------------------------------------------------------------------------------------- per-stage paths
def variants(model):
    return MODELS[model].variants


def generation_file(model, variant, config_name):
    return out_path("generation", model=model, variant=variant, decoding=config_name)


def score_file(model, variant, config_name):
    return out_path("scores", model=model, variant=variant, decoding=config_name)


def decoding_params(wildcards):
    return DECODING[wildcards.decoding].as_dict()


def probe_layers(model):
    return MODELS[model].probe_layers if STUDY.config["probe"]["enabled"] else []


# generate (rules/generate.smk) ---------------------------------------------------------
def generation_settings(wildcards):
    """Everything besides the decoding config that changes a generation file (a params rerun trigger)."""
    decoding = config["decoding"]
    generation = config["generation"]
    return {
        "max_new_tokens": decoding["max_new_tokens"],
        "stop": list(decoding["stop"]),
        "beam_mode": decoding["beam_mode"],
        "max_test_rows": decoding["max_test_rows"],
        "batch_size": generation["batch_size"],
        "max_prompt_tokens": generation["max_prompt_tokens"],
        "static_cache": generation["static_cache"],
        "compile_backend": generation["compile_backend"],
        "merge_adapter": generation["merge_adapter"],
    }


def stop_generation_servers():
    """Stop this run's generation servers on this host (Snakefile onsuccess/onerror; main process only:
    on SLURM a server lives inside its allocation and ends with it)."""
    if workflow.is_main_process:
        from tunelens.servers import stop_servers

        stopped = stop_servers()
        if stopped:
            print(f"stopped {stopped} generation server(s)")


def generation_conda_env(wildcards):
    """--sdm conda: backend vllm generates in envs/vllm.yaml (vLLM pins its own torch), others in
    envs/torch.yaml. Without conda, a job without vLLM reaches generation.vllm_python instead.
    """
    if model_spec(wildcards).generation_backend == "vllm":
        return "../envs/vllm.yaml"
    return "../envs/torch.yaml"


def vllm_options(wildcards):
    from tunelens.config import generation_server_fields

    return generation_server_fields(config, wildcards.model)["vllm_options"]


# finetune (rules/finetune.smk) ---------------------------------------------------------
FINETUNED_MODELS = [name for name, spec in MODELS.items() if spec.finetuned]


def finetune_checkpoint_dir(wildcards):
    """Resumable trainer checkpoints: not a rule output, so a failed job keeps them for its rerun."""
    return f"{R}/checkpoints/{wildcards.model}"


# probe (rules/probe.smk) ---------------------------------------------------------------
def probe_config(key):
    """A `probe.<key>` setting (a rule param, so changing it reruns the probe)."""
    return lookup(dpath=f"probe/{key}", within=config)


def early_exit_layer(wildcards):
    """The `{layer}` wildcard as an int; a layer the config does not plan fails before any job runs."""
    layer = int(wildcards.layer)
    planned = probe_layers(wildcards.model)
    if layer not in planned:
        raise ValueError(
            f"early exit: layer {layer} is not a probe layer of model '{wildcards.model}' (planned: {planned})"
        )
    return layer


def early_exit_decoding(wildcards):
    """probe.early_exit.decoding as a full decoding config with its canonical name (greedy by default)."""
    from tunelens.config import DecodingConfig

    return DecodingConfig.from_dict(config["probe"]["early_exit"]["decoding"]).as_dict()


# ----------------------------------------------------------------------------------------- scoring
def scoring_config(key):
    """A `scoring.<key>` value (slash path) as a rule param."""
    return lookup(dpath=f"scoring/{key}", within=config)


def score_metrics(wildcards):
    return list(STUDY.config["scoring"]["metrics"])


def score_context(wildcards):
    """Everything the metrics need besides the text: dataset kind, code language, BERTScore settings."""
    from tunelens.models import EMBEDDED_MODELS

    settings = STUDY.config["scoring"]["bertscore"]
    source = settings["model"]
    num_layers = settings["num_layers"]
    if num_layers is None and source.startswith("embedded:"):
        num_layers = EMBEDDED_MODELS[source.removeprefix("embedded:")]["num_layers"]
    kind = STUDY.config["dataset"]["kind"]
    language = STUDY.config["dataset"]["code_language"]
    if wildcards.get("evalset"):  # an evaluation set has its own kind (CodeBLEU or not)
        spec = EVALSETS[wildcards.evalset]
        kind, language = spec.kind, spec.code_language
    return {
        "dataset_kind": kind,
        "code_language": language,
        "device": STUDY.config["device"],
        "bertscore": {
            "model": bertscore_model_path(wildcards),
            "num_layers": num_layers,
            "batch_size": settings["batch_size"],
            "lang": settings["lang"],
            "rescale_with_baseline": settings["rescale_with_baseline"],
            "baseline_path": settings["baseline_path"],
        },
    }


def early_exit_score_layer(wildcards):
    return int(wildcards.layer)


def score_gpus(wildcards):
    if (
        STUDY.config["device"] == "cpu"
        or "bertscore" not in STUDY.config["scoring"]["metrics"]
    ):
        return 0
    return STUDY.config["scoring"]["bertscore"]["gpus"]


def judge_model_name(wildcards):
    return STUDY.config["scoring"]["judge"]["model"]


def judge_model_input(wildcards):
    """The judge's materialised or downloaded directory when it is an embedded or hub model of `models`."""
    name = judge_model_name(wildcards)
    if name in MODELS:
        from types import SimpleNamespace

        return model_input(SimpleNamespace(model=name))
    return []


def judge_model_path(wildcards):
    name = judge_model_name(wildcards)
    if name in MODELS:
        from types import SimpleNamespace

        return model_path(SimpleNamespace(model=name))
    return name


def human_groups():
    """(model, variant, config) of every generation file, in a fixed order (sheet and score outputs)."""
    return [
        (model, variant, name)
        for model in MODELS
        for variant in variants(model)
        for name in DECODING
    ]


def human_generation_files(wildcards):
    evalset = wildcards.get("evalset")
    if evalset:
        return [evalset_generation_file(evalset, *group) for group in human_groups()]
    return [generation_file(*group) for group in human_groups()]


def human_score_outputs(kind, prefix=R):
    """Human score files of every group under `prefix` (results/, or EVAL with its {evalset} wildcard)."""
    suffix = ".json" if kind == "json" else ".rows.csv"
    return [
        f"{prefix}/human/scores/{model}/{variant}/{name}{suffix}"
        for model, variant, name in human_groups()
    ]


def human_rating_files(evalset=None):
    """Filled sheets in scoring.human.ratings_dir, or its <evalset>/ subfolder for an evaluation set's
    sheet (found when the DAG is built)."""
    import glob
    import os

    folder = STUDY.config["scoring"]["human"]["ratings_dir"]
    if evalset:
        folder = os.path.join(folder, evalset)
    return sorted(glob.glob(os.path.join(folder, "*.csv")))


def evalset_human_rating_files(wildcards):
    return human_rating_files(wildcards.evalset)


def all_human_files(evalset=None):
    """Sheet + key when human rating is enabled; the Human scores once filled sheets exist."""
    if not STUDY.config["scoring"]["human"]["enabled"]:
        return []
    prefix = f"{R}/eval/{evalset}" if evalset else R
    targets = [f"{prefix}/human/sheet.csv", f"{prefix}/human/key.csv"]
    if human_rating_files(evalset):
        targets += human_score_outputs("json", prefix)
    return targets


def all_score_files():
    return [
        score_file(model, variant, name)
        for model in MODELS
        for variant in variants(model)
        for name in DECODING
    ]


def evalset_generation_file(evalset, model, variant, config_name):
    return out_path(
        "generation",
        EVAL,
        evalset=evalset,
        model=model,
        variant=variant,
        decoding=config_name,
    )


def all_evalset_files(kind):
    """Every evaluation set's files of one kind (scores, perplexity, judge, human, human_sheet, manifest)."""
    files = []
    for evalset in EVALSETS:
        groups = [
            (model, variant, name)
            for model in MODELS
            for variant in variants(model)
            for name in DECODING
        ]
        if kind == "manifest":
            files.append(eval_path(evalset, "manifest.json"))
        elif kind == "scores":
            files += [
                out_path(
                    "scores", EVAL, evalset=evalset, model=m, variant=v, decoding=c
                )
                for m, v, c in groups
            ]
        elif kind == "judge" and STUDY.config["scoring"]["judge"]["enabled"]:
            files += [
                out_path("judge", EVAL, evalset=evalset, model=m, variant=v, decoding=c)
                for m, v, c in groups
            ]
        elif kind == "perplexity" and STUDY.config["scoring"]["perplexity"]:
            files += [
                out_path(
                    "perplexity", EVAL, evalset=evalset, model=model, variant=variant
                )
                for model in MODELS
                for variant in variants(model)
            ]
        elif kind == "human":
            files += [p for p in all_human_files(evalset) if p.endswith(".json")]
        elif kind == "human_sheet":
            files += [p for p in all_human_files(evalset) if p.endswith(".csv")]
    return files


def all_perplexity_files():
    if not STUDY.config["scoring"]["perplexity"]:
        return []
    return [
        out_path("perplexity", model=model, variant=variant)
        for model in MODELS
        for variant in variants(model)
    ]


def all_judge_files():
    if not STUDY.config["scoring"]["judge"]["enabled"]:
        return []
    return [
        out_path("judge", model=model, variant=variant, decoding=name)
        for model in MODELS
        for variant in variants(model)
        for name in DECODING
    ]


def all_lens_files():
    if not STUDY.config["probe"]["enabled"]:
        return []
    return [
        out_path("lens", model=model, variant=variant)
        for model in MODELS
        for variant in variants(model)
    ]


def all_early_exit_score_files():
    if not (
        STUDY.config["probe"]["enabled"]
        and STUDY.config["probe"]["early_exit"]["enabled"]
    ):
        return []
    return [
        out_path("early_exit_scores", model=model, variant=variant, layer=layer)
        for model in MODELS
        for variant in variants(model)
        for layer in probe_layers(model)
    ]


def all_early_exit_judge_files():
    """The judge's files of every early-exit generation: only when both the judge and early exit are on."""
    if not (
        STUDY.config["scoring"]["judge"]["enabled"]
        and STUDY.config["probe"]["enabled"]
        and STUDY.config["probe"]["early_exit"]["enabled"]
    ):
        return []
    return [
        out_path("early_exit_judge", model=model, variant=variant, layer=layer)
        for model in MODELS
        for variant in variants(model)
        for layer in probe_layers(model)
    ]


def all_finetune_metrics():
    return [
        out_path("finetune_metrics", model=model)
        for model, spec in MODELS.items()
        if spec.finetuned
    ]


# report (rules/report.smk) -----------------------------------------------------------
REPORT = {
    "summary_md": f"{R}/summary.md",
    "summary_html": f"{R}/summary.html",
    "summary_csv": f"{R}/summary.csv",
    "plots": f"{R}/plots",
}


REPORT_PLOT_GROUPS = {
    "sweep": "Metric vs decoding parameter",
    "layers": "Metric vs exit layer",
    "loss": "Fine-tuning loss",
}


def report_plot_group(wildcards):
    """Report subcategory of a plot, from its file name prefix (see tunelens.report plot_*)."""
    return REPORT_PLOT_GROUPS[wildcards.plot_kind]


def report_inputs(wildcards):
    """Every file the report summarises, by kind.

    Human scores exist once filled rating sheets are in scoring.human.ratings_dir; the blank sheet
    and lens files are not tabulated but are asked for, so `all` leaves a finished study behind.
    """
    human = all_human_files()
    return {
        "scores": all_score_files(),
        "perplexity": all_perplexity_files(),
        "judge": all_judge_files(),
        "human": [path for path in human if path.endswith(".json")],
        "early_exit": all_early_exit_score_files(),
        "early_exit_judge": all_early_exit_judge_files(),
        "finetune": all_finetune_metrics(),
        "human_sheet": [path for path in human if path.endswith(".csv")],
        "lens": all_lens_files(),
        "split_manifest": [SPLIT["manifest"]],
        # evaluation sets (results/eval/<set>/...): the same kinds of files, per set
        "eval_manifests": all_evalset_files("manifest"),
        "eval_scores": all_evalset_files("scores"),
        "eval_perplexity": all_evalset_files("perplexity"),
        "eval_judge": all_evalset_files("judge"),
        "eval_human": all_evalset_files("human"),
        "eval_human_sheet": all_evalset_files("human_sheet"),
    }


def report_decoding_configs():
    """Decoding config name -> its fields, in study order (the sweep axes of tables and plots)."""
    return {
        name: {k: v for k, v in decoding.as_dict().items() if k != "name"}
        for name, decoding in DECODING.items()
    }


def report_config_hash():
    """sha256 of the validated config (defaults filled) as canonical JSON: which study this is."""
    import hashlib
    import json

    canonical = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def all_targets():
    """The targets of the default target: the report outputs; their inputs pull in every stage."""
    return list(REPORT.values())


# ----------------------------------------------------------------------------------------- job costs
def archive_job_costs():
    """Append benchmark files not yet archived to benchmarks/history.tsv (the main process only)."""
    if workflow.is_main_process:
        from tunelens.cost import archive_benchmarks

        archive_benchmarks("benchmarks")


def report_job_gpus():
    """Rule -> model -> GPUs its jobs ask for ("*": every model), for the report's GPU-hours
    (tunelens.report.costs counts them only where the study ran on CUDA)."""
    from types import SimpleNamespace

    model_rules = [
        "finetune",
        "generate",
        "generation_agreement",
        "perplexity",
        "judge",
    ]
    model_rules += ["logit_lens", "early_exit", "judge_early_exit"]
    model_rules += ["generate_evalset", "perplexity_evalset", "judge_evalset"]
    gpus = {
        rule_name: {name: model_gpus(SimpleNamespace(model=name)) for name in MODELS}
        for rule_name in model_rules
    }
    for rule_name in ("score", "score_early_exit", "score_evalset"):
        gpus[rule_name] = {"*": score_gpus(None)}
    return gpus
