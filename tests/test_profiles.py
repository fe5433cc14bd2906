"""The README's cluster commands as a user types them from the checkout: `--profile slurm`, `--profile local`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from snakemake.cli import get_profile_dir

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["slurm", "local"])
def test_profile_names_resolve_to_the_profiles_folder(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    found = get_profile_dir(name)
    assert found is not None, f"snakemake --profile {name} finds no profile from the checkout"
    assert found[1].resolve() == (ROOT / "profiles" / name / "config.yaml").resolve()


@pytest.mark.parametrize("name", ["slurm", "local"])
def test_the_user_command_as_written(name, tmp_path):
    """`snakemake --cores all --profile <name>` run from the checkout (a dry run into an empty workdir)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNELENS_SLURM_PARTITION": "gpu-probe"}
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "all", "--profile", name, "-n", "--directory", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert "rule finetune" in output
    # the SLURM profile's default-resources reach the jobs; the local profile has none of them
    assert ("slurm_partition=gpu-probe" in output) == (name == "slurm")
