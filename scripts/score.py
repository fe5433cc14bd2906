"""Snakemake entry point of rules `score` and `score_early_exit` (see tunelens.score.score_generation_file)."""

from tunelens.jobs import job_log, use_job_threads
from tunelens.score import score_generation_file

job_log(snakemake.log[0])  # errors and tracebacks go to the rule's log too
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
    config=snakemake.wildcards.get("decoding"),
    layer=params.layer,
)
