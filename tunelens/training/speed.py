"""How the fine-tune uses the GPU: packed rows kept apart, and the autotuner for checkpointing and micro-batch."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from tunelens.io import write_json_atomic
from tunelens.training.plan import AUTOTUNE_FILE, TrainingPlan

log = logging.getLogger("tunelens.finetune")

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


def separate_packed_rows(model) -> str:
    """Make packed rows attend only to themselves, whatever the attention kernel.

    TRL packs padding-free: rows are concatenated and their boundaries travel as `position_ids` (and
    `cu_seq_lens_*`), which only flash-attention's varlen kernels read. Under SDPA or eager attention a packed
    row would attend to the rows before it. For those kernels a forward pre-hook on the decoder turns the
    position ids into an explicit block-diagonal mask. Returns how rows are separated (recorded in metrics).
    """
    implementation = getattr(model.config, "_attn_implementation", None) or "sdpa"
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


def autotune_cuda(trainer, settings: dict, plan: TrainingPlan, checkpoint_dir: Path) -> dict:
    """Choose activation checkpointing and the micro-batch by measuring them on this GPU.

    What the user configured stays: rows per optimizer step (batch_size x gradient_accumulation), length,
    learning rate, seed, and so the rows of every optimizer step (the sampler's order does not depend on the
    micro-batch; transformers normalises the loss over the whole accumulated step). Within that, each candidate
    runs forward+backward on the longest micro-batch of the training set (the worst case for memory) and the
    fastest that fits the GPU's memory, with headroom for the optimizer state, is kept. Checkpointing stays as
    configured when it was set explicitly. A resumed run reuses the choice recorded in `checkpoint_dir`.
    """
    import torch

    rows_per_step = settings["batch_size"] * settings["gradient_accumulation"]
    record_path = checkpoint_dir / AUTOTUNE_FILE
    if record_path.exists():
        choice = json.loads(record_path.read_text(encoding="utf-8"))
        if choice.get("rows_per_step") == rows_per_step:
            _set_checkpointing(trainer, choice["gradient_checkpointing"])
            _apply_micro_batch(trainer, choice["micro_batch_size"], rows_per_step)
            log.info("autotune: reusing the choice of the interrupted run: %s", choice["reason"])
            return choice

    configured = settings["gradient_checkpointing"]
    checkpointing_options = [False, True] if configured == "auto" else [bool(configured)]
    micro_options = [m for m in range(rows_per_step, 0, -1) if rows_per_step % m == 0]
    dataset = trainer.train_dataset
    lengths = [len(ids) for ids in dataset["input_ids"]]
    longest_first = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    device = next(trainer.model.parameters()).device

    def worst_batch(micro: int) -> dict:
        examples = [dataset[i] for i in longest_first[:micro]]
        batch = trainer.data_collator(examples)
        return {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}

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
                {rows_per_step, min(settings["batch_size"], rows_per_step)}, reverse=True)
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
    finally:
        torch.set_rng_state(rng[0])
        torch.cuda.set_rng_state_all(rng[1])
        trainer.model.train(was_training)
    fitting = [t for t in trials if t["fits"]]
    if not fitting:
        best = {"gradient_checkpointing": True if configured == "auto" else bool(configured),
                "micro_batch_size": settings["batch_size"] if rows_per_step % settings["batch_size"] == 0 else 1}
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
              "micro_batch_size": best["micro_batch_size"], "reason": reason, "trials": trials,
              "gpu_total_mib": round(total / 2**20)}
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(record_path, choice)
    log.info("autotune: %s", reason)
    return choice


