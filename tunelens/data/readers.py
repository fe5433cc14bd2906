"""The readers behind tunelens.data.data.read_source: local data files by format (.jsonl, .json, .csv, .parquet;
UTF-8 with or without a byte-order mark), downloaded hub datasets, and BadRows, the records dropped while reading
or cleaning, counted by reason."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path

from tunelens.errors import DataError


class BadRows:
    """Records dropped while reading or cleaning, counted by reason with their first line numbers.

    on_bad_rows 'count' (default) drops and counts; 'error' fails on the first one, naming it.
    """

    def __init__(self, on_bad_rows: str = "count", where: str = "dataset"):
        self.mode, self.where = on_bad_rows, where
        self.counts: Counter = Counter()
        self.examples: dict[str, list[str]] = {}
        # Where each row that was read sits in the file ("line 12"), by row index; empty when the format has
        # no lines (parquet, hub datasets).
        self.positions: list[str] = []

    def row(self, index: int) -> str:
        """'line 12, row 11' (the file's line, when known, and the 1-based row number among rows read)."""
        line = self.positions[index] if index < len(self.positions) else None
        return f"{line}, row {index + 1}" if line and line != f"row {index + 1}" else f"row {index + 1}"

    def add(self, reason: str, at: str, detail: str = "") -> None:
        if self.mode == "error":
            raise DataError(f"{self.where}, {at}: {reason.replace('_', ' ')}{': ' + detail if detail else ''} "
                            "(dataset.on_bad_rows is 'error'; 'count' drops such rows and counts them)")
        self.counts[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < 5:
            examples.append(at)


UTF8_BOM = b"\xef\xbb\xbf"


def read_text(path: Path) -> str:
    """A data file as text: UTF-8, with or without a byte-order mark (Excel writes one); anything else fails
    naming the file, line and byte offset of the first byte that is not UTF-8."""
    data = Path(path).read_bytes()
    if data.startswith(UTF8_BOM):
        data = data[len(UTF8_BOM):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(
            f"{path}: not UTF-8 at line {line}, column {column} (byte offset {exc.start}: 0x{data[exc.start]:02x}); "
            "re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8, or 'CSV UTF-8' in Excel)"
        ) from None


def _read_file(path: Path, bad: "BadRows | None" = None) -> list[dict]:
    bad = bad if bad is not None else BadRows()
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        parsed = []
        for line_no, line in enumerate(read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                parsed.append((f"line {line_no}", json.loads(line)))
            except json.JSONDecodeError as exc:
                bad.add("malformed_json_line", f"line {line_no}", exc.msg)
        return _objects(parsed, bad)
    if suffix == ".json":
        try:
            data = json.loads(read_text(path))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); for "
                            "JSON lines use .jsonl (a malformed line there is dropped and counted)") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of objects (or {{'data': [...]}}), got {type(data).__name__}")
        return _objects(((f"item {index}", row) for index, row in enumerate(data)), bad)
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
        rows = []
        for row in reader:
            if None in row:  # more cells than header columns
                bad.add("malformed_csv_row", f"line {reader.line_num}", f"{len(reader.fieldnames or [])} columns "
                        f"in the header, more in this row")
                continue
            rows.append(row)
            bad.positions.append(f"line {reader.line_num}")
        return rows
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise DataError(f"{path}: unsupported file type '{suffix}'; expected .json, .jsonl, .csv or .parquet")


def _objects(items, bad: BadRows) -> list[dict]:
    """The JSON objects among (where, value) pairs; anything else is dropped as not_an_object."""
    rows = []
    for where, value in items:
        if isinstance(value, dict):
            rows.append(value)
            bad.positions.append(where)
        else:
            bad.add("not_an_object", where, f"a JSON {type(value).__name__}")
    return rows


def inspect_file(path: Path) -> tuple[set[str], int]:
    """(columns, readable rows) of a local data file: what the parse-time checks need."""
    if not path.is_file():
        raise DataError(f"file '{path}' does not exist")
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        metadata = pq.read_metadata(path)
        return set(metadata.schema.to_arrow_schema().names), metadata.num_rows
    rows = _read_file(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    return set().union(*(row.keys() for row in rows[:1000])), len(rows)


def _read_hub(dataset_id: str, split: str, hub_dir: str | Path | None = None) -> tuple[list[dict], dict]:
    import datasets

    from tunelens.hub import source_record

    try:
        dataset = datasets.load_dataset(str(hub_dir) if hub_dir else dataset_id, split=split)
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError...)
        raise DataError(
            f"cannot load hub dataset '{dataset_id}' (split '{split}'): {type(exc).__name__}: {exc}. "
            "Offline? Pre-download it into HF_HOME or point dataset.source at a local file."
        ) from None
    info = {"kind": "hub", "source": dataset_id, "split": split, "fingerprint": dataset._fingerprint}
    record = source_record(hub_dir) if hub_dir else None
    if record:
        info.update(revision=record["revision"], downloaded_to=str(hub_dir))
    return dataset.to_list(), info
