"""Config section `finetune` (and `models.<name>.finetune`, which overrides it per model)."""

from __future__ import annotations

from dataclasses import dataclass

from tunelens.settings.base import Section, setting


def _all_steps_when_none(max_steps: int | None) -> int:
    return -1 if max_steps is None else max_steps  # SFTConfig: -1 = num_train_epochs decides


@dataclass(frozen=True, kw_only=True)
class FinetuneSection(Section):
    """The fine-tune settings. `lora=` / `sft=` name the peft LoraConfig / TRL SFTConfig argument a key becomes
    (tunelens.training.finetune.lora_config / sft_config build them from these, warmup_ratio as a ratio: SFTConfig reads a
    float warmup_steps in [0, 1) as a fraction of the total steps); the other keys choose the plan
    (tunelens.training.plan) or are read where they act."""

    enabled: bool = setting(True, "false = evaluate the base model only.",
        schema={"type": "boolean"})
    method: str = setting("auto", "auto = qlora on CUDA (bitsandbytes 4-bit NF4), lora in float32 on CPU.",
        schema={"enum": ["auto", "qlora", "lora"]})
    lora_r: int = setting(16, "LoRA rank; at most 1024 (adapter memory grows linearly with it).",
        schema={"type": "integer", "minimum": 1, "maximum": 1024}, lora="r")
    lora_alpha: float = setting(32, "LoRA scaling numerator: the update is scaled by lora_alpha / lora_r.",
        schema={"type": "number", "exclusiveMinimum": 0}, lora="lora_alpha")
    lora_dropout: float = setting(0.05, "Dropout on the LoRA input during training.",
        schema={"type": "number", "minimum": 0, "maximum": 1}, lora="lora_dropout")
    target_modules: str | list = setting("all-linear",
        "Modules that get LoRA adapters: 'all-linear' or a list of module names (e.g. q_proj, v_proj).",
        schema={"type": ["string", "array"], "items": {"type": "string"}}, lora="target_modules")
    learning_rate: float = setting(0.0002, "Peak learning rate (AdamW).",
        schema={"type": "number", "exclusiveMinimum": 0}, sft="learning_rate")
    lr_scheduler: str = setting("cosine", "Learning-rate schedule after warmup.",
        schema={"enum": ["linear", "cosine", "constant", "constant_with_warmup"]}, sft="lr_scheduler_type")
    warmup_ratio: float = setting(0.03, "Fraction of the optimizer steps spent warming the learning rate up from 0.",
        schema={"type": "number", "minimum": 0, "exclusiveMaximum": 1}, sft="warmup_steps", sft_value=float)
    weight_decay: float = setting(0.0, "AdamW weight decay.",
        schema={"type": "number", "minimum": 0}, sft="weight_decay")
    num_epochs: float = setting(1,
        "Passes over the training rows (fractions allowed, at most 1000); max_steps overrides it. With local or "
        "embedded data the optimizer steps are estimated before any job: over 1,000,000 steps or 1e11 training "
        "tokens is rejected.",
        schema={"type": "number", "exclusiveMinimum": 0, "maximum": 1000}, sft="num_train_epochs", sft_value=float)
    max_steps: int | None = setting(None,
        "Overrides num_epochs when set; max_steps x batch_size x gradient_accumulation x max_seq_length is capped at"
        " 1e11 training tokens.",
        schema={"type": ["integer", "null"], "minimum": 1, "maximum": 1000000},
        sft="max_steps", sft_value=_all_steps_when_none)
    batch_size: int = setting(4,
        "Per-device batch size; batch_size x max_seq_length is capped at 1,048,576 tokens per micro-batch.",
        schema={"type": "integer", "minimum": 1, "maximum": 4096}, sft="per_device_train_batch_size")
    gradient_accumulation: int = setting(1, "Micro-batches per optimizer step.",
        schema={"type": "integer", "minimum": 1, "maximum": 65536}, sft="gradient_accumulation_steps")
    max_seq_length: int = setting(512,
        "Tokens per training row (prompt + response); longer rows follow dataset.on_bad_rows.",
        schema={"type": "integer", "minimum": 16, "maximum": 131072})
    packing: bool = setting(False,
        "Pack several rows into one sequence of max_seq_length (rows do not attend to each other).",
        schema={"type": "boolean"}, sft="packing")
    padding_free: bool = setting(False,
        "TRL padding-free batches (rows concatenated, no pad tokens); without packing it never truncates, so it is "
        "refused when a row exceeds max_seq_length.",
        schema={"type": "boolean"}, sft="padding_free")
    gradient_checkpointing: bool | str = setting("auto", "auto = on for CUDA.",
        schema={"enum": ["auto", True, False]})
    liger: bool | str = setting("auto",
        "auto = Liger kernels on CUDA when installed and the vocabulary has at least 128k tokens (their fused "
        "cross-entropy saves the logits' memory; on a 7B Llama shape they measured slower).",
        schema={"enum": ["auto", True, False]})
    autotune: bool = setting(True,
        "On CUDA, measure activation checkpointing (when gradient_checkpointing is auto) and the micro-batch on the "
        "longest rows before training, and keep the fastest that fits the GPU's memory. Rows per optimizer step "
        "(batch_size x gradient_accumulation), length, learning rate and seed are kept; the choice and every trial "
        "go to metrics.json. No effect on CPU.",
        schema={"type": "boolean"})
    cuda_graphs: bool = setting(True,
        "On CUDA, replay each decoder layer's forward and backward from CUDA graphs, one capture per batch shape "
        "(batches padded to a multiple of 64 tokens), when the autotuner measures it faster on rows of median length "
        "and it fits the GPU's memory (needs autotune, the dequantized base, checkpointing off, SDPA or eager "
        "attention, one process). Same rows and loss; what ran goes to metrics.json (layer_graphs).",
        schema={"type": "boolean"})
    logging_steps: int = setting(5, "Optimizer steps between train_log.jsonl records.",
        schema={"type": "integer", "minimum": 1}, sft="logging_steps")
    save_steps: int = setting(25, "Checkpoint every N steps (resume after interruption).",
        schema={"type": "integer", "minimum": 1}, sft="save_steps")
