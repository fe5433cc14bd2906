"""Rules `perplexity` and `perplexity_evalset`: one (model, variant) -> perplexity JSON + per-row CSV.

The work (tunelens.scoring.perplexity.perplexity_output) runs in the model's generation server when it can serve it
(tunelens.scoring.perplexity.run_perplexity_job: the model its generate jobs loaded), else in this process. The
server's key fields (generation backend, vLLM options) and the server settings are read from the config here,
not rule params: where a job runs must not change (or rerun) its output. This script imports no torch: with a
server running, the job is a thin client.
"""

from tunelens.config import generation_server_fields
from tunelens.jobs import job_log, use_job_threads
from tunelens.scoring.perplexity import run_perplexity_job
from tunelens.settings.generation import GenerationSection

job_log(snakemake.log[0])  # errors and tracebacks go to the rule's log too
use_job_threads(snakemake.threads, torch=False)  # the OpenMP variables; a server started here inherits them
params = snakemake.params
generation = GenerationSection.of_config(snakemake.config)  # validated by the workflow
runtime_min = getattr(snakemake.resources, "runtime", None)
job = dict(
    test_file=snakemake.input.test,
    model_name=snakemake.wildcards.model,
    model_path=params.model_path,
    model_source=params.source,
    variant=snakemake.wildcards.variant,
    adapter_dir=snakemake.input.adapter[0] if snakemake.input.adapter else None,
    prompt_format=params.prompt_format,
    batch_size=params.batch_size,
    max_rows=params.max_rows,
    device=params.device,
    samples=params.samples,
    confidence=params.confidence,
    seed=params.seed,
    # What the model's generate jobs key their server with, so both kinds of job share one server.
    **generation_server_fields(snakemake.config, snakemake.wildcards.model),
    gpus=snakemake.resources.gpu,
)
run_perplexity_job(
    job,
    snakemake.output.scores,
    snakemake.output.rows,
    server=generation.server,
    threads=snakemake.threads,
    start_timeout_s=generation.server_start_timeout_s,
    idle_timeout_s=generation.server_idle_timeout_s,
    request_timeout_s=runtime_min * 60 if isinstance(runtime_min, (int, float)) and runtime_min > 0 else 24 * 3600,
)
