# tunelens: fine-tune, generate, score and probe LLMs, then tabulate.
#   snakemake --cores all                                  # the embedded default (config.yaml), offline
#   snakemake --cores all --configfile configs/alpaca-7b.yaml --profile profiles/slurm
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


validate(config, "schemas/config.schema.yaml")


include: "rules/common.smk"
include: "rules/models.smk"
include: "rules/data.smk"


rule all:
    input:
        all_targets(),
    default_target: True
