"""envs/*.yaml (for --software-deployment-method conda) must pin what pyproject.toml pins.

A job run in a conda env and the same job run in the venv must use the same library versions, so:
every package an env lists is a tunelens dependency with the identical version specifier, and the
envs together cover every dependency a job imports (all but the Snakemake driver's own packages).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
ENV_FILES = sorted((REPO / "envs").glob("*.yaml"))
# Run Snakemake itself (and submit to SLURM), never imported by a job's script.
DRIVER_ONLY = {"snakemake", "snakemake-executor-plugin-slurm", "pygments"}
# Conda packages that are the environment's tooling, not a tunelens dependency.
CONDA_TOOLING = {"python", "pip"}


def pyproject_requirements() -> dict[str, Requirement]:
    """name -> requirement, over `dependencies` and every optional extra except dev tooling."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra, entries in project.get("optional-dependencies", {}).items():
        if extra != "dev":
            requirements += entries
    parsed = [Requirement(text) for text in requirements]
    return {canonicalize_name(requirement.name): requirement for requirement in parsed}


def env_requirements(env: dict, where: str) -> tuple[dict[str, Requirement], str | None]:
    """(name -> requirement of the env's pip and conda packages, the env's python spec)."""
    if not isinstance(env, dict) or not isinstance(env.get("dependencies"), list):
        raise AssertionError(f"{where}: expected a mapping with a 'dependencies' list")
    requirements: dict[str, Requirement] = {}
    python = None
    for entry in env["dependencies"]:
        if isinstance(entry, dict):
            if set(entry) != {"pip"}:
                raise AssertionError(f"{where}: unexpected dependency mapping {sorted(entry)}; only 'pip' is allowed")
            texts = entry["pip"]
        else:
            # conda syntax: name=1.2 or name==1.2 or name>=1.2; `=` alone means that version (prefix)
            name, _, version = str(entry).partition("=")
            if canonicalize_name(name) in CONDA_TOOLING:
                if canonicalize_name(name) == "python":
                    python = version.lstrip("=")
                continue
            texts = [str(entry) if not version or version.startswith(("=", ">", "<")) else f"{name}=={version}"]
        for text in texts:
            requirement = Requirement(text)
            name = canonicalize_name(requirement.name)
            if name in requirements:
                raise AssertionError(f"{where}: '{requirement.name}' is listed twice")
            requirements[name] = requirement
    return requirements, python


# envs/vllm.yaml is the vLLM generation env: vLLM is in no pyproject.toml extra (it pins its own torch,
# which the project's torch pin excludes), so that env pins it exactly itself and lets vLLM choose torch.
OWN_PINS = {"vllm.yaml": {"vllm"}}
LEFT_TO_VLLM = {"torch", "transformers", "tokenizers"}


def pin_mismatches(env_file_name: str, env: dict, project: dict[str, Requirement]) -> list[str]:
    """Every way the env disagrees with pyproject.toml, as readable messages (empty when it agrees)."""
    requirements, _ = env_requirements(env, env_file_name)
    problems = []
    own = OWN_PINS.get(env_file_name, set())
    for name in sorted(own):
        requirement = requirements.pop(name, None)
        if requirement is None:
            problems.append(f"{env_file_name}: '{name}' is missing")
        elif len(requirement.specifier) != 1 or next(iter(requirement.specifier)).operator != "==":
            problems.append(f"{env_file_name}: '{requirement}' is not an exact pin (name==version)")
    if own:
        problems += [f"{env_file_name}: '{name}' is vLLM's to pin" for name in sorted(LEFT_TO_VLLM & set(requirements))]
    for name, requirement in sorted(requirements.items()):
        if name not in project:
            problems.append(f"{env_file_name}: '{requirement.name}' is not a dependency in pyproject.toml")
        elif requirement.specifier != project[name].specifier:
            problems.append(
                f"{env_file_name}: '{requirement.name}{requirement.specifier}' but pyproject.toml has "
                f"'{project[name].name}{project[name].specifier}'"
            )
    return problems


def test_envs_exist():
    names = {path.name for path in ENV_FILES}
    assert names, "envs/ has no *.yaml conda environments"


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda path: path.name)
def test_env_pins_equal_pyproject(env_file):
    env = yaml.safe_load(env_file.read_text())
    assert pin_mismatches(env_file.name, env, pyproject_requirements()) == []


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda path: path.name)
def test_env_python_satisfies_requires_python(env_file):
    _, python = env_requirements(yaml.safe_load(env_file.read_text()), env_file.name)
    assert python, f"{env_file.name}: no python version pinned"
    requires_python = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert Version(python) in Requirement(f"python{requires_python}").specifier, (
        f"{env_file.name}: python={python} does not satisfy requires-python {requires_python}"
    )


def test_envs_cover_every_job_dependency():
    listed = set()
    for env_file in ENV_FILES:
        listed |= set(env_requirements(yaml.safe_load(env_file.read_text()), env_file.name)[0])
    missing = sorted(set(pyproject_requirements()) - DRIVER_ONLY - listed)
    assert missing == [], f"pyproject.toml dependencies in no envs/*.yaml: {missing}"


# ------------------------------------------------------------------------ the checker itself
PROJECT = {canonicalize_name(r.name): r for r in map(Requirement, ["torch==2.13.0", "numpy", "peft==0.21.2"])}


def test_checker_reports_a_different_pin():
    env = {"dependencies": ["python=3.11", {"pip": ["torch==2.12.0", "numpy"]}]}
    assert pin_mismatches("x.yaml", env, PROJECT) == [
        "x.yaml: 'torch==2.12.0' but pyproject.toml has 'torch==2.13.0'"
    ]


def test_checker_reports_unpinned_and_unknown_packages():
    env = {"dependencies": [{"pip": ["peft", "requests==2.0"]}]}
    assert pin_mismatches("x.yaml", env, PROJECT) == [
        "x.yaml: 'peft' but pyproject.toml has 'peft==0.21.2'",
        "x.yaml: 'requests' is not a dependency in pyproject.toml",
    ]


def test_checker_reads_conda_pins():
    env = {"dependencies": ["python=3.11", "pip", "torch=2.13.0", "numpy"]}
    assert pin_mismatches("x.yaml", env, PROJECT) == []
    env = {"dependencies": ["torch=2.11.0"]}
    assert pin_mismatches("x.yaml", env, PROJECT) == [
        "x.yaml: 'torch==2.11.0' but pyproject.toml has 'torch==2.13.0'"
    ]


def test_checker_vllm_env_pins_vllm_itself_and_leaves_torch_to_it():
    env = {"dependencies": ["python=3.11", {"pip": ["vllm==0.33.0", "numpy"]}]}
    assert pin_mismatches("vllm.yaml", env, PROJECT) == []
    env = {"dependencies": [{"pip": ["vllm>=0.30", "torch==2.13.0"]}]}
    assert pin_mismatches("vllm.yaml", env, PROJECT) == [
        "vllm.yaml: 'vllm>=0.30' is not an exact pin (name==version)",
        "vllm.yaml: 'torch' is vLLM's to pin",
    ]
    assert pin_mismatches("vllm.yaml", {"dependencies": [{"pip": ["numpy"]}]}, PROJECT) == [
        "vllm.yaml: 'vllm' is missing"
    ]
