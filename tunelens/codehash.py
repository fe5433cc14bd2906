"""Which code a rule's jobs run, as one hash: a rule param, so a job reruns exactly when its code changes.

Snakemake tracks a `script:` rule by the script's mtime only: touching a script reruns its jobs, while a
fix in the `tunelens` modules that hold the logic goes unnoticed. `code_hash(script)` instead hashes the
*normalised AST* of the code the script can execute, found by reachability (issue 23: a module-grain hash
reran every generation for a lens-plot fix, and every job, fine-tunes included, for any io.py edit):
  - every `tunelens` module it imports, transitively, contributes its top-level code (what runs on import:
    imports, constants, registrations, the decorators and default values of its functions). So a new function
    with a default argument in a module many jobs import (tunelens.models, tunelens.io) reruns all of them, fine-
    tunes included, although none calls it; without defaults only its callers' jobs rerun;
  - each function or class contributes its body only when it is reachable by name: from the script, from
    reached top-level code, or from another reached body (`f`, `module.f`, `from tunelens.x import f`, and
    re-exports are followed; a function-level import runs only when its function is reached);
  - conservative where names are dynamic: a module object used as a value (`getattr(errors, name)`) makes all
    of that module reachable; a class makes all its methods reachable; a definition with a decorator that
    may register it (anything but dataclass, lru_cache, property, contextmanager...) is reachable whenever
    its module runs. A module imported by a *string* (`importlib.import_module("tunelens.scoring.metrics")`) is
    deliberately not followed: that is how a module keeps code it only passes along (names, not calls) out of
    a job's hash (tunelens.schema, tunelens.generation.genserver).
Comments, blank lines, formatting and docstrings are not part of the AST dump, so editing them changes
nothing; nor are help texts, the documentation of a config key or decoding parameter (the `help` of
tunelens.settings' `setting`/`section` and tunelens.generation.decoding's `knob`: the schema's descriptions, which were
YAML before they moved next to the code); any change to reachable code does, and a new function no job calls
changes no job.

Blind to where a module lives (issue 25: moving a module into a stage package must not by itself rerun
anything): no module path enters the hash. A module is named by a label, its position in the order the walk
first reaches the modules (which follows the import statements in source order and the names used, never
paths); an import of a tunelens module contributes the names it binds (in the dump) and the labels of what
they denote and of the modules it runs (beside it); a string naming a tunelens module
(`"tunelens.scoring.metrics"`, `-m ...` in a command, a logger name) contributes that module's label, or its
last name when the job does not import it (so two such modules with the same last name, say data.data and
training.data, are not told apart by a string: code a job does not run is not part of its hash anyway); a
package whose __init__.py holds no code (a docstring at most) and no data files contributes nothing. So a
pure move (`git mv` plus the matching import lines and strings) leaves every hash as it was, while pointing
an import or a string at another module, or editing any reached code, changes it. `code_closure` and the
lists below still name modules by their paths (for docs and tests). What the walk reads of each file, with
the paths taken out, is its table (tunelens.codetable).

The workflow drops Snakemake's own `code` trigger (profiles/*/config.yaml) and puts this hash in the
params of every rule (rules/*.smk), so the params trigger does the work.

Fast on purpose (the DAG is built on every invocation and in every job): each module is parsed once per
process and its table kept on disk by content hash; the whole package takes a few tens of milliseconds.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import re
import sys
from pathlib import Path

from tunelens.codetable import MODULE_NAME, PACKAGE_DIR, _module_file, _module_table, _ours, _package_of


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


CACHE_FORMAT = "reach-5"  # the cached tables' layout; bump it when _module_table changes


@functools.lru_cache(maxsize=None)
def _parsed(path: Path, package: str | None) -> dict:
    """_module_table of one file (a script: package None)."""
    global _disk_cache_dirty
    source = path.read_bytes()
    key = (f"{hashlib.sha256(source).hexdigest()}:{package}:{sys.version_info[0]}.{sys.version_info[1]}:"
           f"{CACHE_FORMAT}")
    _used_keys.add(key)
    cached = _cache().get(key)
    if cached is not None:
        return cached
    table = _module_table(ast.parse(source, filename=str(path)), package)
    _cache()[key] = table
    _disk_cache_dirty = True
    return table


@functools.lru_cache(maxsize=None)
def _package_data(directory: Path) -> tuple[tuple[str, str], ...]:
    """(file name, sha256) of a package directory's non-Python files (templates such as summary.html.j2)."""
    return tuple(
        (path.name, hashlib.sha256(path.read_bytes()).hexdigest())
        for path in sorted(directory.iterdir())
        if path.is_file() and path.suffix not in (".py", ".pyc")
    )


class _Reach:
    """The code a script can execute: every module it imports (their top-level code runs) and, within
    them, the functions and classes reachable by name from the script and from that code."""

    def __init__(self):
        self.closure: dict[str, str] = {}
        self.code: dict[str, dict] = {}  # closure name -> its _blind_dump (module and definition entries)
        self.modules: dict[str, dict] = {}  # in the order first reached: the labels (_canonical) follow it
        self.pending: list[tuple[str, str]] = []  # (module, name) to include

    def add(self, name: str, code: dict) -> None:
        self.closure[name] = code["digest"]
        self.code[name] = code

    def module(self, module: str) -> dict | None:
        """Load `module` (its top-level code runs): its always-part, its imports and eager definitions."""
        if module in self.modules:
            return self.modules[module]
        path = _module_file(module)
        if path is None:
            return None
        table = _parsed(path, _package_of(path))
        self.modules[module] = table
        self.add(module, table["always"])
        if path.name == "__init__.py":
            for name, digest in _package_data(path.parent):
                self.closure[f"{module}:{name}"] = digest
        for imported in table["imports"]:
            self.module(imported)
        for star in table["stars"]:
            self.everything(star)
        for chain in table["always_refs"]:
            self.resolve(module, chain, {})
        for name in table["eager"]:
            self.pending.append((module, name))
        return table

    def everything(self, module: str) -> None:
        table = self.module(module)
        if table is not None:
            self.pending += [(module, name) for name in table["defs"]]

    def resolve(self, module: str, chain: list[str], local: dict) -> None:
        """Follow a name used in `module` (function-local import bindings `local`) to what it denotes."""
        table = self.modules[module]
        head, rest = chain[0], chain[1:]
        binding = local.get(head) or table["bindings"].get(head)
        if binding is None:
            if head in table["defs"]:
                self.pending.append((module, head))
            return
        target, attribute = binding
        if attribute is not None:
            self.pending.append((target, attribute))
            return
        for part in rest:  # a module: walk down its submodules to the attribute used
            if _ours(f"{target}.{part}"):
                target = f"{target}.{part}"
                self.module(target)
                continue
            self.pending.append((target, part))
            return
        self.everything(target)  # the module object itself used as a value: all of it

    def run(self) -> None:
        done: set[tuple[str, str]] = set()
        while self.pending:
            module, name = self.pending.pop()
            if (module, name) in done:
                continue
            done.add((module, name))
            table = self.module(module)
            if table is None:
                continue
            if name in table["defs"]:
                definition = table["defs"][name]
                self.add(f"{module}#{name}", definition["code"])
                for imported in definition["imports"]:
                    self.module(imported)
                for chain in definition["refs"]:
                    self.resolve(module, chain, definition["bindings"])
            elif name in table["bindings"]:  # a re-export: `from tunelens.x import f` in this module
                self.resolve(module, [name], {})
            elif _ours(f"{module}.{name}"):
                self.module(f"{module}.{name}")


def _reach(script: str | Path) -> _Reach:
    """The walk over what `script` can execute (code_closure)."""
    script = Path(script).resolve()
    table = _parsed(script, None)
    reach = _Reach()
    reach.add("<script>", table["always"])
    reach.modules["<script>"] = table
    for imported in table["imports"]:
        reach.module(imported)
    for star in table["stars"]:
        reach.everything(star)
    for chain in table["always_refs"]:
        reach.resolve("<script>", chain, {})
    for name, definition in table["defs"].items():  # a script's own functions: all of them
        reach.add(f"<script>#{name}", definition["code"])
        for imported in definition["imports"]:
            reach.module(imported)
        for chain in definition["refs"]:
            reach.resolve("<script>", chain, definition["bindings"])
    reach.run()
    return reach


def code_closure(script: str | Path) -> dict[str, str]:
    """{name: digest} of the code `script` can execute: the script, the top-level code of every tunelens
    module it imports, transitively ("tunelens.x"), each function and class reachable by name from there
    ("tunelens.x#f"), and the data files (templates) of each package it imports ("tunelens.report:file")."""
    return _reach(script).closure


def _canonical(reach: _Reach) -> list[tuple[str, str]]:
    """The closure with no module path in it (module docstring): (name, content) pairs, names sorted.

    Modules are labelled in the order the walk first reached them; a package with no code and no data files
    (the empty __init__.py of a stage package) gets no label and contributes nothing."""
    def empty(module: str) -> bool:
        path = _module_file(module)
        return reach.modules[module].get("empty", False) and not (
            path is not None and path.name == "__init__.py" and _package_data(path.parent))

    labels, empties = {"<script>": "<script>"}, 0
    for module in reach.modules:
        if module in labels:
            continue
        if empty(module):
            labels[module] = f"empty{empties}"  # only ever seen when such a package is bound as a value
            empties += 1
        else:
            labels[module] = f"m{len(labels) - 1 - empties}"

    def label(module: str) -> str:
        # a module the walk never loaded (only named by an import in unreached code): its path, to stay sound
        return labels.get(module) or f"path:{module}"

    def resolve_string(text: str) -> str:
        def named(match: re.Match) -> str:
            parts = match.group(0).split(".")
            for end in range(len(parts), 1, -1):  # the longest prefix that is a module (the root alone is not)
                module = ".".join(parts[:end])
                if _module_file(module) is not None:
                    name = labels.get(module) or f"unloaded:{parts[end - 1]}"
                    return ".".join([f"<{name}>", *parts[end:]])
            return match.group(0)
        return MODULE_NAME.sub(named, text)

    items = []
    for name, digest in reach.closure.items():
        module, sep, rest = name.partition("#") if "#" in name else name.partition(":")
        if not sep and module in labels and labels[module].startswith("empty"):
            continue  # an empty package's top-level code: nothing runs
        canonical_name = label(module) + sep + rest
        code = reach.code.get(name)
        if code is None:  # a package data file
            items.append((canonical_name, digest))
            continue
        imports = [[[label(m) for m in modules if not labels.get(m, "").startswith("empty")],
                    [[bound, label(target), attribute] for bound, target, attribute in bindings],
                    [label(star) for star in stars]]
                   for modules, bindings, stars in code["imports"]]
        strings = [resolve_string(text) for text in code["strings"]]
        items.append((canonical_name, json.dumps([digest, imports, strings])))
    return sorted(items)


@functools.lru_cache(maxsize=None)
def code_hash(script: str | Path) -> str:
    """sha256 (first 16 hex digits) over the normalised code a script runs; see the module docstring."""
    digest = hashlib.sha256()
    for name, content in _canonical(_reach(script)):
        digest.update(name.encode() + b"\0" + content.encode() + b"\0")
    _save_cache()
    return digest.hexdigest()[:16]


def code_modules(script: str | Path) -> list[str]:
    """The tunelens modules a script runs (for docs and tests)."""
    return sorted(name for name in code_closure(script) if name != "<script>" and not set(name) & {"#", ":"})


def code_functions(script: str | Path) -> list[str]:
    """The tunelens functions and classes a script can run, as 'module#name' (for docs and tests)."""
    return sorted(name for name in code_closure(script) if "#" in name and not name.startswith("<script>"))
