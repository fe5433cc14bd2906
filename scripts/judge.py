"""Snakemake entry point of rules `judge`, `judge_evalset` and `judge_early_exit` (see
tunelens.scoring.judge.judge_generation_file). An early-exit file has no {decoding} wildcard (its config name comes from
the generation meta) and a {layer} one."""

from tunelens.jobs import job_log, use_job_threads
from tunelens.scoring.judge import judge_generation_file

job_log(snakemake.log[0])  # errors and tracebacks go to the rule's log too
use_job_threads(snakemake.threads)
params = snakemake.params
layer = snakemake.wildcards.get("layer")
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
    config=snakemake.wildcards.get("decoding"),
    layer=None if layer is None else int(layer),
    batch_size=params.batch_size,
    device=params.device,
    gpus=snakemake.resources.gpu,
    samples=params.samples,
    confidence=params.confidence,
    seed=params.seed,
)
