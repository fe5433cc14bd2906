"""Fine-tune settings and the plan resolved from them and the device, before any model is loaded."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field

from tunelens.errors import ConfigError, ModelError
from tunelens.settings.finetune import FinetuneSection

# Written into the checkpoint directory: a resumed run keeps the micro-batch and checkpointing it measured.
AUTOTUNE_FILE = "tunelens_autotune.json"


# --------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class TrainingPlan:
    """The concrete choices for one run, resolved from the settings and the device before any work."""

    method: str  # "qlora" | "lora"
    device: str  # "cuda" | "cpu"
    compute_dtype: str  # "bfloat16" | "float16" | "float32": dtype of the base weights' matmuls
    gradient_checkpointing: bool
    liger: bool
    reasons: tuple[str, ...] = field(default_factory=tuple)  # one line per automatic choice, logged and recorded


def _liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def _bitsandbytes_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def check_settings(settings: FinetuneSection | dict) -> FinetuneSection:
    """The settings as a FinetuneSection (a dict's missing keys take their defaults; an unknown key fails), checked
    for what the schema cannot express when they do not come from a validated config. Raises ConfigError."""
    settings = FinetuneSection.from_dict(settings, where="finetune settings")
    if settings.method not in ("auto", "qlora", "lora"):
        raise ConfigError(f"finetune.method: '{settings.method}'; expected one of auto, qlora, lora")
    if not 0 <= settings.warmup_ratio < 1:
        raise ConfigError(f"finetune.warmup_ratio: {settings.warmup_ratio}; expected a fraction in [0, 1)")
    if settings.max_steps is None and not settings.num_epochs > 0:
        raise ConfigError(f"finetune.num_epochs: {settings.num_epochs}; expected > 0 when max_steps is null")
    target = settings.target_modules
    if isinstance(target, list) and not target:
        raise ConfigError("finetune.target_modules: empty list; give module names or 'all-linear'")
    return settings


LIGER_MIN_VOCAB = 128_000


def resolve_plan(settings: FinetuneSection | dict, device: str = "auto", vocab_size: int | None = None) -> TrainingPlan:
    """Decide method, dtype, gradient checkpointing and Liger from the settings and the device.

    Explicit choices that cannot work here (qlora or liger on CPU, liger not installed) are errors,
    raised before the model is loaded.
    """
    import torch

    settings = check_settings(settings)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device: '{device}'; expected auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for, but torch sees no CUDA device")
    reasons = []

    method = settings.method
    if method == "auto":
        if device == "cuda" and _bitsandbytes_installed():
            method = "qlora"
            reasons.append("method auto -> qlora: CUDA device and bitsandbytes installed (4-bit NF4 base)")
        elif device == "cuda":
            method = "lora"
            reasons.append("method auto -> lora: bitsandbytes is not installed, so the base stays in 16-bit")
        else:
            method = "lora"
            reasons.append(
                "method auto -> lora in float32: quantisation is off on CPU (bitsandbytes' 4-bit CPU path is "
                "very slow and QLoRA's bf16 compute is ~6x slower than float32 on AVX2-only CPUs)"
            )
    if method == "qlora" and device != "cuda":
        raise ConfigError("finetune.method: 'qlora' needs a CUDA device (bitsandbytes 4-bit); use method lora or auto on CPU")
    if method == "qlora" and not _bitsandbytes_installed():
        raise ConfigError("finetune.method: 'qlora' needs bitsandbytes; install the 'gpu' extra (bitsandbytes==0.50.2)")

    if device == "cuda":
        compute_dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    else:
        compute_dtype = "float32"

    checkpointing = settings.gradient_checkpointing
    if checkpointing == "auto":
        checkpointing = device == "cuda"
        reasons.append(
            f"gradient_checkpointing auto -> {checkpointing}: "
            + ("on until the autotuner measures that the GPU holds the activations without it"
               if checkpointing else "CPU memory is not the limit")
        )

    liger = settings.liger
    if liger is True and device != "cuda":
        raise ConfigError("finetune.liger: true needs a CUDA device (Liger kernels are Triton GPU kernels)")
    if liger is True and not _liger_installed():
        raise ConfigError("finetune.liger: true, but liger-kernel is not installed (the 'gpu' extra: liger-kernel==0.8.5)")
    if liger == "auto":
        # Measured on an H200 with a 7B Llama shape (BENCHMARKS.md, bench/bench_gpu_study.py): Liger was 9-23%
        # slower than without. Its fused linear cross-entropy pays where the logits are what fills memory, i.e.
        # with very large vocabularies (Gemma's 262k), so auto keeps it for those only.
        large_vocab = vocab_size is not None and vocab_size >= LIGER_MIN_VOCAB
        liger = device == "cuda" and _liger_installed() and large_vocab
        if device != "cuda":
            why = "CPU run"
        elif not _liger_installed():
            why = "not installed"
        elif large_vocab:
            why = f"vocabulary of {vocab_size} tokens: the fused cross-entropy saves the logits' memory"
        else:
            why = f"vocabulary under {LIGER_MIN_VOCAB} tokens: measured slower than plain kernels on a 7B shape"
        reasons.append(f"liger auto -> {liger}: {why}")
    return TrainingPlan(
        method=method, device=device, compute_dtype=compute_dtype, gradient_checkpointing=bool(checkpointing),
        liger=bool(liger), reasons=tuple(reasons),
    )


# --------------------------------------------------------------------------------------------- target modules
def linear_module_names(model) -> dict[str, list[str]]:
    """Linear layers LoRA can target: short name (e.g. 'q_proj') -> full module names. The LM head is left
    out (TRL computes log-probs from its weight directly, so an adapter there would never train)."""
    import torch

    head = model.get_output_embeddings()
    names: dict[str, list[str]] = {}
    for full_name, module in model.named_modules():
        # bitsandbytes' Linear4bit subclasses nn.Linear, so quantised models list the same names.
        if isinstance(module, torch.nn.Linear) and module is not head:
            names.setdefault(full_name.rsplit(".", 1)[-1], []).append(full_name)
    return names


def check_target_modules(target_modules: str | list[str], model, where: str = "finetune.target_modules") -> None:
    """Raise ConfigError unless every requested module exists as a linear layer of `model`.

    `target_modules` is 'all-linear', a list of short names (PEFT matches a module whose name is, or ends
    with '.' + , an entry), or a regular expression over full module names (PEFT's string form).
    """
    available = linear_module_names(model)
    head_name = next((n for n, m in model.named_modules() if m is model.get_output_embeddings()), "lm_head")
    listing = f"linear modules of {type(model).__name__}: {sorted(available)}"
    if target_modules == "all-linear":
        return
    if isinstance(target_modules, str):
        full_names = [name for names in available.values() for name in names]
        if not any(re.fullmatch(target_modules, name) for name in full_names):
            raise ConfigError(
                f"{where}: regular expression '{target_modules}' matches no linear module of the model; {listing}"
            )
        return
    for name in target_modules:
        if name == head_name.rsplit(".", 1)[-1]:
            raise ConfigError(
                f"{where}: '{name}' is the LM head, which LoRA cannot train here (TRL reads its weight directly); "
                f"choose among the {listing}"
            )
        matched = name in available or any(full.endswith("." + name) or full == name
                                           for names in available.values() for full in names)
        if not matched:
            raise ConfigError(f"{where}: module '{name}' does not exist in the model; {listing}")


def _meta_model(model_path: str, revision: str | None):
    """The model's module tree without weights (device 'meta'): enough to validate target modules in
    about a second, before the expensive load."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_path, revision=revision)
    except OSError as exc:
        raise ModelError(f"cannot read the config of model '{model_path}': {exc}") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


