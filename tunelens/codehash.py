"""Which code a rule's jobs run, as one hash: a rule param, so a job reruns exactly when its code changes.

Snakemake tracks a `script:` rule by the script's mtime only: touching a script reruns its jobs, while a
fix in the `tunelens` modules that hold the logic goes unnoticed. `code_hash(script)` instead hashes the
*normalised AST* of the code the script can execute, found by reachability (issue 23: a module-grain hash
reran every generation for a lens-plot fix, and every job, fine-tunes included, for any io.py edit):
  - every `tunelens` module it imports, transitively, contributes its top-level code (what runs on import:
    imports, constants, registrations, the decorators and default values of its functions);
  - each function or class contributes its body only when it is reachable by name: from the script, from
    reached top-level code, or from another reached body (`f`, `module.f`, `from tunelens.x import f`, and
    re-exports are followed; a function-level import runs only when its function is reached);
  - conservative where names are dynamic: a module object used as a value (`getattr(errors, name)`) makes all
    of that module reachable; a class makes all its methods reachable; a definition with a decorator that
    may register it (anything but dataclass, lru_cache, property, contextmanager...) is reachable whenever
    its module runs. A module imported by a *string* (`importlib.import_module("tunelens.metrics")`) is
    deliberately not followed: that is how a module keeps code it only passes along (names, not calls) out of
    a job's hash (tunelens.schema, tunelens.genserver).
Comments, blank lines, formatting and docstrings are not part of the AST dump, so editing them changes
nothing; nor are help texts, the documentation of a config key or decoding parameter (the `help` of
tunelens.settings' `setting`/`section` and tunelens.decoding's `knob`: the schema's descriptions, which were
YAML before they moved next to the code); any change to reachable code does, and a new function no job calls
changes no job.

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


# Declarations whose second argument (or `help=`) is a help text: documentation, like a docstring.
HELP_DECLARATIONS = {"setting", "computed_setting", "section", "entries", "knob"}


def _is_text(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def _strip_docstrings(tree: ast.AST) -> None:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) \
                in HELP_DECLARATIONS:
            if len(node.args) > 1 and _is_text(node.args[1]):
                node.args[1] = ast.Constant("")
            for keyword in node.keywords:
                if keyword.arg == "help" and _is_text(keyword.value):
                    keyword.value = ast.Constant("")


def _package_of(path: Path) -> str:
    """Dotted package a tunelens file belongs to (for relative imports)."""
    relative = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1])
    return ".".join(parts[:-1])


def _absolute(node: ast.ImportFrom, package: str | None) -> str:
    """The module an ImportFrom names, relative imports resolved against `package`."""
    if node.level and package:
        base_parts = package.split(".")
        base_parts = base_parts[: len(base_parts) - (node.level - 1)]
        return ".".join(base_parts + ([node.module] if node.module else []))
    return node.module or ""


def _ours(name: str) -> bool:
    return name.split(".")[0] == PACKAGE and _module_file(name) is not None


def _import_effects(node: ast.Import | ast.ImportFrom, package: str | None) -> tuple[list[str], dict, list[str]]:
    """(tunelens modules the statement runs, {bound name: [module, attribute or None]}, star-imported modules)."""
    modules, bindings, stars = [], {}, []
    if isinstance(node, ast.Import):
        for alias in node.names:
            parts = alias.name.split(".")
            if parts[0] != PACKAGE:
                continue
            # importing tunelens.a.b runs tunelens/__init__.py and tunelens/a/__init__.py too
            modules += [".".join(parts[:end]) for end in range(1, len(parts) + 1) if _ours(".".join(parts[:end]))]
            if alias.asname:
                bindings[alias.asname] = [alias.name, None]
            else:
                bindings[parts[0]] = [parts[0], None]
        return modules, bindings, stars
    base = _absolute(node, package)
    parts = base.split(".")
    if parts[0] != PACKAGE:
        return modules, bindings, stars
    modules += [".".join(parts[:end]) for end in range(1, len(parts) + 1) if _ours(".".join(parts[:end]))]
    for alias in node.names:
        if alias.name == "*":
            stars.append(base)
            continue
        name = alias.asname or alias.name
        if _ours(f"{base}.{alias.name}"):  # `from tunelens import metrics`: the module tunelens.metrics
            modules.append(f"{base}.{alias.name}")
            bindings[name] = [f"{base}.{alias.name}", None]
        else:
            bindings[name] = [base, alias.name]
    return modules, bindings, stars


def _chains(nodes) -> list[list[str]]:
    """Every name the code refers to, as dotted chains ('io.write_json' -> ['io', 'write_json']); a name that
    is the base of a chain is not listed on its own (io.write_json uses write_json, not all of io)."""
    chains, bases = [], set()
    for root in nodes:
        for node in ast.walk(root):
            if isinstance(node, ast.Attribute) and id(node) not in bases:
                chain, inner = [node.attr], node.value
                while isinstance(inner, ast.Attribute):
                    bases.add(id(inner))
                    chain.append(inner.attr)
                    inner = inner.value
                if isinstance(inner, ast.Name):
                    bases.add(id(inner))
                    chains.append([inner.id, *reversed(chain)])
            elif isinstance(node, ast.Name) and id(node) not in bases:
                chains.append([node.id])
    unique = {tuple(chain) for chain in chains}
    return [list(chain) for chain in sorted(unique)]


# Decorators that neither register nor call the function they wrap at import time: a definition with any other
# decorator (e.g. tunelens.metrics' @register) is reachable whenever its module runs.
PLAIN_DECORATORS = {"dataclass", "dataclasses.dataclass", "functools.lru_cache", "functools.cache", "lru_cache",
                    "functools.wraps", "functools.cached_property", "property", "staticmethod", "classmethod",
                    "contextlib.contextmanager", "contextmanager", "abstractmethod", "abc.abstractmethod"}


def _plain(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    name = ast.unparse(target)
    return name in PLAIN_DECORATORS or name.endswith((".setter", ".getter", ".deleter"))


def _dump(node: ast.AST) -> str:
    return hashlib.sha256(ast.dump(node, annotate_fields=False, include_attributes=False).encode()).hexdigest()


def _module_table(tree: ast.Module, package: str | None) -> dict:
    """What the reachability walk needs of one module (JSON, kept in the disk cache).

    always: digest of what runs whenever the module is imported (every top-level statement except the
      bodies of functions and classes; their decorators and default values do run), with always_refs, the
      names it uses, and imports, the tunelens modules it imports at top level;
    bindings / stars: top-level import bindings; defs: per function or class, its digest, the names it uses,
      the modules it imports inside and its local import bindings; eager: definitions reachable whenever
      the module runs (a decorator that may register them).
    """
    _strip_docstrings(tree)
    always_nodes, imports, bindings, stars, defs, eager = [], [], {}, [], {}, []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules, bound, star = _import_effects(node, package)
            imports += modules
            bindings.update(bound)
            stars += star
            always_nodes.append(node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            header = [*node.decorator_list]
            if isinstance(node, ast.ClassDef):
                header += [*node.bases, *node.keywords]
            else:
                header += [*node.args.defaults, *(d for d in node.args.kw_defaults if d is not None)]
            if header:  # decorators, base classes and default values run at import; a bare def's name does not
                always_nodes.append(ast.Expr(value=ast.Tuple(elts=[
                    ast.Constant(node.name), *[h.value if isinstance(h, ast.keyword) else h for h in header]],
                    ctx=ast.Load())))
            inner_modules, inner_bindings = [], {}
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    modules, bound, star = _import_effects(inner, package)
                    inner_modules += modules + star
                    inner_bindings.update(bound)
            defs[node.name] = {"digest": _dump(node), "refs": _chains([node]), "imports": sorted(set(inner_modules)),
                               "bindings": inner_bindings}
            if not all(_plain(d) for d in node.decorator_list):
                eager.append(node.name)
        else:
            always_nodes.append(node)
    always = ast.Module(body=always_nodes, type_ignores=[])
    return {"always": _dump(always), "always_refs": _chains(always_nodes), "imports": sorted(set(imports)),
            "bindings": bindings, "stars": sorted(set(stars)), "defs": defs, "eager": eager}


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


CACHE_FORMAT = "reach-3"  # the cached tables' layout; bump it when _module_table changes


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
        self.modules: dict[str, dict] = {}
        self.pending: list[tuple[str, str]] = []  # (module, name) to include

    def module(self, module: str) -> dict | None:
        """Load `module` (its top-level code runs): its always-part, its imports and eager definitions."""
        if module in self.modules:
            return self.modules[module]
        path = _module_file(module)
        if path is None:
            return None
        table = _parsed(path, _package_of(path))
        self.modules[module] = table
        self.closure[module] = table["always"]
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
                self.closure[f"{module}#{name}"] = definition["digest"]
                for imported in definition["imports"]:
                    self.module(imported)
                for chain in definition["refs"]:
                    self.resolve(module, chain, definition["bindings"])
            elif name in table["bindings"]:  # a re-export: `from tunelens.x import f` in this module
                self.resolve(module, [name], {})
            elif _ours(f"{module}.{name}"):
                self.module(f"{module}.{name}")


def code_closure(script: str | Path) -> dict[str, str]:
    """{name: digest} of the code `script` can execute: the script, the top-level code of every tunelens
    module it imports, transitively ("tunelens.x"), each function and class reachable by name from there
    ("tunelens.x#f"), and the data files (templates) of each package it imports ("tunelens.report:file")."""
    script = Path(script).resolve()
    table = _parsed(script, None)
    reach = _Reach()
    reach.closure["<script>"] = table["always"]
    reach.modules["<script>"] = table
    for imported in table["imports"]:
        reach.module(imported)
    for star in table["stars"]:
        reach.everything(star)
    for chain in table["always_refs"]:
        reach.resolve("<script>", chain, {})
    for name, definition in table["defs"].items():  # a script's own functions: all of them
        reach.closure[f"<script>#{name}"] = definition["digest"]
        for imported in definition["imports"]:
            reach.module(imported)
        for chain in definition["refs"]:
            reach.resolve("<script>", chain, definition["bindings"])
    reach.run()
    return reach.closure


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
    return sorted(name for name in code_closure(script) if name != "<script>" and not set(name) & {"#", ":"})


def code_functions(script: str | Path) -> list[str]:
    """The tunelens functions and classes a script can run, as 'module#name' (for docs and tests)."""
    return sorted(name for name in code_closure(script) if "#" in name and not name.startswith("<script>"))
