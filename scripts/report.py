"""Snakemake entry point of rule `report` (see tunelens.report.write_report)."""
from pathlib import Path

from tunelens.jobs import job_log
from tunelens.report import ReportSettings, workflow_git_commit, write_report

job_log(snakemake.log[0])  # errors and tracebacks go to the rule's log too
params = snakemake.params
inputs = snakemake.input


def evaluation_set_inputs(names, inputs):
    """{set: {"scores": [...], ..., "manifest": path}} from the flat eval_* input lists (results/eval/<set>/...)."""
    by_set = {name: {} for name in names}
    for kind in ("scores", "perplexity", "judge", "human", "human_sheet"):
        for path in inputs.get(f"eval_{kind}") or []:
            by_set[Path(path).parts[2]].setdefault(kind, []).append(path)
    for path in inputs.get("eval_manifests") or []:
        by_set[Path(path).parts[2]]["manifest"] = path
    return by_set

write_report(
    score_files=list(inputs.get("scores") or []),
    perplexity_files=list(inputs.get("perplexity") or []),
    judge_files=list(inputs.get("judge") or []),
    human_files=list(inputs.get("human") or []),
    human_sheet_files=list(inputs.get("human_sheet") or []),
    early_exit_files=list(inputs.get("early_exit") or []),
    early_exit_judge_files=list(inputs.get("early_exit_judge") or []),
    finetune_metrics_files=list(inputs.get("finetune") or []),
    summary_md=snakemake.output.summary_md,
    summary_csv=snakemake.output.summary_csv,
    summary_html=snakemake.output.summary_html,
    plots_dir=snakemake.output.plots,
    settings=ReportSettings(
        decoding_configs=params.decoding_configs,
        default_config=params.default_config,
        bootstrap_samples=params.bootstrap_samples,
        confidence=params.confidence,
        multiple_comparisons=params.multiple_comparisons,
        seed=params.seed,
        config_hash=params.config_hash,
        # Read here, not a rule param: a docs-only commit must not rerun the report.
        git_commit=workflow_git_commit(Path(snakemake.scriptdir).parent),
        evaluation_set=params.evaluation_set,
    ),
    evaluation_sets=evaluation_set_inputs(params.evaluation_sets, inputs),
    split_manifest=(inputs.get("split_manifest") or [None])[0],
    benchmarks_dir=params.benchmarks_dir,
    job_gpus=params.job_gpus,
    device=params.device,
)
