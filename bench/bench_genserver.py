"""Model loads and wall time of a study's generate jobs, with and without the generation server.

    .venv/bin/python bench/bench_genserver.py --model results/models/smollm2 --configs 4 --out gs.json
    .venv/bin/python bench/bench_genserver.py --model DIR --backend vllm --vllm-python .venv-vllm/bin/python \
        --configs 2 --out gs-vllm.json

Runs the real DAG (`snakemake --cores N` on the project's Snakefile) for the generate jobs of one model:
{base, finetuned} x `--configs` decoding configs on the embedded demo test split (`--rows` rows). The
fine-tuned variant uses a random LoRA adapter (rank 8, q/v projections) put in place of the fine-tune's
output, so only generation is timed. It runs the same jobs twice in one workdir, `generation.server: true`
(the default) then `false`, and reports per mode: wall time of the Snakemake run, the sum of the jobs' wall
times (benchmark files), loads / engine builds (meta `execution.loaded`), the load time they paid, the
generation time, and whether the generation files are byte-identical between the two modes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")


def make_adapter(model_dir: Path, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(out)
    return out


def snakemake(workdir: Path, *args: str, env: dict) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    result = subprocess.run([SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir), *args],
                            cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"snakemake {' '.join(args)} failed:\n{result.stderr[-4000:]}")
    return result, seconds


def run_mode(workdir: Path, base_args: list[str], targets: list[str], server: bool, env: dict) -> dict:
    for target in targets:  # rerun these jobs from scratch
        for path in (workdir / target, workdir / target.replace(".jsonl", ".meta.json")):
            path.unlink(missing_ok=True)
    shutil.rmtree(workdir / "benchmarks" / "generate", ignore_errors=True)
    override = workdir.parent / f"server-{server}.yaml"
    override.write_text(json.dumps({"generation": {"server": server}}))
    _, wall = snakemake(workdir, *targets, *base_args[:2], str(override), *base_args[2:], env=env)
    metas = [json.loads((workdir / t.replace(".jsonl", ".meta.json")).read_text()) for t in targets]
    job_walls = [float(path.read_text().splitlines()[1].split("\t")[0])
                 for path in (workdir / "benchmarks" / "generate").rglob("*.tsv")]
    return {
        "server": server,
        "snakemake_wall_s": round(wall, 1),
        "jobs": len(metas),
        "jobs_wall_s_sum": round(sum(job_walls), 1),
        "loads": sum(bool(m["execution"]["loaded"]) for m in metas),
        "load_time_s_sum": round(sum(m["load_time_s"] for m in metas), 1),
        "generation_time_s_sum": round(sum(m["generation_time_s"] for m in metas), 1),
        "modes": sorted({m["execution"]["mode"] for m in metas}),
        "backend": sorted({m["backend"] for m in metas}),
        "files": {t: (workdir / t).read_bytes().decode() for t in targets},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF model directory (e.g. results/models/smollm2)")
    parser.add_argument("--backend", default="hf", choices=("hf", "vllm"))
    parser.add_argument("--vllm-python", default=None)
    parser.add_argument("--configs", type=int, default=4, help="decoding configs (greedy + sampled at temperatures)")
    parser.add_argument("--rows", type=int, default=8, help="test rows")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--out", default=None, help="JSON results")
    args = parser.parse_args(argv)

    model_dir = Path(args.model).resolve()
    work = Path(tempfile.mkdtemp(prefix="bench-genserver-"))
    workdir = work / "work"
    workdir.mkdir()
    configs = [{"name": "greedy", "temperature": 0.0}] + [
        {"name": f"t{i}", "temperature": round(0.5 + 0.25 * i, 2), "top_k": 50} for i in range(args.configs - 1)
    ]
    config = {
        "seed": 3, "device": "cpu",
        "dataset": {"name": "demo", "source": "embedded:demo", "test_size": args.rows},
        "models": {"m": {"source": str(model_dir), "generation_backend": args.backend, "prompt_format": "chat"}},
        "decoding": {"mode": "list", "configs": configs, "max_new_tokens": args.max_new_tokens},
        "generation": {"vllm_max_lora_rank": 8, **({"vllm_python": args.vllm_python} if args.vllm_python else {})},
        "finetune": {"lora_r": 8},
        "probe": {"enabled": False},
    }  # fmt: skip
    configfile = work / "config.yaml"
    configfile.write_text(json.dumps(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "VLLM_CACHE_ROOT": str(work / "vllm_cache"), "VLLM_CPU_OMP_THREADS_BIND": "0-1"}
    base_args = ["--configfile", str(configfile), "--cores", str(args.cores)]
    snakemake(workdir, "results/data/demo/test.jsonl", *base_args, env=env)
    finetune = workdir / "results" / "finetune" / "m"
    make_adapter(model_dir, finetune / "adapter")
    for name in ("train_log.jsonl", "metrics.json", "loss.png"):
        (finetune / name).write_text("")
    targets = [f"results/generations/m/{variant}/{c['name']}.jsonl" for variant in ("base", "finetuned")
               for c in configs]  # fmt: skip
    runs = [run_mode(workdir, base_args, targets, server, env) for server in (True, False)]
    identical = runs[0].pop("files") == runs[1].pop("files")
    result = {"model": str(model_dir), "backend": args.backend, "configs": args.configs, "rows": args.rows,
              "max_new_tokens": args.max_new_tokens, "cores": args.cores, "byte_identical": identical, "runs": runs}
    print(json.dumps(result, indent=1))
    print("| generation | jobs | snakemake wall s | jobs' wall s (sum) | loads / engine builds | load s | generation s |")
    print("|---|---|---|---|---|---|---|")
    for run in runs:
        print(f"| {'server' if run['server'] else 'one load per job'} | {run['jobs']} | {run['snakemake_wall_s']} | "
              f"{run['jobs_wall_s_sum']} | {run['loads']} | {run['load_time_s_sum']} | {run['generation_time_s_sum']} |")
    print(f"generation files byte-identical between the two: {identical}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
