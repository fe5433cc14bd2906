"""What `make install` and `make vllm-venv` leave behind, checked on the venvs the suite itself runs from.

uv, unlike pip, writes no .pyc files unless asked (--compile-bytecode, in the Makefile's UV_FLAGS). Where
PYTHONDONTWRITEBYTECODE is set, as on the dev and CI machines, nothing writes them later either, and every
Python process (each Snakemake job starts two) then compiles torch, transformers and vLLM from source on import:
on this 2-core machine that made `.ci/run` take 840 s instead of 545 s (BENCHMARKS.md, issue 13).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("TUNELENS_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
# Modules every job imports (or the vLLM worker does), by the file whose bytecode must exist. (tunelens itself is
# an editable install, left to Python: compiling it on import costs 0.05 s.)
MAIN_MODULES = ["torch", "transformers.modeling_utils", "snakemake.workflow", "peft", "trl"]
VLLM_MODULES = ["torch", "vllm.entrypoints.llm", "vllm.v1.engine.core"]

# Finds each module's source file without importing anything (find_spec of a submodule would import its package).
FIND_MISSING = """
import importlib.util, json, os, sys
missing = []
for name in sys.argv[1:]:
    top, *rest = name.split(".")
    package = os.path.dirname(importlib.util.find_spec(top).origin)
    source = os.path.join(package, *rest[:-1], rest[-1] + ".py") if rest else os.path.join(package, "__init__.py")
    if not os.path.exists(source) or not os.path.exists(importlib.util.cache_from_source(source)):
        missing.append(source)
print(json.dumps(missing))
"""


def missing_bytecode(python: str | Path, modules: list[str]) -> list[str]:
    """Source files of `modules` (found, not imported, by `python`) that have no compiled .pyc beside them."""
    result = subprocess.run([str(python), "-c", FIND_MISSING, *modules], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def test_main_venv_is_byte_compiled():
    assert missing_bytecode(sys.executable, MAIN_MODULES) == []


@pytest.mark.vllm
def test_vllm_venv_is_byte_compiled():
    if not VLLM_PYTHON.exists():
        if os.environ.get("CI"):
            pytest.fail(f"CI is set, so the vLLM venv must exist: {VLLM_PYTHON}")
        pytest.skip(f"{VLLM_PYTHON} not found (make vllm-venv)")
    assert missing_bytecode(VLLM_PYTHON, VLLM_MODULES) == []
