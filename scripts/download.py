"""Snakemake entry point of rules `download_model` and `download_dataset` (see tunelens.hub.download)."""
import logging

from tunelens.hub import download

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
params = snakemake.params
download(params.hub_id, snakemake.output[0], revision=params.revision, repo_type=params.repo_type)
