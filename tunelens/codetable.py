"""One module's table for tunelens.codehash: what its reachability walk needs of a parsed file, with module paths
taken out (_PathBlind), so that the hash is blind to where a module lives.

A table holds the code of what runs whenever the module is imported, the names that code uses, the tunelens
modules it imports and the names they bind, and per function or class its code, the names it uses and the
modules it imports inside (_module_table). The tunelens package is found at PACKAGE_DIR (tests point it at a
fixture package).
"""

from __future__ import annotations

import ast
import copy
import hashlib
import re
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
        if _ours(f"{base}.{alias.name}"):  # `from tunelens.scoring import metrics`: the module tunelens.scoring.metrics
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
# decorator (e.g. tunelens.scoring.metrics' @register) is reachable whenever its module runs.
PLAIN_DECORATORS = {"dataclass", "dataclasses.dataclass", "functools.lru_cache", "functools.cache", "lru_cache",
                    "functools.wraps", "functools.cached_property", "property", "staticmethod", "classmethod",
                    "contextlib.contextmanager", "contextmanager", "abstractmethod", "abc.abstractmethod"}


def _plain(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    name = ast.unparse(target)
    return name in PLAIN_DECORATORS or name.endswith((".setter", ".getter", ".deleter"))


def _dump(node: ast.AST) -> str:
    return hashlib.sha256(ast.dump(node, annotate_fields=False, include_attributes=False).encode()).hexdigest()


def _unique(items: list[str]) -> list[str]:
    """`items` without repeats, in first-seen order (the walk's order, hence the labels, follows it)."""
    return list(dict.fromkeys(items))


MODULE_NAME = re.compile(r"\btunelens(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
REF = "\0tunelens-ref\0"  # stands for a tunelens import's module, or a string naming a tunelens module


class _PathBlind(ast.NodeTransformer):
    """Takes module paths out of a copy of the code before it is dumped: an import of tunelens modules keeps the
    names it binds, and its effects (modules run, what each name denotes) go to `imports`, to be hashed by
    label; a string or bytes constant that names a tunelens module goes to `strings` (resolved when hashing)."""

    def __init__(self, package: str | None):
        self.package = package
        self.imports: list[list] = []
        self.strings: list[str] = []

    def _ours(self, node: ast.Import | ast.ImportFrom) -> ast.AST:
        modules, bindings, stars = _import_effects(node, self.package)
        self.imports.append([modules, [[name, *target] for name, target in bindings.items()], stars])
        return node

    def visit_Import(self, node: ast.Import) -> ast.AST:
        if not any(alias.name.split(".")[0] == PACKAGE for alias in node.names):
            return node
        self._ours(node)
        return ast.Import(names=[
            ast.alias(name=REF, asname=alias.asname or alias.name.split(".")[0])
            if alias.name.split(".")[0] == PACKAGE else alias for alias in node.names])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> ast.AST:
        if _absolute(node, self.package).split(".")[0] != PACKAGE:
            return node
        self._ours(node)
        return ast.ImportFrom(module=REF, names=[ast.alias(name=alias.asname or alias.name) for alias in node.names],
                              level=0)

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        value = node.value
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        if isinstance(text, str) and MODULE_NAME.search(text):
            self.strings.append(text)
            return ast.Constant(value=REF if isinstance(value, str) else REF.encode())
        return node


def _blind_dump(nodes: list[ast.AST], package: str | None) -> dict:
    """{"digest", "imports", "strings"} of `nodes` with module paths taken out (see _PathBlind)."""
    blind = _PathBlind(package)
    body = [blind.visit(copy.deepcopy(node)) for node in nodes]
    return {"digest": _dump(ast.Module(body=body, type_ignores=[])), "imports": blind.imports,
            "strings": blind.strings}


def _module_table(tree: ast.Module, package: str | None) -> dict:
    """What the reachability walk needs of one module (JSON, kept in the disk cache).

    always: the code (_blind_dump) of what runs whenever the module is imported (every top-level statement
      except the bodies of functions and classes; their decorators and default values do run), with
      always_refs, the names it uses, and imports, the tunelens modules it imports at top level (source order);
    bindings / stars: top-level import bindings; defs: per function or class, its code, the names it uses,
      the modules it imports inside and its local import bindings; eager: definitions reachable whenever
      the module runs (a decorator that may register them); empty: no code at all (a docstring at most).
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
            defs[node.name] = {"code": _blind_dump([node], package), "refs": _chains([node]),
                               "imports": _unique(inner_modules), "bindings": inner_bindings}
            if not all(_plain(d) for d in node.decorator_list):
                eager.append(node.name)
        else:
            always_nodes.append(node)
    empty = not defs and all(isinstance(node, ast.Pass) for node in always_nodes)
    return {"always": _blind_dump(always_nodes, package), "always_refs": _chains(always_nodes),
            "imports": _unique(imports), "bindings": bindings, "stars": _unique(stars), "defs": defs,
            "eager": eager, "empty": empty}
