"""Snakemake entry point of rule `perplexity` (see tunelens.perplexity.reference_perplexity)."""

from tunelens.jobs import job_log, use_job_threads
from tunelens.perplexity import reference_perplexity

job_log(snakemake.log[0])  # errors and tracebacks go to the rule's log too
use_job_threads(snakemake.threads)
params = snakemake.params
reference_perplexity(
    snakemake.input.test,
    snakemake.output.scores,
    snakemake.output.rows,
    model_name=snakemake.wildcards.model,
    model_path=params.model_path,
    model_source=params.source,
    variant=snakemake.wildcards.variant,
    adapter_dir=snakemake.input.adapter[0] if snakemake.input.adapter else None,
    prompt_format=params.prompt_format,
    batch_size=params.batch_size,
    max_rows=params.max_rows,
    device=params.device,
    gpus=snakemake.resources.gpu,
    samples=params.samples,
    confidence=params.confidence,
    seed=params.seed,
)
