"""Benchmark of the probe stage: early-exit generation cost vs depth, and the logit lens vs a plain forward.

    # CPU, the embedded SmolLM2 (30 layers) materialised as an HF dir:
    OMP_NUM_THREADS=2 python bench/bench_probe.py --model /tmp/mat/smollm2-135m-instruct --device cpu
    # GPU, a random-weight Llama-2-7B shape in bf16 (no download; 32 layers):
    python bench/bench_probe.py --random-llama 7b --device cuda --batch 16 --new-tokens 64

Early exit: batch of random-token prompts, greedy, exactly --new-tokens tokens per row (EOS ignored, so every
layer generates the same number of tokens), first L blocks only (tunelens.probe.probe.truncated_decoder, the code
the early_exit rule runs). Reported: seconds, time ratio t_L / t_N, and L/N; a ratio near L/N means the
top blocks are not run. The gap is the per-token cost outside the blocks (embedding, LM head, sampling loop).
Logit lens: one prompt of --lens-seq tokens; plain forward (logits at every position) vs
tunelens.probe.lens.lens_log_probs over ALL layers at --lens-positions positions (final norm + LM head per layer).
Times are the minimum over --repeats runs after one warm-up. Prints a Markdown table; --json writes numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import time


def build_model(args):
    import torch

    from tunelens.models import load_model

    if args.random_llama:
        from transformers import LlamaConfig, LlamaForCausalLM

        shapes = {
            "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
            "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=32000),
        }
        config = LlamaConfig(**shapes[args.random_llama], max_position_embeddings=4096)
        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        torch.manual_seed(0)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # build in the target dtype: a float32 7B would need 27 GB first
        try:
            with torch.device(args.device):
                model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(default_dtype)
        name = f"random Llama ({args.random_llama} shape, {dtype})"
        return model.eval(), name
    model, _ = load_model(args.model, device=args.device)
    return model, f"{args.model} ({next(model.parameters()).dtype})"


def timed_interleaved(functions: dict, repeats: int, sync) -> dict:
    """Minimum seconds per named function over `repeats` rounds, after one warm-up round. Rounds visit the
    functions in turn, so a load change on a shared machine hits all of them alike."""
    times = {name: float("inf") for name in functions}
    for round_index in range(repeats + 1):
        for name, fn in functions.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if round_index:  # round 0 is the warm-up
                times[name] = min(times[name], time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF model directory")
    parser.add_argument("--random-llama", choices=["7b", "tiny"], help="random-weight Llama of this shape instead")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", default="0.25,0.5,0.75,1.0", help="early-exit layers (absolute or fractions)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--lens-seq", type=int, default=72, help="tokens in the lens sequence (prompt + continuation)")
    parser.add_argument("--lens-positions", type=int, default=9, help="positions the lens reads (lens_new_tokens + 1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    if not (args.model or args.random_llama):
        parser.error("give --model or --random-llama")

    import torch

    from tunelens.config import resolve_layers
    from tunelens.models import num_decoder_layers
    from tunelens.probe.lens import lens_log_probs
    from tunelens.probe.probe import truncated_decoder

    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    model, model_name = build_model(args)
    depth = num_decoder_layers(model)
    specs = [float(v) if "." in v else int(v) for v in args.layers.split(",")]
    layers = resolve_layers(specs, depth, "bench")
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, vocab, (args.batch, args.prompt_tokens), generator=generator).to(args.device)

    def generate():
        with torch.inference_mode():
            model.generate(
                input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens, do_sample=False, num_beams=1, pad_token_id=0,
            )

    def early_exit_at(layer):
        def run():
            with truncated_decoder(model, layer):
                generate()

        return run

    if depth not in layers:
        layers.append(depth)
    seconds = timed_interleaved({layer: early_exit_at(layer) for layer in layers}, args.repeats, sync)
    early = [{"layer": layer, "seconds": seconds[layer]} for layer in layers]
    full = seconds[depth]
    tokens = args.batch * args.new_tokens
    for entry in early:
        entry.update(ratio=entry["seconds"] / full, depth_fraction=entry["layer"] / depth, tokens_per_s=tokens / entry["seconds"])

    sequence = torch.randint(100, vocab, (1, args.lens_seq), generator=generator).to(args.device)
    positions = list(range(args.lens_seq - args.lens_positions, args.lens_seq))
    all_layers = list(range(1, depth + 1))

    def plain():
        with torch.inference_mode():
            model(input_ids=sequence, use_cache=False)

    def lens():
        with torch.inference_mode():
            lens_log_probs(model, sequence, positions, all_layers)

    lens_times = timed_interleaved({"plain": plain, "lens": lens}, args.repeats, sync)
    plain_s, lens_s = lens_times["plain"], lens_times["lens"]

    result = {
        "model": model_name, "num_layers": depth, "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "batch": args.batch, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "early_exit": early,
        "lens": {"seq": args.lens_seq, "positions": args.lens_positions, "layers": depth, "plain_forward_s": plain_s,
                 "lens_all_layers_s": lens_s, "ratio": lens_s / plain_s},
    }
    print(f"\n{model_name}, {depth} layers, device {args.device}"
          f"{' (' + result['gpu'] + ')' if result['gpu'] else ''}; batch {args.batch} x {args.prompt_tokens}-token "
          f"prompts, {args.new_tokens} new tokens, greedy\n")
    print("| early-exit layer L | L/N | time (s) | t_L / t_N | tokens/s |")
    print("|---|---|---|---|---|")
    for entry in early:
        print(f"| {entry['layer']} | {entry['depth_fraction']:.2f} | {entry['seconds']:.3f} | {entry['ratio']:.2f} "
              f"| {entry['tokens_per_s']:.1f} |")
    print(f"\nlogit lens over all {depth} layers at {args.lens_positions} positions of a {args.lens_seq}-token "
          f"sequence: {lens_s * 1000:.1f} ms vs plain forward {plain_s * 1000:.1f} ms = {lens_s / plain_s:.2f}x")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
