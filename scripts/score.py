"""Snakemake entry point of rules `score` and `score_early_exit` (see tunelens.scoring.score.score_generation_file).

BERTScore runs in the run's BERTScore server (tunelens.scoring.metrics.bertscore_runner: one import of bert_score and
torch and one scorer load for all score jobs, the same values) when generation servers are on, except inside a
SLURM allocation, where each job would start a server of its own. This script imports no torch then.
"""

import os

from tunelens.scoring import metrics
from tunelens.jobs import job_log, use_job_threads
from tunelens.scoring.score import score_generation_file
from tunelens.settings.generation import GenerationSection

job_log(snakemake.log[0])  # errors and tracebacks go to the rule's log too
use_job_threads(snakemake.threads, torch=False)  # the OpenMP variables; a server started here inherits them
params = snakemake.params
generation = GenerationSection.of_config(snakemake.config)  # validated by the workflow
if generation.server and "SLURM_JOB_ID" not in os.environ:
    metrics.BERTSCORE_RUNNER = metrics.bertscore_runner(
        start_timeout_s=generation.server_start_timeout_s, idle_timeout_s=generation.server_idle_timeout_s
    )
score_generation_file(
    snakemake.input.generations,
    snakemake.output.scores,
    snakemake.output.rows,
    meta_file=snakemake.input.meta,
    metrics=params.metrics,
    context=params.context,
    samples=params.samples,
    confidence=params.confidence,
    seed=params.seed,
    model=snakemake.wildcards.model,
    variant=snakemake.wildcards.variant,
    config=snakemake.wildcards.get("decoding"),
    layer=params.layer,
)
