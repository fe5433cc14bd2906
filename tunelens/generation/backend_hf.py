"""hf backend: transformers `generate`, batched with left padding, prompts sorted by token length, batch sizes
from the free GPU memory (batch_size auto). Used through tunelens.generation.generate."""

from __future__ import annotations

import collections
import contextlib
import gc
import json
import logging
import time
from typing import Sequence

from tunelens.generation import graphs
from tunelens.generation.completions import Completion, GenerationSettings, cut_at_stop
from tunelens.generation.decoding import DecodingConfig, hf_generation_kwargs
from tunelens.errors import ModelError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- hf backend
HF_NEUTRAL = {"min_p": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "repetition_penalty": 1.0,
              "no_repeat_ngram_size": 0, "length_penalty": 1.0}


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
    static = uses_static_cache(dc, settings, model)
    cache: dict = {}
    if static and graphed_decoding(model, settings):
        # tunelens passes its own StaticCache (tunelens.generation.graphs) and replays the decoding step from a
        # CUDA graph; transformers' own compile stays off.
        cache["disable_compile"] = True
    elif static:
        cache["cache_implementation"] = "static"
        if settings.compile_backend in ("eager", "graphs"):
            cache["disable_compile"] = True
        else:
            from transformers import CompileConfig

            # dynamic=False: the buckets keep the shapes few, and each is compiled (captured) once per model.
            cache["compile_config"] = (
                CompileConfig(backend="cudagraphs", mode=None, fullgraph=False, dynamic=False)
                if settings.compile_backend == "cudagraphs"
                else CompileConfig(mode="reduce-overhead", fullgraph=False, dynamic=False)
            )
    return GenerationConfig(
        **cache,
        # Every warper the config does not set is neutral; the decoding parameters override (tunelens.generation.decoding).
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


def graphed_decoding(model, settings: GenerationSettings) -> bool:
    """Whether a static-cache request replays its decoding step from tunelens' CUDA graphs (compile_backend
    graphs): not for a PEFT-wrapped model (its generate goes around the wrapped forward), which then runs
    transformers' static cache eagerly. On CPU the same path runs its buffers eagerly."""
    return settings.compile_backend == "graphs" and not hasattr(model, "peft_config")


def uses_static_cache(decoding_config: DecodingConfig, settings: GenerationSettings, model=None) -> bool:
    """Whether a request decodes with the static KV cache: asked for, and for beam search only on tunelens' graphed
    path (`model` given and `graphed_decoding`), whose cache reorders the beams in place
    (graphs.reorder_generated_only). transformers' own static cache replaces its tensors on every beam reorder, so
    its beam search keeps the dynamic cache."""
    if not getattr(settings, "static_cache", False):
        return False
    if not decoding_config.is_beam:
        return True
    return model is not None and graphed_decoding(model, settings)


# Static cache: the cache length is rounded up to a multiple of this, and rows to `row_bucket`, so that the
# compiled decoding step sees few shapes (one per bucket) across batches, requests and decoding configs.
STATIC_LEN_BUCKET = 256
# With compile_backend graphs (or eager) a new shape costs one capture (0.06 s on a 7B shape), not a compile, so
# the cache length is rounded to a finer multiple: each step's attention reads the whole static cache, and at
# 0.5 MB a token (7B, no GQA) the padding costs as much as the weights (BENCHMARKS.md, issue 21).
GRAPHS_LEN_BUCKET = 64


def static_len_bucket(compile_backend: str) -> int:
    """The multiple a static cache's length is rounded to for this compile backend."""
    return GRAPHS_LEN_BUCKET if compile_backend in ("graphs", "eager") else STATIC_LEN_BUCKET


def row_bucket(rows: int, num_beams: int = 1) -> int:
    """Rows a static-cache batch is padded to: the next power of two up to 64, then the next multiple of 64.

    Beam search pads less, to the next power of two up to 4 and then the next multiple of 4: every filler row
    costs `num_beams` sequences of compute and cache, and a graph capture is cheap (0.06 s on a 7B shape), so more
    shapes cost little."""
    if num_beams > 1:
        return 1 << max(rows - 1, 0).bit_length() if rows <= 4 else -(-rows // 4) * 4
    if rows <= 64:
        return 1 << max(rows - 1, 0).bit_length()
    return -(-rows // 64) * 64


def static_cache_len(longest_prompt: int, max_new_tokens: int, bucket: int = STATIC_LEN_BUCKET) -> int:
    """Static cache length for a request whose longest prompt has `longest_prompt` tokens."""
    return -(-(longest_prompt + max_new_tokens) // bucket) * bucket


def _allow_recompiles() -> None:
    """One compiled step per (model, row bucket, cache length): more than torch's default 8 recompiles of one
    code object in a server that keeps two models; past the limit dynamo would silently run eager."""
    import torch._dynamo

    config = torch._dynamo.config
    config.recompile_limit = max(getattr(config, "recompile_limit", 8), 64)
    if hasattr(config, "accumulated_recompile_limit"):
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 512)


def reproducible_attention(device):
    """The attention generation runs on `device`: on CUDA, the decoding step's attention as two batched matrix
    products (`decode_attention`) and every other attention through PyTorch's SDPA without cuDNN's backend.

    On the H200 (torch 2.11, cu130) SDPA picks cuDNN's fused attention for the decoding step with the padding mask,
    and that kernel's output differs from call to call on the same inputs: the same greedy request's logits
    differed from the second decoding step on, and a 36-row sampled request kept only 13-18 rows equal run to run,
    with or without CUDA graphs and with torch.use_deterministic_algorithms. Memory-efficient attention
    reproduced 36 of 36 rows and all logits bit for bit, but at real size (192 rows, a 448-token static cache) it
    made the whole decoding step ~1.5x slower than cuDNN's (BENCHMARKS.md, issue 21). A no-op elsewhere."""
    import contextlib

    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    stack = contextlib.ExitStack()
    stack.enter_context(sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]))
    if _float32_scores_supported(device):
        stack.enter_context(_decode_attention_installed())
    return stack


_FLOAT32_SCORES: dict[str, bool] = {}


def _float32_scores_supported(device) -> bool:
    """Whether this torch multiplies bf16 matrices into float32 on `device` (`torch.bmm(..., out_dtype=)`, CUDA
    since torch 2.8); checked once per device, outside any graph capture. Without it the step stays on SDPA."""
    import torch

    key = str(device)
    if key not in _FLOAT32_SCORES:
        try:
            a = torch.ones(1, 1, 8, dtype=torch.bfloat16, device=device)
            _FLOAT32_SCORES[key] = torch.bmm(a, a.transpose(1, 2), out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, NotImplementedError, TypeError, AssertionError) as exc:  # Assertion: no CUDA build
            log.warning("decoding attention stays on SDPA: torch.bmm(out_dtype=float32) is not available on %s (%s)",
                        key, exc)
            _FLOAT32_SCORES[key] = False
    return _FLOAT32_SCORES[key]


@contextlib.contextmanager
def _decode_attention_installed():
    """transformers' "sdpa" attention answers the decoding step with `decode_attention` while inside."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    previous = ALL_ATTENTION_FUNCTIONS._local_mapping.get("sdpa")
    ALL_ATTENTION_FUNCTIONS["sdpa"] = decode_attention
    try:
        yield
    finally:
        if previous is None:
            del ALL_ATTENTION_FUNCTIONS["sdpa"]
        else:
            ALL_ATTENTION_FUNCTIONS["sdpa"] = previous


def decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     is_causal=None, **kwargs):
    """transformers' SDPA attention, with the decoding step (one query per row) as two batched matrix products.

    For one new token, attention is a matrix-vector product per row and head against the whole (static) cache:
    it only has to read the keys and values once. `q @ K^T` (accumulated and returned in float32, as SDPA's kernels
    keep their scores), the mask, softmax in float32, then `p @ V`: plain cuBLAS products, the same result on the
    same inputs every call, and no SDPA kernel choice. Grouped-query heads read their shared key and value heads
    without copies. Everything else (prompts, training, dropout, other arguments) goes to transformers' SDPA."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rows, heads, queries, dim = query.shape
    kv_heads = key.shape[1]
    supported_dtype = query.dtype == torch.float32 or (query.is_cuda and query.dtype in (torch.bfloat16, torch.float16))
    if (queries != 1 or (dropout and module.training) or kwargs.get("position_bias") is not None
            or kwargs.get("s_aux") is not None or heads % kv_heads or not supported_dtype):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    length = key.shape[2]
    scale = dim ** -0.5 if scaling is None else scaling
    q = query.reshape(rows * kv_heads, heads // kv_heads, dim)
    k = key.reshape(rows * kv_heads, length, dim)
    if query.dtype == torch.float32:
        scores = torch.bmm(q, k.transpose(1, 2))
    else:
        scores = torch.bmm(q, k.transpose(1, 2), out_dtype=torch.float32)
    scores = scores.view(rows, kv_heads, heads // kv_heads, length).mul_(scale)
    if attention_mask is not None:
        mask = attention_mask[:, :, :, :length]  # [rows, 1, 1, length] broadcasts over the head groups
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.to(torch.float32)
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.bmm(probs.view(rows * kv_heads, heads // kv_heads, length), value.reshape(rows * kv_heads, length, dim))
    return out.view(rows, 1, heads, dim), None


# (id(tokenizer), stop strings) -> (tokenizer, its StopStringCriteria), most recently used last.
_STOP_CRITERIA: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()


def stop_string_criteria(tokenizer, stop: Sequence[str]):
    """transformers' StopStringCriteria for `stop`, built once per tokenizer and kept (a StoppingCriteriaList).

    `generate(stop_strings=..., tokenizer=...)` builds it on every call, and its own cache never hits: the key is
    the vocabulary as a tuple in `get_vocab()` order, which changes from call to call. On the H200 bench that
    rebuild took 0.65 s of a 1.8 s request (36 rows x 64 tokens; BENCHMARKS.md, issue 21). The criterion is the
    same class with the same stop strings, so what stops where is unchanged."""
    from transformers import StoppingCriteriaList
    from transformers.generation.stopping_criteria import StopStringCriteria

    key = (id(tokenizer), tuple(stop))
    entry = _STOP_CRITERIA.get(key)
    if entry is None or entry[0] is not tokenizer:
        entry = (tokenizer, StopStringCriteria(tokenizer=tokenizer, stop_strings=list(stop)))
        _STOP_CRITERIA[key] = entry
        while len(_STOP_CRITERIA) > 8:
            _STOP_CRITERIA.popitem(last=False)
    _STOP_CRITERIA.move_to_end(key)
    return StoppingCriteriaList([entry[1]])


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


def gpu_memory_state(device) -> str:
    """One line on `device`'s memory for an out-of-memory warning: free/total as the driver sees it (other processes
    included), what this process's allocator holds and uses, and the decoding caches the models here keep."""
    import torch

    if device.type != "cuda":
        return "not a GPU"
    gib = 2**30
    free, total = torch.cuda.mem_get_info(device)
    return (f"GPU free {free / gib:.1f} of {total / gib:.1f} GiB; this process: allocated "
            f"{torch.cuda.memory_allocated(device) / gib:.1f} GiB, reserved {torch.cuda.memory_reserved(device) / gib:.1f}, "
            f"decoding caches kept {graphs.held_bytes_all() / gib:.1f}")


def auto_token_budget(model) -> tuple[int, int] | None:
    """(tokens of KV cache one batch may hold, bytes per row for logits) on this device; None on CPU.

    A model sharded over several GPUs keeps each decoder block's cache on that block's GPU: the budget is the
    smallest over its GPUs of (free memory / the cache bytes per token of the blocks it holds)."""
    import torch

    from tunelens.models import decoder_layers, input_device

    if input_device(model).type != "cuda":
        return None
    layers_on: dict = {}
    for layer in decoder_layers(model):
        where = next(layer.parameters()).device
        layers_on[where] = layers_on.get(where, 0) + 1
    per_layer = kv_bytes_per_token(model) / max(sum(layers_on.values()), 1)
    tokens = None
    for device, count in layers_on.items():
        if device.type != "cuda":
            continue
        free, _ = torch.cuda.mem_get_info(device)
        # Memory the allocator holds but no tensor uses is free to this process too.
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        if device == input_device(model):
            # The decoding cache this model keeps between batches is reused or released for the next one.
            free += graphs.held_bytes(model)
        room = int(KV_MEMORY_SHARE * free / (per_layer * count))
        tokens = room if tokens is None else min(tokens, room)
    vocab = model.config.get_text_config().vocab_size
    # The step's logits and the warpers' sorted copies grow with rows (and beams), not with tokens: plan_batches
    # charges each row 16 bytes x vocab of them, converted to KV-cache tokens.
    return int(tokens or 0), 16 * vocab


def plan_batches(lengths: Sequence[int], order: Sequence[int], settings: GenerationSettings, num_beams: int,
                 budget: tuple[int, int] | None, kv_bytes: int = 0, static_len: int | None = None) -> list[list[int]]:
    """Split the length-sorted row order (longest first) into batches.

    A fixed batch_size cuts every `batch_size` rows. "auto" with a budget (CUDA) grows each batch while
    rows x (its longest prompt + max_new_tokens) x beams tokens of KV cache, plus each row's logits, stay
    within the budget; without one (CPU) it cuts every CPU_AUTO_BATCH rows. With a static cache
    (`static_len`) a batch holds row_bucket(rows, beams) x static_len x beams tokens of cache whatever its prompts.
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
        if static_len:
            tokens = row_bucket(rows, num_beams) * static_len * num_beams
            extra_tokens = (row_bucket(rows, num_beams) * num_beams * row_bytes) // max(kv_bytes, 1)
        else:
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
    # The stop strings go in as a criterion built once per tokenizer (stop_string_criteria), not rebuilt per call.
    generation_config.stop_strings = None
    stopping = stop_string_criteria(tokenizer, settings.stop) if settings.stop else None
    eos_ids = set(generation_config.eos_token_id)
    pad_id = generation_config.pad_token_id
    from tunelens.models import input_device

    device = input_device(model)  # a sharded model's first block and embeddings: where the inputs go
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only: new tokens must follow the prompt directly
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    # Other models' decoding caches go before the memory budget is read, so that the batches planned here do not
    # depend on which variant this process answered before.
    graphs.release_others(model)
    budget = auto_token_budget(model) if settings.batch_size == "auto" else None
    static_len = None
    num_beams = generation_config.num_beams
    static = uses_static_cache(decoding_config, settings, model)
    graphed = static and graphed_decoding(model, settings)
    if static:
        static_len = static_cache_len(max(lengths), settings.max_new_tokens,
                                      static_len_bucket(settings.compile_backend))
    if generation_config.cache_implementation == "static":  # transformers' own static cache (not graphed)
        generation_config.max_cache_len = static_len
        if device.type == "cuda" and not generation_config.disable_compile:
            _allow_recompiles()
    pending = plan_batches(lengths, order, settings, num_beams, budget,
                           kv_bytes_per_token(model) if budget else 0, static_len)
    results: list[Completion | None] = [None] * len(prompts)
    batch_index = 0
    try:
        while pending:
            indices = pending.pop(0)
            # Prompts are full texts (template included): no extra BOS beyond what the template holds.
            # A static cache pads the batch with copies of its last (shortest) prompt up to the row bucket; their
            # outputs are dropped. Sampled rows then depend on the bucket through the random stream, as they depend
            # on the batches already; greedy rows do not.
            filler = row_bucket(len(indices), num_beams) - len(indices) if static_len else 0
            encoded = tokenizer(
                [prompts[i] for i in indices] + [prompts[indices[-1]]] * filler, return_tensors="pt", padding=True,
                add_special_tokens=False,
            ).to(device)
            torch.manual_seed(settings.seed + batch_index)
            try:
                with torch.inference_mode(), reproducible_attention(device):
                    if graphed:
                        store = graphs.decode_graphs(model)
                        kv = store.cache_for((len(indices) + filler) * num_beams, static_len)
                        if num_beams > 1:
                            graphs.reorder_generated_only(kv, int(encoded["input_ids"].shape[1]))
                        with store.installed(kv):
                            output = model.generate(
                                **encoded, generation_config=generation_config, past_key_values=kv,
                                stopping_criteria=stopping,
                            )
                    else:
                        output = model.generate(
                            **encoded,
                            generation_config=generation_config,
                            stopping_criteria=stopping,
                        )
            except torch.OutOfMemoryError:
                del encoded
                graphs.release(model)
                if device.type == "cuda":
                    gc.collect()  # whatever a reference cycle still holds of the failed batch
                    torch.cuda.empty_cache()
                if len(indices) == 1:
                    raise ModelError(
                        f"out of memory generating a single prompt of {lengths[indices[0]]} tokens with "
                        f"max_new_tokens={settings.max_new_tokens}, num_beams={num_beams}"
                    ) from None
                half = len(indices) // 2
                log.warning("batch of %d rows ran out of memory (%s); retrying as %d + %d rows", len(indices),
                            gpu_memory_state(device), half, len(indices) - half)
                if batch_log is not None:
                    batch_log.append({"out_of_memory": len(indices)})
                pending[:0] = [indices[:half], indices[half:]]
                continue
            if batch_log is not None:
                entry = {"rows": len(indices), "prompt_tokens": int(encoded["input_ids"].shape[1])}
                if static_len:
                    entry.update(padded_rows=len(indices) + filler, cache_len=static_len)
                batch_log.append(entry)
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
