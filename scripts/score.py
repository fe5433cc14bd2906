"""Snakemake entry point of rules `score` and `score_early_exit` (see tunelens.score.score_generation_file)."""
import logging

from tunelens.jobs import use_job_threads
from tunelens.score import score_generation_file

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
use_job_threads(snakemake.threads, torch=False)
params = snakemake.params
score_generation_file(
    snakemake.input.generations,
    snakemake.output.scores,
    snakemake.output.rows,
    meta_file=snakemake.input.meta,
    metrics=params.metrics,
    context=params.context,
    samples=params.samples,
    confidence=params.confidence,
    seed=params.seed,
    model=snakemake.wildcards.model,
    variant=snakemake.wildcards.variant,
    config=snakemake.wildcards.get("config"),
    layer=params.layer,
)
