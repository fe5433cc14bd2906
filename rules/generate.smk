# Generation: one job per (model, variant, decoding config), so changing or adding one decoding config
# reruns only its jobs. Backends, semantics and formats: docs/generation.md, docs/ARCHITECTURE.md.
# Input functions and params: rules/common.smk (generate section).


rule generate:
    input:
        test=SPLIT["test"],
        model=model_input,
        adapter=adapter_input,
    output:
        generations=report(
            out("generation"),
            caption="../report/generate.rst",
            category="Generations",
            subcategory="{model}",
            labels={
                "model": "{model}",
                "variant": "{variant}",
                "decoding": "{decoding}",
            },
        ),
        meta=out("generation_meta"),
    log:
        "logs/generate/{model}/{variant}/{decoding}.log",
    benchmark:
        "benchmarks/generate/{model}/{variant}/{decoding}.tsv"
    priority: GENERATE_PRIORITY
    conda:
        generation_conda_env
    threads: model_threads
    resources:
        **MODEL_JOB,
        **SERVER_SLOTS,
        gpu=model_gpus,
        mem_mb=model_resource("mem_mb"),
        runtime=model_resource("runtime"),
        cpus_per_task=model_resource("cpus"),
    params:
        code=code_version("generate.py"),
        model_path=model_path,
        model_source=model_field("source"),
        prompt_format=model_field("prompt_format"),
        decoding=decoding_params,
        settings=generation_settings,
        backend=model_field("generation_backend"),
        vllm=vllm_options,
        seed=lookup(dpath="seed", within=config),
        device=lookup(dpath="device", within=config),
    script:
        "../scripts/generate.py"


# Not part of `all`: run on demand, e.g. `snakemake results/agreement/smollm2/base.json`.
rule generation_agreement:
    input:
        test=SPLIT["test"],
        model=model_input,
        adapter=adapter_input,
    output:
        report(
            out("agreement"),
            caption="../report/generate_agreement.rst",
            category="Generations",
            subcategory="{model}",
            labels={"model": "{model}", "variant": "{variant}", "check": "hf vs vllm"},
        ),
    log:
        "logs/generation_agreement/{model}/{variant}.log",
    benchmark:
        "benchmarks/generation_agreement/{model}/{variant}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: model_threads
    resources:
        gpu=model_gpus,
        mem_mb=model_resource("mem_mb"),
        runtime=model_resource("runtime"),
        cpus_per_task=model_resource("cpus"),
    params:
        code=code_version("agreement.py"),
        model_path=model_path,
        prompt_format=model_field("prompt_format"),
        rows=lookup(dpath="generation/agreement_rows", within=config),
        max_new_tokens=lookup(
            dpath="generation/agreement_max_new_tokens", within=config
        ),
        max_prompt_tokens=lookup(dpath="generation/max_prompt_tokens", within=config),
        vllm_python=lookup(dpath="generation/vllm_python", within=config),
        vllm=vllm_options,
        device=lookup(dpath="device", within=config),
    script:
        "../scripts/agreement.py"


# The same job on an evaluation set's rows (results/eval/{evalset}/, rule evalset).
use rule generate as generate_evalset with:
    input:
        test=f"{EVAL}/test.jsonl",
        model=model_input,
        adapter=adapter_input,
    output:
        generations=report(
            out("generation", EVAL),
            caption="../report/generate.rst",
            category="Generations",
            subcategory="{model}",
            labels={
                "model": "{model}",
                "variant": "{variant}",
                "decoding": "{decoding}",
                "evaluation set": "{evalset}",
            },
        ),
        meta=out("generation_meta", EVAL),
    log:
        "logs/generate_evalset/{evalset}/{model}/{variant}/{decoding}.log",
    benchmark:
        "benchmarks/generate_evalset/{evalset}/{model}/{variant}/{decoding}.tsv"
