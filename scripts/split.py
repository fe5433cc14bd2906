"""Snakemake entry point of rule `split` (see tunelens.data.data.split_dataset)."""

from tunelens.jobs import job_log
from tunelens.data.data import split_dataset

job_log(snakemake.log[0])  # errors and tracebacks go to the rule's log too
params = snakemake.params
split_dataset(
    source=params.source,
    name=params.name,
    fields=params.fields,
    required_fields=tuple(params.required_fields),
    on_bad_rows=params.on_bad_rows,
    seed=params.seed,
    test_size=params.test_size,
    max_train=params.max_train,
    hub_split=params.hub_split,
    hub_dir=snakemake.input.hub_dataset[0] if snakemake.input.hub_dataset else None,
    train_path=snakemake.output.train,
    test_path=snakemake.output.test,
    manifest_path=snakemake.output.manifest,
)
