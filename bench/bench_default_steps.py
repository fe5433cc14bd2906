"""How many fine-tuning steps does the embedded default need? Fine-tune each embedded model for several step
counts and score the fine-tuned variant at the default decoding config, with the pipeline itself.

Each step count is one `snakemake` run in its own folder (OUT/steps_<i>/) on a copy of config.yaml whose
models' finetune.max_steps are that count's, asking only for the fine-tuned variant's score files at the
default decoding config: split -> finetune -> generate -> score, the rules and code of `make run`. The
materialised models (results/models/) are copied from --from, a finished default run, so each run fine-tunes
and generates only; `--rerun-triggers mtime` keeps the copies. The base variant's scores (steps 0) are read
from --from too: the base model does not depend on the step count.

    python bench/bench_default_steps.py --from /path/to/finished/run --out /tmp/steps \
        --smollm2 10,20,30 --gemma3 4,8,12

Prints a markdown table per model: steps, fine-tune CPU seconds and wall (benchmarks/finetune/<model>.tsv),
first/final training loss, BLEU and ROUGE-L with their bootstrap CIs, and whether the CI separates from the
base variant's. Runs of --from (its own step counts) are listed too, as they are the current default.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tunelens.cost import read_benchmark  # noqa: E402

MODELS = ("smollm2", "gemma3")


def default_decoding(config: dict) -> str:
    d = config["decoding"]["defaults"]
    return f"top_k_{d['top_k']}_num_beams_{d['num_beams']}_temp_{d['temperature']}"


def read_run(workdir: Path, model: str, variant: str, decoding: str) -> dict:
    scores = json.loads((workdir / f"results/scores/{model}/{variant}/{decoding}.json").read_text())["metrics"]
    row = {m: (scores[m]["value"], scores[m]["ci_low"], scores[m]["ci_high"]) for m in ("bleu", "rougeL")}
    if variant == "finetuned":
        bench = read_benchmark(workdir / f"benchmarks/finetune/{model}.tsv")[0]
        metrics = json.loads((workdir / f"results/finetune/{model}/metrics.json").read_text())
        row.update(cpu_s=bench["cpu_time"], wall_s=bench["s"], steps=metrics["steps"],
                   first_loss=metrics["first_loss"], final_loss=metrics["final_loss"],
                   tokens_per_s=metrics["tokens_per_s"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", type=Path, required=True, help="a finished default run's folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=REPO_ROOT / "config.yaml")
    for model in MODELS:
        parser.add_argument(f"--{model}", required=True, help="comma-separated step counts, one per run")
    parser.add_argument("--cores", default="2")
    args = parser.parse_args()

    config = yaml.safe_load(args.config.read_text())
    decoding = default_decoding(config)
    steps = {model: [int(s) for s in getattr(args, model).split(",")] for model in MODELS}
    runs = len(steps[MODELS[0]])
    if any(len(counts) != runs for counts in steps.values()):
        parser.error("give every model the same number of step counts (one per run)")

    workdirs = []
    for i in range(runs):
        workdir = args.out / f"steps_{i}"
        workdirs.append(workdir)
        if (workdir / "done").exists():
            continue
        (workdir / "results").mkdir(parents=True, exist_ok=True)
        if not (workdir / "results/models").exists():
            shutil.copytree(args.source / "results/models", workdir / "results/models")
        run_config = json.loads(json.dumps(config))
        for model in MODELS:
            run_config["models"][model].setdefault("finetune", {})["max_steps"] = steps[model][i]
        (workdir / "config.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))
        targets = [f"results/scores/{model}/finetuned/{decoding}.json" for model in MODELS]
        command = [sys.executable, "-m", "snakemake", *targets, "--cores", args.cores,
                   "--snakefile", str(REPO_ROOT / "Snakefile"), "--directory", str(workdir),
                   "--configfile", str(workdir / "config.yaml"), "--rerun-triggers", "mtime"]
        print("+", " ".join(command), flush=True)
        subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        (workdir / "done").write_text("")

    results = {model: {"base": read_run(args.source, model, "base", decoding)} for model in MODELS}
    for model in MODELS:
        for workdir in [*workdirs, args.source]:
            row = read_run(workdir, model, "finetuned", decoding)
            results[model][row["steps"]] = row
    (args.out / "steps.json").write_text(json.dumps(results, indent=1))

    def ci(v):
        return f"{v[0]:.1f} [{v[1]:.1f}, {v[2]:.1f}]"

    for model in MODELS:
        base = results[model]["base"]
        print(f"\n{model}, decoding {decoding}; base: BLEU {ci(base['bleu'])}, "
              f"ROUGE-L {ci(tuple(100 * x for x in base['rougeL']))}")
        print("| steps | fine-tune CPU s | wall s | tok/s | loss first -> final | BLEU [95% CI] | ROUGE-L x100 [95% CI] "
              "| CIs apart from base |")
        print("|---|---|---|---|---|---|---|---|")
        for steps_done in sorted(k for k in results[model] if k != "base"):
            row = results[model][steps_done]
            apart = row["bleu"][1] > base["bleu"][2] and row["rougeL"][1] > base["rougeL"][2]
            print(f"| {steps_done} | {row['cpu_s']:.0f} | {row['wall_s']:.0f} | {row['tokens_per_s']:.0f} "
                  f"| {row['first_loss']:.2f} -> {row['final_loss']:.2f} | {ci(row['bleu'])} "
                  f"| {ci(tuple(100 * x for x in row['rougeL']))} | {'yes' if apart else 'no'} |")


if __name__ == "__main__":
    main()
