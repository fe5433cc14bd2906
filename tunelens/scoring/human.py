"""Human ratings: blind rating sheets out, filled sheets back in as a `human` score (0-1).

Sheet (`results/human/sheet.csv`): the same `sample_size` test rows (seeded sample of the ids that every
generation file has, so groups are compared on the same rows) from every (model, variant, config), all
items shuffled together. Columns: item, task, reference, answer, correct, comment. Nothing in a row says
which model, variant or config produced the answer; `results/human/key.csv` maps items back
(item, model, variant, config, id).

Raters fill `correct` with 1 (the answer is correct) or 0 (it is not) and put the sheet(s) in
`scoring.human.ratings_dir`. Several files are several raters (or parts of the sheet): an item's score is the
mean of its ratings; a group's Human score is the mean over its rated items, with a bootstrap CI over items.
A malformed sheet fails naming the file, the line and the column.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from tunelens.errors import DataError
from tunelens.io import read_jsonl, write_json_atomic, write_text_atomic
from tunelens.scoring.metrics import MetricResult
from tunelens.prompts import user_message
from tunelens.scoring.score import read_generations, score_record, write_rows_csv

log = logging.getLogger(__name__)

SHEET_COLUMNS = ("item", "task", "reference", "answer", "correct", "comment")
KEY_COLUMNS = ("item", "model", "variant", "config", "id")
RATING_INSTRUCTIONS = (
    "correct: 1 if the answer does what the task asks (the reference shows one correct answer; others may be "
    "correct too), 0 if it does not. Leave no row blank: delete rows you do not rate."
)
Group = tuple[str, str, str]  # (model, variant, config)


def _csv_text(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def item_id(group: Group, row_id: str, answer: str) -> str:
    """A rating item's id: a digest of what is rated (model, variant, config, test row, answer text).

    Stable: adding or removing groups, or another shuffle, leaves every other item's id unchanged. Bound to
    the content: when an answer changes (generations rerun), so does its id, and a rating of the old answer
    no longer matches any item of the new key (rejected, never moved onto another answer). Opaque: the
    sheet still says nothing of which model, variant or config produced an answer.
    """
    digest = hashlib.sha256("\x1f".join((*group, row_id, answer)).encode("utf-8")).hexdigest()
    return f"item-{digest[:12]}"


def write_human_sheet(
    generation_files: Mapping[Group, str | Path],
    test_file: str | Path,
    sheet_csv: str | Path,
    key_csv: str | Path,
    *,
    sample_size: int,
    seed: int,
) -> dict:
    """Write the blind sheet and its key. Returns {"items", "rows_per_group", "groups"}."""
    if not generation_files:
        raise DataError("no generation files to sample rating rows from")
    tasks = {row["id"]: row for row in read_jsonl(test_file, required=("id", "instruction", "input", "output"))}
    by_group = {group: {row["id"]: row for row in read_generations(path)} for group, path in generation_files.items()}
    common = set.intersection(*(set(rows) for rows in by_group.values()))
    missing = sorted(common - set(tasks))
    if missing:
        raise DataError(f"row id(s) {missing[:5]} of the generation files are not in the test split {test_file}")
    if not common:
        raise DataError("the generation files share no row id; cannot build a paired rating sheet")
    rng = np.random.default_rng(seed)
    ids = sorted(common)
    sampled = [ids[i] for i in sorted(rng.choice(len(ids), size=min(sample_size, len(ids)), replace=False))]
    entries = [(group, row_id) for group in sorted(by_group) for row_id in sampled]
    items = [item_id(group, row_id, by_group[group][row_id]["generated"]) for group, row_id in entries]
    if len(set(items)) != len(items):  # 48-bit digests of distinct (group, row): practically never
        raise DataError("two rating items got the same id; change scoring.human.sample_size or the seed")
    order = rng.permutation(len(entries))
    sheet_rows, key_rows = [], []
    for index in order:
        (model, variant, config), row_id = entries[index]
        item = items[index]
        row = by_group[(model, variant, config)][row_id]
        sheet_rows.append([item, user_message(tasks[row_id]), row["reference"], row["generated"], "", ""])
        key_rows.append([item, model, variant, config, row_id])
    write_text_atomic(key_csv, _csv_text(KEY_COLUMNS, key_rows))
    write_text_atomic(sheet_csv, _csv_text(SHEET_COLUMNS, sheet_rows))
    log.info("%d items (%d rows x %d groups) -> %s", len(entries), len(sampled), len(by_group), sheet_csv)
    return {"items": len(entries), "rows_per_group": len(sampled), "groups": len(by_group)}


def read_key(key_csv: str | Path) -> dict[str, dict]:
    key_csv = Path(key_csv)
    if not key_csv.exists():
        raise DataError(f"{key_csv}: key file does not exist (rule human_sheet writes it with the sheet)")
    with key_csv.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != KEY_COLUMNS:
            raise DataError(f"{key_csv}: columns {reader.fieldnames}; expected {list(KEY_COLUMNS)}")
        return {row["item"]: row for row in reader}


def read_sheet_answers(sheet_csv: str | Path) -> dict[str, str]:
    """{item: answer} of the sheet as written (to catch ratings of an older sheet)."""
    with Path(sheet_csv).open(encoding="utf-8", newline="") as handle:
        return {row["item"]: row["answer"] for row in csv.DictReader(handle)}


def read_rating_sheet(path: str | Path, key: Mapping[str, dict], answers: Mapping[str, str] | None = None) -> dict[str, float]:
    """{item: 0.0 or 1.0} from one filled sheet. Errors name the file, the 1-based line and the column.

    With `answers` (the current sheet), a rated row whose `answer` differs from the current sheet's fails:
    the sheet was rebuilt (new generations) after it was rated, so the rating is for another answer.
    """
    path = Path(path)
    with path.open(encoding="utf-8-sig", newline="") as handle:  # -sig: spreadsheets often add a BOM
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        for column in ("item", "correct"):
            if column not in header:
                raise DataError(f"{path}, line 1: no column '{column}'; the sheet's columns are {list(SHEET_COLUMNS)}")
        ratings: dict[str, float] = {}
        seen_line: dict[str, int] = {}
        for row in reader:
            line = reader.line_num
            if None in row:
                raise DataError(f"{path}, line {line}: more cells than the {len(header)} columns of the header")
            item = (row["item"] or "").strip()
            if item not in key:
                raise DataError(
                    f"{path}, line {line}, column 'item': '{item}' is not an item of the key file; item ids are "
                    "digests of the rated answer, so the sheet was rebuilt after this file was rated (an answer "
                    "changed) or the file belongs to another sheet: rate the new sheet's items"
                )
            if item in seen_line:
                raise DataError(f"{path}, line {line}, column 'item': '{item}' already rated on line {seen_line[item]}")
            if answers is not None and "answer" in row and row["answer"] != answers.get(item):
                raise DataError(
                    f"{path}, line {line}, column 'answer': differs from {item}'s answer in the current sheet; "
                    "the sheet was rebuilt after this file was rated: rate the new sheet"
                )
            value = (row["correct"] or "").strip()
            if value not in ("0", "1"):
                shown = repr(value) if value else "empty"
                raise DataError(
                    f"{path}, line {line}, column 'correct': {shown}; expected 1 (correct) or 0 (not correct); "
                    "delete the row to leave an item unrated"
                )
            ratings[item] = float(value)
            seen_line[item] = line
    return ratings


def human_scores(
    rating_files: Sequence[str | Path],
    key_csv: str | Path,
    outputs: Mapping[Group, tuple[str | Path, str | Path]],
    *,
    sheet_csv: str | Path | None = None,
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 1234,
) -> dict[Group, dict]:
    """Read filled sheets and write one score file (metric `human`, 0-1) + per-row CSV per group.

    `outputs` maps (model, variant, config) -> (json path, rows csv path); every group needs at least one
    rated item. Per-row CSV: id (test row id), item, human (mean over raters), raters. `sheet_csv` (the sheet
    the key belongs to) lets stale ratings fail.
    """
    if not rating_files:
        raise DataError(f"no filled rating sheets given (expected CSV files with columns {list(SHEET_COLUMNS)})")
    key = read_key(key_csv)
    answers = read_sheet_answers(sheet_csv) if sheet_csv is not None else None
    per_item: dict[str, list[float]] = {}
    for path in rating_files:
        for item, value in read_rating_sheet(path, key, answers).items():
            per_item.setdefault(item, []).append(value)
    summaries = {}
    for group, (json_path, rows_path) in outputs.items():
        items = sorted(item for item in per_item if tuple(key[item][c] for c in ("model", "variant", "config")) == group)
        if not items:
            raise DataError(
                f"no ratings for model '{group[0]}', variant '{group[1]}', config '{group[2]}' in {list(map(str, rating_files))}; "
                f"rate its items (see {key_csv})"
            )
        items.sort(key=lambda item: key[item]["id"])
        values = np.asarray([np.mean(per_item[item]) for item in items])
        result = MetricResult("human", values, float(values.mean()),
                              details={"instructions": RATING_INSTRUCTIONS, "raters_per_item": float(np.mean([len(per_item[i]) for i in items]))})
        n = len(items)
        summary = score_record(
            model=group[0], variant=group[1], config=group[2], layer=None, results=[result], n=n,
            samples=samples, confidence=confidence, seed=seed,
            source={"rating_files": [str(p) for p in rating_files], "key": str(key_csv),
                    "sheet": str(sheet_csv) if sheet_csv is not None else None},
        )
        write_rows_csv(rows_path, [key[item]["id"] for item in items],
                       {"human": values, "raters": [float(len(per_item[i])) for i in items]},
                       extra={"item": items})
        write_json_atomic(json_path, summary)
        summaries[group] = summary
    return summaries
