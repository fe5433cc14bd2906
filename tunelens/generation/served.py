"""A model job other than generate (perplexity, logit_lens) as a request to its model's generation server.

Early exit already works this way (tunelens.generation.genserver.run_early_exit_job); these jobs follow it:

  - The job sends `{**job, "task": <task>}` to the server its model's generate jobs use (same key: the job
    passes the same backend, device, gpus, seed, vLLM options and threads), which keeps the hf model of each
    variant loaded: no job loads the model of its own while the server can serve it.
  - The server computes the job's output (`_Server.perplexity` / `_Server.logit_lens`) and answers
    {"output": <the job's JSON>, "n_rows": len(rows), "execution": ...} with the rows; the job writes every
    file itself (plots included), so a server never writes an output.
  - A model generated with vLLM (its server holds an engine, not the hf model: it declines) or a server that
    cannot serve runs `compute` here instead, as before. The job's own errors (TunelensError) are raised as is.

Kept apart from tunelens.generation.genserver (which imports the generation code) and from each task's compute code, so
that a job's code hash (tunelens.codehash) holds what the job runs: a perplexity job's hash does not include
the generation code, and a generate job's hash includes neither perplexity nor lens code (the server imports
those by name).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Callable

from tunelens.servers import ServerUnavailable, generate_via_server

log = logging.getLogger(__name__)

# What keys the model's server but is no argument of a task's compute function.
SERVER_KEYS = ("task", "backend", "gpus", "vllm_options")


def run_model_task(task: str, job: dict, compute: Callable[..., tuple[dict, list]], *, server: bool = True,
                   base=None, threads: int | None = None, start_timeout_s: float = 120.0,
                   request_timeout_s: float = 24 * 3600.0, idle_timeout_s: float = 120.0) -> tuple[dict, list, dict]:
    """(output, rows, execution) of one job. `job`: keyword arguments of `compute` (which returns
    (output, rows)) plus the server's key fields (backend, gpus, vllm_options). With `server`, the model's
    generation server computes it on the model it keeps; otherwise, or when that server cannot serve it, `compute`
    runs here with `threads` torch threads. `execution` says how: mode, server pid, whether this request
    loaded the model, and the seconds the job waited."""
    if server and job.get("backend", "auto") != "vllm":
        started = time.perf_counter()
        try:
            meta, rows = generate_via_server({**job, "task": task}, python=sys.executable, base=base,
                                             start_timeout_s=start_timeout_s, request_timeout_s=request_timeout_s,
                                             idle_timeout_s=idle_timeout_s)
            execution = {**meta["execution"], "client_wait_s": round(time.perf_counter() - started, 3)}
            return meta["output"], rows, execution
        except ServerUnavailable as exc:
            log.warning("generation server unavailable (%s); running the %s job without it", exc, task)
    started = time.perf_counter()
    if threads:
        from tunelens.jobs import use_job_threads

        use_job_threads(threads)
    # The job's GPU count stays: in this process the model is loaded here, sharded over them when more than one.
    output, rows = compute(**{k: v for k, v in job.items() if k not in SERVER_KEYS or k == "gpus"})
    execution = {"mode": "in-process", "python": sys.executable, "loaded": True,
                 "client_wait_s": round(time.perf_counter() - started, 3)}
    return output, rows, execution
