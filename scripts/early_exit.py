"""Rule `early_exit`: one (model, variant, layer) -> early-exit generation rows + .meta.json.

The work (tunelens.probe.probe.early_exit_output) runs in the model's generation server when it can serve it
(tunelens.generation.genserver.run_early_exit_job: one model load for every layer, both variants and the generate jobs),
else in this process. The server's key fields (generation backend, vLLM options) and the server settings are
read from the config here, not rule params: where a job runs must not change (or rerun) its output. This
script imports no torch: with a server running, the job is a thin client.
"""

from tunelens.config import generation_server_fields
from tunelens.generation.genserver import run_early_exit_job
from tunelens.jobs import job_log, use_job_threads
from tunelens.servers import server_reusable
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
    static_cache=params.static_cache,
    compile_backend=params.compile_backend,
    seed=params.seed,
    device=params.device,
    # What the model's generate jobs key their server with, so both kinds of job share one server.
    **generation_server_fields(snakemake.config, snakemake.wildcards.model),
    gpus=snakemake.resources.gpu,
)
run_early_exit_job(
    job,
    snakemake.output.generations,
    snakemake.output.meta,
    # Not for a job its allocation runs alone (SLURM without grouping): no other job could use the server.
    server=generation.server and server_reusable(),
    threads=snakemake.threads,
    start_timeout_s=generation.server_start_timeout_s,
    idle_timeout_s=generation.server_idle_timeout_s,
    request_timeout_s=runtime_min * 60 if isinstance(runtime_min, (int, float)) and runtime_min > 0 else 24 * 3600,
)
