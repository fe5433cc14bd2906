"""Snakemake entry point of rule `evalset` (see tunelens.data.data.prepare_evaluation_set)."""

from tunelens.jobs import job_log
from tunelens.data.data import prepare_evaluation_set

job_log(snakemake.log[0])  # errors and tracebacks go to the rule's log too
settings = snakemake.params.evalset
prepare_evaluation_set(
    name=snakemake.wildcards.evalset,
    source=settings["source"],
    fields=settings["fields"],
    seed=snakemake.params.seed,
    max_rows=settings["max_rows"],
    hub_split=settings["hub_split"],
    train_path=snakemake.input.train,
    test_path=snakemake.output.test,
    manifest_path=snakemake.output.manifest,
)
