# Fine-tuning: one LoRA / QLoRA job per model with finetune.enabled (tunelens.training.finetune, docs/finetune.md).
# Every setting is a param, so editing one model's finetune keys reruns only that model's fine-tune and
# what depends on its adapter. Checkpoints live in results/checkpoints/{model}/ (not an output, so a failed
# or killed job keeps them and its rerun resumes); the job deletes them when it completes.


rule finetune:
    input:
        train=SPLIT["train"],
        model=model_input,
    output:
        adapter=directory(out("adapter")),
        train_log=out("train_log"),
        metrics=report(
            out("finetune_metrics"),
            caption="../report/finetune_metrics.rst",
            category="Fine-tuning",
            subcategory="{model}",
            labels={"model": "{model}", "file": "metrics.json"},
        ),
        loss_png=report(
            out("loss_plot"),
            caption="../report/finetune_loss.rst",
            category="Fine-tuning",
            subcategory="{model}",
            labels={"model": "{model}", "file": "loss.png"},
        ),
    log:
        "logs/finetune/{model}.log",
    benchmark:
        "benchmarks/finetune/{model}.tsv"
    wildcard_constraints:
        model=_alternation(FINETUNED_MODELS) or "(?!)",
    priority: CRITICAL_PATH_PRIORITY
    conda:
        "../envs/torch.yaml"
    threads: model_threads
    resources:
        gpu=model_gpus,
        mem_mb=model_resource("mem_mb"),
        runtime=model_resource("runtime"),
        cpus_per_task=model_resource("cpus"),
    params:
        code=code_version("finetune.py"),
        model_path=model_path,
        revision=model_field("revision"),
        prompt_format=model_field("prompt_format"),
        settings=model_field("finetune"),
        seed=lookup(dpath="seed", within=config),
        device=lookup(dpath="device", within=config),
        checkpoint_dir=finetune_checkpoint_dir,
        on_bad_rows=lookup(dpath="dataset/on_bad_rows", within=config),
    script:
        "../scripts/finetune.py"
