"""Benchmark the generation stage: hf batched vs a one-prompt-at-a-time loop, vllm vs hf, load vs generation.

    # CPU, the embedded SmolLM2 (materialised dir), 16 code prompts, 64 new tokens:
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_generate.py --model results/models/smollm2 \
        --data ../shared/data/code_alpaca_2k.json --rows 16 --max-new-tokens 64 --batch-size 16 \
        --vllm-python .venv-vllm/bin/python --out bench_generate_cpu.json
    # GPU (device tool), random-weight models of real shapes built in place (no download):
    python bench/bench_generate.py --random llama-7b --tokenizer TOKDIR --rows 32 --loop-rows 8 ...

Every timing is wall-clock seconds; tokens/s counts generated tokens over generation time (load excluded).
The decoding config is the study default (top_k 50, temperature 0.8, seeded), so both modes produce
the same number of tokens per row only in expectation; speed is compared in tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from tunelens.generation.agreement import _completions_in_subprocess  # noqa: E402
from tunelens.config import DecodingConfig  # noqa: E402
from tunelens.generation.generate import GenerationSettings, hf_generate_batched, load_prompt_rows  # noqa: E402

SHAPES = {
    # Llama-2-7B's shape (the study's model); random weights, so every row runs to max_new_tokens.
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32),
    # SmolLM2-135M's shape.
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3),
}


def read_rows(data: str | None, n: int) -> list[dict]:
    """First n rows of an Alpaca-format JSON/JSONL file, or of the embedded demo dataset."""
    if data is None:
        from tunelens.data.demo_data import generate_demo_rows

        rows = generate_demo_rows()
    else:
        text = Path(data).read_text()
        rows = json.loads(text) if data.endswith(".json") else [json.loads(line) for line in text.splitlines()]
    return [
        {"id": f"bench-{i}", "instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]}
        for i, r in enumerate(rows[:n])
    ]


def random_model(shape: str, tokenizer_dir: str, device: str):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SHAPES[shape])
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    started = time.perf_counter()
    with torch.device(device):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(dtype).eval()
    return model, tokenizer, time.perf_counter() - started


def timed(fn):
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF model dir (real weights)")
    parser.add_argument("--random", choices=sorted(SHAPES), help="random-weight model of this shape instead")
    parser.add_argument("--tokenizer", help="tokenizer dir for --random")
    parser.add_argument("--save-load", action="store_true",
                        help="with --random: save the model to disk and time load_model() from there")
    parser.add_argument("--data", default=None, help="Alpaca JSON/JSONL (default: embedded demo rows)")
    parser.add_argument("--rows", type=int, default=16, help="prompts for the batched run")
    parser.add_argument("--loop-rows", type=int, default=None, help="prompts for the one-at-a-time loop (default rows)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[16])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--vllm-python", default=None, help="also time vllm (through this Python)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch

    from tunelens.models import load_model, pick_device

    device = pick_device(args.device)
    rows = read_rows(args.data, args.rows)
    results: dict = {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "rows": len(rows), "max_new_tokens": args.max_new_tokens}
    if device == "cuda":
        results["gpu"] = torch.cuda.get_device_name()
    if args.random:
        model, tokenizer, load_s = random_model(args.random, args.tokenizer, device)
        results.update(model=f"random {args.random}", load_time_s=round(load_s, 2), load_kind="random init")
        if args.save_load:
            saved = tempfile.mkdtemp()
            model.save_pretrained(saved)
            tokenizer.save_pretrained(saved)
            del model
            (model, tokenizer), load_s = timed(lambda: load_model(saved, device=device))
            results.update(load_time_s=round(load_s, 2), load_kind="load_model from disk (random weights)")
    else:
        (model, tokenizer), load_s = timed(lambda: load_model(args.model, device=device))
        results.update(model=args.model, load_time_s=round(load_s, 2), load_kind="load_model from disk")

    with tempfile.TemporaryDirectory() as workdir:
        test_file = Path(workdir) / "test.jsonl"
        test_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        prompt_rows = load_prompt_rows(test_file, "alpaca", tokenizer, max_prompt_tokens=4096)
        prompts = [r.prompt for r in prompt_rows]
        results["mean_prompt_tokens"] = round(sum(r.num_prompt_tokens for r in prompt_rows) / len(rows), 1)
        decoding = DecodingConfig()  # the study default: top_k 50, num_beams 1, temperature 0.8

        def run(batch_size, subset):
            settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=batch_size, seed=0)
            out, seconds = timed(lambda: hf_generate_batched(model, tokenizer, subset, decoding, settings))
            tokens = sum(c.num_generated_tokens for c in out)
            return {"batch_size": batch_size, "prompts": len(subset), "seconds": round(seconds, 2),
                    "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}

        run(min(args.batch_size), prompts[:2])  # warm-up (kernels, allocator)
        results["batched"] = [run(b, prompts) for b in args.batch_size]
        loop_prompts = prompts[: args.loop_rows or len(prompts)]
        results["one_at_a_time"] = run(1, loop_prompts)
        best = max(results["batched"], key=lambda r: r["tokens_per_s"])
        loop_speed = results["one_at_a_time"]["tokens_per_s"]
        results["batched_over_loop_tokens_per_s"] = round(best["tokens_per_s"] / loop_speed, 2)
        gen_s = best["seconds"]
        results["load_share_of_job"] = round(results["load_time_s"] / (results["load_time_s"] + gen_s), 3)

        if args.vllm_python and args.model:
            del model
            request = {
                "backend": "vllm", "model_path": str(Path(args.model).resolve()), "test_file": str(test_file),
                "prompt_format": "alpaca", "decoding_config": decoding.as_dict(),
                "settings": {"max_new_tokens": args.max_new_tokens, "seed": 0, "max_prompt_tokens": 4096},
                "device": device,
            }
            vllm_rows = _completions_in_subprocess(args.vllm_python, request)
            tokens = sum(r["num_generated_tokens"] for r in vllm_rows)
            seconds = vllm_rows[0]["generation_time_s"]
            results["vllm"] = {"load_time_s": vllm_rows[0]["load_time_s"], "seconds": seconds, "tokens": tokens,
                               "tokens_per_s": round(tokens / seconds, 1)}
            ratio = results["vllm"]["tokens_per_s"] / best["tokens_per_s"]
            results["vllm_over_hf_batched_tokens_per_s"] = round(ratio, 2)

    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
