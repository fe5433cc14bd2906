"""CUDA devices and whether a model fits them, read without torch where it can (the driver API through ctypes):
the `device: cuda` check and the GPU-fit checks of tunelens.preflight (DAG time) and of the jobs (before a load).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

if TYPE_CHECKING:
    from tunelens.config import Study


# --------------------------------------------------------------------------------------------- cuda
def _libcuda():
    """The CUDA driver library (ctypes), or None without one."""
    import ctypes

    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def cuda_device_count() -> int:
    """CUDA devices usable by this process (driver API through ctypes: no torch import, ~1 ms)."""
    import ctypes

    lib = _libcuda()
    if lib is None or lib.cuInit(0) != 0:
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


# --------------------------------------------------------------------------------------------- GPU fit
# What a model needs on its GPUs, as tunelens.servers.gpu_bytes_to_load estimates a load: 1.25 x the weights (the
# rest of each GPU holds the KV cache, activations and logits; sharded, load_model caps each GPU's weights at
# SHARD_WEIGHT_SHARE = 1 / 1.25 of its memory) plus 2 GiB a GPU (CUDA context, allocator).
GPU_RESERVE_BYTES = 2 * 2**30
# 4-bit NF4 with double quantisation takes ~4.1 bits a quantised weight; the embeddings and LM head stay in 16 bits.
# 0.6 byte a parameter bounds both for Llama shapes (70B: 0.55).
NF4_BYTES_PER_PARAMETER = 0.6


def gpu_fit_problem(model_name: str, model_dir: str | Path, gpus: int, dtype_bytes: float,
                    gpu_memory: Sequence[int], setting: str | None = None) -> str | None:
    """The problem when model `model_name`'s weights (from its safetensors headers, `dtype_bytes` a parameter)
    do not fit the job's `gpus` GPUs, whose total memory (bytes) is `gpu_memory` (the first `gpus` are used);
    None when they fit or the weights are not known. Needed: weights / SHARD_WEIGHT_SHARE + GPU_RESERVE_BYTES a GPU.
    `setting`: the config key of the GPU count (default models.<model_name>.resources.gpus)."""
    from tunelens.models import SHARD_WEIGHT_SHARE

    setting = setting or f"models.{model_name}.resources.gpus"
    from tunelens.modelfiles import safetensors_parameters

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

    lib = _libcuda()
    if lib is None:
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
            problem = gpu_fit_problem(name, model_dirs[name], spec.resource_settings.gpus, 2, gpu_memory)
            if problem:
                problems.append(problem)
    return problems
