"""Rule generation_agreement: the same greedy prompts through hf and vllm, token-level agreement report."""

import logging

from tunelens.jobs import use_job_threads
from tunelens.agreement import agreement

logging.basicConfig(
    filename=snakemake.log[0], level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
)
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
