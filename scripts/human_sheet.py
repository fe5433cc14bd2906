"""Snakemake entry point of rule `human_sheet` (see tunelens.scoring.human.write_human_sheet)."""

from tunelens.jobs import job_log
from tunelens.scoring.human import write_human_sheet

job_log(snakemake.log[0])  # errors and tracebacks go to the rule's log too
params = snakemake.params
write_human_sheet(
    {tuple(group): path for group, path in zip(params.groups, snakemake.input.generations)},
    snakemake.input.test,
    snakemake.output.sheet,
    snakemake.output.key,
    sample_size=params.sample_size,
    seed=params.seed,
)
