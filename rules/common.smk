# The only place that turns the config into paths, wildcards and targets (see docs/ARCHITECTURE.md): it loads
# the config and binds the names the rules call to tunelens.workflow.Plan, which holds the logic (unit-tested).
import sys

sys.path.insert(0, workflow.basedir)  # tunelens from this checkout, installed or not

from tunelens.codehash import code_hash
from tunelens.config import (
    check_yaml_duplicates,
    load_config,
    load_default_config,
    prepare_job_environment,
)
from tunelens.errors import TunelensError
from tunelens.workflow import Plan, alternation

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


R = "results"
# The logic behind the names below lives in tunelens/workflow/ (unit-tested there).
PLAN = Plan(STUDY, results=R)
DATASET = STUDY.dataset_name
MODELS = STUDY.models
DECODING = STUDY.decoding
EVALSETS = STUDY.evaluation_sets


def check_device_before_jobs():
    """onstart (Snakefile): a real local run is about to start jobs; device: cuda must find CUDA here.

    Not at parse time: the executor (a cluster's GPU node, or a dry run) is not known then.
    """
    if workflow.local_exec and PLAN.device == "cuda":
        from tunelens.preflight import cuda_problem

        problem = cuda_problem()
        if problem:
            print(f"tunelens: ConfigError: {problem}", file=sys.stderr)
            raise SystemExit(1)
    if workflow.local_exec and PLAN.device != "cpu":
        # Snakemake itself would stop only when it reaches the first such job, after the others ran.
        limit = workflow.global_resources.get("gpu")
        # a snakemake Resource (9.x) or a plain int
        limit = getattr(limit, "value", limit)
        problem = PLAN.gpu_limit_problem(limit)
        if problem:
            print(f"tunelens: ConfigError: {problem}", file=sys.stderr)
            raise SystemExit(1)
        # Models already on disk against this machine's GPUs (the others: in the job, tunelens.models.load_model).
        from tunelens.preflight import cuda_memory

        problems = PLAN.gpu_fit_problems(cuda_memory())
        if problems:
            print("tunelens: ConfigError: " + "\n  ".join(problems), file=sys.stderr)
            raise SystemExit(1)


def code_version(script):
    """A rule's `code` param: hash of the normalised source its script runs (script + tunelens imports).

    Snakemake's own code trigger is off (profiles/*/config.yaml): it reruns on a script's mtime and
    misses edits in tunelens/. This param reruns a rule's jobs exactly when code they execute changes;
    comments, docstrings and formatting do not count (tunelens/codehash.py).
    """
    return code_hash(f"{workflow.basedir}/scripts/{script}")


_alternation = alternation


wildcard_constraints:
    **PLAN.wildcard_constraints(),


# ----------------------------------------------------------------------------------------- paths
# Output kinds and their paths: tunelens.workflow.OUTPUTS (rules: out(kind) or out(kind, EVAL)).
out = PLAN.out
out_path = PLAN.out_path
SPLIT = PLAN.SPLIT
# results/eval/{evalset}/: an evaluation set's test rows, manifest and every per-set output
EVAL = PLAN.EVAL
HUB_DATASET_DIR = PLAN.HUB_DATASET_DIR
REPORT = PLAN.REPORT
HUB_MODELS = PLAN.HUB_MODELS
FINETUNED_MODELS = PLAN.FINETUNED_MODELS

# ----------------------------------------------------------------------------------------- input functions
# data (rules/data.smk)
dataset_file_input = PLAN.dataset_file_input
hub_dataset_input = PLAN.hub_dataset_input
evalset_file_input = PLAN.evalset_file_input
evalset_params = PLAN.evalset_params
# models (rules/models.smk and every model rule)
model_spec = PLAN.model_spec
model_field = PLAN.model_field
model_input = PLAN.model_input
model_path = PLAN.model_path
adapter_input = PLAN.adapter_input
bertscore_model_input = PLAN.bertscore_model_input
bertscore_embedded_name = PLAN.bertscore_embedded_name
model_resource = PLAN.model_resource
model_threads = PLAN.model_threads
model_gpus = PLAN.model_gpus
# generate (rules/generate.smk)
decoding_params = PLAN.decoding_params
generation_settings = PLAN.generation_settings
generation_conda_env = PLAN.generation_conda_env
vllm_options = PLAN.vllm_options
# finetune (rules/finetune.smk)
finetune_checkpoint_dir = PLAN.finetune_checkpoint_dir
# probe (rules/probe.smk)
early_exit_layer = PLAN.early_exit_layer
early_exit_decoding = PLAN.early_exit_decoding
# scoring (rules/score.smk)
score_metrics = PLAN.score_metrics
score_context = PLAN.score_context
early_exit_score_layer = PLAN.early_exit_score_layer
score_gpus = PLAN.score_gpus
judge_model_name = PLAN.judge_model_name
judge_model_input = PLAN.judge_model_input
judge_model_path = PLAN.judge_model_path
human_groups = PLAN.human_groups
human_generation_files = PLAN.human_generation_files
human_score_outputs = PLAN.human_score_outputs
# filled sheets in scoring.human.ratings_dir, found when the DAG is built
human_rating_files = PLAN.human_rating_files
evalset_human_rating_files = PLAN.evalset_human_rating_files
# report (rules/report.smk) and the default target (Snakefile)
report_plot_group = PLAN.report_plot_group
report_inputs = PLAN.report_inputs
report_decoding_configs = PLAN.report_decoding_configs
report_config_hash = PLAN.report_config_hash
report_job_gpus = PLAN.report_job_gpus
all_targets = PLAN.all_targets


def probe_config(key):
    """A `probe.<key>` setting (a rule param, so changing it reruns the probe)."""
    return lookup(dpath=f"probe/{key}", within=config)


def scoring_config(key):
    """A `scoring.<key>` value (slash path) as a rule param."""
    return lookup(dpath=f"scoring/{key}", within=config)


# ----------------------------------------------------------------------------------------- resources
# On one machine (--cores, no --jobs) a model's generation server runs one request at a time: a resource
# genserver_<model> with a limit of 1 per model (Plan.server_slots); none on a cluster or without servers.
SERVER_SLOTS = PLAN.server_slots(cluster=workflow.nodes is not None)
for _name in SERVER_SLOTS:
    workflow.register_resource(_name, 1)


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
# Within a variant, its generate jobs go before its early-exit, lens and perplexity jobs: their outputs feed the
# CPU-only score jobs, which then run beside the GPU's remaining probe work instead of after it. It also fixes
# which job starts the variant's generation server (pays the model load): a generate job, in every run, so that
# per-stage GPU-seconds compare from run to run (bench/bench_gpu_study.py; BENCHMARKS.md issue 21).
GENERATE_PRIORITY = 1


# Score jobs are short and spend most of their time starting up; one thread each lets two run side by
# side (and matches the profiles' default cpus_per_task of 1).
SCORE_THREADS = 1


# ----------------------------------------------------------------------------------------- run hooks
def stop_generation_servers():
    """Stop this run's generation servers on this host (Snakefile onsuccess/onerror; main process only:
    on SLURM a server lives inside its allocation and ends with it)."""
    if workflow.is_main_process:
        from tunelens.servers import stop_servers

        stopped = stop_servers()
        if stopped:
            print(f"stopped {stopped} generation server(s)")


def archive_job_costs():
    """Append benchmark files not yet archived to benchmarks/history.tsv (the main process only)."""
    if workflow.is_main_process:
        from tunelens.cost import archive_benchmarks

        archive_benchmarks("benchmarks")
