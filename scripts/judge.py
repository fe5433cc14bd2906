"""Snakemake entry point of rule `judge` (see tunelens.judge.judge_generation_file)."""

from tunelens.jobs import job_log, use_job_threads
from tunelens.judge import judge_generation_file

job_log(snakemake.log[0])  # errors and tracebacks go to the rule's log too
use_job_threads(snakemake.threads)
params = snakemake.params
judge_generation_file(
    snakemake.input.generations,
    snakemake.input.test,
    snakemake.output.scores,
    snakemake.output.rows,
    meta_file=snakemake.input.meta,
    judge_model=params.judge_model,
    judge_path=params.judge_path,
    model=snakemake.wildcards.model,
    variant=snakemake.wildcards.variant,
    config=snakemake.wildcards.decoding,
    batch_size=params.batch_size,
    device=params.device,
    gpus=snakemake.resources.gpu,
    samples=params.samples,
    confidence=params.confidence,
    seed=params.seed,
)
