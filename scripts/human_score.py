"""Snakemake entry point of rule `human_score` (see tunelens.scoring.human.human_scores)."""

from tunelens.jobs import job_log
from tunelens.scoring.human import human_scores

job_log(snakemake.log[0])  # errors and tracebacks go to the rule's log too
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
