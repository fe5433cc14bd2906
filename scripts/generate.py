"""Rule generate: one (model, variant, decoding config) -> generation .jsonl + .meta.json."""

from tunelens.jobs import job_log, use_job_threads
from tunelens.generate import generate

job_log(snakemake.log[0])  # errors and tracebacks go to the rule's log too
use_job_threads(snakemake.threads)
params = snakemake.params
settings = dict(params.settings)
generate(
    snakemake.input.test,
    snakemake.output.generations,
    snakemake.output.meta,
    model_name=snakemake.wildcards.model,
    model_path=params.model_path,
    model_source=params.model_source,
    variant=snakemake.wildcards.variant,
    adapter_dir=snakemake.input.adapter[0] if snakemake.input.adapter else None,
    prompt_format=params.prompt_format,
    decoding_config=params.decoding,
    max_new_tokens=settings["max_new_tokens"],
    stop=settings["stop"],
    seed=params.seed,
    beam_mode=settings["beam_mode"],
    backend=params.backend,
    batch_size=settings["batch_size"],
    max_prompt_tokens=settings["max_prompt_tokens"],
    max_test_rows=settings["max_test_rows"],
    device=params.device,
    gpus=snakemake.resources.gpu,
    vllm_options=params.vllm,
)
