"""Checks of a validated config against this machine and its files, run when the DAG is built (before any job).

tunelens.config.load_config checks the config on its own (types, ranges, references between keys). This
module checks what needs the outside world, cheaply and without loading a model:
  - every model reference (models.*.source, scoring.judge.model, scoring.bertscore.model) resolves: an
    embedded model, a model name, an existing local directory, or a hub id; with the hub off
    (HF_HUB_OFFLINE=1, the default) a hub id must be in the local hub cache. A reference whose first path
    component exists locally is taken as a path typo even with the hub on;
  - the dataset: a hub id in the cache when the hub is off; a local file is read (UTF-8, BOM allowed) to
    check that every mapped column exists and that test_size leaves rows for training;
  - other files named by the config (bertscore baseline, vllm_python);
  - device: cuda on a machine without a usable CUDA device (only for a local, non-dry run: a cluster's
    login node usually has no GPU);
  - memory estimates of the keys that scale a job's memory with the data (bootstrap resamples).
Every problem found is reported at once, each naming its key and value.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from tunelens.config import EMBEDDED_PREFIX, HUB_ID, Study, source_kind
from tunelens.errors import ConfigError, DataError
from tunelens.hub import hub_offline, truthy as _truthy  # noqa: F401 (hub_offline: callers import it here)

# Resample matrices of the percentile bootstrap: ~4 float64/int64 arrays of samples x rows (tunelens.statistics).
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


# --------------------------------------------------------------------------------------------- cuda
def cuda_device_count() -> int:
    """CUDA devices usable by this process (driver API through ctypes: no torch import, ~1 ms)."""
    import ctypes

    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return 0
    if lib.cuInit(0) != 0:
        return 0
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def cuda_problem() -> str | None:
    """The problem with `device: cuda` on this machine, or None when a CUDA device is usable."""
    if cuda_device_count() > 0:
        return None
    return ("device: 'cuda', but this machine has no usable CUDA device (no driver, or CUDA_VISIBLE_DEVICES hides "
            "them); use device: auto or cpu, or run on a GPU node (a cluster executor checks on the node)")


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


def _dataset_problems(study: Study, base_dir: Path, offline: bool, environ,
                      downloaded: bool = False) -> tuple[list[str], int | None]:
    """Problems of the dataset, and the number of test rows when it can be known."""
    dataset = study.config["dataset"]
    source, test_size = dataset["source"], dataset["test_size"]
    kind = source_kind(source)
    problems: list[str] = []
    if kind == "hub" and downloaded:
        return problems, int(test_size) if test_size >= 1 else None
    if kind == "hub":
        problem = _hub_dataset_problem("dataset.source", source, base_dir, offline, environ)
        return [problem] if problem else [], int(test_size) if test_size >= 1 else None
    if kind != "local":
        return problems, int(test_size) if test_size >= 1 else None
    from tunelens.data import inspect_file

    path = Path(source).expanduser()
    path = path if path.is_absolute() else base_dir / path
    try:
        columns, n_rows = inspect_file(path)
    except DataError as exc:
        return [f"dataset.source: '{source}': {exc}"], None
    fields = dataset["fields"]
    for field in study.mapped_fields:
        column = fields.get(field)
        if column is not None and column not in columns:
            problems.append(
                f"dataset.fields.{field}: column '{column}' is not in '{source}'; columns found: {sorted(columns)}"
                + (" (set dataset.fields.input: null when the data has no input column)" if field == "input" else "")
            )
    n_test = max(1, round(test_size * n_rows)) if test_size < 1 else int(test_size)
    if n_test >= n_rows:
        problems.append(
            f"dataset.test_size: {test_size} asks for {n_test} test rows but '{source}' has only {n_rows} rows; "
            "nothing would be left for training (use a fraction below 1 or a smaller count)"
        )
    return problems, min(n_test, n_rows)


def preflight(study: Study, *, base_dir: str | Path = ".", environ: Mapping[str, str] | None = None,
              check_cuda: bool = True, downloaded: frozenset[str] = frozenset()) -> None:
    """Raise ConfigError listing every problem of `study` that can be known before a job runs.

    `downloaded`: "models.<name>" / "dataset" whose hub download already exists (rules download_model /
    download_dataset, tunelens.hub.downloaded_sources): jobs load it, so neither the hub nor its cache is needed.
    """
    environ = os.environ if environ is None else environ
    base_dir = Path(base_dir)
    config = study.config
    offline = hub_offline(environ)
    problems: list[str] = []
    for name, spec in study.models.items():
        if spec.source_kind == "hub" and f"models.{name}" not in downloaded:
            problem = check_model_reference(f"models.{name}.source", spec.source, base_dir=base_dir,
                                            offline=offline, environ=environ)
            if problem:
                problems.append(problem)

    judge = config["scoring"]["judge"]
    if judge["enabled"] and judge["model"]:
        problem = check_model_reference("scoring.judge.model", judge["model"], model_names=list(study.models),
                                        base_dir=base_dir, offline=offline, environ=environ)
        if problem:
            problems.append(problem)
    bertscore = config["scoring"]["bertscore"]
    if "bertscore" in config["scoring"]["metrics"]:
        problem = check_model_reference("scoring.bertscore.model", bertscore["model"], base_dir=base_dir,
                                        offline=offline, environ=environ)
        if problem:
            problems.append(problem)
        baseline = bertscore["baseline_path"]
        if baseline and not (base_dir / Path(baseline).expanduser()).is_file():
            problems.append(f"scoring.bertscore.baseline_path: '{baseline}': file does not exist")
    vllm_python = config["generation"]["vllm_python"]
    if vllm_python and not (base_dir / Path(vllm_python).expanduser()).is_file():
        problems.append(f"generation.vllm_python: '{vllm_python}': file does not exist")

    dataset_problems, n_test = _dataset_problems(study, base_dir, offline, environ, "dataset" in downloaded)
    problems += dataset_problems
    for name, spec in study.evaluation_sets.items():
        if spec.source_kind == "hub":
            problem = _hub_dataset_problem(f"evaluation_sets[name={name}].source", spec.source, base_dir, offline,
                                           environ)
            if problem:
                problems.append(problem)

    samples = config["scoring"]["bootstrap_samples"]
    max_rows = config["decoding"]["max_test_rows"]
    n_eval = min(x for x in (n_test, max_rows) if x is not None) if (n_test or max_rows) else None
    if n_eval:
        needed = BOOTSTRAP_BYTES_PER_CELL * samples * n_eval
        if needed > BOOTSTRAP_MEMORY_LIMIT:
            problems.append(
                f"scoring.bootstrap_samples: {samples} resamples of {n_eval} evaluated rows need ~{needed / 1024**3:.0f} "
                f"GiB in every scoring job (limit {BOOTSTRAP_MEMORY_LIMIT // 1024**3} GiB); lower bootstrap_samples "
                f"to at most {BOOTSTRAP_MEMORY_LIMIT // (BOOTSTRAP_BYTES_PER_CELL * n_eval)} or decoding.max_test_rows"
            )

    if check_cuda and config["device"] == "cuda":
        problem = cuda_problem()
        if problem:
            problems.append(problem)
    if problems:
        raise ConfigError("the config cannot run here:\n  " + "\n  ".join(problems))


# --------------------------------------------------------------------------------------------- GPU fit
# What a model needs on its GPUs, as tunelens.servers.gpu_bytes_to_load estimates a load: 1.25 x the weights (the
# rest of each GPU holds the KV cache, activations and logits; sharded, load_model caps each GPU's weights at
# SHARD_WEIGHT_SHARE = 1 / 1.25 of its memory) plus 2 GiB a GPU (CUDA context, allocator).
GPU_RESERVE_BYTES = 2 * 2**30
# 4-bit NF4 with double quantisation takes ~4.1 bits a quantised weight; the embeddings and LM head stay in 16 bits.
# 0.6 byte a parameter bounds both for Llama shapes (70B: 0.55).
NF4_BYTES_PER_PARAMETER = 0.6


def safetensors_parameters(model_dir: str | Path) -> int | None:
    """Parameters of the model in `model_dir`, read from its safetensors headers (no weights read); None when it
    is not a local directory with safetensors files (a hub id, or not downloaded yet)."""
    import json
    import struct

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return None
    parameters = 0
    for shard in sorted(model_dir.glob("*.safetensors")):
        with shard.open("rb") as handle:  # 8-byte header length, then JSON with each tensor's shape
            header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
        for name, entry in header.items():
            if name != "__metadata__":
                count = 1
                for dim in entry["shape"]:
                    count *= dim
                parameters += count
    return parameters or None


def gpu_fit_problem(model_name: str, model_dir: str | Path, gpus: int, dtype_bytes: float,
                    gpu_memory: Sequence[int], setting: str | None = None) -> str | None:
    """The problem when model `model_name`'s weights (from its safetensors headers, `dtype_bytes` a parameter)
    do not fit the job's `gpus` GPUs, whose total memory (bytes) is `gpu_memory` (the first `gpus` are used);
    None when they fit or the weights are not known. Needed: weights / SHARD_WEIGHT_SHARE + GPU_RESERVE_BYTES a GPU.
    `setting`: the config key of the GPU count (default models.<model_name>.resources.gpus)."""
    from tunelens.models import SHARD_WEIGHT_SHARE

    setting = setting or f"models.{model_name}.resources.gpus"
    parameters = safetensors_parameters(model_dir)
    gpus = max(int(gpus or 1), 1)
    if parameters is None or not gpu_memory:
        return None
    if len(gpu_memory) < gpus:
        return f"model '{model_name}': the job asks for {gpus} GPUs ({setting}) but sees {len(gpu_memory)}"
    weights = parameters * dtype_bytes

    def needed(count: int) -> float:
        return weights / SHARD_WEIGHT_SHARE + GPU_RESERVE_BYTES * count

    if needed(gpus) <= sum(gpu_memory[:gpus]):
        return None
    enough = next((n for n in range(gpus + 1, len(gpu_memory) + 1) if needed(n) <= sum(gpu_memory[:n])), None)
    advice = (f"set {setting} to at least {enough}" if enough
              else f"this node's {len(gpu_memory)} GPU(s) cannot hold it: use more or larger GPUs, or 4-bit weights")
    return (f"model '{model_name}' ({parameters / 1e9:.1f} B parameters x {dtype_bytes:g} bytes = "
            f"{weights / 2**30:.1f} GiB of weights) does not fit {gpus} GPU(s) of {min(gpu_memory[:gpus]) / 2**30:.1f} "
            f"GiB: it needs about {needed(gpus) / 2**30:.1f} GiB (weights x {1 / SHARD_WEIGHT_SHARE:g} for the KV cache "
            f"and activations, + {GPU_RESERVE_BYTES / 2**30:g} GiB a GPU); {advice}")


def check_model_fits_gpus(model_name: str, model_dir: str | Path, gpus: int, dtype_bytes: float) -> None:
    """In a job, before it loads a model on CUDA: raise ModelError when the weights cannot fit the job's GPUs
    (their memory as torch sees it on this node), instead of failing with out-of-memory minutes into the load."""
    import torch

    from tunelens.errors import ModelError

    memory = [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]
    problem = gpu_fit_problem(model_name, model_dir, gpus, dtype_bytes, memory, "models.<name>.resources.gpus")
    if problem:
        raise ModelError(problem)


def cuda_memory() -> list[int]:
    """Total memory (bytes) of each CUDA device this process sees (driver API through ctypes: no torch import);
    empty without a usable driver."""
    import ctypes

    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return []
    count = ctypes.c_int(0)
    if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return []
    memory = []
    for index in range(count.value):
        device, total = ctypes.c_int(0), ctypes.c_size_t(0)
        if lib.cuDeviceGet(ctypes.byref(device), index) != 0 or lib.cuDeviceTotalMem_v2(ctypes.byref(total), device):
            return []
        memory.append(total.value)
    return memory


def gpu_fit_problems(study: Study, model_dirs: Mapping[str, str | Path], gpu_memory: Sequence[int]) -> list[str]:
    """DAG-time form of check_model_fits_gpus, for a local run whose GPUs are those of this machine
    (`gpu_memory`): every model whose weights are already on disk (`model_dirs`: name -> directory) against its
    resources.gpus, in the dtype its jobs load it in (bfloat16; the fine-tune's 4-bit base is smaller). Models not
    on disk yet (to be downloaded or materialised) and cluster runs (the node is not known) are checked in the job."""
    problems = []
    for name, spec in study.models.items():
        if name in model_dirs:
            problem = gpu_fit_problem(name, model_dirs[name], spec.resources["gpus"], 2, gpu_memory)
            if problem:
                problems.append(problem)
    return problems
