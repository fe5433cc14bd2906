"""Snakemake entry point of rule `early_exit` (see tunelens.probe.run_early_exit)."""

from tunelens.jobs import job_log, use_job_threads
from tunelens.probe import run_early_exit

job_log(snakemake.log[0])  # errors and tracebacks go to the rule's log too
use_job_threads(snakemake.threads)
params = snakemake.params
run_early_exit(
    model_name=snakemake.wildcards.model,
    source=params.source,
    model_path=params.model_path,
    adapter_dir=snakemake.input.adapter[0] if snakemake.input.adapter else None,
    variant=snakemake.wildcards.variant,
    test_path=snakemake.input.test,
    output_jsonl=snakemake.output.generations,
    output_meta=snakemake.output.meta,
    layer=params.layer,
    layer_specs=params.layer_specs,
    expected_layers=params.planned_layers,
    prompt_format=params.prompt_format,
    decoding=params.decoding,
    beam_mode=params.beam_mode,
    max_test_rows=params.max_test_rows,
    max_new_tokens=params.max_new_tokens,
    stop=params.stop,
    batch_size=params.batch_size,
    max_prompt_tokens=params.max_prompt_tokens,
    seed=params.seed,
    device=params.device,
)
