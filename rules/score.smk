# Scoring: generation files -> score files with bootstrap CIs; reference perplexity; optional LLM judge;
# blind human rating sheets and their read-back. Formats: docs/ARCHITECTURE.md; metrics: docs/scoring.md.
# Input functions and params: rules/common.smk (scoring section).


rule score:
    input:
        generations=out("generation"),
        meta=out("generation_meta"),
        bertscore_model=bertscore_model_input,
    output:
        scores=report(
            out("scores"),
            caption="../report/score.rst",
            category="Scores",
            subcategory="{model}",
            labels={
                "model": "{model}",
                "variant": "{variant}",
                "decoding": "{decoding}",
            },
        ),
        rows=out("score_rows"),
    log:
        "logs/score/{model}/{variant}/{decoding}.log",
    benchmark:
        "benchmarks/score/{model}/{variant}/{decoding}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: SCORE_THREADS
    resources:
        gpu=score_gpus,
        mem_mb=8000,
        runtime=60,
    params:
        code=code_version("score.py"),
        metrics=score_metrics,
        context=score_context,
        samples=scoring_config("bootstrap_samples"),
        confidence=scoring_config("confidence"),
        seed=lookup(dpath="seed", within=config),
        layer=None,
    script:
        "../scripts/score.py"


rule score_early_exit:
    input:
        generations=out("early_exit"),
        meta=out("early_exit_meta"),
        bertscore_model=bertscore_model_input,
    output:
        scores=out("early_exit_scores"),
        rows=out("early_exit_rows"),
    log:
        "logs/score_early_exit/{model}/{variant}/layer_{layer}.log",
    benchmark:
        "benchmarks/score_early_exit/{model}/{variant}/layer_{layer}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: SCORE_THREADS
    resources:
        gpu=score_gpus,
        mem_mb=8000,
        runtime=60,
    params:
        code=code_version("score.py"),
        metrics=score_metrics,
        context=score_context,
        samples=scoring_config("bootstrap_samples"),
        confidence=scoring_config("confidence"),
        seed=lookup(dpath="seed", within=config),
        layer=early_exit_score_layer,
    script:
        "../scripts/score.py"


rule perplexity:
    input:
        test=SPLIT["test"],
        model=model_input,
        adapter=adapter_input,
    output:
        scores=report(
            out("perplexity"),
            caption="../report/score_perplexity.rst",
            category="Scores",
            subcategory="{model}",
            labels={
                "model": "{model}",
                "variant": "{variant}",
                "metric": "perplexity",
            },
        ),
        rows=out("perplexity_rows"),
    log:
        "logs/perplexity/{model}/{variant}.log",
    benchmark:
        "benchmarks/perplexity/{model}/{variant}.tsv"
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
        code=code_version("perplexity.py"),
        source=model_field("source"),
        model_path=model_path,
        prompt_format=model_field("prompt_format"),
        batch_size=scoring_config("perplexity_batch_size"),
        max_rows=lookup(dpath="decoding/max_test_rows", within=config),
        samples=scoring_config("bootstrap_samples"),
        confidence=scoring_config("confidence"),
        seed=lookup(dpath="seed", within=config),
        device=lookup(dpath="device", within=config),
    script:
        "../scripts/perplexity.py"


rule judge:
    input:
        generations=out("generation"),
        meta=out("generation_meta"),
        test=SPLIT["test"],
        judge_model=judge_model_input,
    output:
        scores=out("judge"),
        rows=out("judge_rows"),
    log:
        "logs/judge/{model}/{variant}/{decoding}.log",
    benchmark:
        "benchmarks/judge/{model}/{variant}/{decoding}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: model_threads
    resources:
        gpu=model_gpus,
        mem_mb=model_resource("mem_mb"),
        runtime=model_resource("runtime"),
        cpus_per_task=model_resource("cpus"),
    params:
        code=code_version("judge.py"),
        judge_model=judge_model_name,
        judge_path=judge_model_path,
        batch_size=scoring_config("judge/batch_size"),
        samples=scoring_config("bootstrap_samples"),
        confidence=scoring_config("confidence"),
        seed=lookup(dpath="seed", within=config),
        device=lookup(dpath="device", within=config),
    script:
        "../scripts/judge.py"


# The judge on each early-exit generation (probe.early_exit), when the judge is on: the per-layer table's Judge
# column. Same params, script and score-file format as `judge`; the file carries the layer (from the wildcard).
use rule judge as judge_early_exit with:
    input:
        generations=out("early_exit"),
        meta=out("early_exit_meta"),
        test=SPLIT["test"],
        judge_model=judge_model_input,
    output:
        scores=out("early_exit_judge"),
        rows=out("early_exit_judge_rows"),
    log:
        "logs/judge_early_exit/{model}/{variant}/layer_{layer}.log",
    benchmark:
        "benchmarks/judge_early_exit/{model}/{variant}/layer_{layer}.tsv"


rule human_sheet:
    input:
        generations=human_generation_files,
        test=SPLIT["test"],
    output:
        sheet=report(
            out("human_sheet"),
            caption="../report/score_human_sheet.rst",
            category="Human rating",
        ),
        key=out("human_key"),
    log:
        "logs/human_sheet/human_sheet.log",
    benchmark:
        "benchmarks/human_sheet/human_sheet.tsv"
    conda:
        "../envs/core.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=code_version("human_sheet.py"),
        groups=human_groups(),
        sample_size=scoring_config("human/sample_size"),
        seed=lookup(dpath="seed", within=config),
    script:
        "../scripts/human_sheet.py"


rule human_score:
    input:
        ratings=human_rating_files(),
        sheet=out("human_sheet"),
        key=out("human_key"),
    output:
        scores=human_score_outputs("json"),
        rows=human_score_outputs("rows"),
    log:
        "logs/human_score/human_score.log",
    benchmark:
        "benchmarks/human_score/human_score.tsv"
    conda:
        "../envs/core.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=code_version("human_score.py"),
        groups=human_groups(),
        samples=scoring_config("bootstrap_samples"),
        confidence=scoring_config("confidence"),
        seed=lookup(dpath="seed", within=config),
    script:
        "../scripts/human_score.py"


# ----------------------------------------------------------------------- evaluation sets (results/eval/{evalset}/)
# The jobs above on each evaluation set's rows; score_context gives the set's own kind (CodeBLEU or not).
use rule score as score_evalset with:
    input:
        generations=out("generation", EVAL),
        meta=out("generation_meta", EVAL),
        bertscore_model=bertscore_model_input,
    output:
        scores=report(
            out("scores", EVAL),
            caption="../report/score.rst",
            category="Scores",
            subcategory="{model}",
            labels={
                "model": "{model}",
                "variant": "{variant}",
                "decoding": "{decoding}",
                "evaluation set": "{evalset}",
            },
        ),
        rows=out("score_rows", EVAL),
    log:
        "logs/score_evalset/{evalset}/{model}/{variant}/{decoding}.log",
    benchmark:
        "benchmarks/score_evalset/{evalset}/{model}/{variant}/{decoding}.tsv"


use rule perplexity as perplexity_evalset with:
    input:
        test=f"{EVAL}/test.jsonl",
        model=model_input,
        adapter=adapter_input,
    output:
        scores=report(
            out("perplexity", EVAL),
            caption="../report/score_perplexity.rst",
            category="Scores",
            subcategory="{model}",
            labels={
                "model": "{model}",
                "variant": "{variant}",
                "metric": "perplexity",
                "evaluation set": "{evalset}",
            },
        ),
        rows=out("perplexity_rows", EVAL),
    log:
        "logs/perplexity_evalset/{evalset}/{model}/{variant}.log",
    benchmark:
        "benchmarks/perplexity_evalset/{evalset}/{model}/{variant}.tsv"


use rule judge as judge_evalset with:
    input:
        generations=out("generation", EVAL),
        meta=out("generation_meta", EVAL),
        test=f"{EVAL}/test.jsonl",
        judge_model=judge_model_input,
    output:
        scores=out("judge", EVAL),
        rows=out("judge_rows", EVAL),
    log:
        "logs/judge_evalset/{evalset}/{model}/{variant}/{decoding}.log",
    benchmark:
        "benchmarks/judge_evalset/{evalset}/{model}/{variant}/{decoding}.tsv"


# One blind sheet per evaluation set; its filled sheets go into scoring.human.ratings_dir/<evalset>/.
use rule human_sheet as human_sheet_evalset with:
    input:
        generations=human_generation_files,
        test=f"{EVAL}/test.jsonl",
    output:
        sheet=report(
            out("human_sheet", EVAL),
            caption="../report/score_human_sheet.rst",
            category="Human rating",
            labels={"evaluation set": "{evalset}"},
        ),
        key=out("human_key", EVAL),
    log:
        "logs/human_sheet_evalset/{evalset}.log",
    benchmark:
        "benchmarks/human_sheet_evalset/{evalset}.tsv"


use rule human_score as human_score_evalset with:
    input:
        ratings=evalset_human_rating_files,
        sheet=out("human_sheet", EVAL),
        key=out("human_key", EVAL),
    output:
        scores=human_score_outputs("json", EVAL),
        rows=human_score_outputs("rows", EVAL),
    log:
        "logs/human_score_evalset/{evalset}.log",
    benchmark:
        "benchmarks/human_score_evalset/{evalset}.tsv"
