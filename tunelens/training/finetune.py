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

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from tunelens.errors import ConfigError, DataError, ModelError
from tunelens.io import (
    atomic_directory, library_versions, sha256_dir, write_json_atomic, write_jsonl_atomic,
)
# The stage's parts (tunelens/training/), re-exported: callers and tests import them from here.
from tunelens.training.data import (  # noqa: F401
    TRAIN_ROW_KEYS, DataStats, encode_text, load_train_rows, tokenize_examples, training_examples,
)
from tunelens.training.plan import (  # noqa: F401
    AUTOTUNE_FILE, LIGER_MIN_VOCAB, TrainingPlan, _meta_model, check_settings,
    check_target_modules, linear_module_names, resolve_plan,
)
from tunelens.training.outputs import (  # noqa: F401
    DIVERGENCE_FACTOR, DIVERGENCE_MIN_RISE, LOG_KEYS, DivergenceError, _model_source, _peak_memory,
    canonical_adapter_config, check_divergence, loss_window_record, plot_loss, train_log_rows,
)
from tunelens.settings.finetune import FinetuneSection
from tunelens.training.trainer import sft_trainer_class
from tunelens.training.checkpoints import (  # noqa: F401
    RUN_FINGERPRINT_FILE, _complete_checkpoint, prepare_checkpoint_dir, run_fingerprint,
)
from tunelens.training.speed import (  # noqa: F401
    VARLEN_ATTENTION, _probe, attention_implementation, autotune_cuda, lean_lora_forward, packed_attention_mask,
    packed_sequences_as_rows, separate_packed_rows,
)

log = logging.getLogger(__name__)

ADAPTER_RECORD = "tunelens_adapter.json"


# --------------------------------------------------------------------------------------------- trainer
def lora_config(settings: FinetuneSection | dict):
    """peft LoraConfig from the settings: every key declared with `lora=` (tunelens.settings.finetune)."""
    from peft import LoraConfig

    return LoraConfig(
        **FinetuneSection.from_dict(settings).library_kwargs("lora"),
        bias="none",
        task_type="CAUSAL_LM",
    )


def sft_config(settings: FinetuneSection | dict, plan: TrainingPlan, checkpoint_dir: str | Path, seed: int, *,
               max_length: int | None):
    """TRL SFTConfig from the tunelens settings. Every value that changes the result comes from `settings`: the keys
    declared with `sft=` (tunelens.settings.finetune), the plan resolved from them, and max_length."""
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
        **FinetuneSection.from_dict(settings).library_kwargs("sft"),
        max_length=max_length,
        completion_only_loss=True,
        bf16=plan.compute_dtype == "bfloat16",
        fp16=plan.compute_dtype == "float16",
        use_cpu=plan.device == "cpu",
        use_liger_kernel=plan.liger,
        logging_first_step=True,
        save_strategy="steps",
        # Two, not one: if a job is killed while writing the newest, the previous one is still whole.
        save_total_limit=2,
        include_num_input_tokens_seen="non_padding",
        # Off: the filter reads every micro-batch's loss on the host (a device sync per micro-batch) to hide a NaN
        # from the log; a NaN loss should reach train_log.jsonl, where check_divergence fails the job on it.
        logging_nan_inf_filter=False,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def _load_base_model(model_path: str, plan: TrainingPlan, revision: str | None):
    import torch
    from transformers import AutoModelForCausalLM

    if plan.device == "cuda":
        from tunelens.servers import release_gpu_for_this_job

        release_gpu_for_this_job()  # an idle generation server must not hold the GPU memory training needs
    dtype = getattr(torch, plan.compute_dtype)
    if plan.device == "cuda":
        from tunelens.gpufit import NF4_BYTES_PER_PARAMETER, check_model_fits_gpus

        # Each data-parallel process holds the whole model on its own GPU: the check is against one GPU.
        check_model_fits_gpus(str(model_path), model_path, 1,
                              NF4_BYTES_PER_PARAMETER if plan.method == "qlora" else dtype.itemsize)
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



class HostClock:
    """Step ends on the host's clock: right on a CPU, where a step's work is done when its call returns."""

    def mark(self) -> float:
        return time.perf_counter()

    def seconds(self, start: float, end: float) -> float:
        return end - start


class DeviceClock:
    """Step ends on the GPU's clock. The CPU queues a step's work and moves on, up to a step or more ahead of the
    GPU (tunelens' trainer reads nothing back between log rows), so the host's time at a step's end is when the
    step was queued, not when it ran. A CUDA event marks the point in the queued work; the time between two marks
    is the GPU's. Reading it waits for the later mark, which a logged row's values have already waited for."""

    def mark(self):
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        end.synchronize()
        return start.elapsed_time(end) / 1000


def step_clock(device_type: str) -> HostClock | DeviceClock:
    """The clock that times a step on this device: the GPU's on CUDA, the host's elsewhere."""
    return DeviceClock() if device_type == "cuda" else HostClock()


def _make_log_callback():
    """A TrainerCallback that adds `tokens` and `tokens_per_s` to each log row, logs it, and counts the
    optimizer steps this process runs. Defined inside a function so importing this module stays free of
    transformers (Snakemake imports tunelens on every invocation)."""
    from transformers import TrainerCallback

    class TrainLogCallback(TrainerCallback):
        def __init__(self, clock=None):
            self.steps_run = 0
            self.start_step = 0
            # Where step ends are read: the GPU's clock on CUDA, the host's elsewhere (chosen at train begin).
            self.clock = clock
            self._last_mark = None
            self._last_tokens = 0
            self._step_end: dict = {}  # optimizer step -> the clock's mark at its end, until its row is logged

        def on_train_begin(self, args, state, control, **kwargs):
            if self.clock is None:
                self.clock = step_clock(getattr(args.device, "type", "cpu"))
            self.start_step = state.global_step
            self._last_mark = self.clock.mark()
            self._last_tokens = state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kwargs):
            self.steps_run += 1
            self._step_end[state.global_step] = self.clock.mark()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self._last_mark is None:  # a row logged outside train() (e.g. evaluate()): no step to time
                return
            entry = state.log_history[-1] if state.log_history else {}
            # A row's rate runs to the end of its own step: the trainer may log it one step later
            # (tunelens.training.trainer), with the state as of its step.
            now = self._step_end.get(entry.get("step"))
            if now is None:
                now = self.clock.mark()
            self._step_end = {step: at for step, at in self._step_end.items() if step > entry.get("step", -1)}
            if "loss" in entry:
                tokens = state.num_input_tokens_seen - self._last_tokens
                elapsed = max(self.clock.seconds(self._last_mark, now), 1e-9)
                # Stored in log_history, which checkpoints save, so rows of a killed run survive a resume.
                entry["tokens"] = int(tokens)
                entry["tokens_per_s"] = round(tokens / elapsed, 2)
                log.info(
                    "step %d/%d loss %.4f lr %.3g tokens/s %.1f", state.global_step, state.max_steps,
                    entry["loss"], entry.get("learning_rate", float("nan")), entry["tokens_per_s"],
                )
            self._last_mark, self._last_tokens = now, state.num_input_tokens_seen

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
    settings: FinetuneSection | dict,
    prompt_format: str,
    seed: int,
    device: str = "auto",
    revision: str | None = None,
    callbacks: Sequence = (),
    on_bad_rows: str = "count",
    sync_free: bool = True,
    lean_layers: bool = True,
    processes: int = 1,
) -> PreparedRun:
    """Validate everything cheap first (settings, device, target modules, data), then load the model and
    build the SFTTrainer. Nothing is trained and nothing but `checkpoint_dir` is written.

    `sync_free` False builds TRL's own SFTTrainer, which syncs with the device on every micro-batch for its
    metrics (tunelens.training.trainer); `lean_layers` False keeps PEFT's own LoRA forward (`lean_lora_forward`).
    Only benchmarks turn them off."""
    model_path = str(model_path)
    settings = check_settings(settings)
    meta_model = _meta_model(model_path, revision)
    plan = resolve_plan(settings, device, vocab_size=meta_model.config.get_text_config().vocab_size)
    for reason in plan.reasons:
        log.info("%s", reason)
    check_target_modules(settings.target_modules, meta_model)

    from tunelens.models import load_tokenizer

    tokenizer = load_tokenizer(model_path, revision)
    rows = load_train_rows(train_jsonl)
    # The DAG estimated the work when the rows were known then (local or embedded data); a hub dataset's rows
    # are known here, before any training step.
    from tunelens.config import training_work_problems

    problems = training_work_problems("finetune", settings, rows=len(rows))
    if problems:
        raise ConfigError("; ".join(problems))
    examples = training_examples(rows, prompt_format, tokenizer)
    tokenized, stats = tokenize_examples(rows, examples, tokenizer, settings.max_seq_length, train_jsonl,
                                         on_bad_rows)
    if stats.truncated_rows:
        log.warning("%d of %d rows are longer than max_seq_length=%d tokens and are truncated (end cut)",
                    stats.truncated_rows, stats.rows, settings.max_seq_length)
    max_length = settings.max_seq_length
    if settings.padding_free and not settings.packing:
        # TRL does not truncate padding-free batches without packing: allowed only when no row needs it.
        if stats.truncated_rows:
            raise ConfigError(
                f"finetune.padding_free without packing does not truncate, and {stats.truncated_rows} row(s) of "
                f"{train_jsonl} exceed max_seq_length={max_length}; enable packing or raise max_seq_length"
            )
        max_length = None
    log.info("train set: %d rows, %d prompt tokens, %d response tokens (loss-bearing) per epoch, longest row %d",
             stats.rows, stats.prompt_tokens, stats.completion_tokens, stats.max_row_tokens)

    fingerprint = run_fingerprint(model_path, train_jsonl, settings, prompt_format, seed, plan, revision, processes)
    resume_from = prepare_checkpoint_dir(checkpoint_dir, fingerprint)

    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer

    started = time.perf_counter()
    model = _load_base_model(model_path, plan, revision)
    load_time_s = time.perf_counter() - started
    row_separation = None
    if settings.packing or settings.padding_free:
        row_separation = separate_packed_rows(model)
        log.info("packed rows are kept apart by: %s", row_separation)
    log_callback = _make_log_callback()
    trainer_class = sft_trainer_class() if sync_free else SFTTrainer
    trainer = trainer_class(
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
    if settings.packing and attention_implementation(model) not in VARLEN_ATTENTION:
        if packed_sequences_as_rows(trainer.data_collator):
            row_separation += "; packed sequences collated as rows of their own"
    if lean_layers:
        log.info("lean LoRA forward on %d layers", lean_lora_forward(trainer.model))
    autotune = None
    if plan.device == "cuda" and settings.autotune:
        autotune = autotune_cuda(trainer, settings, plan, Path(checkpoint_dir))
    return PreparedRun(trainer, plan, stats, fingerprint, resume_from, log_callback, load_time_s, row_separation,
                       autotune)



# --------------------------------------------------------------------------------------------- outputs
def _save_adapter(model, adapter_dir: Path, record: dict) -> None:
    """Save the adapter into a staging dir beside `adapter_dir`, then rename it into place."""
    with atomic_directory(adapter_dir) as staging:
        model.save_pretrained(str(staging))
        canonical_adapter_config(staging)
        write_json_atomic(staging / ADAPTER_RECORD, record)


def finetune(
    model_path: str | Path,
    train_jsonl: str | Path,
    adapter_dir: str | Path,
    train_log: str | Path,
    metrics_json: str | Path,
    loss_png: str | Path,
    checkpoint_dir: str | Path,
    settings: FinetuneSection | dict,
    prompt_format: str,
    seed: int,
    device: str = "auto",
    revision: str | None = None,
    model_name: str | None = None,
    callbacks: Sequence = (),
    on_bad_rows: str = "count",
    build_options: dict | None = None,
    gpus: int = 1,
    processes: int | None = None,
    data_parallel: str | None = None,
) -> dict:
    """Fine-tune a LoRA adapter on `train_jsonl` and write the stage's outputs. Returns the metrics dict.

    `settings` is the model's merged `finetune` config section (schemas/config.schema.yaml).
    `callbacks` are extra transformers TrainerCallbacks (tests use one to kill a run mid-way; one process only).
    `build_options` go to `build_trainer` (benchmarks turn the speed-ups off with them).
    Resumes from `checkpoint_dir` when it holds a checkpoint of the same run; deletes it on success.
    `gpus`: the job's GPU count; on CUDA with more than one, training is data-parallel over them
    (tunelens.training.distributed: same rows per optimizer step and loss as one GPU). `processes` overrides the
    number of data-parallel processes (CPU included: gloo); `data_parallel` is set by that module in its workers.
    """
    import torch

    from tunelens.training import distributed

    wall_start = time.perf_counter()
    settings = check_settings(settings)
    if not settings.enabled:
        raise ConfigError(f"finetune.enabled is false for model '{model_name or model_path}'; nothing to train")
    if processes is None:
        from tunelens.models import pick_device

        processes = int(gpus or 1) if pick_device(device) == "cuda" else 1
    if processes > 1 and not distributed.in_worker():
        try:
            split, how = distributed.data_parallel_settings(settings, processes)
        except ValueError as exc:
            log.warning("%s: training in one process", exc)
            processes, data_parallel = 1, f"one process: {exc}"
        else:
            meta_model = _meta_model(str(model_path), revision)
            plan = resolve_plan(split, device, vocab_size=meta_model.config.get_text_config().vocab_size)
            # Here, once: the workers find it prepared (no two processes deleting stale checkpoints at once).
            prepare_checkpoint_dir(checkpoint_dir, run_fingerprint(
                str(model_path), train_jsonl, split, prompt_format, seed, plan, revision, processes))
            distributed.launch(dict(
                model_path=str(model_path), train_jsonl=str(train_jsonl), adapter_dir=str(adapter_dir),
                train_log=str(train_log), metrics_json=str(metrics_json), loss_png=str(loss_png),
                checkpoint_dir=str(checkpoint_dir), settings=split.as_dict(), prompt_format=prompt_format, seed=seed,
                device=device, revision=revision, model_name=model_name, on_bad_rows=on_bad_rows,
                processes=processes, data_parallel=how,
            ), processes, Path(checkpoint_dir))
            return json.loads(Path(metrics_json).read_text())
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    run = build_trainer(model_path, train_jsonl, checkpoint_dir, settings, prompt_format, seed, device,
                        revision, callbacks, on_bad_rows=on_bad_rows, processes=processes, **(build_options or {}))
    trainer, plan = run.trainer, run.plan
    if run.resume_from is not None:
        log.info("resuming from %s", run.resume_from)

    train_start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
    train_time_s = time.perf_counter() - train_start
    if not distributed.is_main_process():
        return {}  # process 0 writes the outputs

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
        "settings": settings.as_dict(),
        "prompt_format": prompt_format,
        "seed": seed,
        "train_sha256": run.fingerprint["train_sha256"],
        "versions": library_versions(),
    }
    adapter_dir = Path(adapter_dir)
    _save_adapter(trainer.model, adapter_dir, adapter_record)

    layer_graphs = getattr(trainer, "tunelens_layer_graphs", None)
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
        # decoder layers replayed from CUDA graphs (tunelens.training.graphed): shapes captured, passes by path
        "layer_graphs": layer_graphs.summary() if layer_graphs else None,
        "micro_batch_size": trainer.args.per_device_train_batch_size,
        "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
        # processes, and how each optimizer step's rows were split over them (None: one process, as configured)
        "data_parallel": {"processes": processes, "split": data_parallel},
        "plan_reasons": list(plan.reasons),
        "settings": settings.as_dict(),
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
        "final_loss": rows[-1]["loss"],  # one logged step (one batch): noisy; the windows below are not
        "first_loss": rows[0]["loss"],
        **loss_window_record(rows),
        "mean_train_loss": round(float(result.training_loss), 6),
        "load_time_s": round(run.load_time_s, 2),
        "train_time_s": round(train_time_s, 2),
        "wall_time_s": round(time.perf_counter() - wall_start, 2),
        "peak_memory": _peak_memory(),
        "adapter": {"dir": str(adapter_dir), "sha256": sha256_dir(adapter_dir)},
        "versions": library_versions(),
    }
    write_jsonl_atomic(train_log, rows)
    plot_loss(rows, loss_png, f"{model_name or Path(str(model_path)).name}: {plan.method}, r={settings.lora_r}")
    write_json_atomic(metrics_json, metrics)
    # Only now is the run complete; its checkpoints have served their purpose.
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    log.info("done: %d steps (%d in this job), loss %.4f -> %.4f (mean of the first and last %d logged steps), "
             "%s tokens/s, adapter %s", metrics["steps"], steps_this_job, metrics["first_loss_window_mean"],
             metrics["last_loss_window_mean"], metrics["loss_window_steps"], metrics["tokens_per_s"], adapter_dir)
    return metrics
