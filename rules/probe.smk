# Per-layer probe ("premature layers", as in DoLa): logit lens and early-exit generation.
# Early-exit files use the generation row format; rule `score_early_exit` (scoring stage) scores them.


rule logit_lens:
    input:
        test=SPLIT["test"],
        model=model_input,
        adapter=adapter_input,
    output:
        lens=out("lens"),
        heatmap=report(
            out("lens_heatmap"),
            caption="../report/probe_lens_heatmap.rst",
            category="Layer probe",
            subcategory="{model}",
            labels={"model": "{model}", "variant": "{variant}", "plot": "top tokens"},
        ),
        entropy=report(
            out("lens_entropy"),
            caption="../report/probe_lens_entropy.rst",
            category="Layer probe",
            subcategory="{model}",
            labels={
                "model": "{model}",
                "variant": "{variant}",
                "plot": "entropy and KL",
            },
        ),
    log:
        "logs/logit_lens/{model}/{variant}.log",
    benchmark:
        "benchmarks/logit_lens/{model}/{variant}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: model_threads
    resources:
        **SERVER_SLOTS,
        **MODEL_JOB,
        gpu=model_gpus,
        mem_mb=model_resource("mem_mb"),
        runtime=model_resource("runtime"),
        cpus_per_task=model_resource("cpus"),
    params:
        code=code_version("logit_lens.py"),
        source=model_field("source"),
        model_path=model_path,
        prompt_format=model_field("prompt_format"),
        layer_specs=model_field("layer_specs"),
        planned_layers=model_field("probe_layers"),
        lens_prompts=probe_config("lens_prompts"),
        lens_test_prompts=probe_config("lens_test_prompts"),
        top_k=probe_config("lens_top_k"),
        new_tokens=probe_config("lens_new_tokens"),
        max_prompt_tokens=lookup(dpath="generation/max_prompt_tokens", within=config),
        seed=lookup(dpath="seed", within=config),
        device=lookup(dpath="device", within=config),
    script:
        "../scripts/logit_lens.py"


rule early_exit:
    input:
        test=SPLIT["test"],
        model=model_input,
        adapter=adapter_input,
    output:
        generations=out("early_exit"),
        meta=out("early_exit_meta"),
    log:
        "logs/early_exit/{model}/{variant}/layer_{layer}.log",
    benchmark:
        "benchmarks/early_exit/{model}/{variant}/layer_{layer}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: model_threads
    resources:
        **MODEL_JOB,
        **SERVER_SLOTS,
        gpu=model_gpus,
        mem_mb=model_resource("mem_mb"),
        runtime=model_resource("runtime"),
        cpus_per_task=model_resource("cpus"),
    params:
        code=code_version("early_exit.py"),
        source=model_field("source"),
        model_path=model_path,
        prompt_format=model_field("prompt_format"),
        layer=early_exit_layer,
        layer_specs=model_field("layer_specs"),
        planned_layers=model_field("probe_layers"),
        decoding=early_exit_decoding,
        beam_mode=lookup(dpath="decoding/beam_mode", within=config),
        max_test_rows=probe_config("early_exit/max_test_rows"),
        max_new_tokens=probe_config("early_exit/max_new_tokens"),
        stop=lookup(dpath="decoding/stop", within=config),
        batch_size=lookup(dpath="generation/batch_size", within=config),
        max_prompt_tokens=lookup(dpath="generation/max_prompt_tokens", within=config),
        static_cache=lookup(dpath="generation/static_cache", within=config),
        compile_backend=lookup(dpath="generation/compile_backend", within=config),
        seed=lookup(dpath="seed", within=config),
        device=lookup(dpath="device", within=config),
    script:
        "../scripts/early_exit.py"
