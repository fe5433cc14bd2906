# Data split: one dataset per study, deterministic and leakage-checked.


rule split:
    input:
        dataset_file_input,
        hub_dataset=hub_dataset_input,
    output:
        train=SPLIT["train"],
        test=SPLIT["test"],
        manifest=SPLIT["manifest"],
    log:
        f"logs/split/{DATASET}.log",
    benchmark:
        f"benchmarks/split/{DATASET}.tsv"
    conda:
        "../envs/core.yaml"
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        code=code_version("split.py"),
        source=lookup(dpath="dataset/source", within=config),
        name=DATASET,
        fields=lookup(dpath="dataset/fields", within=config),
        required_fields=list(STUDY.mapped_fields),
        on_bad_rows=lookup(dpath="dataset/on_bad_rows", within=config),
        seed=lookup(dpath="seed", within=config),
        test_size=lookup(dpath="dataset/test_size", within=config),
        max_train=lookup(dpath="dataset/max_train", within=config),
        hub_split=lookup(dpath="dataset/hub_split", within=config),
    script:
        "../scripts/split.py"


# Evaluation sets: each `evaluation_sets` entry used whole as test data, rows leaked from the training
# split dropped and counted in its manifest (tunelens.data.data.prepare_evaluation_set).
rule evalset:
    input:
        evalset_file_input,
        train=SPLIT["train"],
    output:
        test=f"{EVAL}/test.jsonl",
        manifest=f"{EVAL}/manifest.json",
    log:
        "logs/evalset/{evalset}.log",
    benchmark:
        "benchmarks/evalset/{evalset}.tsv"
    conda:
        "../envs/core.yaml"
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        code=code_version("evalset.py"),
        evalset=evalset_params,
        seed=lookup(dpath="seed", within=config),
    script:
        "../scripts/evalset.py"


# A hub dataset is downloaded once, on the submitting host (network), before the split reads it offline.
localrules:
    download_dataset,


rule download_dataset:
    output:
        directory(HUB_DATASET_DIR),
    log:
        f"logs/download_dataset/{DATASET}.log",
    benchmark:
        f"benchmarks/download_dataset/{DATASET}.tsv"
    conda:
        "../envs/core.yaml"
    params:
        hub_id=lookup(dpath="dataset/source", within=config),
        revision=lookup(dpath="dataset/revision", within=config),
        repo_type="dataset",
        code=code_version("download.py"),
    script:
        "../scripts/download.py"
