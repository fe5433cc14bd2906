"""Which code a rule's jobs run, as one hash: a rule param, so a job reruns exactly when its code changes.

Snakemake tracks a `script:` rule by the script's mtime only: touching a script reruns its jobs, while a
fix in the `tunelens` modules that hold the logic goes unnoticed. `code_hash(script)` instead hashes the
*normalised AST* of the script and of every `tunelens` module it imports, transitively (module-level and
function-level imports alike: a lazy import still runs in the job). Comments, blank lines, formatting and
docstrings are not part of the AST dump, so editing them changes nothing; any change to executed code does.

The workflow drops Snakemake's own `code` trigger (profiles/*/config.yaml) and puts this hash in the
params of every rule (rules/*.smk), so the params trigger does the work.

Fast on purpose (the DAG is built on every invocation and in every job): each module is parsed once per
process; the whole package takes a few tens of milliseconds.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import sys
from pathlib import Path

PACKAGE = "tunelens"
PACKAGE_DIR = Path(__file__).resolve().parent


def _module_file(module: str) -> Path | None:
    """The source file of a `tunelens[.x[.y]]` module or package, or None when it is not ours."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = PACKAGE_DIR.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _strip_docstrings(tree: ast.AST) -> None:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]


def _package_of(path: Path) -> str:
    """Dotted package a tunelens file belongs to (for relative imports)."""
    relative = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1])
    return ".".join(parts[:-1])


def _imported_modules(tree: ast.AST, package: str | None) -> set[str]:
    """Every tunelens module named by an import anywhere in `tree` (including `from tunelens import x`)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level and package:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            for alias in node.names:  # `from tunelens import metrics` imports the module tunelens.metrics
                found.add(f"{base}.{alias.name}")
    modules = set()
    for name in found:
        parts = name.split(".")
        if parts[0] != PACKAGE:
            continue
        # importing tunelens.a.b runs tunelens/__init__.py and tunelens/a/__init__.py too
        for end in range(1, len(parts) + 1):
            if _module_file(".".join(parts[:end])) is not None:
                modules.add(".".join(parts[:end]))
    return modules


# Parsing is most of the cost (~0.1-0.5 s for the package on a busy 2-core machine, on every snakemake call
# and in every job), so results are kept on disk by the sha256 of the file's bytes: an unchanged file is
# read and hashed, not parsed. The cache is only a shortcut; a missing or unwritable one changes nothing.
CACHE_FILE = PACKAGE_DIR / "__pycache__" / "codehash-cache.json"
CACHE_MAX_ENTRIES = 2000  # past this, only the entries this process used are kept (old file versions go)
_disk_cache: dict | None = None
_disk_cache_dirty = False
_used_keys: set[str] = set()


def _cache() -> dict:
    global _disk_cache
    if _disk_cache is None:
        try:
            _disk_cache = json.loads(CACHE_FILE.read_text())
        except (OSError, ValueError):
            _disk_cache = {}
    return _disk_cache


def _save_cache() -> None:
    global _disk_cache_dirty
    if not _disk_cache_dirty:
        return
    global _disk_cache
    if len(_disk_cache) > CACHE_MAX_ENTRIES:
        _disk_cache = {key: value for key, value in _disk_cache.items() if key in _used_keys}
    try:
        CACHE_FILE.parent.mkdir(exist_ok=True)
        tmp = CACHE_FILE.with_name(f"{CACHE_FILE.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(_disk_cache))
        os.replace(tmp, CACHE_FILE)
        _disk_cache_dirty = False
    except OSError:
        pass


@functools.lru_cache(maxsize=None)
def _parsed(path: Path, package: str | None) -> tuple[str, frozenset[str]]:
    """(digest of the normalised AST, tunelens modules it imports) of one file."""
    global _disk_cache_dirty
    source = path.read_bytes()
    key = f"{hashlib.sha256(source).hexdigest()}:{package}:{sys.version_info[0]}.{sys.version_info[1]}"
    _used_keys.add(key)
    cached = _cache().get(key)
    if cached is not None:
        return cached[0], frozenset(cached[1])
    tree = ast.parse(source, filename=str(path))
    imports = frozenset(_imported_modules(tree, package))
    _strip_docstrings(tree)
    digest = hashlib.sha256(ast.dump(tree, annotate_fields=False, include_attributes=False).encode()).hexdigest()
    _cache()[key] = [digest, sorted(imports)]
    _disk_cache_dirty = True
    return digest, imports


@functools.lru_cache(maxsize=None)
def _package_data(directory: Path) -> tuple[tuple[str, str], ...]:
    """(file name, sha256) of a package directory's non-Python files (templates such as summary.html.j2)."""
    return tuple(
        (path.name, hashlib.sha256(path.read_bytes()).hexdigest())
        for path in sorted(directory.iterdir())
        if path.is_file() and path.suffix not in (".py", ".pyc")
    )


def code_closure(script: str | Path) -> dict[str, str]:
    """{name: digest of the normalised AST} of `script` and every tunelens module it runs (transitively),
    plus the data files (templates) that sit in the directory of each package it imports."""
    script = Path(script).resolve()
    dump, pending = _parsed(script, None)
    closure = {"<script>": dump}
    pending = set(pending)
    while pending:
        module = pending.pop()
        if module in closure:
            continue
        path = _module_file(module)
        dump, imports = _parsed(path, _package_of(path))
        closure[module] = dump
        if path.name == "__init__.py":
            for name, digest in _package_data(path.parent):
                closure[f"{module}:{name}"] = digest
        pending |= imports - closure.keys()
    return closure


@functools.lru_cache(maxsize=None)
def code_hash(script: str | Path) -> str:
    """sha256 (first 16 hex digits) over the normalised code a script runs; see the module docstring."""
    digest = hashlib.sha256()
    for name, dump in sorted(code_closure(script).items()):
        digest.update(name.encode() + b"\0" + dump.encode() + b"\0")
    _save_cache()
    return digest.hexdigest()[:16]


def code_modules(script: str | Path) -> list[str]:
    """The tunelens modules a script runs (for docs and tests)."""
    return sorted(name for name in code_closure(script) if name != "<script>")
