"""Snakemake entry point of rule `logit_lens` (see tunelens.probe.run_logit_lens)."""

from tunelens.jobs import job_log, use_job_threads
from tunelens.probe import run_logit_lens

job_log(snakemake.log[0])  # errors and tracebacks go to the rule's log too
use_job_threads(snakemake.threads)
params = snakemake.params
run_logit_lens(
    model_name=snakemake.wildcards.model,
    source=params.source,
    model_path=params.model_path,
    adapter_dir=snakemake.input.adapter[0] if snakemake.input.adapter else None,
    variant=snakemake.wildcards.variant,
    test_path=snakemake.input.test,
    output_json=snakemake.output.lens,
    output_heatmap=snakemake.output.heatmap,
    output_entropy=snakemake.output.entropy,
    layer_specs=params.layer_specs,
    expected_layers=params.planned_layers,
    prompt_format=params.prompt_format,
    lens_prompts=params.lens_prompts,
    lens_test_prompts=params.lens_test_prompts,
    top_k=params.top_k,
    new_tokens=params.new_tokens,
    max_prompt_tokens=params.max_prompt_tokens,
    seed=params.seed,
    device=params.device,
    gpus=snakemake.resources.gpu,
)
