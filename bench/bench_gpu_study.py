"""The whole study on one GPU: the real DAG on a 7B shape, and the recipe users have today, side by side.

Runs in parts of under 10 minutes each (a part rebuilds what it needs: the random 7B model takes ~40 s):

    # 1. fine-tuning: the plain TRL + PEFT + bitsandbytes recipe vs tunelens' defaults (same rows, seed, batch),
    #    each variant --repeats times, interleaved; median and spread of each
    python bench/bench_gpu_study.py --part finetune --data code_alpaca_2k.json --tokenizer TOKDIR \
        --plain-script plain_trl_qlora.py --out finetune.json
    # 2. generation: fixed batch sizes vs batch_size auto; one prompt at a time for each of the 13 configs
    python bench/bench_gpu_study.py --part generate --data code_alpaca_2k.json --tokenizer TOKDIR --out generate.json
    # 3. the DAG: snakemake --cores all --configfile configs/gpu-study.yaml, every stage to summary.md
    python bench/bench_gpu_study.py --part dag --data code_alpaca_2k.json --tokenizer TOKDIR --out dag.json
    # then, anywhere: the study table (GPU-seconds per stage, tunelens vs the recipe, load share)
    python bench/bench_gpu_study.py --table finetune.json generate.json dag.json

The model is a random-weight Llama-2-7B shape (bench_finetune.make_llama7b) with TOKDIR's tokenizer, written to
gpu-study/llama2-7b-random; the rows are real Alpaca-format rows (Code Alpaca), copied to gpu-study/.
GPU-seconds of a DAG stage = the sum of its jobs' wall time (Snakemake benchmark files) x the GPUs each job
held, which is what a cluster bills. "Loading" = a job's wall time less the time it spent computing (training
steps, generate calls, forward passes, as its own outputs record): interpreter start, imports, model load.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

STUDY_DIR = REPO_ROOT / "gpu-study"
MODEL_DIR = STUDY_DIR / "llama2-7b-random"
DATA_FILE = STUDY_DIR / "code_alpaca.json"
PRESET = REPO_ROOT / "configs" / "gpu-study.yaml"

for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                   "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}.items():
    os.environ.setdefault(key, value)


def setup(args) -> dict:
    """The random 7B model and the data at the paths the preset names; seconds each took."""
    from bench_finetune import make_llama7b

    timings = {}
    STUDY_DIR.mkdir(exist_ok=True)
    if not (MODEL_DIR / "config.json").exists():
        started = time.perf_counter()
        make_llama7b(MODEL_DIR, args.tokenizer)
        timings["make_model_s"] = round(time.perf_counter() - started, 1)
    shutil.copyfile(args.data, DATA_FILE)
    return timings


# --------------------------------------------------------------------------------------------- fine-tuning
def part_finetune(args) -> dict:
    """The plain recipe and tunelens variants, each run in a fresh process with the same rows/steps/batch/length/seed,
    `--repeats` times, interleaved (A B C A B C): one noisy run cannot make a ratio. Each variant reports the median
    of its runs' tokens/s and their spread; runs that would start after `--deadline` s are skipped (recorded)."""
    names = (["plain"] if args.plain_script else []) + args.variants.split(",")
    started = time.perf_counter()
    runs: dict[str, list] = {name: [] for name in names}
    for round_no in range(args.repeats):
        for name in names:
            if time.perf_counter() - started > args.deadline:
                runs[name].append({"skipped": f"past --deadline {args.deadline} s"})
                continue
            begin = time.perf_counter()
            summary = _run_plain(args, round_no) if name == "plain" else _run_tunelens(args, name, round_no)
            summary["wall_s"] = round(time.perf_counter() - begin, 1)
            summary["round"] = round_no
            runs[name].append(summary)
            print(f"round {round_no} {name}:", summary.get("tokens_per_s_median", summary.get("failed", "")[-300:]),
                  "tok/s", summary["wall_s"], "s", flush=True)
    return summarise_runs(runs)


def summarise_runs(runs: dict[str, list]) -> dict:
    """Per variant: the first good run's record, plus the median and spread of every good run's tokens/s; per
    variant and round, the ratio to the plain recipe's run of the same round."""
    results = {}
    for name, name_runs in runs.items():
        good = [r for r in name_runs if "tokens_per_s_median" in r]
        if not good:
            results[name] = {"failed": next((r.get("failed") or r.get("skipped") for r in name_runs), "no run"),
                             "runs": name_runs}
            continue
        tps = [r["tokens_per_s_median"] for r in good]
        median = statistics.median(tps)
        results[name] = {**good[0], "tokens_per_s_runs": tps, "tokens_per_s_median": median,
                         "spread": round((max(tps) - min(tps)) / median, 3), "repeats": len(good),
                         "runs": [{k: r.get(k) for k in ("round", "tokens_per_s_median", "wall_s", "first_loss",
                                                         "final_loss", "micro_batch_size", "gradient_checkpointing")}
                                  for r in name_runs]}
    plain = results.get("plain", {})
    if "tokens_per_s_runs" in plain:
        by_round = {r["round"]: r["tokens_per_s_median"] for r in plain["runs"] if r.get("tokens_per_s_median")}
        for name, entry in results.items():
            if name == "plain" or "tokens_per_s_runs" not in entry:
                continue
            entry["vs_plain_median"] = round(entry["tokens_per_s_median"] / plain["tokens_per_s_median"], 2)
            entry["vs_plain_by_round"] = [round(r["tokens_per_s_median"] / by_round[r["round"]], 2)
                                          for r in entry["runs"] if r.get("tokens_per_s_median") and r["round"] in by_round]
    return results


def _run_plain(args, round_no: int) -> dict:
    out = Path(args.work) / f"plain-{round_no}.json"
    proc = subprocess.run([sys.executable, args.plain_script, "--model", str(MODEL_DIR), "--data", str(DATA_FILE),
                           "--rows", str(args.rows), "--batch-size", "8", "--steps", str(args.steps),
                           "--max-length", str(args.max_seq_length), "--seed", "1234", "--out", str(out)], capture_output=True, text=True)
    if proc.returncode == 0 and out.exists():
        return json.loads(out.read_text())
    return {"failed": proc.stderr[-3000:]}


def _run_tunelens(args, variant: str, round_no: int) -> dict:
    """One run of bench_finetune.py; a variant spelled `old:VARIANT` runs it from `--checkout` (that tree's code)."""
    checkout, env = REPO_ROOT, None
    if variant.startswith("old:"):
        checkout, variant = Path(args.checkout).resolve(), variant[len("old:"):]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(checkout), os.environ.get("PYTHONPATH")]))}
    tag = ("old-" if checkout != REPO_ROOT else "") + variant
    out = Path(args.work) / f"tunelens-{tag}-{round_no}.json"
    proc = subprocess.run([sys.executable, str(checkout / "bench" / "bench_finetune.py"), "--model", str(MODEL_DIR),
                           "--data", str(DATA_FILE), "--rows", str(args.rows), "--batch-size", "8",
                           "--steps", str(args.steps), "--max-seq-length", str(args.max_seq_length), "--seed", "1234",
                           "--variants", variant, "--learning-rate", str(args.learning_rate),
                           "--lr-scheduler", args.lr_scheduler, "--warmup-ratio", str(args.warmup_ratio),
                           "--out", str(out)], text=True, capture_output=True, env=env)
    summaries = json.loads(out.read_text()) if out.exists() else []
    if summaries and "failed" not in summaries[0]:
        return summaries[0]
    return {"failed": (summaries[0].get("failed") if summaries else None) or proc.stderr[-3000:]}


# --------------------------------------------------------------------------------------------- generation
def part_generate(args) -> dict:
    """tokens/s of fixed batch sizes and of batch_size auto on the same prompts (study default config), then
    one prompt at a time for each decoding config on a few rows (the recipe users start from)."""
    import torch

    from tunelens.config import _expand_decoding
    from tunelens.generation.decoding import DecodingConfig, knob_names
    from tunelens.generation.generate import GenerationSettings, hf_generate_batched
    from tunelens.models import load_model
    from tunelens.prompts import build_prompt

    import yaml

    records = json.loads(DATA_FILE.read_text())
    started = time.perf_counter()
    model, tokenizer = load_model(MODEL_DIR, device=args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    load_s = time.perf_counter() - started
    prompts = [build_prompt({"instruction": r["instruction"], "input": r.get("input") or ""}, "alpaca", tokenizer)
               for r in records[: args.gen_rows]]
    default = DecodingConfig(top_k=50, temperature=0.8, num_beams=1)
    results = {"load_s": round(load_s, 2), "rows": len(prompts), "max_new_tokens": args.max_new_tokens, "batch": {}}

    def timed(batch_size, configs_prompts, decoding):
        sync()
        begin = time.perf_counter()
        log = []
        out = hf_generate_batched(model, tokenizer, configs_prompts, decoding,
                                  GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=batch_size), log)
        sync()
        seconds = time.perf_counter() - begin
        tokens = sum(c.num_generated_tokens for c in out)
        return {"seconds": round(seconds, 3), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
                "batches": [b.get("rows") for b in log if "rows" in b], "oom_splits": sum("out_of_memory" in b for b in log)}

    timed(16, prompts[:16], default)  # warm-up: kernels, allocator
    for batch_size in [16, 64, 256, "auto"]:
        results["batch"][str(batch_size)] = timed(batch_size, prompts, default)
        print("batch", batch_size, results["batch"][str(batch_size)], flush=True)

    # One prompt at a time, per decoding config of the preset, on the first loop_rows test-sized prompts.
    preset = yaml.safe_load(PRESET.read_text())["decoding"]
    defaults = {field: getattr(DecodingConfig(), field) for field in knob_names()} | preset["defaults"]
    configs = _expand_decoding({"defaults": defaults, "mode": preset["mode"], "configs": [], "sweep": preset["sweep"]})
    loop = {}
    for config in configs:
        entry = timed(1, prompts[: args.loop_rows], config)
        batched = timed("auto", prompts[: args.study_rows], config)
        loop[config.name] = {"one_at_a_time": entry, "auto": batched,
                             "one_at_a_time_s_per_row": round(entry["seconds"] / args.loop_rows, 3)}
        print(config.name, "one-at-a-time", entry["tokens_per_s"], "tok/s; auto", batched["tokens_per_s"], flush=True)
    results["per_config"] = loop
    results["study_rows"] = args.study_rows
    return results


# --------------------------------------------------------------------------------------------- the DAG
def part_dag(args) -> dict:
    """Run the preset through Snakemake; per-job wall time and peak memory from the benchmark files, and
    each job's compute time from its outputs."""
    command = ["snakemake", "--cores", "all", "--configfile", str(PRESET), "--rerun-incomplete", "--keep-going",
               "--resources", f"gpu={args.concurrent_gpu_jobs}", "--scheduler", "greedy",
               *shlex.split(args.snakemake_args)]
    started = time.perf_counter()
    proc = subprocess.run(["timeout", "-s", "INT", str(args.dag_timeout), *command], cwd=REPO_ROOT, text=True,
                          capture_output=True)
    wall = time.perf_counter() - started
    log_tail = (proc.stdout + proc.stderr)[-6000:]
    return {"command": " ".join(command), "returncode": proc.returncode, "wall_s": round(wall, 1),
            "jobs": collect_jobs(REPO_ROOT), "log_tail": log_tail, "server_log": server_log_lines(REPO_ROOT),
            "summary_exists": (REPO_ROOT / "results" / "summary.md").exists()}


def server_log_lines(root: Path, limit: int = 60) -> list[str]:
    """The generation servers' own log lines about loads, merges, swaps and graph captures (their log files live
    under .tunelens/servers/, which the per-job figures do not see): where a server start's seconds went."""
    lines = []
    for path in sorted((root / ".tunelens" / "servers").glob("*/*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if any(word in line for word in ("listening", "loaded ", "swapping", "captured", "not captur", "stopped", "out of memory")):
                lines.append(f"{path.name}: {line[:240]}")
    return lines[:limit]


GPU_RULES = {"finetune", "generate", "perplexity", "logit_lens", "early_exit", "judge", "generation_agreement"}


def collect_jobs(root: Path) -> list[dict]:
    """One record per finished job: rule, wildcards, wall s, max RSS MB, and compute s where known."""
    from tunelens.cost import benchmark_files, read_benchmark, rule_and_wildcards

    jobs = []
    for path in benchmark_files(root / "benchmarks"):
        rule, wildcards = rule_and_wildcards(path, root / "benchmarks")
        row = read_benchmark(path)[-1]
        job = {"rule": rule, "wildcards": wildcards, "wall_s": row["s"], "max_rss_mb": row.get("max_rss"),
               "cpu_time_s": row.get("cpu_time"), "gpu": rule in GPU_RULES}
        job.update(compute_time(root, rule, wildcards))
        jobs.append(job)
    return jobs


def compute_time(root: Path, rule: str, wildcards: str) -> dict:
    """The seconds a job spent on its own work and loading its model, from the files it wrote."""
    results = root / "results"
    try:
        if rule == "finetune":
            metrics = json.loads((results / "finetune" / wildcards / "metrics.json").read_text())
            return {"compute_s": metrics["train_time_s"], "model_load_s": metrics["load_time_s"],
                    "finetune": {k: metrics.get(k) for k in ("tokens_per_s", "steps", "micro_batch_size",
                                                             "gradient_checkpointing", "liger", "autotune",
                                                             "first_loss", "final_loss", "peak_memory")}}
        if rule in ("generate", "early_exit"):
            model, variant, name = Path(wildcards).parts
            meta_path = (results / "generations" / model / variant / f"{name}.meta.json" if rule == "generate"
                         else results / "probe" / model / variant / "early_exit" / f"{name}.meta.json")
            meta = json.loads(meta_path.read_text())
            return {"compute_s": meta["generation_time_s"], "model_load_s": meta["load_time_s"],
                    "generated_tokens": meta.get("generated_tokens"), "batches": meta.get("batches")}
        if rule == "perplexity":
            model, variant = Path(wildcards).parts
            record = json.loads((results / "perplexity" / model / f"{variant}.json").read_text())
            return {"compute_s": record["source"]["score_time_s"], "model_load_s": record["source"]["load_time_s"],
                    "execution": record.get("execution")}
        if rule == "logit_lens":
            model, variant = Path(wildcards).parts
            lens = json.loads((results / "probe" / model / variant / "lens.json").read_text())
            return {"compute_s": lens["lens_time_s"], "model_load_s": lens["load_time_s"],
                    "execution": lens.get("execution")}
    except (OSError, ValueError, KeyError):
        return {}
    return {}


# --------------------------------------------------------------------------------------------- table
def stage_table(dag: dict) -> list[dict]:
    stages: dict[str, dict] = {}
    for job in dag["jobs"]:
        stage = stages.setdefault(job["rule"], {"rule": job["rule"], "jobs": 0, "wall_s": 0.0, "gpu_s": 0.0,
                                                "compute_s": 0.0, "known_compute": 0, "peak_rss_mb": 0.0,
                                                "load_s": 0.0})
        stage["jobs"] += 1
        stage["wall_s"] += job["wall_s"]
        stage["gpu_s"] += job["wall_s"] if job["gpu"] else 0.0
        stage["peak_rss_mb"] = max(stage["peak_rss_mb"], job.get("max_rss_mb") or 0.0)
        stage["load_s"] += job.get("model_load_s") or 0.0
        if "compute_s" in job:
            stage["compute_s"] += job["compute_s"]
            stage["known_compute"] += 1
    return sorted(stages.values(), key=lambda s: -s["wall_s"])


def table(paths: list[Path]) -> str:
    parts = {}
    for path in paths:
        parts.update(json.loads(path.read_text()))
    lines = []
    if "dag" in parts:
        dag = parts["dag"]
        lines += [f"DAG: `{dag['command']}`: exit {dag['returncode']}, {dag['wall_s']:.0f} s wall, "
                  f"summary.md {'written' if dag['summary_exists'] else 'MISSING'}", "",
                  "| stage | jobs | GPU-s | of which model loads | GPU-s less loads | wall s (sum) | compute s | "
                  "loading share | peak RSS MB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for stage in stage_table(dag):
            share = (f"{1 - stage['compute_s'] / stage['wall_s']:.0%}"
                     if stage["known_compute"] == stage["jobs"] and stage["wall_s"] else "n/a")
            loads = stage["load_s"] if stage["gpu_s"] else 0.0
            lines.append(f"| {stage['rule']} | {stage['jobs']} | {stage['gpu_s']:.0f} | {loads:.0f} | "
                         f"{stage['gpu_s'] - loads:.0f} | {stage['wall_s']:.0f} | "
                         f"{stage['compute_s']:.0f} | {share} | {stage['peak_rss_mb']:.0f} |")
    if "finetune" in parts:
        ft = parts["finetune"]
        plain = ft.get("plain", {}).get("tokens_per_s_median")
        lines += ["", "| fine-tune variant | tok/s (median of runs) | runs | spread | vs plain (by round) | peak MiB | "
                      "micro x accum | ckpt | loss first -> last |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, s in ft.items():
            if not isinstance(s, dict):
                continue
            if "failed" in s:
                lines.append(f"| {name} | FAILED | | | | | | | |")
                continue
            tps = s["tokens_per_s_median"]
            micro = s.get("micro_batch_size") or 8
            runs = ", ".join(f"{t:.0f}" for t in s.get("tokens_per_s_runs", [tps]))
            by_round = ", ".join(f"{r:.2f}" for r in s.get("vs_plain_by_round", []))
            lines.append(f"| {name} | {tps:.0f} | {runs} | {s.get('spread', 0):.0%} | "
                         f"{tps / plain:.2f}x ({by_round}) | {s.get('peak_mib', 0):.0f} | {micro} x {8 // micro} | "
                         f"{s.get('gradient_checkpointing')} | {s['first_loss']:.3f} -> {s['final_loss']:.3f} |"
                         if plain else f"| {name} | {tps:.0f} | {runs} | | | | | | |")
        plain_losses = [row["loss"] for row in ft.get("plain", {}).get("steps", [])]
        for name, s in ft.items():
            if isinstance(s, dict) and s.get("losses") and plain_losses and not s.get("packing"):
                n = min(len(plain_losses), len(s["losses"]))
                diff = statistics.mean(abs(a - b) for a, b in zip(plain_losses[:n], s["losses"][:n]))
                wiggle = statistics.mean(abs(a - b) for a, b in zip(plain_losses[1:n], plain_losses[: n - 1]))
                lines.append(f"\nLoss per token, {name} vs plain over {n} steps (same rows and order): mean |difference| "
                             f"{diff:.4f} nats; plain's own step-to-step change {wiggle:.4f}; final {s['losses'][n - 1]:.4f} "
                             f"vs {plain_losses[n - 1]:.4f}.")
    if "generate" in parts:
        gen = parts["generate"]
        best = max(v["tokens_per_s"] for k, v in gen["batch"].items() if k != "auto")
        lines += ["", f"Generation, {gen['rows']} prompts x {gen['max_new_tokens']} new tokens (study default config):", "",
                  "| batch | tok/s | batches | vs best fixed |", "|---|---|---|---|"]
        for key, value in gen["batch"].items():
            lines.append(f"| {key} | {value['tokens_per_s']:.0f} | {len(value['batches'])} | {value['tokens_per_s'] / best:.0%} |")
        per = gen["per_config"]
        loop_s = sum(v["one_at_a_time_s_per_row"] for v in per.values()) * gen["study_rows"]
        auto_s = sum(v["auto"]["seconds"] for v in per.values())
        lines += ["", f"All {len(per)} decoding configs on {gen['study_rows']} rows, generation only (no start-up): "
                      f"one prompt at a time {loop_s:.0f} s (extrapolated from the loop rows), batch auto {auto_s:.0f} s "
                      f"({loop_s / auto_s:.1f}x)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["finetune", "generate", "dag"])
    parser.add_argument("--table", nargs="+", type=Path, help="merge part JSONs into the markdown table")
    parser.add_argument("--data", type=Path, help="Alpaca-format JSON list (Code Alpaca)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer dir for the random 7B shape")
    parser.add_argument("--plain-script", help="../shared/gpu/plain_trl_qlora.py")
    parser.add_argument("--variants", default="auto,auto+packing",
                        help="fine-tune variants (bench_finetune.VARIANTS); `old:VARIANT` runs it from --checkout")
    parser.add_argument("--checkout", type=Path,
                        help="another tunelens tree (e.g. `git archive` of an earlier commit) for `old:` variants, "
                             "so that both sides of a comparison interleave in one call")
    parser.add_argument("--rows", type=int, default=256, help="fine-tuning rows")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--max-seq-length", type=int, default=512,
                        help="fine-tune length for every variant (padding_free refuses rows longer than it: 560 keeps "
                             "Code Alpaca's longest of the first 256 rows, 547 tokens)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per fine-tune variant, interleaved (A B C A B C)")
    parser.add_argument("--deadline", type=float, default=float("inf"),
                        help="seconds after which no further fine-tune run starts (the GPU call's limit)")
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--lr-scheduler", default="cosine")
    parser.add_argument("--warmup-ratio", type=float, default=0.03)
    parser.add_argument("--gen-rows", type=int, default=256)
    parser.add_argument("--study-rows", type=int, default=36, help="rows per decoding config (the preset's test set)")
    parser.add_argument("--loop-rows", type=int, default=2, help="rows per config for the one-at-a-time loop")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--concurrent-gpu-jobs", type=int, default=2, help="GPU jobs Snakemake runs at once")
    parser.add_argument("--dag-timeout", type=int, default=480)
    parser.add_argument("--snakemake-args", default="",
                        help="passed on to snakemake, e.g. --snakemake-args='--omit-from finetune' (base model only)")
    parser.add_argument("--work", default="/tmp/bench_gpu_study")
    parser.add_argument("--device", default="cuda", help="cpu only to try the script itself")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if "old:" in args.variants and not (args.checkout and (args.checkout / "bench" / "bench_finetune.py").is_file()):
        parser.error("`old:` variants need --checkout DIR, a tunelens tree with bench/bench_finetune.py")
    if args.table:
        print(table(args.table))
        return
    Path(args.work).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = {"setup": setup(args)}
    result[args.part] = {"finetune": part_finetune, "generate": part_generate, "dag": part_dag}[args.part](args)
    result[args.part]["part_wall_s"] = round(time.perf_counter() - started, 1)
    text = json.dumps(result, indent=1, default=str)
    if args.out:
        args.out.write_text(text + "\n")
    print(table([args.out]) if args.out else text)


if __name__ == "__main__":
    main()
