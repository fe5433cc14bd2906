"""Snakemake entry point of rule `finetune` (see tunelens.training.finetune.finetune)."""
import logging
import sys

log_file = open(snakemake.log[0], "w", buffering=1)
# transformers/TRL/datasets write warnings and progress to stderr: keep them in the job's log too.
sys.stderr = log_file
logging.basicConfig(stream=log_file, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

from tunelens.jobs import use_job_threads  # noqa: E402

use_job_threads(snakemake.threads)

import datasets  # noqa: E402

from tunelens.training.finetune import finetune  # noqa: E402

datasets.disable_progress_bars()  # one bar per map() call would bury the training log
params = snakemake.params
finetune(
    model_path=params.model_path,
    train_jsonl=snakemake.input.train,
    adapter_dir=snakemake.output.adapter,
    train_log=snakemake.output.train_log,
    metrics_json=snakemake.output.metrics,
    loss_png=snakemake.output.loss_png,
    checkpoint_dir=params.checkpoint_dir,
    settings=dict(params.settings),
    prompt_format=params.prompt_format,
    seed=params.seed,
    device=params.device,
    revision=params.revision,
    model_name=snakemake.wildcards.model,
    on_bad_rows=params.on_bad_rows,
    gpus=snakemake.resources.gpu,
)
