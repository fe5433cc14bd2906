"""Snakemake entry point of rules `materialize_model` and `materialize_bertscore_model`."""
import logging

from tunelens.jobs import use_job_threads
from tunelens.models import materialize_embedded

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
use_job_threads(snakemake.threads)
materialize_embedded(snakemake.params.embedded, snakemake.output[0])
