"""Snakemake entry point of rules `download_model` and `download_dataset` (see tunelens.hub.download)."""

from tunelens.hub import download
from tunelens.jobs import job_log

job_log(snakemake.log[0])  # errors and tracebacks go to the rule's log too
params = snakemake.params
download(params.hub_id, snakemake.output[0], revision=params.revision, repo_type=params.repo_type)
