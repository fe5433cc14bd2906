"""Hub models and datasets, fetched once into a local directory before any GPU job.

Rules `download_model` / `download_dataset` (localrules: they run on the submitting host, which has
network on a cluster) write `results/hub/{models,datasets}/<name>/`: the repository's files at one commit,
plus `tunelens_source.json` recording the hub id, the revision asked for and the commit it resolved to.
Every job then loads that directory as a local path, offline. A configured `revision` pins the commit;
without one the commit of the first download is recorded, and kept until the directory is deleted.

With the hub off (HF_HUB_OFFLINE=1, the default) a repository already in the Hugging Face cache
(HF_HOME / HF_HUB_CACHE) is copied from there; one that is neither downloaded nor cached stops the run
before any job, naming the model (tunelens.preflight, told which downloads exist by `downloaded_sources`).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
from pathlib import Path

from tunelens.errors import ModelError
from tunelens.io import atomic_directory

log = logging.getLogger(__name__)

SOURCE_RECORD = "tunelens_source.json"
REPO_TYPES = ("model", "dataset")


def truthy(value) -> bool:
    """An environment flag's value as huggingface_hub reads it ("1", "true", "yes", "on")."""
    return str(value or "").strip().lower() in ("1", "true", "yes", "on")


def hub_offline(environ=None) -> bool:
    """True when huggingface_hub would not reach the hub (HF_HUB_OFFLINE set to a true value). Here rather than
    in tunelens.preflight so that jobs importing this module do not pull the config checks into their code hash."""
    environ = os.environ if environ is None else environ
    return truthy(environ.get("HF_HUB_OFFLINE"))


def cached_snapshot(repo_id: str, revision: str | None = None, repo_type: str = "model") -> Path | None:
    """The local snapshot of repo_id@revision in the Hugging Face cache, or None when it is not cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, repo_type=repo_type, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None


def model_download_dir(results: str | Path, model: str) -> Path:
    return Path(results) / "hub" / "models" / model


def dataset_download_dir(results: str | Path, dataset: str) -> Path:
    return Path(results) / "hub" / "datasets" / dataset


def downloaded_sources(study, results: str | Path = "results") -> frozenset[str]:
    """"models.<name>" / "dataset" of `study` whose hub download is complete (its record written last)."""
    done = {f"models.{name}" for name, spec in study.models.items()
            if spec.source_kind == "hub" and (model_download_dir(results, name) / SOURCE_RECORD).is_file()}
    if (dataset_download_dir(results, study.dataset_name) / SOURCE_RECORD).is_file():
        done.add("dataset")
    return frozenset(done)


def _resolve_commit(repo_id: str, revision: str | None, repo_type: str) -> str:
    from huggingface_hub import HfApi

    info = HfApi().repo_info(repo_id, revision=revision, repo_type=repo_type)
    return info.sha


def download(repo_id: str, output_dir: str | Path, *, revision: str | None = None, repo_type: str = "model") -> dict:
    """Fetch repo_id at `revision` (a commit, tag or branch; None = default branch) into output_dir.

    The directory appears atomically, with tunelens_source.json naming the commit. Returns that record.
    """
    if repo_type not in REPO_TYPES:
        raise ValueError(f"repo_type '{repo_type}'; expected one of {REPO_TYPES}")
    from huggingface_hub import snapshot_download

    output_dir = Path(output_dir)
    with atomic_directory(output_dir) as staging:
        if hub_offline():
            snapshot = cached_snapshot(repo_id, revision, repo_type)
            if snapshot is None:
                raise ModelError(
                    f"{repo_type} '{repo_id}' (revision {revision or 'default'}) is not in the Hugging Face cache "
                    "and the hub is off (HF_HUB_OFFLINE=1)"
                )
            # The snapshot folder of the cache is named after the commit it holds.
            commit, origin = snapshot.name, "cache"
            shutil.copytree(snapshot, staging, symlinks=False, dirs_exist_ok=True)
        else:
            commit, origin = _resolve_commit(repo_id, revision, repo_type), "hub"
            snapshot_download(repo_id, revision=commit, repo_type=repo_type, local_dir=staging)
            shutil.rmtree(staging / ".cache", ignore_errors=True)  # huggingface_hub's download bookkeeping
        record = {
            "hub_id": repo_id,
            "repo_type": repo_type,
            "requested_revision": revision,
            "revision": commit,
            "from": origin,
            "downloaded_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        (staging / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    log.info("%s %s: revision %s from the %s -> %s", repo_type, repo_id, commit, origin, output_dir)
    return record


def source_record(path: str | Path) -> dict | None:
    """The tunelens_source.json of a downloaded (or materialised) model directory, if any."""
    record = Path(path) / SOURCE_RECORD
    if not record.is_file():
        return None
    return json.loads(record.read_text(encoding="utf-8"))


def hub_revision(path: str | Path) -> str | None:
    """The hub commit a downloaded model directory holds (None for embedded and local models)."""
    record = source_record(path) if Path(path).is_dir() else None
    return record.get("revision") if record and "hub_id" in record else None
