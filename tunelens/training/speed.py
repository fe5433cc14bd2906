"""How the fine-tune uses the GPU: packed rows kept apart, and the autotuner for checkpointing and micro-batch."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from tunelens.io import write_json_atomic
from tunelens.settings.finetune import FinetuneSection
from tunelens.training.plan import AUTOTUNE_FILE, TrainingPlan

log = logging.getLogger("tunelens.training.finetune")

# Attention kernels that read TRL's packed-sequence boundaries (cu_seq_lens / position_ids) by themselves.
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")


def packed_attention_mask(position_ids, dtype=None):
    """Block-diagonal causal mask for rows packed into one sequence, from their position ids.

    A packed row starts where its position id is 0 (TRL's padding-free collator restarts them per row).
    Returns [batch, 1, T, T]: boolean (True = may attend) for SDPA / flex, or additive (0 / dtype min)
    when `dtype` is given, the form eager attention adds to its scores.
    """
    import torch

    segment = (position_ids == 0).cumsum(-1)  # [B, T]: which packed row each token belongs to
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (segment[:, :, None] == segment[:, None, :]) & causal
    allowed = allowed[:, None]
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def attention_implementation(model) -> str:
    """The attention kernel family the model runs (transformers' default: SDPA)."""
    return getattr(model.config, "_attn_implementation", None) or "sdpa"


def separate_packed_rows(model) -> str:
    """Make packed rows attend only to themselves, whatever the attention kernel.

    TRL packs padding-free: rows are concatenated and their boundaries travel as `position_ids` (and
    `cu_seq_lens_*`), which only flash-attention's varlen kernels read. Under SDPA or eager attention a packed
    row would attend to the rows before it. For those kernels a forward pre-hook on the decoder turns the
    position ids into an explicit block-diagonal mask. Returns how rows are separated (recorded in metrics).
    """
    implementation = attention_implementation(model)
    if implementation in VARLEN_ATTENTION:
        return f"{implementation} varlen kernel (cu_seq_lens)"
    eager = implementation == "eager"

    def hook(module, args, kwargs):
        position_ids = kwargs.get("position_ids")
        if kwargs.get("attention_mask") is not None or position_ids is None:
            return None
        if position_ids.shape[0] == 1 and int((position_ids == 0).sum()) <= 1:
            return None  # one row: the plain causal mask is already right
        dtype = next(module.parameters()).dtype if eager else None
        kwargs["attention_mask"] = packed_attention_mask(position_ids, dtype)
        return args, kwargs

    model.get_decoder().register_forward_pre_hook(hook, with_kwargs=True)
    return f"block-diagonal mask for {implementation} attention"



def packed_sequences_as_rows(collator) -> bool:
    """Collate a micro-batch of packed sequences as one row each ([sequences, longest]), not all in one row.

    TRL's packing concatenates every packed sequence of a micro-batch into a single row (padding-free), which
    flash-attention's varlen kernels split again by `cu_seq_lens`. Under SDPA or eager attention that row is one
    attention block of (sequences x length)^2 scores with a block-diagonal mask: at 8 sequences of 512 tokens, 8x
    the attention work of 8 rows of 512. As rows, each packed sequence attends within itself, its packed rows kept
    apart by the position ids as before (`separate_packed_rows`); the tokens, labels and loss are the same: each
    packed row's first token is not predicted from the row before it, and rows shorter than the longest are
    padded (pad tokens carry no loss and are not counted as tokens). Returns whether the collator was changed
    (TRL's language-modeling collator with packing only)."""
    if not (getattr(collator, "padding_free", False) and hasattr(collator, "return_position_ids")
            and hasattr(collator, "torch_call")):
        return False
    collator.padding_free = False
    collator.return_position_ids = True  # from each example's seq_lengths: restarting at every packed row
    rows = collator.torch_call

    def torch_call(examples):
        out = rows(examples)
        out["labels"][out["position_ids"] == 0] = -100  # as TRL's padding-free batches
        out.pop("attention_mask", None)  # the block-diagonal mask comes from the position ids
        return out

    collator.torch_call = torch_call
    return True


# --------------------------------------------------------------------------------------------- lean LoRA layers
def _is_4bit(module) -> bool:
    return type(module).__name__ == "Linear4bit" and hasattr(getattr(module, "weight", None), "quant_state")


def lean_lora_forward(model) -> int:
    """Give every LoRA linear layer of `model` (PEFT) a shorter forward: the same computation in fewer kernels.

    PEFT's forward per layer runs `base(x)`, a defensive `clone()` (4-bit bases), `lora_B(lora_A(dropout(x)))`,
    `* scaling` and `+ result`: six kernels and their backward, plus Python checks, for each of the 224 layers of a
    7B model with all-linear targets. Here: `base(x)`, dropout, `lora_A`, and one `addmm` that adds
    `scaling * lora_B(...)` to the base output (the multiply and the add happen in the matmul's epilogue, rounded
    once instead of three times). The dropout module is the same, so it draws the same random numbers. The base is
    the dequantized weight when `dequantize_base_weights` left one. Layers in any other state (adapters disabled or
    merged, several adapters, DoRA or other variants, a LoRA bias, extra arguments) take PEFT's own forward.
    Returns the number of layers changed.
    """
    import torch
    import torch.nn.functional as F

    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency of the stage
        return 0
    changed = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or not isinstance(module, torch.nn.Module):
            continue
        if not hasattr(module, "base_layer") or not isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict):
            continue
        if getattr(module, "_tunelens_lean", False):
            continue
        original = module.forward

        def forward(x, *args, _module=module, _original=original, **kwargs):
            m = _module
            active = m.active_adapters
            if (args or kwargs or m.disable_adapters or m.merged or len(active) != 1 or active[0] not in m.lora_A
                    or active[0] in m.lora_variant or m.lora_B[active[0]].bias is not None):
                return _original(x, *args, **kwargs)
            name = active[0]
            lora_a, lora_b = m.lora_A[name], m.lora_B[name]
            autocast = torch.is_autocast_enabled(x.device.type)
            dense = getattr(m.base_layer, "_tunelens_dense_weight", None)
            if dense is not None:  # bitsandbytes' Linear4bit forward, with the weight already dequantized
                bias = m.base_layer.bias
                result = F.linear(x.to(dense.dtype), dense, None if bias is None else bias.to(dense.dtype)).to(x.dtype)
            else:
                result = m.base_layer(x)
            if not autocast and not (result.dtype == x.dtype == lora_a.weight.dtype == lora_b.weight.dtype):
                return _original(x)
            hidden = lora_a(m.lora_dropout[name](x))
            out = torch.addmm(result.reshape(-1, result.shape[-1]), hidden.reshape(-1, hidden.shape[-1]),
                              lora_b.weight.t(), alpha=m.scaling[name])
            return out.view(result.shape)

        module.forward = forward
        module._tunelens_lean = True
        changed += 1
    return changed


def dequantize_base_weights(model) -> int:
    """Keep a dequantized copy (the compute dtype, usually bf16) of every 4-bit base weight under a LoRA layer.

    The frozen NF4 weights are dequantized by bitsandbytes in every forward and every backward of every layer:
    ~450 dequantizations per step for a 7B model, each a few kernels and Python calls. The dequantized values
    never change, so they are computed once here; the matmuls then read the same numbers they would have read.
    The training is QLoRA's (the NF4-rounded base model); the memory is LoRA's (2 bytes per base weight instead
    of ~0.5). Returns the bytes added; the autotuner decides whether the GPU has room (`autotune_cuda`).
    """
    import torch

    total = 0
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if base is None or not _is_4bit(base) or getattr(base, "_tunelens_dense_weight", None) is not None:
            continue
        import bitsandbytes.functional as bnbf

        state = base.weight.quant_state
        dtype = base.compute_dtype or state.dtype or torch.bfloat16
        with torch.no_grad():
            dense = bnbf.dequantize_4bit(base.weight.data, state).to(dtype)
        base._tunelens_dense_weight = dense
        total += dense.numel() * dense.element_size()
    return total


def drop_dequantized_weights(model) -> None:
    for module in model.modules():
        if getattr(module, "_tunelens_dense_weight", None) is not None:
            module._tunelens_dense_weight = None


def dense_base_bytes(model) -> int:
    """Bytes `dequantize_base_weights` would add (0 when the base is not 4-bit)."""
    total = 0
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if base is not None and _is_4bit(base):
            total += 2 * base.weight.quant_state.shape.numel()
    return total


def _checkpointing_key(args) -> str:
    return "activation_checkpointing" if hasattr(args, "activation_checkpointing") else "gradient_checkpointing"


def _set_checkpointing(trainer, enabled: bool) -> None:
    """Turn activation checkpointing on/off on the model now and in the args the Trainer reads at train()."""
    model = trainer.model
    setattr(trainer.args, _checkpointing_key(trainer.args), enabled)
    if enabled:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def _apply_micro_batch(trainer, micro: int, rows_per_step: int) -> None:
    trainer.args.per_device_train_batch_size = micro
    trainer.args.gradient_accumulation_steps = rows_per_step // micro
    trainer._train_batch_size = micro  # the Trainer caches it at construction


def _probe(trainer, batch: dict, repeats: int = 3) -> tuple[float, int]:
    """Seconds per forward+backward of `batch` (median of the repeats after the first) and peak bytes.

    No optimizer step runs and gradients are dropped, so the weights stay as they were; the caller restores
    the random state, so dropout masks of the real run are unchanged."""
    import statistics

    import torch

    model = trainer.model
    model.train()
    on_cuda = next(model.parameters()).is_cuda
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    sync()
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            sync()
            times.append(time.perf_counter() - start)
            del loss
    finally:
        model.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() if on_cuda else 0
    return statistics.median(times[1:] if len(times) > 1 else times), peak


# The dequantized base may take at most this share of the memory this process can use (the rest is for activations).
DENSE_BASE_MAX_SHARE = 0.25


def _choose_dense_base(trainer) -> dict:
    """Dequantize the 4-bit base once when it takes at most DENSE_BASE_MAX_SHARE of the GPU memory left."""
    import torch

    if not any(getattr(m, "_tunelens_lean", False) for m in trainer.model.modules()):
        return {"on": False, "reason": "PEFT's own LoRA forward (it dequantizes on every call)"}
    need = dense_base_bytes(trainer.model)
    if not need:
        return {"on": False, "reason": "base not 4-bit"}
    free, _ = torch.cuda.mem_get_info()
    room = free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    gib = round(need / 2**30, 2)
    if need > DENSE_BASE_MAX_SHARE * room:
        return {"on": False, "gib": gib, "reason": f"{gib} GiB dequantized would exceed {DENSE_BASE_MAX_SHARE:.0%} of the "
                                                    f"{room / 2**30:.0f} GiB free"}
    dequantize_base_weights(trainer.model)
    return {"on": True, "gib": gib, "reason": f"{gib} GiB dequantized once, of {room / 2**30:.0f} GiB free"}


# Test seam: options for LayerGraphs (tests give a CPU stand-in for torch.cuda.make_graphed_callables).
LAYER_GRAPH_OPTIONS: dict = {}
# The captured shapes' fixed buffers may take at most this share of the memory left beside the step's eager peak.
GRAPH_MEMORY_SHARE = 0.5


def install_layer_graphs(trainer, pad_to_multiple_of: int, memory_budget: int):
    """Pad batches to a multiple of `pad_to_multiple_of` tokens and replay the decoder layers from CUDA graphs
    (tunelens.training.graphed). The dispatcher is kept on the trainer for metrics.json."""
    from tunelens.training.graphed import LayerGraphs

    trainer.data_collator.pad_to_multiple_of = pad_to_multiple_of
    graphs = LayerGraphs(trainer.model, memory_budget=memory_budget, **LAYER_GRAPH_OPTIONS)
    trainer.tunelens_layer_graphs = graphs
    return graphs


def remove_layer_graphs(trainer, pad_to_multiple_of) -> None:
    graphs = getattr(trainer, "tunelens_layer_graphs", None)
    if graphs is not None:
        graphs.uninstall()
        trainer.tunelens_layer_graphs = None
    trainer.data_collator.pad_to_multiple_of = pad_to_multiple_of


def _choose_layer_graphs(trainer, settings: FinetuneSection, best: dict, dense: dict, budget: float,
                         worst_batch, typical_batch) -> dict:
    """Replay the decoder layers from CUDA graphs when it measures faster on typical rows and fits.

    Speed is measured on rows of median length at the chosen micro-batch, padded to the bucket multiple: eager,
    then graphed (its first repeat captures, the median of the later ones counts). The longest rows are the wrong
    batch for it: a step of ~4,000 tokens is bound by the GPU's arithmetic either way (1.01x on the H200), while the
    training's typical steps are bound by launching kernels (2x; BENCHMARKS.md, issue 24). Memory is checked on the
    longest rows, whose capture has the largest fixed buffers and activations."""
    import torch

    from tunelens.training.distributed import in_worker
    from tunelens.training.graphed import GRAPH_ATTENTION, PAD_TO_MULTIPLE_OF

    attention = attention_implementation(trainer.model)
    collator = trainer.data_collator
    why_not = ("finetune.cuda_graphs is false" if not settings.cuda_graphs
               else "activation checkpointing is on" if best["gradient_checkpointing"]
               else "the base is not dequantized (bitsandbytes' 4-bit matmul on every call)" if not dense["on"]
               else f"{attention} attention (graphs need SDPA or eager)" if attention not in GRAPH_ATTENTION
               else "data-parallel processes" if in_worker()
               else "the data collator has no pad_to_multiple_of" if not hasattr(collator, "pad_to_multiple_of")
               else None)
    if why_not:
        return {"on": False, "reason": why_not}
    previous = collator.pad_to_multiple_of
    _apply_micro_batch(trainer, best["micro_batch_size"], settings.batch_size * settings.gradient_accumulation)
    _set_checkpointing(trainer, False)
    collator.pad_to_multiple_of = PAD_TO_MULTIPLE_OF
    micro = best["micro_batch_size"]
    longest, typical = worst_batch(micro), typical_batch(micro)
    tokens = int(typical["input_ids"].numel())
    eager_s, _ = _probe(trainer, typical)
    eager_peak = best["peak_mib"] * 2**20  # the trial's, on the longest rows
    memory_budget = int(max(0.0, budget - eager_peak) * GRAPH_MEMORY_SHARE)
    graphs = install_layer_graphs(trainer, PAD_TO_MULTIPLE_OF, memory_budget)
    record = {"pad_to_multiple_of": PAD_TO_MULTIPLE_OF, "memory_budget_mib": memory_budget // 2**20,
              "probe_tokens": tokens, "eager_s": round(eager_s, 4), "eager_peak_mib": best["peak_mib"]}
    try:
        _, graph_peak = _probe(trainer, longest, repeats=1)  # captures the largest shape
        graph_s, _ = _probe(trainer, typical, repeats=4)
    except torch.OutOfMemoryError:
        graph_s, graph_peak = None, None
    captured = graphs.summary()
    record.update({"graph_s": None if graph_s is None else round(graph_s, 4),
                   "graph_peak_mib": None if graph_peak is None else round(graph_peak / 2**20),
                   "capture": captured["shapes"]})
    if graph_s is None:
        keep, reason = False, "out of memory while capturing"
    elif not captured["graphed_passes"]:
        keep, reason = False, f"not captured: {', '.join(captured['eager_passes']) or 'unknown'}"
    elif graph_peak > budget:
        keep, reason = False, f"peak {graph_peak / 2**20:.0f} MiB over the {budget / 2**20:.0f} MiB budget"
    elif graph_s >= eager_s:
        keep, reason = False, f"not faster: {graph_s:.4f} s against {eager_s:.4f} s eager"
    else:
        keep, reason = True, (f"{eager_s / graph_s:.2f}x the eager step on rows of median length ({graph_s:.4f} s "
                              f"against {eager_s:.4f} s; {tokens} tokens padded to a multiple of {PAD_TO_MULTIPLE_OF})")
    if not keep:
        remove_layer_graphs(trainer, previous)
        torch.cuda.empty_cache()
    log.info("autotune: layer graphs %s: %s", "on" if keep else "off", reason)
    return {"on": keep, "reason": reason, **record}


def autotune_cuda(trainer, settings: FinetuneSection | dict, plan: TrainingPlan, checkpoint_dir: Path) -> dict:
    """Choose activation checkpointing and the micro-batch by measuring them on this GPU.

    What the user configured stays: rows per optimizer step (batch_size x gradient_accumulation), length,
    learning rate, seed, and so the rows of every optimizer step (the sampler's order does not depend on the
    micro-batch; transformers normalises the loss over the whole accumulated step). Within that, each candidate
    runs forward+backward on the longest micro-batch of the training set (the worst case for memory) and the
    fastest that fits the GPU's memory, with headroom for the optimizer state, is kept. Checkpointing stays as
    configured when it was set explicitly. A resumed run reuses the choice recorded in `checkpoint_dir`.
    """
    import torch

    settings = FinetuneSection.from_dict(settings)
    rows_per_step = settings.batch_size * settings.gradient_accumulation
    record_path = checkpoint_dir / AUTOTUNE_FILE
    if record_path.exists():
        choice = json.loads(record_path.read_text(encoding="utf-8"))
        if choice.get("rows_per_step") == rows_per_step:
            if (choice.get("dense_base") or {}).get("on"):
                dequantize_base_weights(trainer.model)
            if (choice.get("layer_graphs") or {}).get("on"):
                install_layer_graphs(trainer, choice["layer_graphs"]["pad_to_multiple_of"],
                                     choice["layer_graphs"]["memory_budget_mib"] * 2**20)
            _set_checkpointing(trainer, choice["gradient_checkpointing"])
            _apply_micro_batch(trainer, choice["micro_batch_size"], rows_per_step)
            log.info("autotune: reusing the choice of the interrupted run: %s", choice["reason"])
            return choice

    dense = _choose_dense_base(trainer)
    configured = settings.gradient_checkpointing
    checkpointing_options = [False, True] if configured == "auto" else [bool(configured)]
    micro_options = [m for m in range(rows_per_step, 0, -1) if rows_per_step % m == 0]
    dataset = trainer.train_dataset
    lengths = [len(ids) for ids in dataset["input_ids"]]
    longest_first = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    device = next(trainer.model.parameters()).device

    def collated(indices: list[int]) -> dict:
        batch = trainer.data_collator([dataset[i] for i in indices])
        return {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}

    def worst_batch(micro: int) -> dict:
        return collated(longest_first[:micro])

    def typical_batch(micro: int) -> dict:  # the rows around the median length
        start = max(0, min(len(longest_first) - micro, len(longest_first) // 2 - micro // 2))
        return collated(longest_first[start:start + micro])

    free, total = torch.cuda.mem_get_info()
    # What this process may use: free memory plus what its allocator already holds, less 10% headroom for
    # fragmentation and the steps' varying shapes; AdamW keeps two fp32 moments per trainable parameter.
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    optimizer_bytes = 3 * 4 * trainable
    budget = 0.9 * (free + torch.cuda.memory_reserved()) - optimizer_bytes
    rng = (torch.get_rng_state(), torch.cuda.get_rng_state_all())  # dropout draws from both
    was_training = trainer.model.training
    trials = []
    try:
        for checkpointing in checkpointing_options:
            _set_checkpointing(trainer, checkpointing)
            # Largest micro-batch first: without checkpointing the first that fits is measured; with it, the
            # configured micro-batch and the whole step in one micro-batch.
            candidates = micro_options if not checkpointing else sorted(
                {rows_per_step, min(settings.batch_size, rows_per_step)}, reverse=True)
            for micro in candidates:
                batch = worst_batch(micro)
                tokens = int(batch["input_ids"].numel())
                try:
                    seconds, peak = _probe(trainer, batch)
                except torch.OutOfMemoryError:
                    trials.append({"gradient_checkpointing": checkpointing, "micro_batch_size": micro, "fits": False,
                                   "error": "out of memory"})
                    del batch
                    torch.cuda.empty_cache()
                    continue
                fits = peak <= budget
                trials.append({"gradient_checkpointing": checkpointing, "micro_batch_size": micro, "fits": fits,
                               "peak_mib": round(peak / 2**20), "seconds": round(seconds, 4),
                               "tokens_per_s": round(tokens / seconds, 1)})
                del batch
                torch.cuda.empty_cache()
                if fits and not checkpointing:
                    break
        fitting = [t for t in trials if t["fits"]]
        layer_graphs = (_choose_layer_graphs(trainer, settings, max(fitting, key=lambda t: t["tokens_per_s"]), dense,
                                             budget, worst_batch, typical_batch) if fitting else None)
    finally:
        torch.set_rng_state(rng[0])
        torch.cuda.set_rng_state_all(rng[1])
        trainer.model.train(was_training)
    if not fitting and dense["on"]:
        drop_dequantized_weights(trainer.model)
        torch.cuda.empty_cache()
        dense = {**dense, "on": False, "reason": dense["reason"] + "; dropped: no micro-batch fitted beside it"}
    if not fitting:
        best = {"gradient_checkpointing": True if configured == "auto" else bool(configured),
                "micro_batch_size": settings.batch_size if rows_per_step % settings.batch_size == 0 else 1}
        reason = "no candidate fitted in the probe; keeping the configured micro-batch with checkpointing"
    else:
        best = max(fitting, key=lambda t: t["tokens_per_s"])
        reason = (f"micro-batch {best['micro_batch_size']} x {rows_per_step // best['micro_batch_size']} accumulation, "
                  f"checkpointing {'on' if best['gradient_checkpointing'] else 'off'}: fastest of {len(trials)} "
                  f"measured ({best['tokens_per_s']} tok/s on the longest rows, peak {best['peak_mib']} MiB of a "
                  f"{round(budget / 2**20)} MiB budget)")
    _set_checkpointing(trainer, best["gradient_checkpointing"])
    _apply_micro_batch(trainer, best["micro_batch_size"], rows_per_step)
    choice = {"rows_per_step": rows_per_step, "gradient_checkpointing": best["gradient_checkpointing"],
              "micro_batch_size": best["micro_batch_size"], "reason": reason, "trials": trials, "dense_base": dense,
              "layer_graphs": layer_graphs or {"on": False, "reason": "no micro-batch fitted"},
              "gpu_total_mib": round(total / 2**20)}
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(record_path, choice)
    log.info("autotune: %s", reason)
    return choice


