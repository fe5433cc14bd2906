"""Benchmark the fine-tuning stage (tunelens.training.finetune.finetune): tokens/s, peak memory and loss per method.

Each variant runs the stage's own function in a fresh subprocess (Liger patches transformers' classes
for the whole process, so variants must not share one) on the first N rows of an Alpaca-format file.

    # CPU, SmolLM2 (materialised embedded model), LoRA in float32:
    python bench/bench_finetune.py --model /tmp/mat/smollm2-135m-instruct \
        --data ../shared/data/code_alpaca_2k.json --variants lora --steps 6 --batch-size 4
    # GPU: a random-weight Llama-2-7B shape (built once, SmolLM2's tokenizer), all four variants:
    python bench/bench_finetune.py --make-llama7b /dev/shm/llama7b --tokenizer results/models/smollm2 \
        --model /dev/shm/llama7b --data code_alpaca_2k.json --variants qlora,qlora+liger,lora,lora+liger
    # GPU correctness on a real model: QLoRA for 60 steps, then generate with the adapter:
    python bench/bench_finetune.py --model results/models/smollm2 --data code_alpaca_2k.json \
        --variants qlora --steps 60 --generate 2

Prints a markdown table (paste into BENCHMARKS.md) and writes --out JSON with every run's metrics.
tokens/s = non-padding input tokens per second of training, the median over the logged steps after the
first `--warmup` (compilation, allocator warm-up); peak memory = torch.cuda.max_memory_allocated (GPU)
or max RSS (CPU), MiB.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

# name: settings that differ from bench_settings' base (method qlora on CUDA, lora on CPU, all else auto).
VARIANTS = {
    "lora": {"method": "lora", "liger": False},
    "lora+liger": {"method": "lora", "liger": True},
    "qlora": {"method": "qlora", "liger": False},
    "qlora+liger": {"method": "qlora", "liger": True},
    # The pipeline's defaults today (method/liger/checkpointing auto, the CUDA autotuner on).
    "auto": {},
    "auto+packing": {"packing": True},
    # The default without the decoder layers' CUDA graphs (finetune.cuda_graphs, issue 24), unpacked and packed.
    "auto+nographs": {"cuda_graphs": False},
    "auto+packing+nographs": {"packing": True, "cuda_graphs": False},
    # The default with padding-free batches: the same rows per step, concatenated, no pad tokens (TRL padding_free).
    "auto+padfree": {"padding_free": True},
    # The default with TRL's own SFTTrainer and PEFT's own LoRA forward (the step before issue 24's cuts).
    "auto+peft": {"_build": {"sync_free": False, "lean_layers": False}},
    # The pipeline's defaults before the autotuner (QLoRA + Liger + gradient checkpointing, as configured).
    "before": {"method": "qlora", "liger": True, "gradient_checkpointing": True, "autotune": False},
    # Packing with TRL's loss scoring every position (`_patch`, below): no host sync in the loss. Not adopted; to measure.
    "auto+packing+dense-loss": {"packing": True, "_patch": ("trl-dense-loss",)},
}


def _trl_dense_loss():
    """On CUDA (a Triton device) TRL's fused lm_head loss keeps only the labelled positions, `hidden[mask]` and
    `labels[mask]`: boolean indexing, a host sync in the middle of every forward, and `masked_scatter`, whose
    backward is a `masked_select`, another. Elsewhere it scores every position and zeroes the unlabelled ones (the
    same loss; more lm_head work: the prompt tokens too). This makes CUDA take that path."""
    import trl.trainer.utils as trl_utils

    original = trl_utils._use_triton  # TRL 1.16: only the compaction reads this name in trl.trainer.utils
    trl_utils._use_triton = lambda device: False
    return lambda: setattr(trl_utils, "_use_triton", original)


# Library patches a variant can ask for (`_patch`): a change measured before the stage adopts it.
PATCHES = {"trl-dense-loss": _trl_dense_loss}


@contextlib.contextmanager
def variant_patches(variant: str, variants: dict | None = None):
    """The variant's `_patch`es applied for the duration of the block, then undone."""
    undo = [PATCHES[name]() for name in (variants or VARIANTS)[variant].get("_patch", ())]
    try:
        yield
    finally:
        for restore in reversed(undo):
            restore()


def bench_settings(args, variant: str) -> dict:
    settings = {
        "enabled": True, "method": "auto", "lora_r": args.lora_r, "lora_alpha": 2 * args.lora_r,
        "lora_dropout": 0.05, "target_modules": "all-linear", "learning_rate": args.learning_rate,
        "lr_scheduler": args.lr_scheduler, "warmup_ratio": args.warmup_ratio, "weight_decay": 0.0, "num_epochs": 1,
        "max_steps": args.steps, "batch_size": args.batch_size, "gradient_accumulation": 1,
        "max_seq_length": args.max_seq_length, "packing": args.packing, "padding_free": False,
        "gradient_checkpointing": "auto", "liger": "auto", "logging_steps": 1, "save_steps": 10**6,
        "autotune": True,
    }
    settings.update({k: v for k, v in VARIANTS[variant].items() if not k.startswith("_")})
    return settings


def alpaca_to_split_rows(data: Path, rows: int, out: Path) -> Path:
    """The first `rows` Alpaca records as split rows (id, instruction, input, output)."""
    records = json.loads(data.read_text(encoding="utf-8"))[:rows]
    with out.open("w", encoding="utf-8") as handle:
        for index, record in enumerate(records):
            row = {"id": f"bench-{index}", "instruction": record["instruction"],
                   "input": record.get("input") or "", "output": record["output"]}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out


def make_llama7b(out: Path, tokenizer_dir: Path) -> None:
    """A Llama-2-7B-shaped model (32 layers, hidden 4096, MLP 11008, 32 heads) with random bf16 weights,
    built on the GPU (seconds rather than minutes on CPU) and saved with `tokenizer_dir`'s tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
        dtype="bfloat16",
    )
    started = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    print(f"built {params / 1e9:.2f}B-parameter Llama shape in {time.perf_counter() - started:.0f} s -> {out}",
          flush=True)
    del model
    torch.cuda.empty_cache()


def run_one(args, variant: str, work: Path) -> dict:
    """Train one variant in this process with the stage's function; return its summary."""
    import logging

    from tunelens.training.finetune import finetune
    from tunelens.io import read_jsonl

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    out = work / variant
    with variant_patches(variant):
        metrics = finetune(
            model_path=args.model, train_jsonl=work / "train.jsonl", adapter_dir=out / "adapter",
            train_log=out / "train_log.jsonl", metrics_json=out / "metrics.json", loss_png=out / "loss.png",
            checkpoint_dir=out / "checkpoints", settings=bench_settings(args, variant),
            prompt_format=args.prompt_format, seed=args.seed, device=args.device, model_name=Path(args.model).name,
            build_options=VARIANTS[variant].get("_build"),
        )
    log_rows = read_jsonl(out / "train_log.jsonl")
    steady = [row["tokens_per_s"] for row in log_rows if row["step"] > args.warmup] or \
             [row["tokens_per_s"] for row in log_rows]
    peak = metrics["peak_memory"]
    summary = {
        "variant": variant, "model": str(args.model), "device": metrics["device_name"], "method": metrics["method"],
        "liger": metrics["liger"], "gradient_checkpointing": metrics["gradient_checkpointing"],
        "micro_batch_size": metrics.get("micro_batch_size"), "autotune": metrics.get("autotune"),
        "layer_graphs": metrics.get("layer_graphs"),
        "packing": bench_settings(args, variant)["packing"], "tokens": [row.get("tokens") for row in log_rows],
        "batch_size": args.batch_size, "max_seq_length": args.max_seq_length, "steps": metrics["steps"],
        "tokens_per_s_median": round(statistics.median(steady), 1),
        "tokens_per_s_job": metrics["tokens_per_s"],
        "peak_mib": peak.get("cuda_max_allocated_mib", peak["cpu_max_rss_mib"]),
        "peak_kind": "cuda_max_allocated" if "cuda_max_allocated_mib" in peak else "cpu_max_rss",
        "first_loss": metrics["first_loss"], "final_loss": metrics["final_loss"],
        "load_time_s": metrics["load_time_s"], "train_time_s": metrics["train_time_s"],
        "trainable_params": metrics["trainable_params"], "losses": [row["loss"] for row in log_rows],
    }
    if args.generate:
        summary["generations"] = generate_with_adapter(args, out / "adapter", work / "train.jsonl")
    return summary


def generate_with_adapter(args, adapter_dir: Path, train_jsonl: Path) -> list[dict]:
    """Greedy answers of the base model and of base + adapter to the first training prompts: the adapter
    loads for generation and changes what is generated."""
    import torch

    from tunelens.io import read_jsonl
    from tunelens.models import load_model
    from tunelens.prompts import build_prompt

    rows = read_jsonl(train_jsonl)[: args.generate]
    quantized = bench_settings(args, args.variants.split(",")[0])["method"] in ("qlora", "auto")
    base, tokenizer = load_model(args.model, device=args.device, load_in_4bit=quantized)
    results = []
    for row in rows:
        prompt = build_prompt(row, args.prompt_format, tokenizer)
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(base.device)
        with torch.no_grad():
            plain = base.generate(**inputs, max_new_tokens=64, do_sample=False)
        results.append({"id": row["id"], "reference": row["output"][:300],
                        "base": tokenizer.decode(plain[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)})
    del base
    tuned, tokenizer = load_model(args.model, adapter_dir=adapter_dir, device=args.device, load_in_4bit=quantized)
    for result, row in zip(results, rows):
        prompt = build_prompt(row, args.prompt_format, tokenizer)
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(tuned.device)
        with torch.no_grad():
            out = tuned.generate(**inputs, max_new_tokens=64, do_sample=False)
        result["finetuned"] = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return results


def markdown(summaries: list[dict]) -> str:
    lines = [
        "| model | variant | device | batch x max len | grad ckpt | tokens/s (median) | peak MiB | loss first -> last | load s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        lines.append(
            f"| {Path(s['model']).name} | {s['variant']} | {s['device']} | {s['batch_size']} x {s['max_seq_length']} "
            f"| {s['gradient_checkpointing']} | {s['tokens_per_s_median']:.0f} | {s['peak_mib']:.0f} ({s['peak_kind']}) "
            f"| {s['first_loss']:.3f} -> {s['final_loss']:.3f} | {s['load_time_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF model dir")
    parser.add_argument("--data", required=True, type=Path, help="Alpaca-format JSON list")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--variants", default="lora", help=f"comma-separated, of {sorted(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="logged steps left out of the median tokens/s")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--lr-scheduler", default="cosine")
    parser.add_argument("--warmup-ratio", type=float, default=0.03)
    parser.add_argument("--prompt-format", default="alpaca")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--generate", type=int, default=0, help="after training, greedy-generate N prompts")
    parser.add_argument("--make-llama7b", type=Path, help="first build a random Llama-2-7B shape here")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer dir for --make-llama7b")
    parser.add_argument("--out", type=Path, help="JSON file for all summaries")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant, print its summary
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    if args.one:
        summary = run_one(args, args.one, args.work)
        print("SUMMARY " + json.dumps(summary), flush=True)
        return

    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choices: {sorted(VARIANTS)}")
    if args.make_llama7b:
        if not (args.make_llama7b / "config.json").exists():
            make_llama7b(args.make_llama7b, args.tokenizer)
    summaries = []
    with tempfile.TemporaryDirectory(prefix="bench_finetune_") as tmp:
        work = Path(tmp)
        alpaca_to_split_rows(args.data, args.rows, work / "train.jsonl")
        for variant in args.variants.split(","):
            command = [sys.executable, __file__, *sys.argv[1:], "--one", variant, "--work", str(work)]
            started = time.perf_counter()
            proc = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("SUMMARY ")]
            if proc.returncode != 0 or not lines:
                print(f"{variant}: FAILED (rc {proc.returncode})\n{proc.stderr[-4000:]}", flush=True)
                summaries.append({"variant": variant, "failed": proc.stderr[-2000:]})
                continue
            summary = json.loads(lines[-1][len("SUMMARY "):])
            summary["wall_s"] = round(time.perf_counter() - started, 1)
            summaries.append(summary)
            print(f"{variant}: {summary['tokens_per_s_median']} tokens/s, peak {summary['peak_mib']} MiB, "
                  f"loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}, {summary['wall_s']} s", flush=True)
            for generation in summary.get("generations", []):
                print(json.dumps(generation, ensure_ascii=False), flush=True)
    print(markdown([s for s in summaries if "failed" not in s]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summaries, indent=2) + "\n")


if __name__ == "__main__":
    main()
