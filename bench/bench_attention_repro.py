"""Which attention kernel makes a decoding step differ run to run on the GPU, and what each alternative costs.

Issue 21 (session 8): on the H200 the same greedy request's logits differed from call to call. This runs the
first decoding steps' logits 3 times per PyTorch SDPA backend (default choice, memory-efficient, math, cuDNN,
flash), eager static cache and graphs, and says which steps are bitwise equal across the 3; then the DAG's
36-row sampled request (graphs) per backend: seconds per call and rows equal to the first call. It also lists
the top CUDA kernels of one default call (which attention kernel the default picked). DET=1 (with
CUBLAS_WORKSPACE_CONFIG=:4096:8) adds torch.use_deterministic_algorithms(True) and runs the default only.

tunelens' own pin (backend_hf.reproducible_attention: every backend but cuDNN) is taken out here so that each
case runs the kernels it names; case "tunelens" is that pin. The session 8 figures were taken before the pin
existed, so their "default" is what tunelens ran until then.

    python bench/bench_attention_repro.py --model gpu-study/llama2-7b-random --data code_alpaca_2k.json --out FILE
"""
import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from bench_server_requests import prompts_from, step_logits
    from tunelens.generation import graphs
    from tunelens.generation.decoding import DecodingConfig
    from tunelens.generation.generate import GenerationSettings, hf_generate_batched
    from tunelens.models import load_model
    from tunelens.generation import backend_hf

    backend_hf.reproducible_attention = lambda device: contextlib.nullcontext()  # each case picks its own kernels
    det = os.environ.get("DET") == "1"
    if det:
        torch.use_deterministic_algorithms(True, warn_only=True)
    model, tok = load_model(args.model, device="cuda")
    data = args.data
    prompts = prompts_from(data, 8, tok)
    greedy = DecodingConfig(temperature=0.0)
    base = GenerationSettings(max_new_tokens=8, seed=1234, stop=("### Instruction:",))
    out = {"deterministic_algorithms": det}

    def same(rs):
        return [all(torch.equal(r[i], rs[0][i]) for r in rs[1:]) for i in range(len(rs[0]))]

    # which attention kernel runs by default (one eager static call)
    try:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            step_logits(model, tok, prompts, greedy, base, "eager", 3)
        names = {}
        for e in prof.key_averages():
            t = getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0) or 0
            if t and not e.key.startswith("aten::") and not e.key.startswith("cuda"):
                names[e.key[:90]] = round(t / 1000, 2)
        out["kernels_ms"] = dict(sorted(names.items(), key=lambda kv: -kv[1])[:14])
    except Exception as exc:
        out["kernels_ms"] = repr(exc)[:200]
    print(json.dumps(out["kernels_ms"]), flush=True)

    cases = [("default", None),
             ("tunelens", [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]),
             ("efficient", [SDPBackend.EFFICIENT_ATTENTION]), ("math", [SDPBackend.MATH]),
             ("cudnn", [SDPBackend.CUDNN_ATTENTION]), ("flash", [SDPBackend.FLASH_ATTENTION])]
    if det:
        cases = cases[:1]
    for name, backends in cases:
        for backend in ("eager", "graphs"):
            graphs.release(model)
            try:
                if backends:
                    with sdpa_kernel(backends):
                        rs = [step_logits(model, tok, prompts, greedy, base, backend, 8) for _ in range(3)]
                else:
                    rs = [step_logits(model, tok, prompts, greedy, base, backend, 8) for _ in range(3)]
                out[f"{name}/{backend}"] = same(rs)
            except Exception as exc:
                out[f"{name}/{backend}"] = f"{type(exc).__name__}: {str(exc)[:150]}"
            print(name, backend, out[f"{name}/{backend}"], flush=True)

    # the 36-row request (graphs, sampling): time and tokens call to call, default vs each candidate
    many = prompts_from(data, 36, tok)
    sampled = DecodingConfig(temperature=0.8, top_k=50)
    settings = replace(base, max_new_tokens=64, static_cache=True, compile_backend="graphs")
    for name, backends in (cases if not det else cases[:1]):
        if name == "flash":
            continue
        graphs.release(model)
        try:
            def call():
                if backends:
                    with sdpa_kernel(backends):
                        return hf_generate_batched(model, tok, many, sampled, settings)
                return hf_generate_batched(model, tok, many, sampled, settings)
            first = [c.token_ids for c in call()]
            times, equal = [], []
            for _ in range(2):
                torch.cuda.synchronize(); t = time.perf_counter()
                again = [c.token_ids for c in call()]
                torch.cuda.synchronize(); times.append(round(time.perf_counter() - t, 3))
                equal.append(sum(a == b for a, b in zip(first, again)))
            out[f"request/{name}"] = {"s": times, "rows_equal_to_first_of_36": equal}
        except Exception as exc:
            out[f"request/{name}"] = f"{type(exc).__name__}: {str(exc)[:150]}"
        print("request", name, out[f"request/{name}"], flush=True)
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

