"""Rule `logit_lens`: one (model, variant) -> lens.json + its two plots.

The lens (tunelens.probe.lens.logit_lens_output) is computed in the model's generation server when it can serve it
(tunelens.probe.lens.run_logit_lens_job: the model its generate jobs loaded), else in this process; the plots are
drawn here. The server's key fields (generation backend, vLLM options) and the server settings are read from
the config here, not rule params: where a job runs must not change (or rerun) its output.
"""

from tunelens.config import generation_server_fields
from tunelens.jobs import job_log, use_job_threads
from tunelens.probe.lens import run_logit_lens_job
from tunelens.settings.generation import GenerationSection

job_log(snakemake.log[0])  # errors and tracebacks go to the rule's log too
use_job_threads(snakemake.threads, torch=False)  # the OpenMP variables; a server started here inherits them
params = snakemake.params
generation = GenerationSection.of_config(snakemake.config)  # validated by the workflow
runtime_min = getattr(snakemake.resources, "runtime", None)
job = dict(
    model_name=snakemake.wildcards.model,
    source=params.source,
    model_path=params.model_path,
    adapter_dir=snakemake.input.adapter[0] if snakemake.input.adapter else None,
    variant=snakemake.wildcards.variant,
    test_path=snakemake.input.test,
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
    # What the model's generate jobs key their server with, so both kinds of job share one server.
    **generation_server_fields(snakemake.config, snakemake.wildcards.model),
    gpus=snakemake.resources.gpu,
)
run_logit_lens_job(
    job,
    snakemake.output.lens,
    snakemake.output.heatmap,
    snakemake.output.entropy,
    server=generation.server,
    threads=snakemake.threads,
    start_timeout_s=generation.server_start_timeout_s,
    idle_timeout_s=generation.server_idle_timeout_s,
    request_timeout_s=runtime_min * 60 if isinstance(runtime_min, (int, float)) and runtime_min > 0 else 24 * 3600,
)
