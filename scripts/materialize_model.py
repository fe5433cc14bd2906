"""Snakemake entry point of rules `materialize_model` and `materialize_bertscore_model`."""

from tunelens.jobs import job_log, use_job_threads
from tunelens.models import materialize_embedded

job_log(snakemake.log[0])  # errors and tracebacks go to the rule's log too
use_job_threads(snakemake.threads)
materialize_embedded(snakemake.params.embedded, snakemake.output[0])
