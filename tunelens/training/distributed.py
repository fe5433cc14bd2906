"""Data-parallel fine-tuning: one copy of the model per GPU of the job, through torchrun.

`tunelens.training.finetune.finetune(gpus=N)` on CUDA (or `processes=N`, which also runs on CPU with the gloo backend, as
the tests do) starts

    python -m torch.distributed.run --standalone --nproc_per_node N -m tunelens.training.distributed REQUEST.json

under the job's allocation (the processes see the job's GPUs; process i uses GPU i). Each process runs
`finetune()` on its share of every optimizer step: the Trainer (accelerate) gives process i micro-batches
i, i+N, i+2N, ... of the one-process order, and averages the gradients. What stays as on one GPU:
  - the rows of each optimizer step (batch_size x gradient_accumulation): the gradient accumulation is divided
    by N, or else the micro-batch (data_parallel_settings); a step that cannot be split runs in one process;
  - the loss: transformers normalises by the loss-bearing tokens of the whole step across processes
    (`average_tokens_across_devices`), so the gradient is that of one process, within float rounding;
  - the seed, the LoRA initialisation (the same in every process) and the checkpoints (written by process 0).
lora_dropout > 0 draws its masks per process: the run is then equal in distribution, not bit for bit.
Only process 0 writes the adapter, the train log, the metrics and the plot.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from tunelens.errors import ModelError
from tunelens.settings.finetune import FinetuneSection

log = logging.getLogger(__name__)

REQUEST_FILE = "tunelens_data_parallel.json"


def in_worker() -> bool:
    """Whether this process is one of a data-parallel run's (torchrun sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def data_parallel_settings(settings: FinetuneSection | dict, processes: int) -> tuple[FinetuneSection, str]:
    """(each process's settings, how the step was split) for `processes` processes, keeping rows per optimizer
    step = batch_size x gradient_accumulation. The accumulation is divided first (each process keeps the
    configured micro-batch, the one measured to fit); else the micro-batch. Raises ValueError when neither divides.
    The CUDA autotuner is off: each process would measure on its own and could choose another micro-batch."""
    settings = FinetuneSection.from_dict(settings)
    batch, accumulation = settings.batch_size, settings.gradient_accumulation
    split = settings.replace(autotune=False)
    if accumulation % processes == 0:
        split = split.replace(gradient_accumulation=accumulation // processes)
        how = (f"{processes} processes x micro-batch {batch} x gradient accumulation {accumulation // processes} "
               f"= {batch * accumulation} rows a step, as configured")
    elif batch % processes == 0:
        split = split.replace(batch_size=batch // processes)
        how = (f"{processes} processes x micro-batch {batch // processes} x gradient accumulation {accumulation} "
               f"= {batch * accumulation} rows a step, as configured")
    else:
        raise ValueError(
            f"finetune.batch_size {batch} x gradient_accumulation {accumulation} rows a step cannot be split over "
            f"{processes} processes (neither is a multiple of {processes})"
        )
    return split, how


def launch(request: dict, processes: int, workdir: Path) -> None:
    """Run `processes` data-parallel workers on `request` (finetune's keyword arguments) and wait for them."""
    workdir.mkdir(parents=True, exist_ok=True)
    request_file = workdir / REQUEST_FILE
    request_file.write_text(json.dumps(request, default=str))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           "-m", "tunelens.training.distributed", str(request_file)]
    log.info("data-parallel fine-tune: %s", " ".join(cmd))
    try:
        stream = sys.stderr.fileno()  # the job's log (scripts/finetune.py points stderr at it)
    except (AttributeError, OSError, ValueError):
        stream = None
    env = dict(os.environ)
    # The job's threads, shared by its processes (torchrun would otherwise set OMP_NUM_THREADS=1 silently).
    threads = int(env.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    env["OMP_NUM_THREADS"] = str(max(1, threads // processes))
    result = subprocess.run(cmd, stdout=stream, stderr=stream, env=env)
    if result.returncode != 0:
        raise ModelError(f"data-parallel fine-tune ({processes} processes) failed with exit {result.returncode}; "
                         "the job's log has each process's traceback")


def main(argv: list[str] | None = None) -> int:
    """One worker: set its GPU, then finetune() on its share of each step."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {os.environ.get('RANK', '?')} "
                        "%(levelname)s %(name)s: %(message)s")
    request = json.loads(Path(argv[0]).read_text())
    if request.get("device") != "cpu":
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    from tunelens.training.finetune import finetune

    finetune(**request)
    return 0


if __name__ == "__main__":
    sys.exit(main())
