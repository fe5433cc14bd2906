# tunelens: fine-tune, generate, score and probe LLMs, then tabulate.
#   snakemake --cores all                                  # the embedded default (config.yaml), offline
#   snakemake --cores all --configfile configs/alpaca-7b.yaml --profile slurm
from snakemake.utils import min_version

min_version("9.0")


report: "report/workflow.rst"


# The embedded default (config.yaml) is loaded in common.smk only when no --configfile is given: with a
# `configfile:` directive, Snakemake would deep-merge a preset into the default and a study of three 7B
# models would silently also run the two embedded ones.
# common.smk validates the config (schemas/config.schema.yaml through snakemake.utils.validate, plus the
# checks a schema cannot express) and fills its defaults before any rule is defined.
include: "rules/common.smk"
include: "rules/models.smk"
include: "rules/data.smk"
include: "rules/finetune.smk"
include: "rules/generate.smk"
include: "rules/probe.smk"
include: "rules/score.smk"
include: "rules/report.smk"


# Every rule writes benchmarks/<rule>/<wildcards>.tsv (wall time, CPU time, peak memory); a rerun overwrites
# it, so the run archives each benchmark file it has not seen into benchmarks/history.tsv before its jobs
# start and when it ends (tunelens.cost): the history keeps what every earlier result cost.
onstart:
    check_device_before_jobs()  # device: cuda without CUDA stops here, before any job (rules/common.smk)
    archive_job_costs()


# Generation servers (tunelens/generation/genserver.py) end with the run, their engine processes included.
onsuccess:
    archive_job_costs()
    stop_generation_servers()


onerror:
    archive_job_costs()
    stop_generation_servers()


rule all:
    default_target: True
    input:
        all_targets(),
