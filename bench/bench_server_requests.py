"""What one generate request costs inside a long-lived process, and what the static cache and the merged adapter buy.

Issue 21: in the GPU study DAG a generation-server request decoded at ~70 ms a step, a bare process's first call
at 67 ms and its later calls at 26-29 ms. This bench runs the same request (the preset's rows, tunelens'
hf_generate_batched with its own GenerationConfig, stop string on) in one process, interleaved, and times:

  part threads   dynamic cache, base model: each call on the main thread / on a new thread per call (what the
                 server did) / on one long-lived worker thread (what it does now)
  part static    the static cache with each compile backend (eager, cudagraphs, inductor): first call (compile
                 included) and the later calls, against the dynamic cache; greedy agreement with the dynamic cache
  part graphs    compile_backend graphs (the static-cache step replayed from a hand-captured CUDA graph) against
                 transformers' static cache run eagerly and the dynamic cache, interleaved; greedy equality; the
                 early-exit request (6 rows on 8 of 32 blocks)
  part beams     beam search (2, 5, 10 beams, deterministic) on the graphs path's static cache (beams reordered in
                 place over the generated positions only) against transformers' dynamic cache, interleaved; the
                 beams' agreement; and whether a row's beams hold bitwise the same prompt keys after the prefill
                 (what the in-place reorder relies on)
  part logits    the raw logits of the first decoding steps, graphs vs transformers' eager static cache, on the
                 same batch: bitwise equal or by how much not; and graphs run to run
  part repro     run to run: the logits of the first decoding steps from the capturing call, two replaying calls
                 and a call after a release (a fresh capture), against the eager static cache; and the 36-row
                 sampling request's tokens from two calls on the same graphs, and after a release
  part mergeload the merged copy loaded beside the base, its load in parts, then 3 identical requests on it
  part merged    the fine-tuned variant (LoRA r=16 on all linear layers, random non-zero B): PEFT's per-layer
                 adapter vs merged into the bf16 weights, dynamic and static cache; greedy agreement

    python bench/bench_server_requests.py --model gpu-study/llama2-7b-random --data code_alpaca.json \\
        --parts threads,static,merged --out requests.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def prompts_from(data: Path, rows: int, tokenizer) -> list[str]:
    from tunelens.prompts import build_prompt  # the generation stage's own template

    records = json.loads(data.read_text())[-rows:]
    return [build_prompt({"instruction": r["instruction"], "input": r.get("input", "")}, "alpaca", tokenizer)
            for r in records]


def timed(fn) -> tuple[float, object]:
    import torch

    torch.cuda.synchronize() if torch.cuda.is_available() else None
    started = time.perf_counter()
    out = fn()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    return time.perf_counter() - started, out


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3),
            "all": [round(v, 3) for v in values]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=36)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", default="threads,static,merged")
    parser.add_argument("--backends", default="cudagraphs,inductor")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import torch

    from tunelens.generation.agreement import token_agreement
    from tunelens.generation.decoding import DecodingConfig
    from tunelens.generation.generate import GenerationSettings, hf_generate_batched
    from tunelens.models import load_model

    results: dict = {"rows": args.rows, "max_new_tokens": args.max_new_tokens, "device": args.device,
                     "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    started = time.perf_counter()
    model, tokenizer = load_model(args.model, device=args.device)
    results["load_s"] = round(time.perf_counter() - started, 1)
    prompts = prompts_from(args.data, args.rows, tokenizer)
    sampling = DecodingConfig(temperature=0.8, top_k=50)
    greedy = DecodingConfig(temperature=0.0)
    base_settings = GenerationSettings(max_new_tokens=args.max_new_tokens, stop=("### Instruction:",), seed=1234)
    steps = args.max_new_tokens

    def request(m=None, config=sampling, settings=base_settings, prompts_limit=None):
        return hf_generate_batched(m if m is not None else model, tokenizer, prompts[:prompts_limit], config, settings)

    def save():
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))

    parts = args.parts.split(",")
    if "threads" in parts:
        request()  # the process's first call (CUDA context, cuBLAS, kernels): not a case
        worker = ThreadPoolExecutor(max_workers=1)
        cases = {
            "main thread": lambda: timed(request)[0],
            "new thread per call (server before)": lambda: _on_new_thread(lambda: timed(request)[0]),
            "one worker thread (server now)": lambda: worker.submit(lambda: timed(request)[0]).result(),
            "new thread, torch 1 thread": lambda: _on_new_thread(lambda: _one_thread(lambda: timed(request)[0])),
        }
        times = {name: [] for name in cases}
        for _ in range(args.repeats):
            for name, case in cases.items():
                times[name].append(case())
                print(f"threads: {name}: {times[name][-1]:.2f} s", flush=True)
        results["threads"] = {name: spread(v) | {"ms_per_step": round(1000 * statistics.median(v) / steps, 1)}
                              for name, v in times.items()}
        worker.shutdown()
        save()

    if "static" in parts:
        static = {}
        dyn_greedy = request(config=greedy)
        for backend in ["eager"] + [b for b in args.backends.split(",") if b]:
            settings = replace(base_settings, static_cache=True, compile_backend=backend)
            first, _ = timed(lambda: request(settings=settings))
            later = [timed(lambda: request(settings=settings))[0] for _ in range(args.repeats)]
            dyn = [timed(request)[0] for _ in range(args.repeats)]
            agree = token_agreement([c.token_ids for c in dyn_greedy],
                                    [c.token_ids for c in request(config=greedy, settings=settings)])
            static[backend] = {"first_s": round(first, 2), "later": spread(later),
                               "ms_per_step": round(1000 * statistics.median(later) / steps, 1),
                               "dynamic_interleaved": spread(dyn),
                               "greedy_agreement_with_dynamic": {k: agree[k] for k in ("exact_match", "mean_agreement")}}
            print(f"static {backend}: {static[backend]}", flush=True)
            results["static"] = static
            save()

    if "merged" in parts:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
        adapter_dir = Path("/tmp/bench_adapter")
        get_peft_model(model, lora).save_pretrained(adapter_dir)  # wraps model in place: reload below
        del model
        torch.cuda.empty_cache()
        backend = args.backends.split(",")[0] or "eager"
        merged = {}
        peft_model, _ = load_model(args.model, adapter_dir=adapter_dir, device=args.device)
        merged_model, _ = load_model(args.model, adapter_dir=adapter_dir, device=args.device, merge_adapter=True)
        static_settings = replace(base_settings, static_cache=True, compile_backend=backend)
        variants = {"peft dynamic": (peft_model, base_settings), "merged dynamic": (merged_model, base_settings),
                    "peft static": (peft_model, static_settings), "merged static": (merged_model, static_settings)}
        for name, (m, s) in variants.items():
            first, _ = timed(lambda: request(m=m, settings=s))
            merged[name] = {"first_s": round(first, 2), "later": []}
        for _ in range(args.repeats):
            for name, (m, s) in variants.items():
                merged[name]["later"].append(timed(lambda: request(m=m, settings=s))[0])
        for name in variants:
            later = merged[name]["later"]
            merged[name] |= {"later": spread(later), "ms_per_step": round(1000 * statistics.median(later) / steps, 1)}
        agree = token_agreement([c.token_ids for c in request(m=peft_model, config=greedy)],
                                [c.token_ids for c in request(m=merged_model, config=greedy)])
        merged["greedy_agreement_peft_vs_merged_bf16"] = {k: agree[k] for k in ("exact_match", "mean_agreement")}
        print(f"merged: {merged}", flush=True)
        results["merged"] = merged
        save()
    if "graphs" in parts:
        results["graphs"] = part_graphs(args, model, tokenizer, request, greedy, base_settings, steps)
        save()

    if "beams" in parts:
        results["beams"] = part_beams(args, model, tokenizer, prompts, request, base_settings, steps)
        save()

    if "logits" in parts:
        results["logits"] = part_logits(args, model, tokenizer, greedy, base_settings)
        save()

    if "repro" in parts:
        results["repro"] = part_repro(args, model, tokenizer, request, greedy, base_settings)
        save()

    if "profile" in parts:
        results["profile"] = part_profile(args, request, base_settings, steps)
        save()

    if "mergeload" in parts:
        del model
        torch.cuda.empty_cache()
        results["mergeload"] = part_mergeload(args, request, base_settings, steps)
        save()
    print(json.dumps(results, indent=1))


def part_graphs(args, model, tokenizer, request, greedy, base_settings, steps) -> dict:
    """compile_backend graphs (hand-captured CUDA graph of the static-cache step) against transformers' static
    cache run eagerly and the dynamic cache: first call, then interleaved repeats; greedy equality; early exit."""
    from tunelens.generation import graphs
    from tunelens.generation.agreement import token_agreement
    from tunelens.probe.probe import truncated_decoder

    cases = {"dynamic": base_settings,
             "static eager": replace(base_settings, static_cache=True, compile_backend="eager"),
             "graphs": replace(base_settings, static_cache=True, compile_backend="graphs")}
    out: dict = {"first_s": {}, "later": {}}
    for name, settings in cases.items():
        out["first_s"][name] = round(timed(lambda: request(settings=settings))[0], 3)
    times: dict = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, settings in cases.items():
            times[name].append(timed(lambda: request(settings=settings))[0])
    for name, values in times.items():
        out["later"][name] = spread(values) | {"ms_per_step": round(1000 * statistics.median(values) / steps, 1)}
    print("graphs:", json.dumps(out), flush=True)
    tokens = {name: [c.token_ids for c in request(config=greedy, settings=settings)] for name, settings in cases.items()}
    out["greedy_graphs_equal_static_eager"] = tokens["graphs"] == tokens["static eager"]
    agree = token_agreement(tokens["dynamic"], tokens["graphs"])
    out["greedy_agreement_graphs_vs_dynamic"] = {k: agree[k] for k in ("exact_match", "mean_agreement")}
    store = graphs.decode_graphs(model)
    out["store"] = {"captures": store.captures, "capture_s": round(store.capture_seconds, 2),
                    "shapes": [list(shape) for shape in store.caches], "held_gb": round(store.held_bytes() / 2**30, 2)}
    # early exit: the probe's 6 rows x 64 tokens on the first 8 blocks
    early = {name: [] for name in ("dynamic", "graphs")}
    few = lambda settings: request(settings=settings, prompts_limit=6)  # noqa: E731
    with truncated_decoder(model, 8):
        for name in early:
            timed(lambda: few(cases[name]))
        for _ in range(args.repeats):
            for name in early:
                early[name].append(timed(lambda: few(cases[name]))[0])
    out["early_exit_8_of_32_6_rows"] = {name: spread(v) for name, v in early.items()}
    print("graphs:", json.dumps(out), flush=True)
    return out


def part_beams(args, model, tokenizer, prompts, request, base_settings, steps, widths=(2, 5, 10)) -> dict:
    """Beam search: graphs (static cache, in-place reorder of the generated positions) vs the dynamic cache."""
    import torch

    from tunelens.generation import graphs
    from tunelens.generation.agreement import token_agreement
    from tunelens.generation.decoding import DecodingConfig
    from tunelens.generation.generate import hf_generate_batched

    cases = {"dynamic": base_settings, "graphs": replace(base_settings, static_cache=True, compile_backend="graphs")}
    out: dict = {}
    for width in widths:
        config = DecodingConfig(num_beams=width, temperature=0.0)
        entry: dict = {"first_s": {}, "batches": {}}
        tokens = {}
        for name, settings in cases.items():
            log: list = []
            seconds, result = timed(lambda: hf_generate_batched(model, tokenizer, prompts, config, settings, log))
            entry["first_s"][name], entry["batches"][name] = round(seconds, 2), log
            tokens[name] = [c.token_ids for c in result]
        times: dict = {name: [] for name in cases}
        for _ in range(args.repeats):
            for name, settings in cases.items():
                times[name].append(timed(lambda: request(config=config, settings=settings))[0])
        entry["later"] = {name: spread(v) | {"ms_per_step": round(1000 * statistics.median(v) / steps, 1)}
                          for name, v in times.items()}
        agree = token_agreement(tokens["dynamic"], tokens["graphs"])
        entry["agreement_graphs_vs_dynamic"] = {k: agree[k] for k in ("exact_match", "mean_agreement")}
        out[f"beams_{width}"] = entry
        print(f"beams {width}:", json.dumps(entry), flush=True)
    # What the in-place reorder relies on: after the prefill, a row's beams hold the same prompt keys and values.
    width, rows = 5, min(8, len(prompts))
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts[:rows], return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    prompt_len = encoded["input_ids"].shape[1]
    settings = replace(cases["graphs"], max_new_tokens=1, stop=())
    from tunelens.generation.backend_hf import hf_generation_config

    gen_config = hf_generation_config(model, tokenizer, DecodingConfig(num_beams=width, temperature=0.0), settings)
    store = graphs.decode_graphs(model)
    kv = store.cache_for(rows * width, prompt_len + 64)
    with torch.inference_mode():
        model.generate(**encoded, generation_config=gen_config, past_key_values=kv)
        same = all(torch.equal(part[:, :1].expand_as(part), part)
                   for layer in kv.layers for tensor in (layer.keys, layer.values)
                   for part in [tensor[:, :, :prompt_len].reshape(rows, width, -1)])
    out["prompt_kv_bitwise_equal_across_beams"] = bool(same)
    graphs.release(model)
    print("beams:", json.dumps({"prompt_kv_bitwise_equal_across_beams": same}), flush=True)
    return out


def step_logits(model, tokenizer, prompts, greedy, base_settings, backend: str, steps: int) -> list:
    """The raw logits of the first `steps` decoding steps of one greedy generate call on the static cache."""
    import torch

    from tunelens.generation import graphs
    from tunelens.generation.backend_hf import hf_generation_config, static_cache_len

    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    cache_len = static_cache_len(encoded["input_ids"].shape[1], steps)
    settings = replace(base_settings, static_cache=True, compile_backend=backend, max_new_tokens=steps, stop=())
    config = hf_generation_config(model, tokenizer, greedy, settings)
    config.output_logits, config.return_dict_in_generate = True, True
    from tunelens.generation.backend_hf import reproducible_attention

    with torch.inference_mode(), reproducible_attention(model.device):  # as hf_generate_batched
        if backend == "graphs":
            store = graphs.decode_graphs(model)
            kv = store.cache_for(len(prompts), cache_len)
            with store.installed(kv):
                out = model.generate(**encoded, generation_config=config, past_key_values=kv)
        else:
            config.max_cache_len = cache_len
            out = model.generate(**encoded, generation_config=config)
    return [step.float().cpu() for step in out.logits]


def part_repro(args, model, tokenizer, request, greedy, base_settings, rows: int = 8, steps: int = 6) -> dict:
    """Run to run on the graphs path: is the call that captures the graph the same as later calls replaying it?"""
    import torch

    from tunelens.generation import graphs
    from tunelens.generation.decoding import DecodingConfig

    prompts = prompts_from(args.data, rows, tokenizer)
    graphs.release(model)
    eager = step_logits(model, tokenizer, prompts, greedy, base_settings, "eager", steps)
    runs = {}
    for name in ("capture", "replay1", "replay2"):
        runs[name] = step_logits(model, tokenizer, prompts, greedy, base_settings, "graphs", steps)
    graphs.release(model)
    runs["recapture"] = step_logits(model, tokenizer, prompts, greedy, base_settings, "graphs", steps)
    runs["eager2"] = step_logits(model, tokenizer, prompts, greedy, base_settings, "eager", steps)

    def compare(a, b):
        return [{"equal": bool(torch.equal(x, y)), "max_abs_diff": float((x - y).abs().max())} for x, y in zip(a, b)]

    out = {"rows": rows, "steps": steps,
           "vs_eager": {name: compare(eager, logits) for name, logits in runs.items()},
           "replay1_vs_capture": compare(runs["capture"], runs["replay1"]),
           "replay2_vs_replay1": compare(runs["replay1"], runs["replay2"]),
           "recapture_vs_capture": compare(runs["capture"], runs["recapture"])}
    print("repro:", json.dumps(out), flush=True)
    sampled = DecodingConfig(temperature=0.8, top_k=50)
    settings = replace(base_settings, static_cache=True, compile_backend="graphs")
    tokens = []
    graphs.release(model)
    for _ in range(2):
        tokens.append([c.token_ids for c in request(config=sampled, settings=settings)])
    graphs.release(model)
    tokens.append([c.token_ids for c in request(config=sampled, settings=settings)])
    out["sampling_36_rows"] = {"second_call_equal_first": tokens[1] == tokens[0],
                               "after_release_equal_first": tokens[2] == tokens[0],
                               "rows_equal_second_vs_first": sum(a == b for a, b in zip(tokens[0], tokens[1]))}
    print("repro:", json.dumps(out["sampling_36_rows"]), flush=True)
    return out


def part_logits(args, model, tokenizer, greedy, base_settings, rows: int = 8, steps: int = 4) -> dict:
    """Whether the replayed graph computes what the eager static-cache step computes: the raw logits of the first
    decoding steps (the prefill's step is eager on both paths), graphs vs transformers' static cache run eagerly,
    on the same left-padded batch. Equal bits mean the same kernels; a difference names the rounding gap."""
    import torch

    prompts = prompts_from(args.data, rows, tokenizer)

    def logits(backend: str) -> list:
        return step_logits(model, tokenizer, prompts, greedy, base_settings, backend, steps)

    eager, graphed = logits("eager"), logits("graphs")
    again = logits("graphs")
    result = {"rows": rows, "steps": steps, "per_step": []}
    for index, (a, b, c) in enumerate(zip(eager, graphed, again)):
        result["per_step"].append({"step": index, "bitwise_equal_to_eager": bool(torch.equal(a, b)),
                                   "max_abs_diff": float((a - b).abs().max()),
                                   "max_abs_logit": float(a.abs().max()),
                                   "argmax_equal_rows": int((a.argmax(-1) == b.argmax(-1)).sum()),
                                   "graphs_run_to_run_equal": bool(torch.equal(b, c))})
    print("logits:", json.dumps(result), flush=True)
    return result


def part_profile(args, request, base_settings, steps) -> dict:
    """Where a graphs request's time goes: GPU busy time against wall (torch.profiler), and the Python functions
    with the most own time (cProfile), on the third identical request."""
    import cProfile
    import io
    import pstats

    import torch
    from torch.profiler import ProfilerActivity, profile

    graphed = replace(base_settings, static_cache=True, compile_backend="graphs")
    request(settings=graphed)
    request(settings=graphed)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall, _ = timed(lambda: request(settings=graphed))
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events)
    table = events.table(sort_by="self_cpu_time_total", row_limit=25)
    profiler = cProfile.Profile()
    profiler.enable()
    request(settings=graphed)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    print(table, flush=True)
    print(text.getvalue()[:6000], flush=True)
    return {"wall_s": round(wall, 3), "gpu_busy_s": round(gpu_us / 1e6, 3), "torch_table": table,
            "cprofile": text.getvalue()[:12000]}


def part_mergeload(args, request, base_settings, steps) -> dict:
    """The fine-tuned variant's merged copy loaded beside the base (as the server keeps them): the load in its
    parts (load_model logs them), then three identical requests on it with each cache path."""
    import logging

    import torch
    from peft import LoraConfig, get_peft_model

    from tunelens.models import load_model

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", force=True)
    base, _ = load_model(args.model, device=args.device)
    torch.manual_seed(0)
    adapter_dir = Path("/tmp/bench_adapter")
    scratch, _ = load_model(args.model, device=args.device)
    get_peft_model(scratch, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                       init_lora_weights=False)).save_pretrained(adapter_dir)
    del scratch
    torch.cuda.empty_cache()
    load_s, (merged, _) = timed(lambda: load_model(args.model, adapter_dir=adapter_dir, device=args.device,
                                                   merge_adapter=True))
    out: dict = {"merged_load_s": round(load_s, 2)}
    graphed = replace(base_settings, static_cache=True, compile_backend="graphs")
    for name, settings in (("dynamic", base_settings), ("graphs", graphed)):
        out[name] = [round(timed(lambda: request(m=merged, settings=settings))[0], 3) for _ in range(3)]
        out[name + " (base)"] = [round(timed(lambda: request(m=base, settings=settings))[0], 3) for _ in range(2)]
        print("mergeload:", name, out[name], out[name + " (base)"], flush=True)
    return out


def _on_new_thread(fn):
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("v", fn()))
    thread.start()
    thread.join()
    return box["v"]


def _one_thread(fn):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


if __name__ == "__main__":
    main()
