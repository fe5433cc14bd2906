"""Snakemake entry point of rule `split` (see tunelens.data.split_dataset)."""
import logging

from tunelens.data import split_dataset

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
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
    train_path=snakemake.output.train,
    test_path=snakemake.output.test,
    manifest_path=snakemake.output.manifest,
)
