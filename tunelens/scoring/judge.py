"""Optional LLM judge: a local model rates each generated answer against the reference.

The rubric prompt is fixed and versioned (RUBRIC_VERSION, written into every judge file): change the text,
change the version. The judge does not free-generate: it reads the next-token distribution after the
prompt and compares the five rating tokens "1".."5" (also " 1".." 5", whichever the tokenizer has), so every
row gets a valid rating, deterministically. Per-row `judge` = (rating - 1) / 4 on a 0-1 scale (5 -> 1.0);
`judge_expected` is the probability-weighted rating on the same scale. Corpus judge = mean of rows.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from tunelens.errors import DataError, ModelError
from tunelens.io import read_jsonl, write_json_atomic
from tunelens.scoring.metrics import MetricResult
from tunelens.prompts import user_message
from tunelens.scoring.score import read_generation_meta, read_generations, score_record, write_rows_csv

log = logging.getLogger(__name__)

RUBRIC_VERSION = "tunelens-judge-v1"
RUBRIC = """You are grading an answer to a task against a reference answer.

Task:
{task}

Reference answer:
{reference}

Answer to grade:
{answer}

How correct and complete is the answer to grade, compared with the reference answer?
1 = wrong, irrelevant or empty
2 = mostly wrong
3 = partly correct
4 = mostly correct, minor problems
5 = fully correct
Reply with one digit from 1 to 5."""
RATINGS = (1, 2, 3, 4, 5)


def judge_prompt(task: str, reference: str, answer: str, tokenizer) -> str:
    """The rubric filled in; through the judge's chat template when it has one, else ending in 'Rating:'."""
    text = RUBRIC.format(task=task, reference=reference, answer=answer if answer.strip() else "(empty)")
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text + "\n\nRating:"


def rating_token_ids(tokenizer) -> list[list[int]]:
    """For each rating 1..5, the single tokens that spell it ("4" and/or " 4")."""
    ids = []
    for rating in RATINGS:
        options = set()
        for text in (str(rating), f" {rating}"):
            encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(encoded) == 1:
                options.add(encoded[0])
        if not options:
            raise ModelError(f"judge tokenizer has no single token for rating '{rating}'")
        ids.append(sorted(options))
    return ids


def rate(model, tokenizer, prompts: list[str], *, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(ratings 1..5, expected ratings) for each prompt, from the next-token logits of the rating tokens."""
    import torch

    from tunelens.models import input_device

    device = input_device(model)  # a model sharded over GPUs takes its inputs on its first block's GPU
    options = rating_token_ids(tokenizer)
    ratings = np.zeros(len(prompts))
    expected = np.zeros(len(prompts))
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # the last position is then every row's next-token position
    try:
        with torch.inference_mode():
            for start in range(0, len(prompts), batch_size):
                batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True,
                                  add_special_tokens=False).to(device)
                logits = model(**batch).logits[:, -1, :].float()
                log_probs = torch.log_softmax(logits, dim=-1)
                # A rating's score pools its spellings ("4", " 4").
                per_rating = torch.stack([torch.logsumexp(log_probs[:, ids], dim=-1) for ids in options], dim=-1)
                probs = torch.softmax(per_rating, dim=-1).cpu().numpy()
                ratings[start : start + len(probs)] = np.asarray(RATINGS)[probs.argmax(axis=-1)]
                expected[start : start + len(probs)] = probs @ np.asarray(RATINGS, dtype=np.float64)
    finally:
        tokenizer.padding_side = previous_side
    return ratings, expected


def judge_generation_file(
    generation_file: str | Path,
    test_file: str | Path,
    output_json: str | Path,
    rows_csv: str | Path,
    *,
    judge_model: str,
    judge_path: str | Path,
    model: str | None = None,
    variant: str | None = None,
    config: str | None = None,
    layer: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    gpus: int = 1,
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 1234,
    model_and_tokenizer=None,
    meta_file: str | Path | None = None,
) -> dict:
    """Rate every row of a generation file; write the judge JSON (score-file format, metric `judge`, 0-1)
    and the per-row CSV (`judge`, `judge_rating` 1-5, `judge_expected`). `layer`: the exit layer of an
    early-exit generation file (None for a decoding config's). `gpus`: the job's GPU count; on CUDA with more than
    one the judge model is sharded over them (load_model)."""
    from tunelens.models import load_model

    rows = read_generations(generation_file)
    meta = read_generation_meta(generation_file, len(rows), meta_file)
    tasks = {row["id"]: row for row in read_jsonl(test_file, required=("id", "instruction", "input", "output"))}
    missing = [row["id"] for row in rows if row["id"] not in tasks]
    if missing:
        raise DataError(f"{generation_file}: row id(s) {missing[:5]} are not in the test split {test_file}")
    start = time.perf_counter()
    if model_and_tokenizer is None:
        judge, tokenizer = load_model(judge_path, device=device, gpus=gpus)
    else:
        judge, tokenizer = model_and_tokenizer
    load_time = time.perf_counter() - start
    prompts = [judge_prompt(user_message(tasks[row["id"]]), row["reference"], row["generated"], tokenizer)
               for row in rows]
    start = time.perf_counter()
    ratings, expected = rate(judge, tokenizer, prompts, batch_size=batch_size)
    judge_time = time.perf_counter() - start
    per_row = (ratings - 1) / 4
    result = MetricResult(
        "judge", per_row, float(per_row.mean()),
        details={"rubric_version": RUBRIC_VERSION, "judge_model": judge_model,
                 "definition": "(argmax rating over tokens '1'..'5' - 1) / 4"},
    )
    n = len(rows)
    summary = score_record(
        model=model or (meta.get("model") or {}).get("name"), variant=variant or meta.get("variant"),
        config=config or (meta.get("decoding_config") or {}).get("name"), layer=layer, results=[result], n=n,
        samples=samples, confidence=confidence, seed=seed, source=meta,
        judge={
            "model": judge_model, "path": str(judge_path), "rubric_version": RUBRIC_VERSION, "rubric": RUBRIC,
            "load_time_s": round(load_time, 3), "judge_time_s": round(judge_time, 3),
            "rating_counts": {str(r): int((ratings == r).sum()) for r in RATINGS},
        },
        generation_file=str(generation_file),
    )
    log.info("judge %s on %s: %.3f (0-1) over %d rows in %.1f s", judge_model, generation_file, result.value, n,
             judge_time)
    write_rows_csv(rows_csv, [row["id"] for row in rows],
                   {"judge": per_row, "judge_rating": ratings, "judge_expected": (expected - 1) / 4})
    write_json_atomic(output_json, summary)
    return summary
