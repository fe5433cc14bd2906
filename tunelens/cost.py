"""What each job cost: Snakemake's benchmark files, and a history that survives reruns.

Every rule has a `benchmark:` directive writing `benchmarks/<rule>/<wildcards>.tsv` (one row per repeat:
wall seconds `s`, peak memory `max_rss` in MB, `cpu_time` in seconds, ...). Snakemake overwrites that file
when the job reruns, so the workflow archives every benchmark file it has not seen before into
`benchmarks/history.tsv` at the start of each run and again when the run ends (`onstart`/`onsuccess`/
`onerror` in the Snakefile): a rerun's new cost is appended, the old one stays.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import io
import os
from pathlib import Path
from typing import Mapping, Sequence

from tunelens.errors import DataError

BENCHMARK_DIR = "benchmarks"
HISTORY_NAME = "history.tsv"
# Columns of the history file before the benchmark's own columns.
HISTORY_KEYS = ("file", "rule", "wildcards", "sha256", "finished_at", "archived_at")


def read_benchmark(path: str | Path) -> list[dict]:
    """The rows of one benchmark TSV as dicts (numbers as float; Snakemake's "NA"/"-" as None)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    rows = list(csv.DictReader(io.StringIO(text), delimiter="\t"))
    if not rows or "s" not in rows[0]:
        raise DataError(f"{path}: not a Snakemake benchmark file (expected a header with 's' and one row per repeat)")
    return [{key: _number(value) for key, value in row.items()} for row in rows]


def _number(value):
    if value is None or value in ("NA", "-", ""):
        return None
    try:
        return float(value)
    except ValueError:
        return value


def benchmark_files(bench_dir: str | Path = BENCHMARK_DIR) -> list[Path]:
    """Every job's benchmark file under bench_dir (`<rule>/<wildcards>.tsv`), the history excluded."""
    bench_dir = Path(bench_dir)
    if not bench_dir.is_dir():
        return []
    return sorted(path for path in bench_dir.rglob("*.tsv") if path.parent != bench_dir)


def rule_and_wildcards(path: str | Path, bench_dir: str | Path = BENCHMARK_DIR) -> tuple[str, str]:
    """('generate', 'smollm2/base/top_k_50...') from benchmarks/generate/smollm2/base/top_k_50....tsv."""
    relative = Path(path).relative_to(bench_dir)
    return relative.parts[0], str(Path(*relative.parts[1:]).with_suffix(""))


def _history_seen(history: Path) -> set[tuple[str, str]]:
    if not history.exists():
        return set()
    with history.open(encoding="utf-8", newline="") as handle:
        return {(row["file"], row["sha256"]) for row in csv.DictReader(handle, delimiter="\t")}


def archive_benchmarks(bench_dir: str | Path = BENCHMARK_DIR) -> int:
    """Append every benchmark file not yet in `<bench_dir>/history.tsv` to it; return the rows added.

    A file is identified by its path and content hash, so calling this any number of times records each
    job run once, and a rerun (same path, new content) adds a row beside the old one. Only the process
    that runs the workflow calls it (never a job), so appends do not race.
    """
    bench_dir = Path(bench_dir)
    history = bench_dir / HISTORY_NAME
    seen = _history_seen(history)
    new_rows = []
    for path in benchmark_files(bench_dir):
        data = path.read_bytes()
        key = (path.relative_to(bench_dir).as_posix(), hashlib.sha256(data).hexdigest())
        if key in seen:
            continue
        try:
            rows = read_benchmark(path)
        except (DataError, UnicodeDecodeError):
            continue  # a file being written right now; the next call records it
        rule, wildcards = rule_and_wildcards(path, bench_dir)
        finished = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc)
        now = datetime.datetime.now(datetime.timezone.utc)
        for row in rows:
            new_rows.append({
                "file": key[0], "rule": rule, "wildcards": wildcards, "sha256": key[1],
                "finished_at": finished.isoformat(timespec="seconds"),
                "archived_at": now.isoformat(timespec="seconds"),
                **{k: ("NA" if v is None else v) for k, v in row.items()},
            })
        seen.add(key)
    if not new_rows:
        return 0
    columns = list(HISTORY_KEYS)
    for row in new_rows:
        columns += [key for key in row if key not in columns]
    if history.exists():
        with history.open(encoding="utf-8", newline="") as handle:
            existing = next(csv.reader(handle, delimiter="\t"), [])
        extra = [key for key in columns if key not in existing]
        if extra:  # a benchmark format with more columns (--benchmark-extended): rewrite with the union
            old = read_history(bench_dir)
            columns = existing + extra
            _write_history(history, columns, old + new_rows, mode="w")
            return len(new_rows)
        columns = existing
        _write_history(history, columns, new_rows, mode="a")
    else:
        history.parent.mkdir(parents=True, exist_ok=True)
        _write_history(history, columns, new_rows, mode="w")
    return len(new_rows)


def _write_history(history: Path, columns: list[str], rows: list[dict], mode: str) -> None:
    with history.open(mode, encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, delimiter="\t", restval="NA", extrasaction="ignore",
                                lineterminator="\n")
        if mode == "w":
            writer.writeheader()
        writer.writerows({key: ("NA" if value is None else value) for key, value in row.items()} for row in rows)
        handle.flush()
        os.fsync(handle.fileno())


def read_history(bench_dir: str | Path = BENCHMARK_DIR) -> list[dict]:
    """Every archived job run, oldest first (benchmark numbers as float, NA as None)."""
    history = Path(bench_dir) / HISTORY_NAME
    if not history.exists():
        return []
    with history.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    keep_text = set(HISTORY_KEYS) | {"h:m:s"}
    return [{key: (value if key in keep_text else _number(value)) for key, value in row.items()} for row in rows]


# --------------------------------------------------------------------------------------------- study totals
COST_METRICS = {  # summary.csv metric -> (benchmark column, scale)
    "jobs": (None, "count"),
    "wall_s": ("s", "seconds"),
    "cpu_time_s": ("cpu_time", "seconds"),
    "max_rss_mb": ("max_rss", "MB (peak of one job)"),
    "gpu_hours": (None, "GPU-hours"),
}


def job_costs(bench_dir: str | Path = BENCHMARK_DIR, *, models: Sequence[str] = (),
              job_gpus: Mapping[str, Mapping[str, int]] | None = None, exclude: Sequence[str] = ("report",)) -> list[dict]:
    """One record per job benchmark file under bench_dir (the current results; not the history).

    model: the first component of the job's wildcards when it is one of `models`, else "" (jobs shared by the
    study: split, BERTScore model, human sheets). wall `s` and `cpu_time` are summed over repeats, `max_rss`
    is their maximum. gpus: GPUs the job held, from job_gpus[rule][model] (or [rule]["*"]), 0 when absent.
    """
    models = set(models)
    records = []
    for path in benchmark_files(bench_dir):
        rule, wildcards = rule_and_wildcards(path, bench_dir)
        if rule in exclude:
            continue
        rows = read_benchmark(path)
        parts = Path(wildcards).parts
        model = next((part for part in parts if part in models), "")
        gpus_of_rule = (job_gpus or {}).get(rule, {})
        gpus = int(gpus_of_rule.get(model, gpus_of_rule.get("*", 0)) or 0)
        wall = sum(row["s"] or 0.0 for row in rows)
        cpu = [row.get("cpu_time") for row in rows if isinstance(row.get("cpu_time"), float)]
        rss = [row.get("max_rss") for row in rows if isinstance(row.get("max_rss"), float)]
        records.append({
            "rule": rule, "wildcards": wildcards, "model": model, "file": path.as_posix(),
            "wall_s": wall, "cpu_time_s": sum(cpu) if cpu else None, "max_rss_mb": max(rss) if rss else None,
            "gpus": gpus, "gpu_hours": wall * gpus / 3600.0,
        })
    return records


def summarise_costs(records: Sequence[dict], by: str) -> dict[str, dict]:
    """Totals per `by` ("rule" or "model"), in first-seen order, plus "all": jobs, wall, CPU time and GPU-hours
    summed, peak memory the largest of one job. CPU time / peak memory are None when no job measured them."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(record[by], []).append(record)
    groups["all"] = list(records)

    def total(group, key):
        values = [r[key] for r in group if r[key] is not None]
        return sum(values) if values else None

    out = {}
    for name, group in groups.items():
        rss = [r["max_rss_mb"] for r in group if r["max_rss_mb"] is not None]
        out[name] = {"jobs": len(group), "wall_s": total(group, "wall_s"), "cpu_time_s": total(group, "cpu_time_s"),
                     "max_rss_mb": max(rss) if rss else None, "gpu_hours": total(group, "gpu_hours")}
    return out
