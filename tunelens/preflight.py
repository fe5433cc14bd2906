"""Checks of a validated config against this machine and its files, run when the DAG is built (before any job).

tunelens.config.load_config checks the config on its own (types, ranges, references between keys). This
module checks what needs the outside world, cheaply and without loading a model:
  - every model reference (models.*.source, scoring.judge.model, scoring.bertscore.model) resolves: an
    embedded model, a model name, an existing local directory, or a hub id; with the hub off
    (HF_HUB_OFFLINE=1, the default) a hub id must be in the local hub cache. A reference whose first path
    component exists locally is taken as a path typo even with the hub on;
  - model files, read without loading (tunelens.modelfiles): config.json of a causal LM, weight files whose
    headers match their sizes; the generation and training lengths within the context length; LoRA target
    modules among the weights' modules; the same files for a local judge or BERTScore model;
  - the dataset: a hub id in the cache when the hub is off; a local file (or embedded set) is read, cleaned and
    split as rule `split` does: mapped columns exist, rows are left (counted by reason), test_size leaves
    training rows, on_bad_rows: error names the first bad row; local evaluation sets and their leakage check;
  - other files named by the config (bertscore baseline, vllm_python, ratings_dir);
  - device: cuda on a machine without a usable CUDA device (only for a local, non-dry run: a cluster's
    login node usually has no GPU; tunelens.gpufit, with the check that a model's weights fit its GPUs);
  - work and memory estimates that need the data: optimizer steps and training tokens from the training
    rows, bootstrap resamples x evaluated rows.
Every problem found is reported at once, each naming its key and value; `check_config` runs load_config
first and reports its problems in the same message.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from tunelens.config import EMBEDDED_PREFIX, HUB_ID, Problems, Study, load_config, source_kind
from tunelens.errors import ConfigError, DataError
# re-exported: callers (tunelens.training.finetune, rules/common.smk, tests) import the GPU checks from here
from tunelens.gpufit import (  # noqa: F401
    GPU_RESERVE_BYTES, NF4_BYTES_PER_PARAMETER, _libcuda, check_model_fits_gpus, cuda_device_count, cuda_memory,
    cuda_problem, gpu_fit_problem, gpu_fit_problems,
)
from tunelens.hub import hub_offline, truthy as _truthy  # noqa: F401 (hub_offline: callers import it here)
from tunelens.settings import ModelSection

# Resample matrices of the percentile bootstrap: ~4 float64/int64 arrays of samples x rows (tunelens.scoring.statistics).
BOOTSTRAP_BYTES_PER_CELL = 32
BOOTSTRAP_MEMORY_LIMIT = 4 * 1024**3  # score jobs ask for 8 GB


# --------------------------------------------------------------------------------------------- hub
def _hf_home(environ: Mapping[str, str]) -> Path:
    if environ.get("HF_HOME"):
        return Path(environ["HF_HOME"]).expanduser()
    base = Path(environ["XDG_CACHE_HOME"]).expanduser() if environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "huggingface"


def hub_cache(environ: Mapping[str, str]) -> Path:
    if environ.get("HF_HUB_CACHE"):
        return Path(environ["HF_HUB_CACHE"]).expanduser()
    return _hf_home(environ) / "hub"


def datasets_cache(environ: Mapping[str, str]) -> Path:
    if environ.get("HF_DATASETS_CACHE"):
        return Path(environ["HF_DATASETS_CACHE"]).expanduser()
    return _hf_home(environ) / "datasets"


def model_in_cache(repo_id: str, environ: Mapping[str, str]) -> bool:
    """A snapshot of `repo_id` with a config.json in the hub cache (what from_pretrained needs offline)."""
    snapshots = hub_cache(environ) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any((snapshot / "config.json").exists() for snapshot in snapshots.iterdir())


def dataset_in_cache(repo_id: str, environ: Mapping[str, str]) -> bool:
    snapshots = hub_cache(environ) / f"datasets--{repo_id.replace('/', '--')}" / "snapshots"
    if snapshots.is_dir() and any(snapshots.iterdir()):
        return True
    prepared = datasets_cache(environ)
    prefix = repo_id.replace("/", "___").lower()
    return prepared.is_dir() and any(entry.name.lower().startswith(prefix) for entry in prepared.iterdir())


def _path_typo(value: str, base_dir: Path) -> str | None:
    """'mymodels/ckpt' when ./mymodels exists: a path with a typo, not a hub id."""
    if "/" not in value:
        return None
    first = value.split("/", 1)[0]
    if first and (base_dir / first).exists():
        return (f"'{first}' exists here, but '{value}' does not (a local path with a typo? relative paths are "
                f"resolved from {base_dir.resolve()})")
    return None


def check_model_reference(where: str, value: str, *, model_names=(), base_dir: Path, offline: bool,
                          environ: Mapping[str, str], needs_config: bool = True) -> str | None:
    """None when `value` resolves, else the problem (with `where` and the value)."""
    if value in model_names or value.startswith(EMBEDDED_PREFIX):
        return None
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base_dir / path
    kind = source_kind(value) if not path.exists() else "local"
    if kind == "local":
        if not path.is_dir():
            return f"{where}: '{value}': local model directory does not exist ({path.resolve()})"
        if needs_config and not (path / "config.json").exists():
            return f"{where}: '{value}': {path} has no config.json; expected a Hugging Face model directory"
        return None
    typo = _path_typo(value, base_dir)
    if typo:
        return f"{where}: '{value}': {typo}"
    if not HUB_ID.match(value):
        names = f" a model name of `models` ({', '.join(sorted(model_names))})," if model_names else ""
        return f"{where}: '{value}' is neither{names} an existing directory nor a hub id (org/name)"
    if offline and not model_in_cache(value, environ):
        names = f"a model name of `models` ({', '.join(sorted(model_names))}), " if model_names else ""
        return (f"{where}: '{value}' is not {names}an existing directory, nor a hub model in the offline cache "
                f"({hub_cache(environ)}); fix the name or path, pre-download it, or allow downloads with "
                "HF_HUB_OFFLINE=0")
    return None


# --------------------------------------------------------------------------------------------- study
def _hub_dataset_problem(where: str, source: str, base_dir: Path, offline: bool, environ) -> str | None:
    typo = _path_typo(source, base_dir)
    if typo:
        return f"{where}: '{source}': {typo}"
    if (offline or _truthy(environ.get("HF_DATASETS_OFFLINE"))) and not dataset_in_cache(source, environ):
        return (f"{where}: '{source}' is not an existing file (expected a .json/.jsonl/.csv/.parquet path), "
                f"nor a hub dataset in the offline caches ({hub_cache(environ)}, {datasets_cache(environ)}); fix "
                "the path, pre-download it, or allow downloads with HF_DATASETS_OFFLINE=0 HF_HUB_OFFLINE=0")
    return None


def _read_split(where: str, source: str, *, fields: dict, required: tuple, on_bad_rows: str, hub_split: str,
                base_dir: Path):
    """(rows, dropped, bad, problem) of a readable source, read and cleaned as the split job does."""
    from tunelens.data.data import clean_rows, read_source

    try:
        raw, _, bad = read_source(source, hub_split=hub_split, base_dir=base_dir, on_bad_rows=on_bad_rows)
        bad.where = f"'{source}'"
        rows, dropped = clean_rows(raw, fields, "check", where=f"'{source}'", required_fields=required, bad=bad)
    except ConfigError as exc:  # a mapped column that is missing: the message names the key
        return None, None, None, str(exc)
    except DataError as exc:
        return None, None, None, f"{where}: {exc}"
    return rows, dropped, bad, None


def _dataset_problems(study: Study, base_dir: Path, offline: bool, environ,
                      downloaded: bool = False) -> tuple[list[str], dict]:
    """Problems of the dataset, and what is known of it before the split job: {"test": rows evaluated,
    "train": training rows, "train_prompts": (instruction, input) pairs of the training split}.

    A local file (or embedded set) is read, cleaned and split exactly as rule `split` does, so what that job
    would reject (no usable rows, test_size leaving nothing to train on, a bad row under on_bad_rows: error)
    is named before any job, with the rows dropped by reason.
    """
    from tunelens.data.data import split_rows

    dataset = study.settings.dataset
    source, test_size = dataset.source, dataset.test_size
    kind = source_kind(source)
    known = {"test": int(test_size) if test_size >= 1 else None}
    if kind == "hub":
        problem = None if downloaded else _hub_dataset_problem("dataset.source", source, base_dir, offline, environ)
        return [problem] if problem else [], known
    if kind == "local":
        path = Path(source).expanduser()
        if not (path if path.is_absolute() else base_dir / path).is_file():
            return [], known  # tunelens.config named it
    rows, dropped, bad, problem = _read_split(
        "dataset.source", source, fields=dataset.fields.as_dict(), required=study.mapped_fields,
        on_bad_rows=dataset.on_bad_rows, hub_split=dataset.hub_split, base_dir=base_dir)
    if problem:
        return [problem], known
    try:
        train, test, _ = split_rows(rows, seed=study.settings.seed, test_size=test_size,
                                    max_train=dataset.max_train)
    except DataError as exc:
        read = len(rows) + sum(dropped.values())
        plural = "" if len(rows) == 1 else "s"
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(dropped.items()))
        return [f"dataset.source: '{source}': {len(rows)} usable row{plural} of {read} read"
                + (f" (dropped: {reasons})" if reasons else "") + f": {exc}"], known
    from tunelens.data.data import training_prompts

    return [], {"test": len(test), "train": len(train), "train_prompts": training_prompts(train)}


# --------------------------------------------------------------------------------------------- models
def _model_directory(spec, base_dir: Path, environ, results: Path | None) -> Path | None:
    """Where a model's files are before any job: a local directory, a completed hub download, or a
    snapshot in the offline hub cache; None for embedded models and hub models not here yet."""
    if spec.source_kind == "local":
        path = Path(spec.source).expanduser()
        return path if path.is_absolute() else base_dir / path
    if spec.source_kind == "hub":
        if results is not None:
            from tunelens.hub import SOURCE_RECORD, model_download_dir

            download = model_download_dir(results, spec.name)
            if (download / SOURCE_RECORD).is_file():
                return download
        return _cached_model_dir(spec.source, environ)
    return None


def _cached_model_dir(repo_id: str, environ) -> Path | None:
    snapshots = hub_cache(environ) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    if not snapshots.is_dir():
        return None
    found = sorted((s for s in snapshots.iterdir() if (s / "config.json").exists()), key=lambda s: s.stat().st_mtime)
    return found[-1] if found else None


def check_model_files(where: str, directory: Path, *, weights: bool = True) -> tuple[list[str], dict]:
    """Problems of a model directory read without loading it (tunelens.modelfiles): config.json readable
    and a causal LM, weight files intact. Returns (problems, {"config": dict, "modules": set of names})."""
    from tunelens.modelfiles import (ModelFileProblem, architecture_problem, read_config_json,
                                     weight_files_problems)

    try:
        model_config = read_config_json(directory)
    except ModelFileProblem as exc:
        return [f"{where}: {exc}"], {}
    problems = []
    architecture = architecture_problem(model_config)
    if architecture:
        problems.append(f"{where}: {directory}: {architecture}")
    tensors: set[str] = set()
    if weights:
        weight_problems, tensors = weight_files_problems(directory)
        problems += [f"{where}: {problem}" for problem in weight_problems]
    return problems, {"config": model_config, "tensors": tensors}


def _context_length(spec, entry: ModelSection, model_config: dict | None) -> int | None:
    from tunelens.modelfiles import context_length
    from tunelens.models import EMBEDDED_MODELS

    if entry.context_length:
        return entry.context_length
    if spec.source_kind == "embedded":
        return EMBEDDED_MODELS[spec.embedded_name].get("context_length")
    return context_length(model_config) if model_config else None


def _model_problems(study: Study, base_dir: Path, environ, results: Path | None) -> list[str]:
    """Per model: its files (local, downloaded or cached), and what it must hold: the generation lengths and
    the fine-tune's rows within its context length, the LoRA target modules among its modules."""
    config = study.settings
    problems = []
    for name, spec in study.models.items():
        where = f"models.{name}"
        entry = config.models[name]
        directory = _model_directory(spec, base_dir, environ, results)
        info: dict = {}
        if directory is not None and directory.is_dir():
            # A hub model only in the cache: with the hub on, download_model fetches what the cache lacks.
            in_cache_only = spec.source_kind == "hub" and hub_cache(environ) in directory.parents
            found, info = check_model_files(f"{where}.source", directory,
                                            weights=not (in_cache_only and not hub_offline(environ)))
            problems += found
            if found and spec.source_kind == "local":
                continue
        context = _context_length(spec, entry, info.get("config"))
        if context:
            lengths = [("decoding.max_new_tokens", config.decoding.max_new_tokens, "generated")]
            early = config.probe.early_exit
            if config.probe.enabled and early.enabled:
                lengths.append(("probe.early_exit.max_new_tokens", early.max_new_tokens, "generated"))
            for key, value, _ in lengths:
                if value >= context:
                    problems.append(
                        f"{key}: {value} leaves no room for a prompt in {where}'s context length {context} "
                        f"({spec.source}); prompt and answer together must fit, lower it")
            if spec.finetuned and spec.finetune_settings.max_seq_length > context:
                problems.append(
                    f"{where}.finetune.max_seq_length: {spec.finetune_settings.max_seq_length} is beyond {where}'s context "
                    f"length {context} ({spec.source}); training rows that long would run past its positions")
        targets = spec.finetune_settings.target_modules
        if spec.finetuned and isinstance(targets, list) and info.get("tensors"):
            modules = {tensor.rsplit(".", 1)[0] for tensor in info["tensors"] if "." in tensor}
            missing = [t for t in targets if not any(m == t or m.endswith("." + t) for m in modules)]
            if missing:
                from tunelens.modelfiles import module_names

                problems.append(
                    f"{where}.finetune.target_modules: {missing} not among the modules of {spec.source} "
                    f"(its weights name: {', '.join(sorted(module_names(info['tensors'])))})")
    return problems


def _reference_files_problems(where: str, value: str, base_dir: Path, environ, *, causal: bool) -> tuple[list[str], dict]:
    """The files of a model reference that is a local directory or a cached hub model (judge, BERTScore)."""
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base_dir / path
    weights = True
    if not path.is_dir():
        path = _cached_model_dir(value, environ) if HUB_ID.match(value) else None
        weights = hub_offline(environ)  # with the hub on, what the cache lacks is downloaded
    if path is None or not (path / "config.json").exists():
        return [], {}
    found, info = check_model_files(where, path, weights=weights)
    if not causal:  # an encoder (BERTScore) is expected there
        found = [p for p in found if "encoder-only" not in p and "not a causal language model" not in p]
    return found, info


def check_config(config: dict, *, base_dir: str | Path = ".", environ: Mapping[str, str] | None = None,
                 check_cuda: bool = True, results: str | Path | None = "results") -> Study:
    """load_config and preflight together: every problem of the config, its files and this machine, raised as
    one ConfigError (what rules/common.smk runs before any job). Returns the Study when there is none."""
    problems: list[str] = []
    study = load_config(config, base_dir=base_dir, problems=problems)
    downloaded = frozenset()
    if results is not None:
        from tunelens.hub import downloaded_sources

        try:
            downloaded = downloaded_sources(study, results)
        except (KeyError, TypeError, AttributeError):
            downloaded = frozenset()
    preflight(study, base_dir=base_dir, environ=environ, check_cuda=check_cuda, downloaded=downloaded,
              problems=problems, results=results)
    return study


def preflight(study: Study, *, base_dir: str | Path = ".", environ: Mapping[str, str] | None = None,
              check_cuda: bool = True, downloaded: frozenset[str] = frozenset(), problems: list[str] | None = None,
              results: str | Path | None = None) -> None:
    """Raise ConfigError listing every problem of `study` that can be known before a job runs.

    `downloaded`: "models.<name>" / "dataset" whose hub download already exists (rules download_model /
    download_dataset, tunelens.hub.downloaded_sources): jobs load it, so neither the hub nor its cache is needed.
    `problems`: those load_config already found (check_config); they are raised together with these.
    """
    environ = os.environ if environ is None else environ
    base_dir = Path(base_dir)
    config = study.settings
    offline = hub_offline(environ)
    found = Problems(problems)
    found.broken = bool(found.messages)
    for name, spec in study.models.items():
        if spec.source_kind == "hub" and f"models.{name}" not in downloaded:
            problem = check_model_reference(f"models.{name}.source", spec.source, base_dir=base_dir,
                                            offline=offline, environ=environ)
            if problem:
                found.add(problem)
    with found.check():
        found.messages += _model_problems(study, base_dir, environ, Path(results) if results is not None else None)

    with found.check():
        judge = config.scoring.judge
        if judge.enabled and judge.model:
            # the names of `models` as given: a model whose entry has a problem is still a name
            problem = check_model_reference("scoring.judge.model", judge.model, model_names=list(config.models),
                                            base_dir=base_dir, offline=offline, environ=environ)
            if problem:
                found.add(problem)
            elif judge.model not in config.models:
                found.messages += _reference_files_problems("scoring.judge.model", judge.model, base_dir, environ,
                                                            causal=True)[0]
    with found.check():
        bertscore = config.scoring.bertscore
        if "bertscore" in config.scoring.metrics:
            problem = check_model_reference("scoring.bertscore.model", bertscore.model, base_dir=base_dir,
                                            offline=offline, environ=environ)
            if problem:
                found.add(problem)
            elif not bertscore.model.startswith(EMBEDDED_PREFIX):
                from tunelens.modelfiles import num_layers

                file_problems, info = _reference_files_problems("scoring.bertscore.model", bertscore.model,
                                                                base_dir, environ, causal=False)
                found.messages += file_problems
                depth = num_layers(info["config"]) if info.get("config") else None
                if depth and bertscore.num_layers and bertscore.num_layers > depth:
                    found.add(f"scoring.bertscore.num_layers: {bertscore.num_layers} is beyond the depth of "
                              f"{bertscore.model} ({depth} layers)")
            baseline = bertscore.baseline_path
            if baseline and not (base_dir / Path(baseline).expanduser()).is_file():
                found.add(f"scoring.bertscore.baseline_path: '{baseline}': file does not exist")
    with found.check():
        vllm_python = config.generation.vllm_python
        if vllm_python and not (base_dir / Path(vllm_python).expanduser()).is_file():
            found.add(f"generation.vllm_python: '{vllm_python}': file does not exist")
    with found.check():
        ratings_dir = base_dir / Path(config.scoring.human.ratings_dir).expanduser()
        if ratings_dir.exists() and not ratings_dir.is_dir():
            found.add(f"scoring.human.ratings_dir: '{config.scoring.human.ratings_dir}' is a file, not a "
                      "directory (filled rating sheets are read from that folder)")

    known: dict = {}
    with found.check():
        dataset_problems, known = _dataset_problems(study, base_dir, offline, environ, "dataset" in downloaded)
        found.messages += dataset_problems
    with found.check():
        for name, spec in study.evaluation_sets.items():
            if spec.source_kind == "hub":
                problem = _hub_dataset_problem(f"evaluation_sets[name={name}].source", spec.source, base_dir,
                                               offline, environ)
                if problem:
                    found.add(problem)
        if study.evaluation_sets and (study.dataset_kind == "hub" or "train_prompts" in known):
            from tunelens.data.data import check_evaluation_sets

            check_evaluation_sets(study, base_dir, train_prompts=known.get("train_prompts", set()),
                                  problems=found.messages)
    with found.check():
        if known.get("train"):
            from tunelens.config import training_work_problems

            for name, spec in study.models.items():
                if spec.finetuned and not spec.finetune_settings.max_steps:
                    found.messages += training_work_problems(f"models.{name}.finetune", spec.finetune_settings,
                                                             known["train"])

    with found.check():
        samples = config.scoring.bootstrap_samples
        max_rows = config.decoding.max_test_rows
        n_test = known.get("test")
        n_eval = min(x for x in (n_test, max_rows) if x is not None) if (n_test or max_rows) else None
        if n_eval:
            needed = BOOTSTRAP_BYTES_PER_CELL * samples * n_eval
            if needed > BOOTSTRAP_MEMORY_LIMIT:
                found.add(
                    f"scoring.bootstrap_samples: {samples} resamples of {n_eval} evaluated rows need "
                    f"~{needed / 1024**3:.0f} GiB in every scoring job (limit {BOOTSTRAP_MEMORY_LIMIT // 1024**3} GiB); "
                    f"lower bootstrap_samples to at most {BOOTSTRAP_MEMORY_LIMIT // (BOOTSTRAP_BYTES_PER_CELL * n_eval)}"
                    " or decoding.max_test_rows"
                )

    if check_cuda and config.device == "cuda":
        problem = cuda_problem()
        if problem:
            found.add(problem)
    found.raise_any()
