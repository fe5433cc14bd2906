"""Rule generate: one (model, variant, decoding config) -> generation .jsonl + .meta.json.

The generation itself runs in the model's generation server, in this process, or (backend vllm without
vLLM here) under generation.vllm_python: tunelens.generation.genserver.run_generation_job decides. Those settings
are read from the config here, not rule params: where a job runs must not change (or rerun) its output.
This script imports no torch: with a server running, the job is a thin client.
"""

from pathlib import Path

from tunelens.generation.genserver import run_generation_job
from tunelens.jobs import job_log, use_job_threads
from tunelens.servers import server_reusable
from tunelens.settings.generation import GenerationSection

job_log(snakemake.log[0])  # errors and tracebacks go to the rule's log too
use_job_threads(snakemake.threads, torch=False)  # the OpenMP variables; a server started here inherits them
params = snakemake.params
settings = dict(params.settings)
generation = GenerationSection.of_config(snakemake.config)  # validated by the workflow
vllm_python = generation.vllm_python
if vllm_python is None:  # the CPU venv `make vllm-venv` builds, when there is one
    default = Path(snakemake.scriptdir).parent / ".venv-vllm" / "bin" / "python"
    vllm_python = str(default) if default.exists() else None
runtime_min = getattr(snakemake.resources, "runtime", None)
job = dict(
    test_file=snakemake.input.test,
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
    static_cache=settings["static_cache"],
    compile_backend=settings["compile_backend"],
    merge_adapter=settings["merge_adapter"],
    device=params.device,
    gpus=snakemake.resources.gpu,
    vllm_options=params.vllm,
)
run_generation_job(
    job,
    snakemake.output.generations,
    snakemake.output.meta,
    vllm_python=vllm_python,
    # Not for a job its allocation runs alone (SLURM without grouping): no other job could use the server.
    server=generation.server and server_reusable(),
    threads=snakemake.threads,
    start_timeout_s=generation.server_start_timeout_s,
    idle_timeout_s=generation.server_idle_timeout_s,
    request_timeout_s=runtime_min * 60 if isinstance(runtime_min, (int, float)) and runtime_min > 0 else 24 * 3600,
)
