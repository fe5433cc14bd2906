"""Hub models and datasets: downloaded once by a local rule, revision recorded, loaded offline by every job.

No hub is reachable here. The stand-in for the download is a filled Hugging Face cache (the layout
huggingface_hub writes: <repo>/refs/main + snapshots/<commit>/), which tunelens copies from when the hub is
off, and, for the online path, a fake snapshot_download.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tunelens import hub

ROOT = Path(__file__).resolve().parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"
DATASET_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def fill_cache(cache: Path, repo_id: str, files_from: Path | dict, commit: str, repo_type: str = "model") -> Path:
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    if isinstance(files_from, Path):
        shutil.copytree(files_from, snapshot)
    else:
        snapshot.mkdir(parents=True)
        for name, text in files_from.items():
            (snapshot / name).write_text(text)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_offline_download_copies_the_cached_commit_and_records_it(tmp_path, tiny_llama_dir, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "cache"
    fill_cache(cache, "org/tiny", tiny_llama_dir, COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    record = hub.download("org/tiny", tmp_path / "out" / "tiny")
    assert record["revision"] == COMMIT and record["from"] == "cache" and record["requested_revision"] is None
    assert (tmp_path / "out" / "tiny" / "config.json").is_file()
    assert hub.hub_revision(tmp_path / "out" / "tiny") == COMMIT
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["tiny"]  # no staging dir left behind
    with pytest.raises(Exception, match="org/absent"):
        hub.download("org/absent", tmp_path / "out" / "absent")
    assert not (tmp_path / "out" / "absent").exists()


def test_preflight_accepts_a_download_without_hub_or_cache(tmp_path, monkeypatch):
    """A model already in results/hub/ needs neither the hub nor the cache; one that is not is named."""
    from tunelens.config import load_config
    from tunelens.errors import ConfigError
    from tunelens.preflight import preflight

    study = load_config(yaml.safe_load(_study(tmp_path).read_text()))
    environ = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HOME": str(tmp_path / "home")}
    with pytest.raises(ConfigError) as error:
        preflight(study, environ=environ, check_cuda=False)
    assert "models.tiny.source: 'org/tiny-llama'" in str(error.value) and "dataset.source" in str(error.value)
    results = tmp_path / "results"
    assert hub.downloaded_sources(study, results) == frozenset()
    for directory in (hub.model_download_dir(results, "tiny"), hub.dataset_download_dir(results, "hubdata")):
        directory.mkdir(parents=True)
        (directory / hub.SOURCE_RECORD).write_text("{}")
    downloaded = hub.downloaded_sources(study, results)
    assert downloaded == {"models.tiny", "dataset"}
    preflight(study, environ=environ, check_cuda=False, downloaded=downloaded)


def test_online_download_pins_the_resolved_commit(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, *, revision, repo_type, local_dir, **kwargs):
        calls.append((repo_id, revision, repo_type))
        (Path(local_dir) / ".cache").mkdir(parents=True)
        (Path(local_dir) / "config.json").write_text("{}")
        return str(local_dir)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(hub, "_resolve_commit", lambda repo_id, revision, repo_type: COMMIT)
    record = hub.download("org/big", tmp_path / "big", revision="v1.0")
    # the files are fetched at the commit the tag resolved to, so the record and the files agree
    assert calls == [("org/big", COMMIT, "model")]
    assert record["requested_revision"] == "v1.0" and record["revision"] == COMMIT and record["from"] == "hub"
    assert not (tmp_path / "big" / ".cache").exists()
    assert json.loads((tmp_path / "big" / hub.SOURCE_RECORD).read_text())["revision"] == COMMIT


def _study(tmp_path: Path) -> Path:
    config = {
        "seed": 1, "device": "cpu",
        "dataset": {"name": "hubdata", "source": "org/demo-data", "test_size": 3},
        "models": {"tiny": {"source": "org/tiny-llama", "prompt_format": "chat", "num_layers": 4,
                            "resources": {"gpus": 0, "cpus": 1, "mem_mb": 1000, "runtime": 10}}},
        "finetune": {"enabled": False},
        "decoding": {"max_new_tokens": 4, "max_test_rows": 3},
        "scoring": {"bootstrap_samples": 100},
        "probe": {"layers": [2, 4]},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _snakemake(tmp_path: Path, cache: Path, *targets: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_CACHE": str(cache), "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache")}
    return subprocess.run(
        [sys.executable, "-m", "snakemake", *targets, "--cores", "2", "--snakefile", str(ROOT / "Snakefile"),
         "--directory", str(tmp_path / "work"), "--configfile", str(_study(tmp_path))],
        capture_output=True, text=True, timeout=600, env=env,
    )


def test_hub_off_and_nothing_cached_stops_before_any_job(tmp_path):
    result = _snakemake(tmp_path, tmp_path / "empty-cache", "results/perplexity/tiny/base.json")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "models.tiny.source: 'org/tiny-llama' is not an existing directory, nor a hub model in the offline cache" in output
    assert "dataset.source: 'org/demo-data'" in output
    assert not (tmp_path / "work" / "results").exists() and not (tmp_path / "work" / "logs").exists()


def test_hub_model_and_dataset_are_fetched_once_and_jobs_load_the_download(tmp_path, tiny_llama_dir):
    from tunelens.config import load_config

    cache = tmp_path / "cache"
    fill_cache(cache, "org/tiny-llama", tiny_llama_dir, COMMIT)
    rows = "".join(json.dumps({"instruction": f"Say {word}.", "input": "", "output": word}) + "\n"
                   for word in ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"])
    fill_cache(cache, "org/demo-data", {"train.jsonl": rows}, DATASET_COMMIT, repo_type="dataset")
    config_name = next(iter(load_config(yaml.safe_load(_study(tmp_path).read_text())).decoding))
    generation = f"results/generations/tiny/base/{config_name}.jsonl"
    result = _snakemake(tmp_path, cache, generation, "results/perplexity/tiny/base.json")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "localrule download_model:" in output and "localrule download_dataset:" in output
    work = tmp_path / "work"
    assert hub.hub_revision(work / "results/hub/models/tiny") == COMMIT
    assert hub.source_record(work / "results/hub/datasets/hubdata")["revision"] == DATASET_COMMIT
    manifest = json.loads((work / "results/data/hubdata/manifest.json").read_text())
    assert manifest["source"]["revision"] == DATASET_COMMIT and manifest["counts"]["read"] == 8
    meta = json.loads((work / generation.replace(".jsonl", ".meta.json")).read_text())
    assert meta["model"]["path"] == "results/hub/models/tiny" and meta["model"]["revision"] == COMMIT
    assert meta["model"]["source"] == "org/tiny-llama"
    # fetched once: a second run plans nothing, the download included
    again = _snakemake(tmp_path, cache, generation, "results/perplexity/tiny/base.json")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
    # the cache emptied (a GPU node without HF_HOME): the downloads are enough
    again = _snakemake(tmp_path, tmp_path / "empty-cache", generation, "results/perplexity/tiny/base.json")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr, again.stderr[-2000:]
