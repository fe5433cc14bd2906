"""Training rows -> prompt-completion examples -> token ids with completion masks (what TRL trains on)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from tunelens.errors import DataError
from tunelens.io import read_jsonl

log = logging.getLogger("tunelens.training.finetune")

TRAIN_ROW_KEYS = ("id", "instruction", "input", "output")

def load_train_rows(train_jsonl: str | Path) -> list[dict]:
    """Split rows (docs/ARCHITECTURE.md), checked: string fields, a non-empty instruction."""
    rows = read_jsonl(train_jsonl, required=TRAIN_ROW_KEYS)
    if not rows:
        raise DataError(f"{train_jsonl}: no rows; the fine-tuning set is empty")
    for line_no, row in enumerate(rows, start=1):
        for key in TRAIN_ROW_KEYS:
            if not isinstance(row[key], str):
                raise DataError(
                    f"{train_jsonl}, line {line_no} (id {row.get('id')!r}): '{key}' is {type(row[key]).__name__}; "
                    "expected a string"
                )
        # An empty output is allowed (real sets have some): the row then trains only the EOS token.
        if not row["instruction"].strip():
            raise DataError(f"{train_jsonl}, line {line_no} (id {row['id']!r}): 'instruction' is empty")
    return rows


def encode_text(text: str, tokenizer) -> list[int]:
    """Token ids of a full text, with no special tokens added: the prompt is a complete text (template
    included), tokenized exactly as the generation and probe stages tokenize it (tunelens.generation.generate)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def training_examples(rows: list[dict], prompt_format: str, tokenizer) -> list[dict[str, str]]:
    """Prompt-completion pairs: the exact prompt the generation stage builds, then the reference + EOS."""
    from tunelens.prompts import build_prompt, response_text

    return [
        {"prompt": build_prompt(row, prompt_format, tokenizer), "completion": response_text(row, tokenizer)}
        for row in rows
    ]


@dataclass
class DataStats:
    """Token counts of the training set, as tokenized for training."""

    rows: int
    prompt_tokens: int
    completion_tokens: int  # loss-bearing tokens per epoch, before truncation
    max_row_tokens: int
    truncated_rows: int  # rows longer than max_seq_length (their start is kept)
    dropped_rows: dict = field(default_factory=dict)  # reason -> rows left out of training


def tokenize_examples(rows: list[dict], examples: list[dict], tokenizer, max_seq_length: int,
                      train_jsonl, on_bad_rows: str = "count") -> tuple[list[dict], DataStats]:
    """Token ids and completion masks (1 = response token, trained) in TRL's tokenized format.

    Tokenizing here rather than in TRL keeps training on exactly the ids generation sees: TRL's own
    tokenization adds special tokens (a second BOS for some tokenizers). The response starts where the
    ids of the prompt and of prompt + response diverge, as in TRL (a merge across the boundary moves it).
    Rows whose prompt alone fills max_seq_length would carry no loss: they are dropped and counted
    (reason prompt_fills_max_seq_length). With on_bad_rows 'error' (dataset.on_bad_rows), they and truncated
    rows fail instead, naming them.
    """
    tokenized, too_long, cut = [], [], []
    prompt_tokens = completion_tokens = max_row = 0
    for line_no, (row, example) in enumerate(zip(rows, examples), start=1):
        prompt_ids = encode_text(example["prompt"], tokenizer)
        ids = encode_text(example["prompt"] + example["completion"], tokenizer)
        n_prompt = next((i for i, (a, b) in enumerate(zip(prompt_ids, ids)) if a != b), min(len(prompt_ids), len(ids)))
        if n_prompt >= max_seq_length:
            too_long.append(f"line {line_no} (id {row['id']!r}, {n_prompt} prompt tokens)")
            continue
        tokenized.append({"input_ids": ids, "completion_mask": [0] * n_prompt + [1] * (len(ids) - n_prompt)})
        prompt_tokens += n_prompt
        completion_tokens += len(ids) - n_prompt
        max_row = max(max_row, len(ids))
        if len(ids) > max_seq_length:
            cut.append(f"line {line_no} (id {row['id']!r}, {len(ids)} tokens)")
    if on_bad_rows == "error" and (too_long or cut):
        which = (f"{len(too_long)} row(s) have a prompt of at least finetune.max_seq_length={max_seq_length} "
                 f"tokens, leaving no response token to train on: {', '.join(too_long[:5])}" if too_long else
                 f"{len(cut)} row(s) are longer than finetune.max_seq_length={max_seq_length} tokens and would be "
                 f"truncated: {', '.join(cut[:5])}")
        raise DataError(f"{train_jsonl}: {which}; dataset.on_bad_rows is 'error' (raise max_seq_length, or "
                        "'count' drops/truncates such rows and counts them)")
    if too_long:
        log.warning("%s: %d row(s) dropped: their prompt leaves no response token within max_seq_length=%d: %s%s",
                    train_jsonl, len(too_long), max_seq_length, ", ".join(too_long[:5]), " ..." if len(too_long) > 5 else "")
    if not tokenized:
        raise DataError(f"{train_jsonl}: every row's prompt fills finetune.max_seq_length={max_seq_length} tokens; "
                        "nothing left to train on (raise max_seq_length)")
    dropped = {"prompt_fills_max_seq_length": len(too_long)} if too_long else {}
    return tokenized, DataStats(len(tokenized), prompt_tokens, completion_tokens, max_row, len(cut), dropped)


