"""Generation stage: run one decoding config over the test prompts and write a generation file.

    generate(test_file, output_file, model_name=..., model_path=..., decoding_config=..., ...)
      -> results/generations/{model}/{variant}/{decoding}.jsonl  + {decoding}.meta.json

Backends
  hf    transformers `generate`, batched with left padding, prompts sorted by token length (less padding),
        KV cache on, the fine-tuned variant through a PEFT adapter (not merged).
  vllm  `vllm.LLM` on the base weights; the fine-tuned variant through `enable_lora` + `LoRARequest`;
        num_beams > 1 through `LLM.beam_search`. Imported only when used.
  auto  vllm when it is importable and usable on this machine, else hf (the choice and why are logged
        and written to the meta file).

Decoding semantics (the same on both backends, written to each meta file's `semantics`):
  - temperature 0 with num_beams 1 is greedy decoding: top_k/top_p are not applied (no sampling).
  - temperature > 0 with num_beams 1 is multinomial sampling with temperature, then top_k (0 = off),
    then top_p (1.0 = off); every parameter is passed explicitly, because transformers defaults top_k to
    50 and vLLM to off.
  - num_beams > 1 with decoding.beam_mode 'beam_search' is deterministic beam search: temperature, top_k
    and top_p are ignored. 'beam_sample' (hf only) samples inside the beams with them.
  - repetition_penalty (1.0 = off) divides positive logits / multiplies negative ones of every token seen in
    the prompt or output (CTRL style, as both engines implement it). vLLM's beam search does not apply it.
  - Stop strings cut the text before the first occurrence (finish_reason 'stop_string'); EOS gives 'stop';
    reaching max_new_tokens gives 'length'. `num_generated_tokens` counts the tokens the model produced,
    the EOS or the tokens spelling the stop string included.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Sequence

from tunelens.generation.decoding import DecodingConfig
from tunelens.generation.completions import DEFAULT_STOP
from tunelens.generation.decoding import check as check_decoding
from tunelens.errors import ConfigError, ModelError
from tunelens.hub import hub_revision
from tunelens.io import library_versions, sha256_dir, write_json_atomic, write_jsonl_atomic
from tunelens.settings import GenerationSection
from tunelens.settings.base import default_of
# The backends and what they share live in their own modules; their names stay importable from here.
from tunelens.generation.backend_hf import (  # noqa: F401
    CPU_AUTO_BATCH, HF_NEUTRAL, KV_MEMORY_SHARE, MAX_AUTO_BATCH, _finish, auto_token_budget, hf_generate_batched,
    STATIC_LEN_BUCKET, hf_generation_config, kv_bytes_per_token, plan_batches, row_bucket, static_len_bucket,
    uses_static_cache,
)
from tunelens.generation.backend_vllm import (  # noqa: F401
    VLLM_NEUTRAL, VllmEngine, _lora_request, _require_vllm, _vllm_beam_search, build_vllm_engine, resolve_backend,
    vllm_generate, vllm_importable, vllm_usable,
)
from tunelens.generation.completions import (  # noqa: F401
    BACKENDS, FINISH_REASONS, SPLIT_FIELDS, Completion, GenerationSettings, PromptRow, _row_seed, as_decoding_config,
    check_context_room, cut_at_stop, describe_semantics, load_prompt_rows,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- one job
def run_completions(
    backend: str,
    model_path: str | Path,
    prompt_rows: Sequence[PromptRow] | None,
    decoding_config: DecodingConfig,
    settings: GenerationSettings,
    *,
    test_file: str | Path | None = None,
    prompt_format: str = "alpaca",
    max_rows: int | None = None,
    adapter_dir: str | Path | None = None,
    device: str = "auto",
    tensor_parallel_size: int = 1,
    vllm_options: dict | None = None,
    engine: VllmEngine | None = None,
    hf_model: tuple | None = None,
    static_cache: bool | str = False,
    merge_adapter: bool | str = False,
) -> tuple[list[PromptRow], list[Completion], dict]:
    """Load the model on `backend` ('hf' or 'vllm'), build/validate prompts, generate; plus timings.

    Prompts are validated (empty, over-long) right after the tokenizer loads and before the model does.
    `static_cache` / `merge_adapter` (hf): True, False or "auto": see resolve_static_cache / resolve_on_device.
    Returns (prompt rows, completions in row order, {'load_time_s', 'generation_time_s', 'device', 'batches',
    'kv_cache', 'adapter_merged'}).
    """
    from tunelens.models import load_tokenizer

    # The generation server passes the tokenizer it keeps with the model: no tokenizer load per request.
    tokenizer = hf_model[1] if hf_model is not None else load_tokenizer(model_path)
    if prompt_rows is None:
        prompt_rows = load_prompt_rows(
            test_file, prompt_format, tokenizer, max_prompt_tokens=settings.max_prompt_tokens, max_rows=max_rows
        )
    check_context_room(prompt_rows, settings.max_new_tokens, model_path, test_file)
    prompts = [row.prompt for row in prompt_rows]
    batches: list[dict] = []  # hf: the batches actually run (rows, padded prompt length, out-of-memory splits)
    started = time.perf_counter()
    if backend == "hf":
        from tunelens.models import input_device, load_model, model_devices, pick_device

        # hf_model: (model, tokenizer) already loaded with this adapter (the generation server's cache).
        model, tokenizer = hf_model or load_model(
            model_path, adapter_dir=adapter_dir, device=device,
            merge_adapter=resolve_on_device(merge_adapter, pick_device(device)), gpus=tensor_parallel_size,
        )
        used_device = str(input_device(model))
        devices = model_devices(model)
        sharded_over = devices if len(devices) > 1 else None
        load_time = time.perf_counter() - started
        started = time.perf_counter()
        settings = with_static_cache(settings, static_cache, model)
        completions = hf_generate_batched(model, tokenizer, prompts, decoding_config, settings, batches)
        kv_cache = "static" if uses_static_cache(decoding_config, settings, model) else "dynamic"
        merged = bool(getattr(model, "tunelens_adapter_merged", False))
    elif backend == "vllm":
        options = dict(vllm_options or {})
        if adapter_dir is not None:
            rank = json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("r", 0)
            if rank > options.get("max_lora_rank", 64):
                raise ConfigError(
                    f"adapter '{adapter_dir}' has LoRA rank {rank}, above generation.vllm_max_lora_rank="
                    f"{options.get('max_lora_rank', 64)}; raise it to at least {rank}"
                )
        owned = engine is None
        if owned:
            engine = build_vllm_engine(
                model_path, enable_lora=adapter_dir is not None, tensor_parallel_size=tensor_parallel_size,
                seed=settings.seed, device=device, **options,
            )
        used_device = "cpu" if engine.on_cpu else "cuda"
        kv_cache, merged, sharded_over = "paged (vLLM)", False, None
        load_time = time.perf_counter() - started if owned else 0.0
        started = time.perf_counter()
        try:
            completions = vllm_generate(
                engine, prompts, decoding_config, settings,
                row_ids=[row.id for row in prompt_rows], adapter_dir=adapter_dir,
            )
        finally:
            if owned:
                engine.shutdown()
    else:
        raise ConfigError(f"backend '{backend}' is not a concrete backend; use hf or vllm (resolve 'auto' first)")
    timing = {
        "load_time_s": round(load_time, 3),
        "generation_time_s": round(time.perf_counter() - started, 3),
        "device": used_device,
        "batches": batches or None,
        "kv_cache": kv_cache,
        "adapter_merged": merged if adapter_dir is not None else None,
        "sharded_over": sharded_over,
    }
    return list(prompt_rows), completions, timing


def resolve_on_device(setting: bool | str, device: str) -> bool:
    """A generation speed setting (`generation.static_cache`, `generation.merge_adapter`): True, False, or "auto" =
    on CUDA only (where it pays; on CPU outputs stay those of the dynamic cache and the PEFT adapter)."""
    if setting == "auto":
        return str(device).startswith("cuda")
    return bool(setting)


# generation.static_cache auto with a compiling backend (inductor, cudagraphs) or eager: on CUDA from this many new
# tokens a row. Measured on an H200 (7B shape, 36 rows, BENCHMARKS.md issue 21): the inductor-compiled static step
# takes 18 ms against ~40 ms dynamic, and compiling one shape takes ~33 s; at 64 new tokens a request saves ~1.4 s,
# so a study's ~9 sampling configs per variant never repay the compile. The graphs backend compiles nothing (a
# capture costs one forward), so with it auto means on CUDA at any length.
STATIC_AUTO_MIN_NEW_TOKENS = 128


def resolve_static_cache(setting: bool | str, device: str, max_new_tokens: int, compile_backend: str = "graphs") -> bool:
    """generation.static_cache: True, False, or "auto" = on CUDA, with compile_backend graphs always, with the
    others when max_new_tokens >= STATIC_AUTO_MIN_NEW_TOKENS."""
    if setting == "auto":
        return str(device).startswith("cuda") and (
            compile_backend == "graphs" or max_new_tokens >= STATIC_AUTO_MIN_NEW_TOKENS)
    return bool(setting)


def with_static_cache(settings: GenerationSettings, setting: bool | str, model) -> GenerationSettings:
    """`settings` with generation.static_cache resolved for a loaded hf model (generate and early-exit jobs). A
    model sharded over GPUs decodes with the dynamic cache: the static-cache step is measured on one GPU only
    (BENCHMARKS.md issue 21), and accelerate's per-block device hooks break its graphs."""
    from tunelens.models import input_device, model_devices

    sharded = len(model_devices(model)) > 1
    return dataclasses.replace(settings, static_cache=not sharded and resolve_static_cache(
        setting, str(input_device(model)), settings.max_new_tokens, settings.compile_backend))


def speed_semantics(kv_cache: str, adapter_merged: bool | None, compile_backend: str, device: str,
                    num_beams: int = 1) -> str:
    """What the sidecar's semantics add about the cache, the attention kernels and the adapter (empty on CPU for
    the dynamic, unmerged path, so those sidecars keep their bytes)."""
    parts = []
    if kv_cache == "static":
        on_cuda = str(device).startswith("cuda")
        if on_cuda and compile_backend == "graphs":
            compiled = ("the one-token decoding step replayed from a CUDA graph captured once per model, depth and "
                        "batch shape (not compiled; the same kernels as the eager step)")
        elif on_cuda and compile_backend != "eager":
            compiled = f"decoding step compiled ({compile_backend})"
        else:
            compiled = "not compiled"
        parts.append(f" Static KV cache: rows padded to a bucket with copies of the batch's last prompt (dropped) "
                     f"and the cache to a multiple of {static_len_bucket(compile_backend)} tokens; {compiled}. "
                     f"Greedy rows equal the dynamic cache's; sampled rows depend on the bucket through the random "
                     f"stream.")
        if num_beams > 1:
            parts.append(" Beam search on the static cache: each step reorders the beams' keys and values in place "
                         "over the generated positions only (a row's beams share its prompt's).")
    if str(device).startswith("cuda") and kv_cache in ("static", "dynamic"):  # the hf backend (vLLM: its own kernels)
        parts.append(" Attention: the decoding step's as two batched matrix products (float32 scores and softmax), "
                     "prompts through PyTorch SDPA without cuDNN's kernel, which is not reproducible run to run.")
    if adapter_merged:
        parts.append(" Fine-tuned weights: the LoRA adapter merged into a copy of the base weights "
                     "(W + scale * B @ A, in the model's dtype), not applied per layer by PEFT.")
    return "".join(parts)


def adapter_record(adapter_dir: str | Path | None) -> dict | None:
    """What identifies an adapter in a sidecar: its directory and the sha256 of its files."""
    return None if adapter_dir is None else {"dir": str(adapter_dir), "sha256": sha256_dir(adapter_dir)}


def check_variant(model_name: str, variant: str, adapter_dir: str | Path | None) -> None:
    """base runs without an adapter, finetuned with one: a mix-up would silently score the wrong model."""
    if variant == "finetuned" and adapter_dir is None:
        raise ConfigError(f"model '{model_name}': variant 'finetuned' needs an adapter directory")
    if variant == "base" and adapter_dir is not None:
        raise ConfigError(f"model '{model_name}': variant 'base' was given an adapter ({adapter_dir})")


def generation_rows(prompt_rows, completions: Sequence[Completion]) -> list[dict]:
    """Rows of a generation file (docs/ARCHITECTURE.md), one per prompt row, in test-file order."""
    return [
        {
            "id": row.id,
            "prompt": row.prompt,
            "reference": row.reference,
            "generated": completion.text,
            "num_generated_tokens": completion.num_generated_tokens,
            "finish_reason": completion.finish_reason,
        }
        for row, completion in zip(prompt_rows, completions)
    ]


def completion_summary(completions: Sequence[Completion], generation_time_s: float) -> dict:
    """The meta fields that describe what was generated: rows, tokens, speed (tokens/s), finish reasons."""
    generated_tokens = sum(c.num_generated_tokens for c in completions)
    return {
        "n_rows": len(completions),
        "generation_time_s": generation_time_s,
        "generated_tokens": generated_tokens,
        "tokens_per_s": round(generated_tokens / generation_time_s, 2) if generation_time_s > 0 else None,
        "finish_reasons": {r: sum(c.finish_reason == r for c in completions) for r in FINISH_REASONS},
    }


def generation_output(
    test_file: str | Path,
    *,
    model_name: str,
    model_path: str | Path,
    model_source: str | None = None,
    variant: str = "base",
    adapter_dir: str | Path | None = None,
    prompt_format: str = "alpaca",
    decoding_config: DecodingConfig | dict,
    max_new_tokens: int = 128,
    stop: Sequence[str] = DEFAULT_STOP,
    seed: int = 1234,
    beam_mode: str = "beam_search",
    backend: str = "auto",
    batch_size: int | str = "auto",
    max_prompt_tokens: int = 1024,
    max_test_rows: int | None = None,
    device: str = "auto",
    gpus: int = 1,
    vllm_options: dict | None = None,
    engine: VllmEngine | None = None,
    hf_model: tuple | None = None,
    static_cache: bool | str = "auto",
    compile_backend: str = default_of(GenerationSection, "compile_backend"),
    merge_adapter: bool | str = "auto",
) -> tuple[dict, list[dict]]:
    """What `generate` writes, computed but not written: (meta, rows). The generation server
    (tunelens.generation.genserver) calls this with a model/engine it keeps loaded (`engine` for vLLM, `hf_model`
    = (model, tokenizer) for hf); the job writes the files itself, so a server never writes outputs."""
    decoding_config = as_decoding_config(decoding_config)
    settings = GenerationSettings(
        max_new_tokens=max_new_tokens, stop=tuple(stop), seed=seed, beam_mode=beam_mode,
        batch_size=batch_size, max_prompt_tokens=max_prompt_tokens, compile_backend=compile_backend,
    )
    check_variant(model_name, variant, adapter_dir)
    if adapter_dir is not None and not (Path(adapter_dir) / "adapter_config.json").exists():
        raise ModelError(f"adapter directory '{adapter_dir}' has no adapter_config.json")
    concrete, reason = resolve_backend(backend, device) if engine is None else ("vllm", "engine passed in")
    check_decoding(decoding_config, beam_mode, [concrete], f"decoding config '{decoding_config.name}' "
                   f"(backend {concrete}: {reason})")
    semantics = describe_semantics(decoding_config, beam_mode, concrete)
    log.info("model %s (%s), variant %s, config %s: backend %s (%s)", model_name, model_path, variant,
             decoding_config.name, concrete, reason)
    log.info("semantics: %s", semantics)
    prompt_rows, completions, timing = run_completions(
        concrete, model_path, None, decoding_config, settings, test_file=test_file, prompt_format=prompt_format,
        max_rows=max_test_rows, adapter_dir=adapter_dir, device=device, tensor_parallel_size=gpus or 1,
        vllm_options=vllm_options, engine=engine, hf_model=hf_model, static_cache=static_cache,
        merge_adapter=merge_adapter,
    )
    semantics += speed_semantics(timing["kv_cache"], timing["adapter_merged"], compile_backend, timing["device"],
                                 decoding_config.num_beams)
    if timing["sharded_over"]:
        semantics += (f" Model sharded by decoder blocks over {len(timing['sharded_over'])} GPUs "
                      f"({', '.join(timing['sharded_over'])}); dynamic KV cache (the static cache is off when sharded).")
    summary = completion_summary(completions, timing["generation_time_s"])
    meta = {
        "backend": concrete,
        "backend_reason": reason,
        "model": {"name": model_name, "source": model_source or str(model_path), "path": str(model_path),
                  "revision": hub_revision(model_path)},
        "variant": variant,
        "adapter": adapter_record(adapter_dir),
        "decoding_config": decoding_config.as_dict(),
        "semantics": semantics,
        **settings.as_meta(),
        "prompt_format": prompt_format,
        "test_file": str(test_file),
        "device": timing["device"],
        "tensor_parallel_size": (gpus or 1) if concrete == "vllm" else None,
        "load_time_s": timing["load_time_s"],
        "batches": timing["batches"],
        "kv_cache": timing["kv_cache"],
        "adapter_merged": timing["adapter_merged"],
        # hf on several GPUs: the devices the model's blocks are on (absent on one device: old sidecars' bytes).
        **({"sharded_over": timing["sharded_over"]} if timing["sharded_over"] else {}),
        **summary,
        "versions": library_versions(),
    }
    return meta, generation_rows(prompt_rows, completions)


def write_generation(output_file: str | Path, meta_file: str | Path | None, meta: dict, rows: list[dict]) -> None:
    """Write a generation file and its sidecar atomically, the meta first (a killed job leaves no
    complete-looking generation file)."""
    output_file = Path(output_file)
    meta_file = Path(meta_file) if meta_file else output_file.with_suffix(".meta.json")
    write_json_atomic(meta_file, meta)
    write_jsonl_atomic(output_file, rows)
    log.info("%d rows, %d tokens in %.1f s (load %.1f s) -> %s", len(rows), meta["generated_tokens"],
             meta["generation_time_s"], meta["load_time_s"], output_file)


def generate(test_file: str | Path, output_file: str | Path, meta_file: str | Path | None = None,
             **options) -> dict:
    """Generate for every test row under one decoding config; write the rows and the `.meta.json` sidecar.

    `options` are generation_output's keyword arguments (model_name, model_path, decoding_config, ...; the
    one signature of a generation job). Output rows (ARCHITECTURE.md): id, prompt, reference, generated,
    num_generated_tokens, finish_reason, in test-file order. Both files are written atomically (temp file +
    rename), the meta first, so a killed job leaves no complete-looking generation file. Returns the meta dict.
    `gpus` is the job's GPU count: vLLM's tensor_parallel_size. Times are seconds, tokens_per_s is
    generated tokens per second of generation time (load excluded).
    """
    meta, rows = generation_output(test_file, **options)
    write_generation(output_file, meta_file, meta, rows)
    return meta
