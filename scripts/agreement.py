"""Rule generation_agreement: the same greedy prompts through hf and vllm, token-level agreement report."""

from tunelens.jobs import job_log, use_job_threads
from tunelens.generation.agreement import agreement

job_log(snakemake.log[0])  # errors and tracebacks go to the rule's log too
use_job_threads(snakemake.threads)
params = snakemake.params
agreement(
    params.model_path,
    snakemake.input.test,
    snakemake.output[0],
    prompt_format=params.prompt_format,
    adapter_dir=snakemake.input.adapter[0] if snakemake.input.adapter else None,
    max_rows=params.rows,
    max_new_tokens=params.max_new_tokens,
    max_prompt_tokens=params.max_prompt_tokens,
    vllm_python=params.vllm_python,
    device=params.device,
    vllm_options=params.vllm,
)
