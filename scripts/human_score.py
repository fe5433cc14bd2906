"""Snakemake entry point of rule `human_score` (see tunelens.human.human_scores)."""
import logging

from tunelens.human import human_scores

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
params = snakemake.params
human_scores(
    snakemake.input.ratings,
    snakemake.input.key,
    {
        tuple(group): (scores, rows)
        for group, scores, rows in zip(params.groups, snakemake.output.scores, snakemake.output.rows)
    },
    sheet_csv=snakemake.input.sheet,
    samples=params.samples,
    confidence=params.confidence,
    seed=params.seed,
)
