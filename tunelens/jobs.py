"""What every Snakemake job does first: hand the job's `threads` to torch and the OpenMP/BLAS pools.

Model rules declare `threads:` from the model's `resources.cpus` (rules/common.smk `model_threads`);
Snakemake lowers it to `--cores` on one machine, and never runs jobs whose threads sum past `--cores`.
A job that then used more threads than it was given would oversubscribe the cores anyway, so each job
pins torch to exactly its share.
"""

from __future__ import annotations

import logging
import os

THREAD_VARIABLES = (
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS",
)

log = logging.getLogger("tunelens.jobs")


def use_job_threads(threads: int, *, torch: bool = True) -> int:
    """Limit this process to `threads` CPU threads: the OpenMP/BLAS variables (read when torch or numpy
    start their pools) and, with torch=True, torch's intra- and inter-op pools. Logs and returns the
    number torch uses (or `threads` without torch)."""
    threads = int(threads)
    if threads < 1:
        raise ValueError(f"job threads: {threads}; expected at least 1")
    for variable in THREAD_VARIABLES:
        os.environ[variable] = str(threads)
    if not torch:
        log.info("job threads: %d (OpenMP/BLAS)", threads)
        return threads
    import torch as _torch

    _torch.set_num_threads(threads)
    try:
        _torch.set_num_interop_threads(threads)
    except RuntimeError:  # already set, or parallel work has started in this process
        pass
    used = _torch.get_num_threads()
    log.info("job threads: %d (torch threads: %d)", threads, used)
    return used


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def job_log(log_path: str) -> None:
    """Send this job's logging, Python warnings and, if it fails, its error with the full traceback to the
    rule's own log file (`log:`), so "check log file(s)" finds the cause there, not only the last INFO line.

    The traceback still goes to stderr too (Snakemake's console and the cluster's job output).
    """
    import sys

    logging.basicConfig(filename=log_path, level=logging.INFO, format=LOG_FORMAT, force=True)
    logging.captureWarnings(True)
    previous = sys.excepthook

    def log_then_raise(kind, error, traceback):
        if not issubclass(kind, KeyboardInterrupt):
            logging.getLogger("tunelens.job").error("job failed: %s: %s", kind.__name__, error,
                                                    exc_info=(kind, error, traceback))
            logging.shutdown()
        previous(kind, error, traceback)

    sys.excepthook = log_then_raise
