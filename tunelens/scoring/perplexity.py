"""Perplexity of the test references under one (model, variant): teacher-forced, response tokens only.

Each test row is tokenised the way generation sees it: the prompt from tunelens.prompts.build_prompt
(tokenised without added special tokens, as tunelens.generation.generate does), followed by the reference response
tunelens.prompts.response_text (the reference output + EOS, the fine-tuning target). Only the response tokens
are scored. Perplexity = exp(total NLL / total response tokens) over the rows (token-weighted, the usual corpus
definition); per row exp(row NLL / row tokens). NLL in nats. Lower is better; 1 is the minimum.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from tunelens.errors import DataError
from tunelens.io import read_jsonl, sha256_dir, write_json_atomic
from tunelens.scoring.metrics import MetricResult
from tunelens.scoring.score import score_record, write_rows_csv

log = logging.getLogger(__name__)

SPLIT_FIELDS = ("id", "instruction", "input", "output")


def encode_rows(rows: Sequence[dict], tokenizer, prompt_format: str, *, max_tokens: int | None = None,
                source: str = "test file") -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) per row. A row longer than `max_tokens` (the model's context) fails with its id."""
    from tunelens.prompts import build_prompt, response_text

    encoded = []
    for line_no, row in enumerate(rows, start=1):
        prompt_ids = tokenizer(build_prompt(row, prompt_format, tokenizer), add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(response_text(row, tokenizer), add_special_tokens=False)["input_ids"]
        if not response_ids:
            raise DataError(f"{source}, line {line_no} (id {row['id']}): the reference response has no tokens")
        if max_tokens is not None and len(prompt_ids) + len(response_ids) > max_tokens:
            raise DataError(
                f"{source}, line {line_no} (id {row['id']}): prompt + reference = "
                f"{len(prompt_ids) + len(response_ids)} tokens, more than the model's context ({max_tokens})"
            )
        encoded.append((prompt_ids, response_ids))
    return encoded


def response_nll(model, tokenizer, encoded: Sequence[tuple[list[int], list[int]]], *, batch_size: int = 8) -> np.ndarray:
    """(n, 2) array: summed NLL (nats) of each row's response tokens and their count. Rows are batched by
    length (right padding, padded and prompt positions masked), so padding does not change any value."""
    import torch

    from tunelens.models import input_device

    device = input_device(model)  # a model sharded over GPUs takes its inputs on its first block's GPU
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = np.zeros((len(encoded), 2), dtype=np.float64)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]) + len(encoded[i][1]))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            lengths = [len(encoded[i][0]) + len(encoded[i][1]) for i in batch]
            width = max(lengths)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            for slot, index in enumerate(batch):
                prompt_ids, response_ids = encoded[index]
                ids = prompt_ids + response_ids
                input_ids[slot, : len(ids)] = torch.tensor(ids)
                attention[slot, : len(ids)] = 1
                labels[slot, len(prompt_ids) : len(ids)] = torch.tensor(response_ids)
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
            # Position t predicts token t+1; float32 log-softmax so bf16 models lose no precision here.
            targets = labels[:, 1:].to(logits.device)
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100, reduction="none"
            )
            # One device-to-host copy per batch, not one sync per row.
            sums = torch.stack([nll.double().sum(dim=1), (targets != -100).sum(dim=1).double()], dim=1).cpu().numpy()
            out[batch] = sums
    return out


def perplexity_result(nll_stats: np.ndarray) -> MetricResult:
    """Corpus perplexity exp(sum NLL / sum tokens) with per-row perplexities and bootstrap statistics."""
    per_row = np.exp(nll_stats[:, 0] / nll_stats[:, 1])
    value = math.exp(nll_stats[:, 0].sum() / nll_stats[:, 1].sum())
    return MetricResult(
        "perplexity", per_row, value, stats=nll_stats,
        reduce=lambda sums: math.exp(sums[0] / sums[1]),
        details={
            "nll_per_token": float(nll_stats[:, 0].sum() / nll_stats[:, 1].sum()),
            "response_tokens": int(nll_stats[:, 1].sum()),
            "definition": "exp(sum of response-token NLL / number of response tokens), reference + EOS, "
            "teacher-forced after the generation prompt",
        },
    )


def perplexity_output(
    test_file: str | Path,
    *,
    model_name: str,
    model_path: str | Path,
    model_source: str | None = None,
    variant: str = "base",
    adapter_dir: str | Path | None = None,
    prompt_format: str = "alpaca",
    batch_size: int = 8,
    max_rows: int | None = None,
    device: str = "auto",
    gpus: int = 1,
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 1234,
    model_and_tokenizer=None,
    load_time_s: float | None = None,
) -> tuple[dict, list[dict]]:
    """Rule `perplexity` computed but not written: (summary, rows), the perplexity JSON and one dict per test
    row ({"id", "perplexity", "nll", "tokens"}: the per-row CSV's columns), as write_perplexity writes them.

    `max_rows` keeps the first N test rows (the rows generation uses, decoding.max_test_rows).
    `model_and_tokenizer` lets a caller reuse a loaded model (the model loads once per call otherwise), as the
    generation server (tunelens.generation.genserver) does; `load_time_s` is then what that load cost this request.
    `gpus`: the job's GPU count; on CUDA with more than one the model is sharded over them (load_model).
    """
    from tunelens.models import input_device, load_model

    rows = read_jsonl(test_file, required=SPLIT_FIELDS)
    if max_rows is not None:
        rows = rows[:max_rows]
    if not rows:
        raise DataError(f"{test_file}: no rows to score")
    start = time.perf_counter()
    if model_and_tokenizer is None:
        model, tokenizer = load_model(model_path, adapter_dir=adapter_dir, device=device, gpus=gpus)
    else:
        model, tokenizer = model_and_tokenizer
    load_time = time.perf_counter() - start if load_time_s is None else load_time_s
    context = getattr(model.config, "max_position_embeddings", None)
    encoded = encode_rows(rows, tokenizer, prompt_format, max_tokens=context, source=str(test_file))
    start = time.perf_counter()
    nll_stats = response_nll(model, tokenizer, encoded, batch_size=batch_size)
    score_time = time.perf_counter() - start
    result = perplexity_result(nll_stats)
    log.info("%s/%s: perplexity %.4g over %d rows (%d tokens) in %.1f s", model_name, variant, result.value,
             len(rows), int(nll_stats[:, 1].sum()), score_time)
    param = next(model.parameters())
    summary = score_record(
        model=model_name, variant=variant, config=None, layer=None, results=[result], n=len(rows),
        samples=samples, confidence=confidence, seed=seed,
        source={
            "model": {"name": model_name, "source": model_source or str(model_path), "path": str(model_path)},
            "variant": variant,
            "adapter": {"dir": str(adapter_dir), "sha256": sha256_dir(adapter_dir)} if adapter_dir else None,
            "prompt_format": prompt_format,
            "test_file": str(test_file),
            "n_rows": len(rows),
            "device": str(input_device(model)),
            "dtype": str(param.dtype).removeprefix("torch."),
            "batch_size": batch_size,
            "load_time_s": round(load_time, 3),
            "score_time_s": round(score_time, 3),
            "rows_per_s": round(len(rows) / score_time, 3) if score_time > 0 else None,
        },
    )
    per_row = [{"id": row["id"], "perplexity": float(ppl), "nll": float(nll), "tokens": float(tokens)}
               for row, ppl, (nll, tokens) in zip(rows, result.per_row, nll_stats)]
    return summary, per_row


def write_perplexity(output_json: str | Path, rows_csv: str | Path, summary: dict, rows: list[dict]) -> None:
    """A perplexity job's two files: the per-row CSV, then the JSON (its presence means the job completed)."""
    write_rows_csv(rows_csv, [row["id"] for row in rows],
                   {column: [row[column] for row in rows] for column in ("perplexity", "nll", "tokens")})
    write_json_atomic(output_json, summary)


def reference_perplexity(test_file: str | Path, output_json: str | Path, rows_csv: str | Path, **job) -> dict:
    """Score the test references under one model variant in this process; write the perplexity JSON + per-row
    CSV atomically (perplexity_output's keyword arguments). Returns the summary."""
    summary, rows = perplexity_output(test_file, **job)
    write_perplexity(output_json, rows_csv, summary, rows)
    return summary


def run_perplexity_job(job: dict, output_json: str | Path, rows_csv: str | Path, **server_options) -> dict:
    """Rule `perplexity` (and `perplexity_evalset`): `job` = perplexity_output's keyword arguments plus what keys
    the model's generation server (backend, gpus, vllm_options, as its generate jobs give them). A request to
    that server, which keeps the model loaded, else in this process (tunelens.generation.served.run_model_task, whose
    keyword arguments `server_options` are). The files are the bytes perplexity_output + write_perplexity
    give in this process, apart from the timings and `execution` (how it ran). Returns the summary."""
    from tunelens.generation.served import run_model_task

    summary, rows, execution = run_model_task("perplexity", job, perplexity_output, **server_options)
    summary["execution"] = execution
    write_perplexity(output_json, rows_csv, summary, rows)
    log.info("perplexity of %s (%s): %s -> %s", job.get("model_name"), job.get("variant"), execution["mode"],
             output_json)
    return summary
