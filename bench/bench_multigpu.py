"""Models larger than one GPU (issue 26): a random-weight Llama-3-70B shape on the GPUs of one node.

Parts, each printed as one JSON line and collected into --out:
  build     the model written to local disk as safetensors shards: the shape is made on the meta device (no
            memory) and each shard filled with random values on --device and saved before the next is made, so
            a 70B shape (~140 GB in bf16) never needs 140 GB of CPU memory; SmolLM2's tokenizer (embedded package)
  serve     generation through the generation server (hf backend, the model sharded over --gpus GPUs): load
            time, tok/s per decoding config, GPU memory per device (nvidia-smi, the server is another process)
  probe     early exit at two layers through the same server, then the logit lens in this process (server
            stopped first: two copies of a 70B shape do not fit): rows, tok/s, lens seconds
  qlora     QLoRA fine-tune steps on the model (one process, 4-bit weights on one GPU): tokens/s, peak memory
  dp        data-parallel fine-tuning of --dp-model on --gpus processes against one, the same rows per optimizer
            step: tokens/s of each, and the loss of each step side by side

On the two-GPU machine (BENCHMARKS.md, "Issue 26"):
    python bench/bench_multigpu.py --parts build,serve,probe,qlora --shape 70b --model-dir /dev/shm/llama70b \
        --gpus 2 --out bench/figures/multigpu_70b.json
    python bench/bench_multigpu.py --parts build,dp --shape 7b --model-dir /dev/shm/llama7b --dp-model /dev/shm/llama7b \
        --gpus 2 --out bench/figures/multigpu_dp7b.json
Proof that it runs, on a CPU (tiny shape, gloo for the data-parallel part):
    python bench/bench_multigpu.py --device cpu --shape tiny --model-dir /tmp/tiny70 --dp-model /tmp/tiny70 --gpus 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

# Llama-3.1-70B / Llama-2-7B layer shapes; the vocabulary is the tokenizer's (SmolLM2's 49,152).
SHAPES = {
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=2),
}
SHARD_BYTES = 5 * 2**30


def depth(args) -> int:
    return args.layers or SHAPES[args.shape]["num_hidden_layers"]


def tokenizer_dir(args, work: Path) -> Path:
    """--tokenizer, else SmolLM2's from the embedded package (written once into the work folder)."""
    from transformers import AutoTokenizer

    if args.tokenizer:
        return args.tokenizer
    from tunelens.models import EMBEDDED_MODELS, _module_dir

    entry = EMBEDDED_MODELS["smollm2-135m-instruct"]
    out = work / "tokenizer"
    if not (out / "tokenizer_config.json").exists():
        AutoTokenizer.from_pretrained(_module_dir(entry), gguf_file=entry["gguf"]).save_pretrained(out)
    return out


def build(args, work: Path) -> dict:
    """Write a random-weight model of --shape to --model-dir, one safetensors shard at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = args.model_dir
    if (out / "config.json").exists() and not args.rebuild:
        return {"part": "build", "skipped": f"{out} exists (--rebuild to write it again)"}
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(args, work))
    shape = dict(SHAPES[args.shape], num_hidden_layers=depth(args))
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, dtype="bfloat16", **shape)
    started = time.perf_counter()
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in LlamaForCausalLM(config).state_dict().items()}
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    generator = torch.Generator(device=args.device).manual_seed(0)
    groups, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.tensor(shape).prod()) if shape else 2
        if current and size + nbytes > SHARD_BYTES:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    groups.append(current)
    weight_map, total = {}, 0
    for index, names in enumerate(groups, start=1):
        file = f"model-{index:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensor = torch.ones(shapes[name], dtype=torch.bfloat16, device=args.device)
            else:
                tensor = torch.empty(shapes[name], dtype=torch.bfloat16, device=args.device)
                tensor.normal_(0.0, 0.02, generator=generator)
            tensors[name] = tensor.cpu()
            weight_map[name] = file
            total += tensor.numel() * 2
        save_file(tensors, str(staging / file), metadata={"format": "pt"})
        del tensors
    (staging / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return {"part": "build", "shape": args.shape, "layers": depth(args), "parameters_b": round(total / 2 / 1e9, 2), "shards": len(groups),
            "gib": round(total / 2**30, 1), "seconds": round(time.perf_counter() - started, 1)}


def write_rows(work: Path, n: int) -> Path:
    from tunelens.data.demo_data import generate_demo_rows

    path = work / "rows.jsonl"
    path.write_text("".join(json.dumps({"id": f"bench-{i}", **row}) + "\n"
                            for i, row in enumerate(generate_demo_rows(n))))
    return path


def gpu_memory_used() -> list[int] | None:
    """MiB used on each GPU (all processes: the server is not this one); None without nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    return [int(line) for line in out.split() if line.strip().isdigit()]


def server_job(args, rows: Path, name: str, decoding: dict) -> dict:
    return dict(test_file=str(rows), model_name=name, model_path=str(args.model_dir), decoding_config=decoding,
                max_new_tokens=args.new_tokens, seed=1234, backend="hf", batch_size="auto", max_test_rows=args.rows,
                device=args.device, gpus=args.gpus if args.device != "cpu" else 0, static_cache="auto",
                merge_adapter="auto")


DECODINGS = [{"name": "greedy", "temperature": 0.0, "top_k": 50, "num_beams": 1},
             {"name": "sample", "temperature": 0.8, "top_k": 50, "num_beams": 1}]


def serve(args, work: Path) -> dict:
    from tunelens.generation import genserver

    rows = write_rows(work, args.rows)
    results = []
    for decoding in DECODINGS:
        meta = genserver.run_generation_job(server_job(args, rows, "bench70", decoding), work / f"{decoding['name']}.jsonl",
                                            base=work, start_timeout_s=3600, idle_timeout_s=600)
        results.append({"config": decoding["name"], "mode": meta["execution"]["mode"], "load_s": meta["load_time_s"],
                        "rows": meta["n_rows"], "tokens": meta["generated_tokens"], "tok_s": meta["tokens_per_s"],
                        "kv_cache": meta["kv_cache"], "sharded_over": meta.get("sharded_over"),
                        "device": meta["device"]})
    return {"part": "serve", "gpus": args.gpus, "configs": results, "gpu_memory_mib": gpu_memory_used()}


def probe(args, work: Path) -> dict:
    from tunelens.generation import genserver
    from tunelens.probe.lens import run_logit_lens

    rows = write_rows(work, args.rows)
    layers = [depth(args) // 2, depth(args)]
    early = []
    for layer in layers:
        job = dict(model_name="bench70", source=str(args.model_dir), model_path=str(args.model_dir), adapter_dir=None,
                   variant="base", test_path=str(rows), layer=layer, layer_specs=layers, expected_layers=layers,
                   prompt_format="alpaca", decoding={"name": "greedy", "temperature": 0.0, "top_k": 50,
                                                     "num_beams": 1},
                   max_test_rows=args.rows, max_new_tokens=args.new_tokens, batch_size="auto", seed=0,
                   device=args.device, backend="hf", vllm_options=None, gpus=args.gpus if args.device != "cpu" else 0)
        meta = genserver.run_early_exit_job(job, work / f"early_{layer}.jsonl", work / f"early_{layer}.meta.json",
                                            base=work, start_timeout_s=3600, idle_timeout_s=600)
        early.append({"layer": layer, "mode": meta["execution"]["mode"], "load_s": meta["load_time_s"],
                      "rows": meta["n_rows"], "tok_s": meta["tokens_per_s"]})
    memory = gpu_memory_used()
    genserver.stop_servers(work)  # the lens loads its own copy
    started = time.perf_counter()
    lens = run_logit_lens(model_name="bench70", source=str(args.model_dir), model_path=args.model_dir,
                          adapter_dir=None, variant="base", test_path=rows, output_json=work / "lens.json",
                          output_heatmap=work / "lens.png", output_entropy=work / "entropy.png", layer_specs=layers,
                          expected_layers=layers, prompt_format="alpaca", lens_prompts=["Name a colour."],
                          lens_test_prompts=4, top_k=5, new_tokens=8, device=args.device,
                          gpus=args.gpus if args.device != "cpu" else 0)
    return {"part": "probe", "early_exit": early, "gpu_memory_mib_serving": memory,
            "lens": {"load_s": lens["load_time_s"], "lens_s": lens["lens_time_s"], "prompts": len(lens["prompts"]),
                     "device": lens["device"], "wall_s": round(time.perf_counter() - started, 1)}}


def train_settings(args, method: str) -> dict:
    return {"enabled": True, "method": method, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
            "target_modules": "all-linear", "learning_rate": 2e-4, "lr_scheduler": "constant", "warmup_ratio": 0.0,
            "weight_decay": 0.0, "num_epochs": 1, "max_steps": args.steps, "batch_size": args.batch_size,
            "gradient_accumulation": args.accumulation, "max_seq_length": 512, "packing": False,
            "padding_free": False, "gradient_checkpointing": "auto", "liger": "auto", "logging_steps": 1,
            "save_steps": 10**6, "autotune": False}


def train(args, work: Path, model: Path, name: str, method: str, processes: int) -> dict:
    from tunelens.training.finetune import finetune

    rows = write_rows(work, max(64, args.steps * args.batch_size * args.accumulation))
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    metrics = finetune(model_path=model, train_jsonl=rows, adapter_dir=out / "adapter", train_log=out / "log.jsonl",
                       metrics_json=out / "metrics.json", loss_png=out / "loss.png", checkpoint_dir=out / "ckpt",
                       settings=train_settings(args, method), prompt_format="alpaca", seed=1234, device=args.device,
                       model_name=name, processes=processes)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steady = [row["tokens_per_s"] for row in log[1:]] or [row["tokens_per_s"] for row in log]
    return {"processes": processes, "method": metrics["method"], "steps": metrics["steps"],
            "rows_per_step": args.batch_size * args.accumulation, "micro_batch": metrics["micro_batch_size"],
            "accumulation": metrics["gradient_accumulation_steps"], "tokens_per_s_job": metrics["tokens_per_s"],
            "tokens_per_s_median_step": round(statistics.median(steady), 1), "load_s": metrics["load_time_s"],
            "train_s": metrics["train_time_s"], "peak_memory": metrics["peak_memory"],
            "losses": [row["loss"] for row in log]}


def qlora(args, work: Path) -> dict:
    method = "qlora" if args.device != "cpu" else "lora"
    return {"part": "qlora", **train(args, work, args.model_dir, "qlora", method, 1)}


def dp(args, work: Path) -> dict:
    method = "qlora" if args.device != "cpu" else "lora"
    one = train(args, work, args.dp_model, "dp1", method, 1)
    many = train(args, work, args.dp_model, f"dp{args.gpus}", method, args.gpus)
    return {"part": "dp", "model": str(args.dp_model), "one": one, "many": many,
            "speedup": round(many["tokens_per_s_job"] / one["tokens_per_s_job"], 2)
            if one["tokens_per_s_job"] and many["tokens_per_s_job"] else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="build,serve,probe,qlora,dp")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="70b")
    parser.add_argument("--model-dir", type=Path, required=True, help="where the random model is (or is written)")
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the shape's; 80 for 70b)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: SmolLM2's, embedded package)")
    parser.add_argument("--dp-model", type=Path, help="the model of the data-parallel part (a 7B shape)")
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--rows", type=int, default=64, help="prompts per decoding config")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    parts = args.parts.split(",")
    if "dp" in parts and args.dp_model is None:
        parser.error("--parts dp needs --dp-model")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-multigpu-"))
    work.mkdir(parents=True, exist_ok=True)
    steps = {"build": build, "serve": serve, "probe": probe, "qlora": qlora, "dp": dp}
    results = {"argv": sys.argv[1:], "parts": []}
    for part in parts:
        started = time.perf_counter()
        result = steps[part](args, work)
        result["wall_s"] = round(time.perf_counter() - started, 1)
        print(json.dumps(result), flush=True)
        results["parts"].append(result)
        if args.out:
            args.out.write_text(json.dumps(results, indent=1) + "\n")
    from tunelens.generation.genserver import stop_servers

    stop_servers(work)


if __name__ == "__main__":
    main()
