"""The Snakemake workflow as a whole: lint, formatting, and a DAG for every preset."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
PRESETS = ["config.yaml", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*.yaml"))]


def run(args: list[str], cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def test_lint_is_clean():
    result = run([*SNAKEMAKE, "--lint"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_snakefmt_is_clean():
    result = run([sys.executable, "-m", "snakefmt", "--check", "Snakefile", "rules"])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_builds_a_dag(preset, tmp_path):
    # --directory: plan against an empty results/ so the dry run lists every job of the preset.
    result = run([*SNAKEMAKE, "-n", "--quiet", "rules", "--configfile", str(ROOT / preset),
                  "--snakefile", str(ROOT / "Snakefile"), "--directory", str(tmp_path)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "split" in result.stdout


def test_bad_config_stops_before_any_job(tmp_path):
    result = run([*SNAKEMAKE, "-n", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
                  "--configfile", str(ROOT / "config.yaml"), "--config", "seed=-x"])
    assert result.returncode != 0
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "config.yaml").read_text().replace("temperature: [0.0]", "temperature: [-0.5]"))
    result = run([*SNAKEMAKE, "-n", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
                  "--configfile", str(bad)])
    assert result.returncode != 0
    assert "decoding.sweep.temperature[0]" in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()
