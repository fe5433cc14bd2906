"""hf-vs-vLLM agreement check: the same greedy prompts through both backends, token-level agreement report.

The rule `generation_agreement` (scripts/agreement.py) calls `agreement`; from a shell:
    python -m tunelens.generation.agreement agreement --model results/models/smollm2 --test results/data/demo/test.jsonl --out a.json
vLLM runs in this process when importable, else in another Python (`--vllm-python`, e.g. .venv-vllm/bin/python)
through the internal `completions` subcommand.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from tunelens.generation.decoding import DecodingConfig
from tunelens.errors import DataError, TunelensError
from tunelens.generation.generate import (
    GenerationSettings, _require_vllm, adapter_record, as_decoding_config, run_completions, vllm_importable,
)
from tunelens.io import library_versions, read_jsonl, write_json_atomic, write_jsonl_atomic

log = logging.getLogger(__name__)


def token_agreement(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> dict:
    """Token-level agreement of two backends' greedy outputs for the same prompts.

    Per row: `prefix` = number of leading tokens equal in both; `agreement` = prefix / max(len) (1.0 when
    both are empty). Summary: exact-match rate (0-1), mean agreement (0-1), mean first-divergence position.
    """
    if len(reference) != len(other):
        raise DataError(f"agreement: {len(reference)} rows vs {len(other)} rows; same prompts expected")
    per_row = []
    for a, b in zip(reference, other):
        prefix = 0
        for x, y in zip(a, b):
            if x != y:
                break
            prefix += 1
        longest = max(len(a), len(b))
        per_row.append(
            {"len_a": len(a), "len_b": len(b), "prefix": prefix,
             "agreement": 1.0 if longest == 0 else prefix / longest, "exact": list(a) == list(b)}
        )
    n = len(per_row)
    diverged = [r["prefix"] for r in per_row if not r["exact"]]
    return {
        "n": n,
        "exact_match": sum(r["exact"] for r in per_row) / n if n else None,
        "mean_agreement": sum(r["agreement"] for r in per_row) / n if n else None,
        "mean_first_divergence": sum(diverged) / len(diverged) if diverged else None,
        "rows": per_row,
    }


def _completions_in_subprocess(python: str, request: dict) -> list[dict]:
    """Run `python -m tunelens.generation.agreement completions` (e.g. in the vllm venv) and read its rows back."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as workdir:
        request_file = Path(workdir) / "request.json"
        out_file = Path(workdir) / "completions.jsonl"
        request_file.write_text(json.dumps(request))
        cmd = [python, "-m", "tunelens.generation.agreement", "completions", str(request_file), str(out_file)]
        log.info("running %s", " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise TunelensError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return read_jsonl(out_file)


def completions_request(request: dict) -> list[dict]:
    """Generate per a JSON-able request (backend, model_path, test_file, prompt_format, decoding_config,
    settings, adapter_dir, max_rows, device); rows carry `token_ids`. Used by the agreement check."""
    settings = GenerationSettings(**request["settings"])
    rows, completions, timing = run_completions(
        request["backend"], request["model_path"], None, as_decoding_config(request["decoding_config"]), settings,
        test_file=request["test_file"], prompt_format=request["prompt_format"], max_rows=request.get("max_rows"),
        adapter_dir=request.get("adapter_dir"), device=request.get("device", "auto"),
        vllm_options=request.get("vllm_options"),
    )
    return [
        {"id": row.id, **asdict(completion), **timing} for row, completion in zip(rows, completions)
    ]


def agreement(
    model_path: str | Path,
    test_file: str | Path,
    output_file: str | Path,
    *,
    prompt_format: str = "alpaca",
    adapter_dir: str | Path | None = None,
    max_rows: int = 16,
    max_new_tokens: int = 32,
    max_prompt_tokens: int = 1024,
    batch_size: int | str = "auto",
    vllm_python: str | None = None,
    device: str = "auto",
    vllm_options: dict | None = None,
) -> dict:
    """Greedy-decode the same prompts with hf and vllm and write a token-level agreement report (JSON).

    hf runs in this process; vllm in this process when importable, else through `vllm_python` (a Python
    with vllm and tunelens installed, e.g. .venv-vllm/bin/python). No stop strings, so both stop only at
    EOS or max_new_tokens and token sequences are comparable.
    """
    greedy = DecodingConfig(top_k=0, num_beams=1, temperature=0.0)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, stop=(), batch_size=batch_size,
                                  max_prompt_tokens=max_prompt_tokens)
    request = {
        "model_path": str(Path(model_path).resolve()), "test_file": str(Path(test_file).resolve()),
        "prompt_format": prompt_format, "decoding_config": greedy.as_dict(), "settings": asdict(settings),
        "adapter_dir": str(Path(adapter_dir).resolve()) if adapter_dir else None, "max_rows": max_rows,
        "device": device, "vllm_options": vllm_options,
    }
    hf_rows = completions_request({**request, "backend": "hf"})
    if vllm_importable():
        vllm_rows = completions_request({**request, "backend": "vllm"})
    elif vllm_python:
        vllm_rows = _completions_in_subprocess(vllm_python, {**request, "backend": "vllm"})
    else:
        _require_vllm()
    summary = token_agreement([r["token_ids"] for r in hf_rows], [r["token_ids"] for r in vllm_rows])
    for row, hf_row, vllm_row in zip(summary["rows"], hf_rows, vllm_rows):
        row.update(id=hf_row["id"], hf_text=hf_row["text"], vllm_text=vllm_row["text"])
    report = {
        "model_path": str(model_path),
        "adapter": adapter_record(adapter_dir),
        "decoding_config": greedy.as_dict(),
        "max_new_tokens": max_new_tokens,
        "hf": {"load_time_s": hf_rows[0]["load_time_s"], "generation_time_s": hf_rows[0]["generation_time_s"]},
        "vllm": {"load_time_s": vllm_rows[0]["load_time_s"], "generation_time_s": vllm_rows[0]["generation_time_s"]},
        **summary,
        "versions": library_versions(),
    }
    write_json_atomic(output_file, report)
    log.info("agreement hf vs vllm on %d greedy rows: exact %.2f, mean token agreement %.3f -> %s",
             summary["n"], summary["exact_match"], summary["mean_agreement"], output_file)
    return report


# --------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    """`python -m tunelens.generation.agreement agreement --model DIR --test FILE [--adapter DIR] [--vllm-python PY]`
    (and `completions REQUEST.json OUT.jsonl`, the worker the agreement check runs in the vllm venv)."""
    parser = argparse.ArgumentParser(prog="python -m tunelens.generation.agreement", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    agree = sub.add_parser("agreement", help="hf vs vllm token-level agreement on greedy prompts")
    agree.add_argument("--model", required=True, help="HF model dir (e.g. results/models/smollm2)")
    agree.add_argument("--test", required=True, help="split file, e.g. results/data/demo/test.jsonl")
    agree.add_argument("--out", required=True, help="report JSON to write")
    agree.add_argument("--adapter", default=None, help="LoRA adapter dir (finetuned variant)")
    agree.add_argument("--prompt-format", default="alpaca", choices=("alpaca", "chat"))
    agree.add_argument("--rows", type=int, default=16)
    agree.add_argument("--max-new-tokens", type=int, default=32)
    agree.add_argument("--vllm-python", default=None, help="Python with vllm (default: this one)")
    agree.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    worker = sub.add_parser("completions", help="(internal) run a completions request")
    worker.add_argument("request")
    worker.add_argument("out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "agreement":
            report = agreement(
                args.model, args.test, args.out, prompt_format=args.prompt_format, adapter_dir=args.adapter,
                max_rows=args.rows, max_new_tokens=args.max_new_tokens, vllm_python=args.vllm_python,
                device=args.device,
            )
            print(json.dumps({k: report[k] for k in ("n", "exact_match", "mean_agreement", "mean_first_divergence")}))
        else:
            rows = completions_request(json.loads(Path(args.request).read_text()))
            write_jsonl_atomic(args.out, rows)
    except TunelensError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
