"""Snakemake entry point of rule `human_sheet` (see tunelens.human.write_human_sheet)."""
import logging

from tunelens.human import write_human_sheet

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
params = snakemake.params
write_human_sheet(
    {tuple(group): path for group, path in zip(params.groups, snakemake.input.generations)},
    snakemake.input.test,
    snakemake.output.sheet,
    snakemake.output.key,
    sample_size=params.sample_size,
    seed=params.seed,
)
