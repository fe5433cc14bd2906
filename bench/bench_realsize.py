"""The generation server at the study's real size: the 13 decoding configs, 500 rows x 256 new tokens, base variant.

configs/gpu-study.yaml with the real evaluation size (500 test rows, 256 new tokens), through Snakemake's generate
jobs on the random 7B shape (bench_gpu_study.setup writes it). The 9 sampling/greedy configs run on all rows;
the 4 beam configs (dynamic cache, widths 2-10) on the first --beam-rows rows, so that the part fits one GPU call
(said in the table). Prints and writes the per-config table: rows, seconds of generation, tokens, tok/s, batches,
KV cache, and the server's load and compile.

    python bench/bench_realsize.py --data code_alpaca_2k.json --tokenizer TOKDIR --out realsize.json

--checkout DIR runs the same part in another checkout of tunelens (e.g. `git archive 9b522d0`), with that
checkout's Snakefile and code, so that both sides of a comparison run in one GPU call; --rows cuts the sampling
rows (said in the output) and --beam-rows 0 skips the beam configs.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "bench"))

SAMPLING = ["top_k_50_num_beams_1_temp_0.8", "top_k_10_num_beams_1_temp_0.8", "top_k_25_num_beams_1_temp_0.8",
            "top_k_40_num_beams_1_temp_0.8", "top_k_75_num_beams_1_temp_0.8", "top_k_50_num_beams_1_temp_0.0",
            "top_k_50_num_beams_1_temp_0.25", "top_k_50_num_beams_1_temp_0.5", "top_k_50_num_beams_1_temp_1.0"]
BEAMS = [f"top_k_50_num_beams_{n}_temp_0.8" for n in (2, 3, 5, 10)]
MODEL = "llama2-7b-random"


def preset(rows: int, checkout: Path = REPO_ROOT) -> str:
    text = (checkout / "configs" / "gpu-study.yaml").read_text()
    text = re.sub(r"test_size: 36", "test_size: 500", text)
    text = re.sub(r"max_new_tokens: 64\n", f"max_new_tokens: 256\n  max_test_rows: {rows}\n", text, count=1)
    assert "max_test_rows" in text and "test_size: 500" in text
    return text


def run(configfile: Path, names: list[str], timeout_s: int, checkout: Path = REPO_ROOT) -> dict:
    targets = [f"results/generations/{MODEL}/base/{n}.jsonl" for n in names]
    started = time.perf_counter()
    proc = subprocess.run(["timeout", "-s", "INT", str(timeout_s), sys.executable, "-m", "snakemake", "--cores", "all",
                           "--configfile", str(configfile), "--resources", "gpu=1", "--scheduler", "greedy",
                           "--keep-going", *targets], cwd=checkout, capture_output=True, text=True)
    return {"returncode": proc.returncode, "wall_s": round(time.perf_counter() - started, 1),
            "log_tail": (proc.stdout + proc.stderr)[-3000:]}


def table(names: list[str], checkout: Path = REPO_ROOT) -> list[dict]:
    rows = []
    for name in names:
        meta_file = checkout / "results" / "generations" / MODEL / "base" / f"{name}.meta.json"
        if not meta_file.exists():
            rows.append({"config": name, "missing": True})
            continue
        meta = json.loads(meta_file.read_text())
        rows.append({"config": name, "rows": meta["n_rows"] if "n_rows" in meta else None,
                     "generation_s": meta["generation_time_s"], "tokens": meta["generated_tokens"],
                     "tok_s": meta["tokens_per_s"], "kv_cache": meta.get("kv_cache"),
                     "batches": [(b.get("rows"), b.get("padded_rows"), b.get("prompt_tokens")) for b in meta["batches"] or []],
                     "loaded": meta["execution"].get("loaded"), "load_s": meta.get("load_time_s")})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=500, help="sampling/greedy rows (500 = the study's size)")
    parser.add_argument("--beam-rows", type=int, default=60, help="0: skip the beam configs")
    parser.add_argument("--checkout", type=Path, default=REPO_ROOT, help="the tunelens checkout to run in")
    parser.add_argument("--timeout", type=int, default=330, help="seconds for the 9 sampling/greedy configs")
    parser.add_argument("--beam-timeout", type=int, default=150)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from bench_gpu_study import setup

    checkout = args.checkout.resolve()
    result = {"setup": setup(argparse.Namespace(tokenizer=args.tokenizer, data=args.data)),
              "checkout": str(checkout), "rows": args.rows, "beam_rows": args.beam_rows}
    if checkout != REPO_ROOT and not (checkout / "gpu-study").exists():
        (checkout / "gpu-study").symlink_to(REPO_ROOT / "gpu-study")  # the model and data setup wrote
    full, beams = checkout / "configs" / "realsize.yaml", checkout / "configs" / "realsize-beams.yaml"
    full.write_text(preset(args.rows, checkout))
    result["sampling_run"] = run(full, SAMPLING, args.timeout, checkout)
    names = list(SAMPLING)
    if args.beam_rows:
        beams.write_text(preset(args.beam_rows, checkout))
        result["beam_run"] = run(beams, BEAMS, args.beam_timeout, checkout)
        names += BEAMS
    result["configs"] = table(names, checkout)
    done = [r for r in result["configs"] if not r.get("missing") and r["config"] in SAMPLING]
    tokens, seconds = sum(r["tokens"] for r in done), sum(r["generation_s"] for r in done)
    result["sampling_tok_s"] = round(tokens / seconds) if seconds else None
    for row in result["configs"]:
        print(json.dumps(row), flush=True)
    print(f"sampling/greedy: {len(done)} configs, {tokens} tokens in {seconds:.1f} s = {result['sampling_tok_s']} tok/s; "
          f"runs {result['sampling_run']['wall_s']} s + {result.get('beam_run', {}).get('wall_s')} s", flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
