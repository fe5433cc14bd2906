"""Data stage: read a dataset, clean it, and split it into train/test deterministically.

Guarantees (tested):
  - same seed + same input rows -> byte-identical train.jsonl/test.jsonl on any machine (the order comes
    from hashing row content with the seed, never from the input order or Python's hash());
  - exact duplicates removed; rows sharing an instruction+input stay on one side, so no test prompt
    appears in train (leakage check recorded in the manifest);
  - rows with a missing or empty required field are dropped and counted by reason, never silently.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

from tunelens.data.readers import BadRows, _read_file, _read_hub
from tunelens.errors import ConfigError, DataError
from tunelens.io import library_versions, sha256_bytes, sha256_file, write_json_atomic, write_jsonl_atomic, dumps_row
from tunelens.sources import EMBEDDED_DATASETS, EMBEDDED_PREFIX, source_kind

log = logging.getLogger(__name__)

REQUIRED = ("instruction", "output")
FIELDS = ("instruction", "input", "output")


# --------------------------------------------------------------------------------------------- reading
def read_source(source: str, *, hub_split: str = "train", base_dir: str | Path = ".",
                on_bad_rows: str = "count", hub_dir: str | Path | None = None) -> tuple[list[dict], dict, "BadRows"]:
    """Rows of a dataset source as dicts, a description of the source (kind, path, content hash), and the
    records that could not be read as rows (malformed lines), by reason. A hub dataset is read from
    `hub_dir`, its download by rule download_dataset (tunelens.hub), when given."""
    kind = source_kind(source)
    if kind == "embedded":
        from tunelens.data.demo_data import generate_demo_rows, generate_holdout_rows

        name = source[len(EMBEDDED_PREFIX):]
        if name not in EMBEDDED_DATASETS:
            raise ConfigError(f"dataset.source: unknown embedded dataset '{name}'; choices: {sorted(EMBEDDED_DATASETS)}")
        rows = generate_holdout_rows() if name == "demo-holdout" else generate_demo_rows()
        digest = sha256_bytes("\n".join(dumps_row(r) for r in rows).encode())
        return rows, {"kind": "embedded", "source": source, "sha256": digest}, BadRows(on_bad_rows)
    if kind == "hub":
        rows, info = _read_hub(source, hub_split, hub_dir)
        return rows, info, BadRows(on_bad_rows)
    path = Path(source).expanduser()
    path = path if path.is_absolute() else Path(base_dir) / path
    if path.is_dir():
        raise DataError(f"'{path}' is a directory; expected a .json/.jsonl/.csv/.parquet file")
    if not path.is_file():
        raise DataError(f"dataset file '{path}' does not exist")
    bad = BadRows(on_bad_rows, where=str(path))
    rows = _read_file(path, bad)
    return rows, {"kind": "local", "source": str(source), "sha256": sha256_file(path)}, bad


# --------------------------------------------------------------------------------------------- cleaning
def row_id(dataset: str, row: dict) -> str:
    key = "\x1f".join(row[field] for field in FIELDS)
    return f"{dataset}-{hashlib.sha1(key.encode('utf-8')).hexdigest()[:12]}"


def clean_rows(raw_rows: list[dict], fields: dict, dataset: str, where: str,
               fields_key: str = "dataset.fields", *, required_fields: tuple[str, ...] = REQUIRED,
               bad: BadRows | None = None) -> tuple[list[dict], Counter]:
    """Map source columns to instruction/input/output and drop unusable rows, counting each reason.

    `fields_key` is the config key of the mapping, named in the error when a column is missing.
    `required_fields`: fields whose mapped column must exist (instruction, output, and input when the config
    maps it). `bad`: what reading already dropped (merged into the returned counts); in its 'error' mode a
    row that would be dropped fails instead (duplicates are always dropped).
    """
    bad = bad if bad is not None else BadRows()
    if not raw_rows and not bad.counts:
        raise DataError(f"{where}: no rows")
    if not raw_rows:
        raise DataError(f"{where}: no usable rows (0 usable rows of {sum(bad.counts.values())} read; dropped: "
                        f"{_reasons(bad.counts)})")
    columns = set().union(*(row.keys() for row in raw_rows[:1000]))
    for field in FIELDS:
        column = fields.get(field)
        if column is not None and column not in columns and field in required_fields:
            raise ConfigError(
                f"{fields_key}.{field}: column '{column}' is not in {where}; columns found: {sorted(columns)}"
                + (f" (set {fields_key}.input: null when the data has no input column)" if field == "input" else "")
            )
    dropped: Counter = Counter()
    seen: set[tuple[str, str, str]] = set()
    rows = []
    for index, raw in enumerate(raw_rows):
        row, reason, detail = {}, None, ""
        for field in FIELDS:
            column = fields.get(field)
            value = raw.get(column) if column is not None else ""
            if value is None:
                value = "" if field == "input" else None
            if value is None:
                reason = f"missing_{field}"
                break
            if not isinstance(value, str):
                reason = f"non_string_{field}"
                break
            if field in REQUIRED and not value.strip():
                reason = f"empty_{field}"
                break
            if _SURROGATE.search(value):
                # valid JSON ("\ud800") but no text: it cannot be written as UTF-8 (or hashed into a row id)
                reason, detail = "lone_surrogate", f"{field} holds a lone surrogate {_SURROGATE.search(value).group()!a}"
                break
            row[field] = value
        if reason:
            bad.add(reason, bad.row(index), detail)
            continue
        key = (row["instruction"], row["input"], row["output"])
        if key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        rows.append({"id": row_id(dataset, row), **row})
    dropped.update(bad.counts)
    if not rows:
        read = len(raw_rows) + sum(count for reason, count in bad.counts.items() if reason in READ_REASONS)
        raise DataError(f"{where}: no usable rows (0 usable rows of {read} read; dropped: {_reasons(dropped)})")
    return rows, dropped


# Reasons counted while reading a file (the record never became a row), not while cleaning rows.
READ_REASONS = ("malformed_json_line", "malformed_csv_row", "not_an_object")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _reasons(counts) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in sorted(counts.items()))


# --------------------------------------------------------------------------------------------- splitting
def _order_key(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}\x1f{text}".encode("utf-8")).hexdigest()


def resolve_test_count(test_size: float, n_prompts: int) -> int:
    """Number of distinct prompts for test: a fraction of prompts (rounded, at least 1) or a count."""
    if test_size < 1:
        count = max(1, round(test_size * n_prompts))
    else:
        count = int(test_size)
    if count >= n_prompts:
        raise DataError(
            f"dataset.test_size: {test_size} asks for {count} test prompts but only {n_prompts} "
            f"{'row' if n_prompts == 1 else 'rows'} with distinct prompts {'is' if n_prompts == 1 else 'are'} usable; "
            "nothing would be left for training (use a fraction below 1 or a smaller count)"
        )
    return count


def split_rows(rows: list[dict], *, seed: int, test_size: float, max_train: int | None = None) -> tuple[list[dict], list[dict], dict]:
    """Split cleaned rows by prompt group (instruction+input) in a seeded, content-hashed order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["instruction"], row["input"]), []).append(row)
    ordered = sorted(groups, key=lambda key: _order_key(seed, "\x1f".join(key)))
    n_test = resolve_test_count(test_size, len(ordered))
    test, train, extra = [], [], 0
    for index, key in enumerate(ordered):
        group = sorted(groups[key], key=lambda r: r["id"])
        if index < n_test:
            # One reference per test prompt; its other outputs can go to neither side without leaking.
            test.append(group[0])
            extra += len(group) - 1
        else:
            train.extend(group)
    if max_train is not None:
        train = train[:max_train]
    overlap = {(r["instruction"], r["input"]) for r in train} & {(r["instruction"], r["input"]) for r in test}
    if overlap:  # by construction impossible; kept as a guard because a leak silently inflates every metric
        raise DataError(f"leakage check failed: {len(overlap)} test prompts also in train")
    stats = {"prompt_groups": len(ordered), "test_prompt_extra_outputs_dropped": extra}
    return train, test, stats


def split_dataset(*, source: str, name: str, fields: dict, seed: int, test_size: float,
                  required_fields: tuple[str, ...] = REQUIRED, on_bad_rows: str = "count", max_train: int | None, hub_split: str, train_path: str | Path, test_path: str | Path,
                  manifest_path: str | Path, base_dir: str | Path = ".", hub_dir: str | Path | None = None) -> dict:
    """Read, clean and split a dataset; write train.jsonl, test.jsonl and manifest.json. Returns the manifest."""
    raw_rows, source_info, bad = read_source(source, hub_split=hub_split, base_dir=base_dir, on_bad_rows=on_bad_rows,
                                             hub_dir=hub_dir)
    n_malformed = sum(bad.counts.values())
    log.info("read %d rows from %s (%d malformed records dropped)", len(raw_rows), source, n_malformed)
    bad.where = f"dataset '{source}'"
    rows, dropped = clean_rows(raw_rows, fields, name, where=f"dataset '{source}'",
                               required_fields=tuple(required_fields), bad=bad)
    columns = set().union(*(row.keys() for row in raw_rows[:1000]))
    absent = sorted(field for field in FIELDS if fields.get(field) is not None and fields[field] not in columns)
    for field in absent:
        log.warning("dataset.fields.%s: column '%s' is not in the data (default mapping): every %s is \"\"",
                    field, fields[field], field)
    train, test, stats = split_rows(rows, seed=seed, test_size=test_size, max_train=max_train)
    write_jsonl_atomic(train_path, train)
    write_jsonl_atomic(test_path, test)
    manifest: dict[str, Any] = {
        "dataset": name,
        "source": source_info,
        "fields": fields,
        "seed": seed,
        "test_size": test_size,
        "max_train": max_train,
        "on_bad_rows": on_bad_rows,
        "absent_columns": {field: fields[field] for field in absent},
        "counts": {
            "read": len(raw_rows) + n_malformed,
            "usable": len(rows),
            "dropped": dict(sorted(dropped.items())),
            "dropped_examples": {reason: bad.examples[reason] for reason in sorted(bad.examples)},
            "train": len(train),
            "test": len(test),
            **stats,
        },
        "leakage_check": "passed: no test instruction+input appears in train",
        "sha256": {"train.jsonl": sha256_file(train_path), "test.jsonl": sha256_file(test_path)},
        "versions": library_versions(),
    }
    write_json_atomic(manifest_path, manifest)
    log.info("split: %d train, %d test, dropped %s", len(train), len(test), dict(dropped))
    return manifest


# --------------------------------------------------------------------------------------------- evaluation sets
LEAKED_ROWS_LISTED = 100  # the manifest lists at most this many dropped leaked rows (all are counted)


def evaluation_set_fields_key(name: str) -> str:
    return f"evaluation_sets[name={name}].fields"


def training_prompts(train_rows: list[dict]) -> set[tuple[str, str]]:
    """The (instruction, input) pairs of the training split: what an evaluation row must not repeat."""
    return {(row["instruction"], row["input"]) for row in train_rows}


def evaluation_set_rows(raw_rows: list[dict], *, name: str, fields: dict, train_prompts: set[tuple[str, str]],
                        seed: int, max_rows: int | None, where: str,
                        fields_key: str, bad: BadRows | None = None) -> tuple[list[dict], dict, list[dict]]:
    """Clean an evaluation set and check it against the training split.

    Returns (rows, counts, leaked): the test rows (one reference per prompt, in a seeded content-hashed order
    that does not depend on the input order; the first `max_rows` when capped), the counts for the manifest
    (read, usable, dropped by reason, beyond_max_rows, test) and the rows dropped because their exact
    instruction+input is in the training split. Zero rows left is an error naming the set.
    """
    malformed = sum(bad.counts.values()) if bad is not None else 0
    rows, dropped = clean_rows(raw_rows, fields, name, where=where, fields_key=fields_key, bad=bad)
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["instruction"], row["input"]), []).append(row)
    kept, leaked = [], []
    for key, group in groups.items():
        group = sorted(group, key=lambda r: r["id"])
        if len(group) > 1:  # one reference per prompt, as in the split's test side
            dropped["duplicate_prompt"] += len(group) - 1
        if key in train_prompts:
            dropped["in_training_split"] += 1
            leaked.append(group[0])
        else:
            kept.append(group[0])
    if not kept:
        raise DataError(
            f"{where}: no usable rows left after the leakage check ({len(raw_rows)} read; dropped by reason: "
            f"{dict(sorted(dropped.items()))}); every remaining instruction+input is in the training split"
        )
    kept.sort(key=lambda r: _order_key(seed, "\x1f".join((r["instruction"], r["input"]))))
    beyond = 0
    if max_rows is not None and len(kept) > max_rows:
        beyond = len(kept) - max_rows
        kept = kept[:max_rows]
    counts = {
        "read": len(raw_rows) + malformed,
        "usable": len(rows),
        "dropped": dict(sorted(dropped.items())),
        "beyond_max_rows": beyond,
        "test": len(kept),
    }
    leaked.sort(key=lambda r: r["id"])
    return kept, counts, leaked


def prepare_evaluation_set(*, name: str, source: str, fields: dict, seed: int, max_rows: int | None,
                           hub_split: str, train_path: str | Path, test_path: str | Path,
                           manifest_path: str | Path, base_dir: str | Path = ".") -> dict:
    """Read one `evaluation_sets` entry, drop rows leaked from the training split (`train_path`), write its
    test.jsonl and manifest.json. Returns the manifest."""
    from tunelens.io import read_jsonl

    where = f"evaluation set '{name}' ({source})"
    raw_rows, source_info, bad = read_source(source, hub_split=hub_split, base_dir=base_dir)
    train = read_jsonl(train_path, required=("instruction", "input"))
    rows, counts, leaked = evaluation_set_rows(
        raw_rows, name=name, fields=fields, train_prompts=training_prompts(train), seed=seed, max_rows=max_rows,
        where=where, fields_key=evaluation_set_fields_key(name), bad=bad,
    )
    write_jsonl_atomic(test_path, rows)
    manifest: dict[str, Any] = {
        "evaluation_set": name,
        "source": source_info,
        "fields": fields,
        "seed": seed,
        "max_rows": max_rows,
        "training_split": {"path": str(train_path), "sha256": sha256_file(train_path), "rows": len(train)},
        "counts": counts,
        "leakage_check": (
            f"{counts['dropped'].get('in_training_split', 0)} row(s) whose exact instruction+input is in the "
            "training split dropped (reason in_training_split); none of the kept rows is"
        ),
        "dropped_rows": {
            "in_training_split": [
                {"id": row["id"], "instruction": row["instruction"], "input": row["input"]}
                for row in leaked[:LEAKED_ROWS_LISTED]
            ],
        },
        "sha256": {"test.jsonl": sha256_file(test_path)},
        "versions": library_versions(),
    }
    write_json_atomic(manifest_path, manifest)
    log.info("evaluation set %s: %d rows, dropped %s", name, len(rows), counts["dropped"])
    return manifest


def check_evaluation_sets(study, base_dir: str | Path = ".", *, train_prompts: set | None = None,
                          problems: list[str] | None = None) -> dict[str, dict]:
    """Check every evaluation set whose rows can be read now (local files, embedded sets) before any job:
    the field mapping names existing columns, and rows are left after cleaning and after the leakage check
    against the training split (computed in memory exactly as rule `split` computes it, when the training data
    is local or embedded; `train_prompts` when the caller has it). Returns {name: counts} of the sets checked;
    a problem raises naming the set, or with `problems` (a list) is appended there and the next set checked.

    Hub sets (and the leakage check against hub training data) are checked by their `evalset` job, which
    every generation job of that set waits for.
    """
    readable = [spec for spec in study.evaluation_sets.values() if spec.source_kind != "hub"]
    if not readable:
        return {}
    dataset = study.settings.dataset
    if train_prompts is None:
        train_prompts = set()
        if study.dataset_kind != "hub":
            raw, _, _ = read_source(dataset.source, hub_split=dataset.hub_split, base_dir=base_dir)
            rows, _ = clean_rows(raw, dataset.fields.as_dict(), dataset.name, where=f"dataset '{dataset.source}'",
                                 required_fields=study.mapped_fields)
            train, _, _ = split_rows(rows, seed=study.settings.seed, test_size=dataset.test_size,
                                     max_train=dataset.max_train)
            train_prompts = training_prompts(train)
    checked = {}
    for spec in readable:
        try:
            try:
                raw, _, bad = read_source(spec.source, hub_split=spec.hub_split, base_dir=base_dir)
            except DataError as exc:
                raise DataError(f"evaluation_sets[name={spec.name}].source: '{spec.source}': {exc}") from None
            _, counts, _ = evaluation_set_rows(
                raw, bad=bad, name=spec.name, fields=spec.fields, train_prompts=train_prompts,
                seed=study.settings.seed, max_rows=spec.max_rows,
                where=f"evaluation_sets[name={spec.name}]: evaluation set '{spec.name}' ({spec.source})",
                fields_key=evaluation_set_fields_key(spec.name),
            )
        except (DataError, ConfigError) as exc:
            if problems is None:
                raise
            problems.append(str(exc))
            continue
        checked[spec.name] = counts
    return checked
