"""Profile the project's own fine-tune step: where a QLoRA optimizer step spends its wall time.

Builds the stage's trainer (`tunelens.training.finetune.build_trainer`: TRL SFTTrainer + PEFT + bitsandbytes on CUDA, the
autotuner included) once per variant, in this one process, then trains short runs of it:

- timed runs, interleaved (A B C A B C ...): tokens/s and seconds per optimizer step, median over the steps after
  `--warmup`; every run restarts from the same LoRA weights, seed and rows, so the per-step losses of variants that
  must not change the training can be compared (`loss_max_abs_diff` against the first variant);
- one profiled run per variant (torch.profiler over `--profile-steps` steps after the warm-up): GPU busy time against
  wall time, the CPU time of each phase of a step (data, forward + loss, backward, clip, optimizer, the rest), the top
  CPU-side operators, kernels per step, and host syncs (cudaStreamSynchronize/cudaMemcpy calls, `.item()`,
  `nonzero`, cudaMalloc/cudaFree).

    # GPU, the random 7B shape (bench_finetune.make_llama7b), the gpu-study preset's 8 rows per step:
    python bench/profile_finetune_step.py --make-llama7b /dev/shm/llama7b --tokenizer TOKDIR --model /dev/shm/llama7b \
        --data code_alpaca_2k.json --variants auto,auto+nosync --out profile.json
    # CPU, to try the script itself on a tiny model:
    python bench/profile_finetune_step.py --model TINY --data code_alpaca_2k.json --device cpu --batch-size 4 \
        --warmup 1 --timed-steps 3 --profile-steps 2

Variants: bench_finetune.VARIANTS plus the ones below (settings changes of the stage).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

for _key, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                     "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_key, _value)

from bench_finetune import VARIANTS, alpaca_to_split_rows, bench_settings, make_llama7b, variant_patches  # noqa: E402

# Profile-only variants: settings of the stage that are candidates for its GPU default.
EXTRA_VARIANTS = {
    "auto+padfree": {"padding_free": True},  # the same rows, concatenated, no padding (block-diagonal mask)
    # TRL's own SFTTrainer: a host sync per micro-batch for each logged metric (tunelens.training.trainer)
    "auto+trl-syncs": {"sync_free": False},
    "auto+peft-forward": {"lean_layers": False},  # PEFT's own LoRA forward (and bitsandbytes' per-call dequantization)
}
ALL_VARIANTS = VARIANTS | EXTRA_VARIANTS

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync",
              "cudaMemcpy", "cudaStreamWaitEvent")
SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::masked_select")
ALLOC_CALLS = ("cudaMalloc", "cudaFree", "cudaMallocAsync", "cudaFreeAsync", "cudaHostAlloc")
LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
PHASES = ("data", "forward+loss", "backward", "clip", "optimizer")


# --------------------------------------------------------------------------------------------- helpers
def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


class _Phases:
    """Wraps the Trainer's step pieces in torch.profiler record_function ranges (attribution only)."""

    def __init__(self, trainer):
        import torch

        self.enabled = False
        rf = torch.profiler.record_function

        def wrap(obj, name, label):
            original = getattr(obj, name)

            def wrapped(*args, **kwargs):
                if not self.enabled:
                    return original(*args, **kwargs)
                with rf(f"phase::{label}"):
                    return original(*args, **kwargs)

            setattr(obj, name, wrapped)

        wrap(trainer, "get_batch_samples", "data")
        wrap(trainer, "compute_loss", "forward+loss")
        wrap(trainer.accelerator, "backward", "backward")
        wrap(trainer, "_clip_grad_norm", "clip")
        self._wrap = wrap

    def wrap_optimizer(self, optimizer) -> None:
        if not getattr(optimizer, "_tunelens_profiled", False):
            self._wrap(optimizer, "step", "optimizer")
            optimizer._tunelens_profiled = True


def _make_callback(state: dict):
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """A mark at each optimizer step's end, on the stage's own clock (no device sync: on CUDA an event, so a
        step's time is the GPU's even though the CPU queues steps ahead of it), and the profiler's start and stop."""

        def on_train_begin(self, args, st, control, optimizer=None, **kwargs):
            state["marks"] = [state["clock"].mark()]
            if optimizer is not None and state.get("phases"):
                state["phases"].wrap_optimizer(optimizer)

        def on_step_end(self, args, st, control, **kwargs):
            state["marks"].append(state["clock"].mark())
            prof = state.get("profiler")
            if prof is None:
                return
            done = len(state["marks"]) - 1
            if done == state["profile_from"]:
                _sync(state["device"])
                state["phases"].enabled = True
                prof.start()
                state["window_start"] = time.perf_counter()
            elif done == state["profile_from"] + state["profile_steps"]:
                _sync(state["device"])
                state["window_s"] = time.perf_counter() - state["window_start"]
                prof.stop()
                state["phases"].enabled = False

    return StepClock()


def _count_tokens(collator, counts: list):
    """The collator, counting each micro-batch's non-padding tokens on the CPU (no device sync)."""

    def collate(examples):
        batch = collator(examples)
        mask = batch.get("attention_mask")
        counts.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
        return batch

    return collate


# --------------------------------------------------------------------------------------------- one variant
class Variant:
    def __init__(self, args, name: str, work: Path):
        import torch

        from tunelens.training.finetune import build_trainer, step_clock

        self.name, self.args = name, args
        settings = bench_settings(args, name.split("+")[0] if name not in VARIANTS else name)
        settings.update(ALL_VARIANTS[name])
        build = dict(ALL_VARIANTS[name].get("_build", {}))
        settings.pop("_build", None)
        settings.pop("_patch", None)  # applied around each run (bench_finetune.variant_patches)
        for key in ("sync_free", "lean_layers"):
            if key in settings:
                build[key] = settings.pop(key)
        settings["max_steps"] = args.warmup + max(args.timed_steps, args.profile_steps)
        self.settings = settings | build
        started = time.perf_counter()
        self.run = build_trainer(args.model, work / "train.jsonl", work / name / "checkpoints", settings,
                                 args.prompt_format, args.seed, args.device, **build)
        self.build_s = time.perf_counter() - started
        trainer = self.run.trainer
        self.token_counts: list[int] = []
        trainer.data_collator = _count_tokens(trainer.data_collator, self.token_counts)
        self.state = {"device": self.run.plan.device, "clock": step_clock(self.run.plan.device)}
        trainer.add_callback(_make_callback(self.state))
        self.state["phases"] = _Phases(trainer)
        self.initial = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}
        self.device = self.run.plan.device
        self.accumulation = trainer.args.gradient_accumulation_steps
        del torch

    def train(self, steps: int, profiler=None) -> dict:
        import torch
        from transformers import set_seed

        trainer = self.run.trainer
        with torch.no_grad():
            for name, param in trainer.model.named_parameters():
                if name in self.initial:
                    param.copy_(self.initial[name])
        set_seed(self.args.seed)
        trainer.optimizer, trainer.lr_scheduler = None, None
        trainer._created_lr_scheduler = False
        trainer.args.max_steps = steps
        self.token_counts.clear()
        self.state.update(profiler=profiler, profile_from=self.args.warmup, profile_steps=self.args.profile_steps)
        with variant_patches(self.name, ALL_VARIANTS):
            trainer.train()
        _sync(self.device)
        marks, clock = self.state["marks"], self.state["clock"]
        step_s = [clock.seconds(a, b) for a, b in zip(marks, marks[1:])]
        acc = self.accumulation
        tokens = [sum(self.token_counts[i * acc:(i + 1) * acc]) for i in range(len(step_s))]
        losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
        steady = list(range(self.args.warmup, len(step_s)))
        return {"step_s": [round(s, 4) for s in step_s], "tokens": tokens, "losses": losses,
                "median_step_s": round(statistics.median(step_s[i] for i in steady), 4) if steady else None,
                "tokens_per_s": round(sum(tokens[i] for i in steady) / sum(step_s[i] for i in steady), 1)
                if steady else None}


# --------------------------------------------------------------------------------------------- profile analysis
def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, None
    for start, stop in sorted(intervals):
        if end is None or start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def _annotation(name: str) -> bool:
    return name.startswith(("phase::", "ProfilerStep"))


def analyse(prof, window_s: float, steps: int, top: int) -> dict:
    """The profile of `steps` optimizer steps as numbers per step."""
    from torch.autograd import DeviceType

    events = prof.events()
    gpu_intervals, kernels, memcpy_dtoh = [], 0, 0
    kernel_time = collections.Counter()
    counts, seconds = collections.Counter(), collections.Counter()
    phase_us = collections.Counter()
    for evt in events:
        name = evt.name
        if evt.device_type == DeviceType.CUDA and _annotation(name):
            continue  # the phase ranges, mirrored on the GPU timeline: not work
        if evt.device_type == DeviceType.CUDA:
            gpu_intervals.append((evt.time_range.start, evt.time_range.end))
            if name.startswith("Memcpy"):
                memcpy_dtoh += "DtoH" in name
            elif not name.startswith("Memset"):
                kernels += 1
                kernel_time[name[:90]] += evt.time_range.elapsed_us()
            continue
        if name in SYNC_CALLS or name in SYNC_OPS or name in ALLOC_CALLS or name in LAUNCH_CALLS:
            counts[name] += 1
            seconds[name] += evt.time_range.elapsed_us() / 1e6
        if name.startswith("phase::"):
            phase_us[name[len("phase::"):]] += evt.time_range.elapsed_us()
    try:  # the raw device events: their start times are exact, whatever FunctionEvent keeps of them
        raw = [(e.start_ns() / 1e3, e.end_ns() / 1e3) for e in prof.profiler.kineto_results.events()
               if e.device_type() == DeviceType.CUDA and not _annotation(e.name())]
    except AttributeError:
        raw = []
    busy_us = _union_us(raw or gpu_intervals)
    per_step = lambda value: round(value / steps, 4)  # noqa: E731
    cpu_ops = [
        {"op": a.key[:80], "calls_per_step": per_step(a.count), "self_cpu_ms_per_step": per_step(a.self_cpu_time_total / 1e3),
         "cpu_total_ms_per_step": per_step(a.cpu_time_total / 1e3)}
        for a in sorted(prof.key_averages(), key=lambda a: -a.self_cpu_time_total)[:top]
    ]
    phases = {name: per_step(phase_us.get(name, 0.0) / 1e6) for name in PHASES}
    phases["rest (callbacks, logging, scheduler, zero_grad)"] = round(window_s / steps - sum(phases.values()), 4)
    return {
        "steps": steps,
        "wall_s_per_step": per_step(window_s),
        "gpu_busy_s_per_step": per_step(busy_us / 1e6),
        "gpu_busy_share": round(busy_us / 1e6 / window_s, 3) if window_s else None,
        "kernels_per_step": per_step(kernels),
        "memcpy_dtoh_per_step": per_step(memcpy_dtoh),
        "calls_per_step": {name: per_step(n) for name, n in sorted(counts.items())},
        "call_s_per_step": {name: per_step(s) for name, s in sorted(seconds.items())},
        "phase_cpu_s_per_step": phases,
        "top_cpu_ops": cpu_ops,
        "top_kernels_ms_per_step": [{"kernel": k, "ms_per_step": per_step(us / 1e3)}
                                    for k, us in kernel_time.most_common(top)],
    }


def profile(variant: Variant, args) -> dict:
    import torch
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if variant.device == "cuda" else [])
    prof = torch.profiler.profile(activities=activities, record_shapes=False, with_stack=False)
    variant.train(args.warmup + args.profile_steps, profiler=prof)
    if args.trace_dir:
        Path(args.trace_dir).mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(Path(args.trace_dir) / f"{variant.name}.json"))
    return analyse(prof, variant.state["window_s"], args.profile_steps, args.top)


def markdown(result: dict) -> str:
    lines = ["| variant | tok/s median (runs) | spread | s/step | GPU busy / wall | kernels/step | syncs/step | "
             "loss max diff |", "|---|---|---|---|---|---|---|---|"]
    for name, v in result["variants"].items():
        if "tokens_per_s_runs" not in v:
            p = v.get("profile", {})
            lines.append(f"| {name} | {v.get('error', 'profile only')[:80]} | | | {p.get('gpu_busy_s_per_step', 0):.3f} / "
                         f"{p.get('wall_s_per_step', 0):.3f} | {p.get('kernels_per_step', 0):.0f} | | |")
            continue
        if "error" in v:
            lines.append(f"| {name} | FAILED: {v['error'][:80]} | | | | | | |")
            continue
        p = v.get("profile", {})
        syncs = sum(p.get("calls_per_step", {}).get(k, 0) for k in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                                  "cudaEventSynchronize", "cudaMemcpyAsync", "cudaMemcpy"))
        lines.append(f"| {name} | {v['tokens_per_s_median']:.0f} ({', '.join(f'{t:.0f}' for t in v['tokens_per_s_runs'])}) "
                     f"| {v['spread']:.1%} | {v['median_step_s']:.3f} | {p.get('gpu_busy_s_per_step', 0):.3f} / "
                     f"{p.get('wall_s_per_step', 0):.3f} | {p.get('kernels_per_step', 0):.0f} | {syncs:.0f} | "
                     f"{v.get('loss_max_abs_diff', 0):.2e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, type=Path, help="Alpaca-format JSON list")
    parser.add_argument("--variants", default="auto", help=f"comma-separated, of {sorted(ALL_VARIANTS)}")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="rows per optimizer step (the gpu-study preset: 8)")
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=4, help="optimizer steps before timing / profiling")
    parser.add_argument("--timed-steps", type=int, default=16)
    parser.add_argument("--profile-steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per variant, interleaved")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--lr-scheduler", default="cosine")
    parser.add_argument("--warmup-ratio", type=float, default=0.03)
    parser.add_argument("--prompt-format", default="alpaca")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--make-llama7b", type=Path)
    parser.add_argument("--tokenizer", type=Path)
    parser.add_argument("--trace-dir", type=Path, help="also write each variant's chrome trace here")
    parser.add_argument("--work", type=Path, default=Path("/tmp/profile_finetune_step"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    args.steps, args.packing = args.warmup + args.timed_steps, False  # for bench_settings
    names = args.variants.split(",")
    unknown = [n for n in names if n not in ALL_VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choices: {sorted(ALL_VARIANTS)}")
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("tunelens.training.finetune").setLevel(logging.WARNING)  # the per-step lines
    if args.make_llama7b and not (args.make_llama7b / "config.json").exists():
        make_llama7b(args.make_llama7b, args.tokenizer)
    args.work.mkdir(parents=True, exist_ok=True)
    alpaca_to_split_rows(args.data, args.rows, args.work / "train.jsonl")

    result = {"args": {k: str(v) for k, v in vars(args).items()}, "variants": {}}
    variants = {}
    for name in names:
        try:
            variants[name] = Variant(args, name, args.work)
        except Exception as exc:  # noqa: BLE001 - a variant that cannot run is a result, not the end of the call
            result["variants"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            print(name, "FAILED:", exc, flush=True)
    runs = collections.defaultdict(list)
    for round_no in range(args.repeats):
        for name, variant in variants.items():
            try:
                runs[name].append(variant.train(args.steps))
            except Exception as exc:  # noqa: BLE001
                result["variants"][name] = {"error": f"{type(exc).__name__}: {exc}"}
                print(name, "FAILED:", exc, flush=True)
                continue
            print(f"round {round_no} {name}: {runs[name][-1]['tokens_per_s']} tok/s, "
                  f"{runs[name][-1]['median_step_s']} s/step", flush=True)
    reference = next((runs[n][0]["losses"] for n in names if runs.get(n)), None)
    for name, variant in variants.items():
        if "error" in result["variants"].get(name, {}):
            continue
        if not runs.get(name):  # --repeats 0: the profile only
            entry = {"profile": profile(variant, args)}
            result["variants"][name] = entry
            continue
        tps = [r["tokens_per_s"] for r in runs[name]]
        entry = {
            "settings": {k: v for k, v in variant.settings.items() if k in ("method", "packing", "padding_free",
                                                                           "gradient_checkpointing", "liger",
                                                                           "sync_free", "lean_layers")},
            "micro_batch_size": variant.run.trainer.args.per_device_train_batch_size,
            "gradient_checkpointing": (variant.run.autotune or {}).get("gradient_checkpointing"),
            "build_s": round(variant.build_s, 1),
            "tokens_per_s_runs": tps, "tokens_per_s_median": statistics.median(tps),
            "spread": (max(tps) - min(tps)) / statistics.median(tps),
            "median_step_s": statistics.median(r["median_step_s"] for r in runs[name]),
            "tokens_per_step": statistics.median(runs[name][0]["tokens"]),
            "losses": runs[name][0]["losses"],
            "loss_max_abs_diff": max((abs(a - b) for a, b in zip(reference, runs[name][0]["losses"])), default=0.0),
            "runs": runs[name],
        }
        if not args.no_profile:
            try:
                entry["profile"] = profile(variant, args)
            except Exception as exc:  # noqa: BLE001
                entry["profile_error"] = f"{type(exc).__name__}: {exc}"
        result["variants"][name] = entry
        if args.out:  # after each variant: a call cut short keeps what it measured
            args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    for name, entry in result["variants"].items():
        if "profile" in entry:
            print(f"\n## {name}\n" + json.dumps({k: v for k, v in entry["profile"].items()}, indent=1), flush=True)
    print(markdown(result), flush=True)


if __name__ == "__main__":
    main()
