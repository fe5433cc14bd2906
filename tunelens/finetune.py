"""Fine-tuning stage: LoRA / QLoRA supervised fine-tuning with TRL's SFTTrainer and PEFT, resumable.

One call of `finetune()` trains one model on the split's train.jsonl and writes (see docs/ARCHITECTURE.md):

- `adapter_dir/`        a standard PEFT adapter directory (adapter_config.json + adapter_model.safetensors),
                        loadable by `peft.PeftModel.from_pretrained` and vLLM's `LoRARequest`, plus
                        `tunelens_adapter.json` saying what produced it;
- `train_log.jsonl`     one row per logging step: step, epoch, loss (mean token cross-entropy, nats),
                        learning_rate, grad_norm, tokens (non-padding input tokens since the previous row),
                        tokens_per_s, mean_token_accuracy (0-1, on response tokens);
- `metrics.json`        trainable parameters, train tokens, wall time, peak memory, final loss, method,
                        device, settings, seed, library versions;
- `loss.png`            the loss curve.

Each training example is `build_prompt(row) + response_text(row)` (the prompt the generation stage uses,
then the reference output and EOS), tokenized as the generation stage tokenizes prompts, with a completion
mask: TRL's `completion_only_loss` puts the loss on the response tokens only.

Method: `auto` = QLoRA on CUDA (bitsandbytes 4-bit NF4 base, double quantisation, bf16 compute, gradient
checkpointing, Liger kernels when installed) and LoRA in float32 on CPU (bitsandbytes' 4-bit CPU path is
very slow and bf16 on AVX2-only CPUs is ~6x slower than float32). `lora` on CUDA trains a bf16 base.

Interruptions: checkpoints go to `checkpoint_dir` (not a rule output, so Snakemake keeps it when a job
fails). A rerun with the same inputs and settings resumes from the last complete checkpoint: the trainer
restores optimizer, scheduler and RNG states and skips the batches already seen, so the data order is the
one of an uninterrupted run. A completed job deletes its checkpoints. Checkpoints of a different run
(other data, settings, seed or model) are discarded, never resumed.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tunelens.errors import ConfigError, DataError, ModelError, TunelensError
from tunelens.io import (
    atomic_directory, library_versions, read_jsonl, save_figure_atomic, sha256_dir, sha256_file, write_json_atomic,
    write_jsonl_atomic,
)

log = logging.getLogger(__name__)

TRAIN_ROW_KEYS = ("id", "instruction", "input", "output")
# Written into the checkpoint directory: checkpoints are resumed only by a run with the same fingerprint.
RUN_FINGERPRINT_FILE = "tunelens_run.json"
ADAPTER_RECORD = "tunelens_adapter.json"
# Keys of the finetune settings that must be present (the schema fills them; a hand-built dict may not).
SETTING_KEYS = (
    "enabled", "method", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "learning_rate",
    "lr_scheduler", "warmup_ratio", "weight_decay", "num_epochs", "max_steps", "batch_size",
    "gradient_accumulation", "max_seq_length", "packing", "padding_free", "gradient_checkpointing", "liger",
    "logging_steps", "save_steps", "autotune",
)
# Settings added after the first release: a hand-built settings dict without them gets these values.
SETTING_DEFAULTS = {"autotune": True}
# Written into the checkpoint directory: a resumed run keeps the micro-batch and checkpointing it measured.
AUTOTUNE_FILE = "tunelens_autotune.json"
# What a train_log.jsonl row holds, in this order (missing values are left out of the row).
LOG_KEYS = ("step", "epoch", "loss", "learning_rate", "grad_norm", "tokens", "tokens_per_s", "mean_token_accuracy")


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


def check_settings(settings: dict) -> None:
    """Fail on missing keys and on combinations the schema cannot express. Raises ConfigError."""
    for key, value in SETTING_DEFAULTS.items():
        settings.setdefault(key, value)
    missing = [key for key in SETTING_KEYS if key not in settings]
    if missing:
        raise ConfigError(f"finetune settings: missing key(s) {missing}; the config schema fills them by default")
    unknown = sorted(set(settings) - set(SETTING_KEYS))
    if unknown:
        raise ConfigError(f"finetune settings: unknown key(s) {unknown}; allowed: {sorted(SETTING_KEYS)}")
    if settings["method"] not in ("auto", "qlora", "lora"):
        raise ConfigError(f"finetune.method: '{settings['method']}'; expected one of auto, qlora, lora")
    if not 0 <= settings["warmup_ratio"] < 1:
        raise ConfigError(f"finetune.warmup_ratio: {settings['warmup_ratio']}; expected a fraction in [0, 1)")
    if settings["max_steps"] is None and not settings["num_epochs"] > 0:
        raise ConfigError(f"finetune.num_epochs: {settings['num_epochs']}; expected > 0 when max_steps is null")
    target = settings["target_modules"]
    if isinstance(target, list) and not target:
        raise ConfigError("finetune.target_modules: empty list; give module names or 'all-linear'")


LIGER_MIN_VOCAB = 128_000


def resolve_plan(settings: dict, device: str = "auto", vocab_size: int | None = None) -> TrainingPlan:
    """Decide method, dtype, gradient checkpointing and Liger from the settings and the device.

    Explicit choices that cannot work here (qlora or liger on CPU, liger not installed) are errors,
    raised before the model is loaded.
    """
    import torch

    check_settings(settings)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device: '{device}'; expected auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for, but torch sees no CUDA device")
    reasons = []

    method = settings["method"]
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

    checkpointing = settings["gradient_checkpointing"]
    if checkpointing == "auto":
        checkpointing = device == "cuda"
        reasons.append(
            f"gradient_checkpointing auto -> {checkpointing}: "
            + ("on until the autotuner measures that the GPU holds the activations without it"
               if checkpointing else "CPU memory is not the limit")
        )

    liger = settings["liger"]
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


# --------------------------------------------------------------------------------------------- data
def load_train_rows(train_jsonl: str | Path) -> list[dict]:
    """Split rows (docs/ARCHITECTURE.md), checked: string fields, a non-empty instruction."""
    rows = read_jsonl(train_jsonl, required=TRAIN_ROW_KEYS)
    if not rows:
        raise DataError(f"{train_jsonl}: no rows; the fine-tuning set is empty")
    for line_no, row in enumerate(rows, start=1):
        for key in TRAIN_ROW_KEYS:
            if not isinstance(row[key], str):
                raise DataError(
                    f"{train_jsonl}, line {line_no} (id {row.get('id')!r}): '{key}' is {type(row[key]).__name__}; "
                    "expected a string"
                )
        # An empty output is allowed (real sets have some): the row then trains only the EOS token.
        if not row["instruction"].strip():
            raise DataError(f"{train_jsonl}, line {line_no} (id {row['id']!r}): 'instruction' is empty")
    return rows


def encode_text(text: str, tokenizer) -> list[int]:
    """Token ids of a full text, with no special tokens added: the prompt is a complete text (template
    included), tokenized exactly as the generation and probe stages tokenize it (tunelens.generate)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def training_examples(rows: list[dict], prompt_format: str, tokenizer) -> list[dict[str, str]]:
    """Prompt-completion pairs: the exact prompt the generation stage builds, then the reference + EOS."""
    from tunelens.prompts import build_prompt, response_text

    return [
        {"prompt": build_prompt(row, prompt_format, tokenizer), "completion": response_text(row, tokenizer)}
        for row in rows
    ]


@dataclass
class DataStats:
    """Token counts of the training set, as tokenized for training."""

    rows: int
    prompt_tokens: int
    completion_tokens: int  # loss-bearing tokens per epoch, before truncation
    max_row_tokens: int
    truncated_rows: int  # rows longer than max_seq_length (their start is kept)
    dropped_rows: dict = field(default_factory=dict)  # reason -> rows left out of training


def tokenize_examples(rows: list[dict], examples: list[dict], tokenizer, max_seq_length: int,
                      train_jsonl, on_bad_rows: str = "count") -> tuple[list[dict], DataStats]:
    """Token ids and completion masks (1 = response token, trained) in TRL's tokenized format.

    Tokenizing here rather than in TRL keeps training on exactly the ids generation sees: TRL's own
    tokenization adds special tokens (a second BOS for some tokenizers). The response starts where the
    ids of the prompt and of prompt + response diverge, as in TRL (a merge across the boundary moves it).
    Rows whose prompt alone fills max_seq_length would carry no loss: they are dropped and counted
    (reason prompt_fills_max_seq_length). With on_bad_rows 'error' (dataset.on_bad_rows), they and truncated
    rows fail instead, naming them.
    """
    tokenized, too_long, cut = [], [], []
    prompt_tokens = completion_tokens = max_row = 0
    for line_no, (row, example) in enumerate(zip(rows, examples), start=1):
        prompt_ids = encode_text(example["prompt"], tokenizer)
        ids = encode_text(example["prompt"] + example["completion"], tokenizer)
        n_prompt = next((i for i, (a, b) in enumerate(zip(prompt_ids, ids)) if a != b), min(len(prompt_ids), len(ids)))
        if n_prompt >= max_seq_length:
            too_long.append(f"line {line_no} (id {row['id']!r}, {n_prompt} prompt tokens)")
            continue
        tokenized.append({"input_ids": ids, "completion_mask": [0] * n_prompt + [1] * (len(ids) - n_prompt)})
        prompt_tokens += n_prompt
        completion_tokens += len(ids) - n_prompt
        max_row = max(max_row, len(ids))
        if len(ids) > max_seq_length:
            cut.append(f"line {line_no} (id {row['id']!r}, {len(ids)} tokens)")
    if on_bad_rows == "error" and (too_long or cut):
        which = (f"{len(too_long)} row(s) have a prompt of at least finetune.max_seq_length={max_seq_length} "
                 f"tokens, leaving no response token to train on: {', '.join(too_long[:5])}" if too_long else
                 f"{len(cut)} row(s) are longer than finetune.max_seq_length={max_seq_length} tokens and would be "
                 f"truncated: {', '.join(cut[:5])}")
        raise DataError(f"{train_jsonl}: {which}; dataset.on_bad_rows is 'error' (raise max_seq_length, or "
                        "'count' drops/truncates such rows and counts them)")
    if too_long:
        log.warning("%s: %d row(s) dropped: their prompt leaves no response token within max_seq_length=%d: %s%s",
                    train_jsonl, len(too_long), max_seq_length, ", ".join(too_long[:5]), " ..." if len(too_long) > 5 else "")
    if not tokenized:
        raise DataError(f"{train_jsonl}: every row's prompt fills finetune.max_seq_length={max_seq_length} tokens; "
                        "nothing left to train on (raise max_seq_length)")
    dropped = {"prompt_fills_max_seq_length": len(too_long)} if too_long else {}
    return tokenized, DataStats(len(tokenized), prompt_tokens, completion_tokens, max_row, len(cut), dropped)


# --------------------------------------------------------------------------------------------- checkpoints
def run_fingerprint(model_path: str, train_jsonl: str | Path, settings: dict, prompt_format: str, seed: int,
                    plan: TrainingPlan, revision: str | None = None) -> dict:
    """What must match for a checkpoint to be resumed: inputs, settings, seed and the resolved plan."""
    model_dir = Path(model_path)
    model_id = {"path": str(model_path), "revision": revision}
    if (model_dir / "config.json").exists():
        model_id["config_sha256"] = sha256_file(model_dir / "config.json")
        weights = sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin"))
        # Sizes and names, not contents: hashing 14 GB of weights on every rerun would cost minutes.
        model_id["weights"] = [[p.name, p.stat().st_size] for p in weights]
    return {
        "model": model_id,
        "train_sha256": sha256_file(train_jsonl),
        "settings": settings,
        "prompt_format": prompt_format,
        "seed": seed,
        "plan": {"method": plan.method, "device": plan.device, "compute_dtype": plan.compute_dtype,
                 "gradient_checkpointing": plan.gradient_checkpointing, "liger": plan.liger},
    }


def _complete_checkpoint(path: Path) -> bool:
    # The trainer writes trainer_state.json after the weights and optimizer, so a checkpoint dir killed
    # mid-write lacks it (or its optimizer) and must not be resumed.
    return (path / "trainer_state.json").exists() and (path / "optimizer.pt").exists() and (
        (path / "adapter_model.safetensors").exists() or (path / "adapter_model.bin").exists()
    )


def prepare_checkpoint_dir(checkpoint_dir: str | Path, fingerprint: dict) -> Path | None:
    """Create `checkpoint_dir` for this run and return the checkpoint to resume from, or None.

    Checkpoints written by a run with another fingerprint are deleted (logged): resuming them would mix
    two different trainings.
    """
    checkpoint_dir = Path(checkpoint_dir)
    record = checkpoint_dir / RUN_FINGERPRINT_FILE
    if checkpoint_dir.exists():
        previous = None
        if record.exists():
            try:
                previous = json.loads(record.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                previous = None
        # Compare through JSON so tuples/lists and int/float spellings of the same value agree.
        if previous != json.loads(json.dumps(fingerprint)):
            log.warning("%s: checkpoints of a different run (data, settings, seed or model changed); deleting them",
                        checkpoint_dir)
            shutil.rmtree(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    if not record.exists():
        write_json_atomic(record, fingerprint)
    candidates = sorted(
        (p for p in checkpoint_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
        reverse=True,
    )
    for candidate in candidates:
        if _complete_checkpoint(candidate):
            return candidate
        log.warning("%s: incomplete checkpoint (killed while saving?), skipped", candidate)
    return None


# --------------------------------------------------------------------------------------------- trainer
def lora_config(settings: dict):
    from peft import LoraConfig

    return LoraConfig(
        r=settings["lora_r"],
        lora_alpha=settings["lora_alpha"],
        lora_dropout=settings["lora_dropout"],
        target_modules=settings["target_modules"],
        bias="none",
        task_type="CAUSAL_LM",
    )


def sft_config(settings: dict, plan: TrainingPlan, checkpoint_dir: str | Path, seed: int, *, max_length: int | None):
    """TRL SFTConfig from the tunelens settings. Every value that changes the result comes from `settings`."""
    import dataclasses

    from trl import SFTConfig

    # transformers >= 5.2x renamed gradient_checkpointing to activation_checkpointing (the old name warns);
    # older 5.x (the GPU image has 5.17) only knows the old name.
    names = {f.name for f in dataclasses.fields(SFTConfig)}
    checkpointing_key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return SFTConfig(
        **{checkpointing_key: plan.gradient_checkpointing},
        output_dir=str(checkpoint_dir),
        seed=seed,
        data_seed=seed,
        per_device_train_batch_size=settings["batch_size"],
        gradient_accumulation_steps=settings["gradient_accumulation"],
        learning_rate=settings["learning_rate"],
        lr_scheduler_type=settings["lr_scheduler"],
        warmup_steps=float(settings["warmup_ratio"]),  # a float in [0, 1) is a ratio of the total steps
        weight_decay=settings["weight_decay"],
        num_train_epochs=float(settings["num_epochs"]),
        max_steps=settings["max_steps"] if settings["max_steps"] is not None else -1,
        max_length=max_length,
        packing=settings["packing"],
        padding_free=settings["padding_free"],
        completion_only_loss=True,
        bf16=plan.compute_dtype == "bfloat16",
        fp16=plan.compute_dtype == "float16",
        use_cpu=plan.device == "cpu",
        use_liger_kernel=plan.liger,
        logging_steps=settings["logging_steps"],
        logging_first_step=True,
        save_strategy="steps",
        save_steps=settings["save_steps"],
        # Two, not one: if a job is killed while writing the newest, the previous one is still whole.
        save_total_limit=2,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def _load_base_model(model_path: str, plan: TrainingPlan, revision: str | None):
    import torch
    from transformers import AutoModelForCausalLM

    if plan.device == "cuda":
        from tunelens.genserver import release_gpu_for_this_job

        release_gpu_for_this_job()  # an idle generation server must not hold the GPU memory training needs
    dtype = getattr(torch, plan.compute_dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "revision": revision}
    if plan.method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_path), **kwargs)
    except OSError as exc:
        raise ModelError(f"cannot load model '{model_path}': {exc}") from None
    if plan.method != "qlora":
        model.to(plan.device)
    return model


# --------------------------------------------------------------------------------------------- packing
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


def _make_log_callback():
    """A TrainerCallback that adds `tokens` and `tokens_per_s` to each log row, logs it, and counts the
    optimizer steps this process runs. Defined inside a function so importing this module stays free of
    transformers (Snakemake imports tunelens on every invocation)."""
    from transformers import TrainerCallback

    class TrainLogCallback(TrainerCallback):
        def __init__(self):
            self.steps_run = 0
            self.start_step = 0
            self._last_time = None
            self._last_tokens = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.start_step = state.global_step
            self._last_time = time.perf_counter()
            self._last_tokens = state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kwargs):
            self.steps_run += 1

        def on_log(self, args, state, control, logs=None, **kwargs):
            now = time.perf_counter()
            entry = state.log_history[-1] if state.log_history else {}
            if "loss" in entry:
                tokens = state.num_input_tokens_seen - self._last_tokens
                elapsed = max(now - self._last_time, 1e-9)
                # Stored in log_history, which checkpoints save, so rows of a killed run survive a resume.
                entry["tokens"] = int(tokens)
                entry["tokens_per_s"] = round(tokens / elapsed, 2)
                log.info(
                    "step %d/%d loss %.4f lr %.3g tokens/s %.1f", state.global_step, state.max_steps,
                    entry["loss"], entry.get("learning_rate", float("nan")), entry["tokens_per_s"],
                )
            self._last_time, self._last_tokens = now, state.num_input_tokens_seen

    return TrainLogCallback()


@dataclass
class PreparedRun:
    """Everything `finetune()` needs after validation: the trainer and what to record."""

    trainer: Any
    plan: TrainingPlan
    stats: DataStats
    fingerprint: dict
    resume_from: Path | None
    log_callback: Any
    load_time_s: float
    row_separation: str | None = None  # how packed rows are kept from attending to each other
    autotune: dict | None = None  # what the CUDA autotuner measured and chose (None: not run)


def build_trainer(
    model_path: str | Path,
    train_jsonl: str | Path,
    checkpoint_dir: str | Path,
    settings: dict,
    prompt_format: str,
    seed: int,
    device: str = "auto",
    revision: str | None = None,
    callbacks: Sequence = (),
    on_bad_rows: str = "count",
) -> PreparedRun:
    """Validate everything cheap first (settings, device, target modules, data), then load the model and
    build the SFTTrainer. Nothing is trained and nothing but `checkpoint_dir` is written."""
    model_path = str(model_path)
    check_settings(settings)
    meta_model = _meta_model(model_path, revision)
    plan = resolve_plan(settings, device, vocab_size=meta_model.config.get_text_config().vocab_size)
    for reason in plan.reasons:
        log.info("%s", reason)
    check_target_modules(settings["target_modules"], meta_model)

    from tunelens.models import load_tokenizer

    tokenizer = load_tokenizer(model_path, revision)
    rows = load_train_rows(train_jsonl)
    examples = training_examples(rows, prompt_format, tokenizer)
    tokenized, stats = tokenize_examples(rows, examples, tokenizer, settings["max_seq_length"], train_jsonl,
                                         on_bad_rows)
    if stats.truncated_rows:
        log.warning("%d of %d rows are longer than max_seq_length=%d tokens and are truncated (end cut)",
                    stats.truncated_rows, stats.rows, settings["max_seq_length"])
    max_length = settings["max_seq_length"]
    if settings["padding_free"] and not settings["packing"]:
        # TRL does not truncate padding-free batches without packing: allowed only when no row needs it.
        if stats.truncated_rows:
            raise ConfigError(
                f"finetune.padding_free without packing does not truncate, and {stats.truncated_rows} row(s) of "
                f"{train_jsonl} exceed max_seq_length={max_length}; enable packing or raise max_seq_length"
            )
        max_length = None
    log.info("train set: %d rows, %d prompt tokens, %d response tokens (loss-bearing) per epoch, longest row %d",
             stats.rows, stats.prompt_tokens, stats.completion_tokens, stats.max_row_tokens)

    fingerprint = run_fingerprint(model_path, train_jsonl, settings, prompt_format, seed, plan, revision)
    resume_from = prepare_checkpoint_dir(checkpoint_dir, fingerprint)

    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer

    started = time.perf_counter()
    model = _load_base_model(model_path, plan, revision)
    load_time_s = time.perf_counter() - started
    row_separation = None
    if settings["packing"] or settings["padding_free"]:
        row_separation = separate_packed_rows(model)
        log.info("packed rows are kept apart by: %s", row_separation)
    log_callback = _make_log_callback()
    trainer = SFTTrainer(
        model=model,
        args=sft_config(settings, plan, checkpoint_dir, seed, max_length=max_length),
        # Already tokenized: TRL builds labels from completion_mask (completion_only_loss), truncates, packs.
        train_dataset=Dataset.from_list(tokenized),
        processing_class=tokenizer,
        peft_config=lora_config(settings),
        callbacks=[log_callback, *callbacks],
    )
    # With tqdm off, the Trainer prints every log dict to stdout; our callback logs them instead.
    trainer.remove_callback(PrinterCallback)
    autotune = None
    if plan.device == "cuda" and settings["autotune"]:
        autotune = autotune_cuda(trainer, settings, plan, Path(checkpoint_dir))
    return PreparedRun(trainer, plan, stats, fingerprint, resume_from, log_callback, load_time_s, row_separation,
                       autotune)


# --------------------------------------------------------------------------------------------- autotune
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


# --------------------------------------------------------------------------------------------- outputs
class DivergenceError(TunelensError):
    """Training diverged: the adapter would be garbage, and its scores would look like real results."""


# A last logged loss above this multiple of the first (and this much higher) is divergence, not noise.
DIVERGENCE_FACTOR = 2.0
DIVERGENCE_MIN_RISE = 0.5


def check_divergence(rows: list[dict], settings: dict, name: str, model=None) -> None:
    """Fail when training blew up: a logged loss or gradient norm is not finite, the gradient vanished
    for good (a collapsed model: every logged step after the first has gradient norm 0), the last loss
    ends far above the first, or (given `model`) a trained parameter is not finite."""
    import math

    lr = settings.get("learning_rate")
    for row in rows:
        for key in ("loss", "grad_norm"):
            if key in row and not math.isfinite(float(row[key])):
                raise DivergenceError(
                    f"fine-tune of '{name}' diverged: {key.replace('grad_norm', 'gradient norm')} is {row[key]} at "
                    f"step {row['step']} (first logged loss {rows[0]['loss']}); lower finetune.learning_rate ({lr}) "
                    "or check the data"
                )
    later = rows[1:]
    if later and all(row.get("grad_norm") == 0.0 for row in later):
        raise DivergenceError(
            f"fine-tune of '{name}' diverged: the gradient norm is 0 from step {later[0]['step']} on, with the loss "
            f"stuck at {float(later[-1]['loss']):.4g} (the model collapsed, e.g. to a uniform prediction); lower "
            f"finetune.learning_rate ({lr})"
        )
    if model is not None:
        for param_name, param in model.named_parameters():
            if param.requires_grad and not bool(param.detach().isfinite().all()):
                raise DivergenceError(f"fine-tune of '{name}' diverged: trained parameter {param_name} holds "
                                      f"non-finite values; lower finetune.learning_rate ({lr})")
    first, last = float(rows[0]["loss"]), float(rows[-1]["loss"])
    if len(rows) > 1 and last > DIVERGENCE_FACTOR * first and last - first > DIVERGENCE_MIN_RISE:
        raise DivergenceError(
            f"fine-tune of '{name}' diverged: loss rose from {first:.4g} (step {rows[0]['step']}) to {last:.4g} "
            f"(step {rows[-1]['step']}), more than {DIVERGENCE_FACTOR:g}x; lower finetune.learning_rate ({lr})"
        )


def train_log_rows(log_history: list[dict]) -> list[dict]:
    """The training rows of the trainer's log history (the final summary row has no 'loss')."""
    rows = []
    for entry in log_history:
        if "loss" not in entry:
            continue
        rows.append({key: entry[key] for key in LOG_KEYS if key in entry})
    return rows


def plot_loss(rows: list[dict], png_path: str | Path, title: str) -> None:
    """Loss (nats per response token) and learning rate against optimizer step, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png_path = Path(png_path)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    steps = [row["step"] for row in rows]
    ax.plot(steps, [row["loss"] for row in rows], marker="o", markersize=3, color="tab:blue", label="train loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean cross-entropy per response token, nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if any("learning_rate" in row for row in rows):
        ax_lr = ax.twinx()
        ax_lr.plot(steps, [row.get("learning_rate", float("nan")) for row in rows], color="tab:gray",
                   linestyle="--", linewidth=1, label="learning rate")
        ax_lr.set_ylabel("learning rate")
    fig.tight_layout()
    try:
        save_figure_atomic(fig, png_path)
    finally:
        plt.close(fig)


def _peak_memory() -> dict:
    import torch

    peak = {"cpu_max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        peak["cuda_max_reserved_mib"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    return peak


def _model_source(model_path: str) -> dict:
    """What the base model is: its path plus the materialisation record of embedded models."""
    from tunelens.models import SOURCE_RECORD

    source: dict[str, Any] = {"path": str(model_path)}
    record = Path(model_path) / SOURCE_RECORD
    if record.exists():
        source["record"] = json.loads(record.read_text(encoding="utf-8"))
    return source


def _save_adapter(model, adapter_dir: Path, record: dict) -> None:
    """Save the adapter into a staging dir beside `adapter_dir`, then rename it into place."""
    with atomic_directory(adapter_dir) as staging:
        model.save_pretrained(str(staging))
        write_json_atomic(staging / ADAPTER_RECORD, record)


def finetune(
    model_path: str | Path,
    train_jsonl: str | Path,
    adapter_dir: str | Path,
    train_log: str | Path,
    metrics_json: str | Path,
    loss_png: str | Path,
    checkpoint_dir: str | Path,
    settings: dict,
    prompt_format: str,
    seed: int,
    device: str = "auto",
    revision: str | None = None,
    model_name: str | None = None,
    callbacks: Sequence = (),
    on_bad_rows: str = "count",
) -> dict:
    """Fine-tune a LoRA adapter on `train_jsonl` and write the stage's outputs. Returns the metrics dict.

    `settings` is the model's merged `finetune` config section (schemas/config.schema.yaml).
    `callbacks` are extra transformers TrainerCallbacks (tests use one to kill a run mid-way).
    Resumes from `checkpoint_dir` when it holds a checkpoint of the same run; deletes it on success.
    """
    import torch

    wall_start = time.perf_counter()
    if not settings.get("enabled", True):
        raise ConfigError(f"finetune.enabled is false for model '{model_name or model_path}'; nothing to train")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    run = build_trainer(model_path, train_jsonl, checkpoint_dir, settings, prompt_format, seed, device,
                        revision, callbacks, on_bad_rows=on_bad_rows)
    trainer, plan = run.trainer, run.plan
    if run.resume_from is not None:
        log.info("resuming from %s", run.resume_from)

    train_start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
    train_time_s = time.perf_counter() - train_start

    rows = train_log_rows(trainer.state.log_history)
    if not rows:
        raise DataError(f"{train_jsonl}: training logged no loss (no optimizer step ran?)")
    check_divergence(rows, settings, model_name or str(model_path), trainer.model)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    steps_this_job = run.log_callback.steps_run
    tokens_this_job = sum(row.get("tokens", 0) for row in rows if row["step"] > run.log_callback.start_step)
    adapter_record = {
        "base_model": _model_source(str(model_path)),
        "revision": revision,
        "method": plan.method,
        "settings": settings,
        "prompt_format": prompt_format,
        "seed": seed,
        "train_sha256": run.fingerprint["train_sha256"],
        "versions": library_versions(),
    }
    adapter_dir = Path(adapter_dir)
    _save_adapter(trainer.model, adapter_dir, adapter_record)

    metrics = {
        "model": model_name,
        "base_model": adapter_record["base_model"],
        "revision": revision,
        "method": plan.method,
        "device": plan.device,
        "device_name": torch.cuda.get_device_name() if plan.device == "cuda" else "cpu",
        "compute_dtype": plan.compute_dtype,
        "gradient_checkpointing": run.autotune["gradient_checkpointing"] if run.autotune else plan.gradient_checkpointing,
        "liger": plan.liger,
        "packed_row_separation": run.row_separation,
        "autotune": run.autotune,
        "micro_batch_size": trainer.args.per_device_train_batch_size,
        "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
        "plan_reasons": list(plan.reasons),
        "settings": settings,
        "prompt_format": prompt_format,
        "seed": seed,
        "train_file": str(train_jsonl),
        "train_sha256": run.fingerprint["train_sha256"],
        "train_rows": run.stats.rows,
        "train_prompt_tokens_per_epoch": run.stats.prompt_tokens,
        "train_response_tokens_per_epoch": run.stats.completion_tokens,
        "truncated_rows": run.stats.truncated_rows,
        # rows left out of training, by reason (dataset.on_bad_rows: error turns them into a failure)
        "dropped_rows": dict(run.stats.dropped_rows),
        "trainable_params": int(trainable),
        "total_params": int(total),
        "trainable_percent": round(100.0 * trainable / total, 4),
        "steps": trainer.state.global_step,
        "epochs": round(float(trainer.state.epoch or 0.0), 4),
        "train_tokens": int(trainer.state.num_input_tokens_seen),  # non-padding input tokens, all jobs
        "resumed_from_step": run.log_callback.start_step if run.resume_from else None,
        "steps_this_job": steps_this_job,
        "tokens_this_job": int(tokens_this_job),
        "tokens_per_s": round(tokens_this_job / train_time_s, 2) if train_time_s > 0 else None,
        "final_loss": rows[-1]["loss"],
        "first_loss": rows[0]["loss"],
        "mean_train_loss": round(float(result.training_loss), 6),
        "load_time_s": round(run.load_time_s, 2),
        "train_time_s": round(train_time_s, 2),
        "wall_time_s": round(time.perf_counter() - wall_start, 2),
        "peak_memory": _peak_memory(),
        "adapter": {"dir": str(adapter_dir), "sha256": sha256_dir(adapter_dir)},
        "versions": library_versions(),
    }
    write_jsonl_atomic(train_log, rows)
    plot_loss(rows, loss_png, f"{model_name or Path(str(model_path)).name}: {plan.method}, r={settings['lora_r']}")
    write_json_atomic(metrics_json, metrics)
    # Only now is the run complete; its checkpoints have served their purpose.
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    log.info("done: %d steps (%d in this job), final loss %.4f, %s tokens/s, adapter %s",
             metrics["steps"], steps_this_job, metrics["final_loss"], metrics["tokens_per_s"], adapter_dir)
    return metrics
