# Aggregation: summary tables, tidy CSV and plots, from the score files alone (tunelens.report).
# Rerunning one model's stages updates the report without recomputing anything else.


rule report:
    input:
        unpack(report_inputs),
    output:
        summary_md=report(
            REPORT["summary_md"],
            caption="../report/summary.rst",
            category="Summary",
            labels={"file": "summary.md (Markdown)"},
        ),
        summary_html=report(
            REPORT["summary_html"],
            caption="../report/summary.rst",
            category="Summary",
            labels={"file": "summary tables"},
        ),
        summary_csv=report(
            REPORT["summary_csv"],
            caption="../report/summary_csv.rst",
            category="Summary",
            labels={"file": "summary.csv (tidy table)"},
        ),
        plots=report(
            directory(REPORT["plots"]),
            patterns=["{plot_kind,sweep|layers|loss}_{plot_name}.png"],
            caption="../report/plots.rst",
            category="Plots",
            subcategory=report_plot_group,
            labels={"plot": "{plot_name}"},
        ),
    log:
        "logs/report/report.log",
    benchmark:
        "benchmarks/report/report.tsv"
    conda:
        "../envs/core.yaml"
    resources:
        mem_mb=2000,
        runtime=20,
    params:
        code=code_version("report.py"),
        decoding_configs=report_decoding_configs(),
        default_config=STUDY.default_decoding,
        bootstrap_samples=lookup(dpath="scoring/bootstrap_samples", within=config),
        confidence=lookup(dpath="scoring/confidence", within=config),
        multiple_comparisons=lookup(dpath="scoring/multiple_comparisons", within=config),
        seed=lookup(dpath="seed", within=config),
        config_hash=report_config_hash(),
        evaluation_set=DATASET,
        evaluation_sets=list(EVALSETS),
        benchmarks_dir="benchmarks",
        job_gpus=report_job_gpus(),
        device=lookup(dpath="device", within=config),
    script:
        "../scripts/report.py"
