"""What a generation server (tunelens.generation.genserver, the process) holds and does per request: _Server keeps
one model's loaded state (a vLLM engine with LoRA enabled, or hf models per adapter) and answers one request at a
time on its one worker thread (generate, early_exit, and by name perplexity, logit_lens and bertscore); Declined is
a request it leaves to the client.

Imported by genserver by an import statement, so it is part of the code hash of every job that runs generation
code (the generate and early_exit jobs); the modules it imports by name (importlib) stay out of that hash.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import logging
import os
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

from tunelens.servers import FAULT_ENV, ServerUnavailable, gpu_bytes_to_load, recv_frame, send_frame

log = logging.getLogger("tunelens.generation.genserver")  # the server's log, as tunelens.servers names it


def _gpu_room_for(model_path, copies: int) -> bool:
    """Whether the GPU has room for `copies` more bf16 copies of the model's weights beside what it holds (10%
    spare). A model whose size is unknown (not a local directory) is taken to fit once, never twice."""
    import torch

    free, _ = torch.cuda.mem_get_info()
    free += torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    need = gpu_bytes_to_load(model_path, 2)
    if need is None:
        return copies == 1
    return free > 1.1 * copies * need


def _free_gpu_cache() -> None:
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()


class Declined(Exception):
    """A request this server does not serve; the client runs the job itself and the server stays up."""


class _Server:
    """One model's loaded state: a vLLM engine (LoRA enabled) or hf models per adapter; one request at a time."""

    def __init__(self, key: str, idle_timeout_s: float):
        self.key = key
        self.idle_timeout_s = idle_timeout_s
        self.lock = threading.Lock()
        self.engine = None
        self.hf_models: dict = {}  # adapter_dir (or None) -> (model, tokenizer)
        self.active = 0
        self.last_activity = time.monotonic()
        self.stopping = False
        self.requests = 0
        # Every request runs on this one long-lived thread, never on the connection's own thread: CUDA graphs
        # captured by torch.compile (cudagraph trees), cuBLAS handles and workspaces, the caching allocator's
        # per-stream pools and torch's grad/inference-mode state are per thread, so a thread per request paid a
        # fresh process's first-call costs on every request (BENCHMARKS.md, issue 21).
        self.worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tunelens-request")

    def _hf_model(self, job: dict) -> tuple[tuple, bool, float]:
        """(model, tokenizer) of the job's variant, loaded once; (that, loaded now, load seconds)."""
        from tunelens.generation.generate import resolve_on_device
        from tunelens.models import load_model, pick_device

        adapter = job.get("adapter_dir")
        device = pick_device(job.get("device", "auto"))
        merge = adapter is not None and resolve_on_device(job.get("merge_adapter", "auto"), device)
        key = (adapter, merge)
        if key in self.hf_models:
            return self.hf_models[key], False, 0.0
        if adapter is not None and not (Path(adapter) / "adapter_config.json").exists():
            from tunelens.errors import ModelError

            raise ModelError(f"adapter directory '{adapter}' has no adapter_config.json")
        from tunelens.generation import graphs

        graphs.release_all()  # the decoding caches the loaded models keep: room for the new one
        while len(self.hf_models) >= 2:  # base + one adapter at most
            self.hf_models.pop(next(iter(self.hf_models)))
        gpus = int(job.get("gpus") or 1)  # > 1 on CUDA: sharded over the job's GPUs, one copy (no room for two)
        if self.hf_models and device == "cuda" and (gpus > 1 or not _gpu_room_for(job["model_path"], 1)):
            log.info("not enough free GPU memory for a second copy of the weights: swapping")
            self.hf_models.clear()
            _free_gpu_cache()
        started = time.perf_counter()
        base_key = (None, False)
        if merge and gpus == 1:
            # The merged copy is made from the base weights in memory, not read from disk again (on a cluster's
            # network file system the second read of a 7B model takes far longer than the copy). A server asked
            # for the merged variant first loads the base for it, and keeps it for the base variant's requests,
            # when the GPU holds two copies.
            if not self.hf_models and device == "cuda" and _gpu_room_for(job["model_path"], 2):
                self.hf_models[base_key] = load_model(job["model_path"], device=device, gpus=gpus)
            if base_key in self.hf_models:
                from tunelens.models import load_tokenizer, merged_copy

                base_model = self.hf_models[base_key][0]
                self.hf_models[key] = (merged_copy(base_model, adapter, drop_attributes=(graphs.STORE_ATTRIBUTE,)),
                                       load_tokenizer(job["model_path"]))
                return self.hf_models[key], True, time.perf_counter() - started
        self.hf_models[key] = load_model(job["model_path"], adapter_dir=adapter, device=device, merge_adapter=merge,
                                         gpus=gpus)
        return self.hf_models[key], True, time.perf_counter() - started

    def early_exit(self, job: dict) -> tuple[dict, list]:
        """An early_exit job (tunelens.probe.probe.early_exit_output) on the hf model this server keeps. A server
        that generates with vLLM declines (it would hold a second copy of the model beside the engine)."""
        from tunelens.generation.generate import resolve_backend
        from tunelens.probe.probe import early_exit_output

        if self.engine is not None or resolve_backend(job.get("backend", "auto"), job.get("device", "auto"))[0] == "vllm":
            raise Declined("this server generates with vLLM; early exit needs the hf model")
        hf_model, loaded, load_time = self._hf_model(job)
        kwargs = {k: v for k, v in job.items() if k not in ("task", "backend", "gpus", "vllm_options")}
        meta, rows = early_exit_output(**kwargs, hf_model=hf_model)
        meta["load_time_s"] = round(load_time, 3)
        self.requests += 1
        meta["execution"] = {"mode": "server", "python": sys.executable, "server_pid": os.getpid(),
                             "loaded": loaded, "request": self.requests}
        return meta, rows

    def _task_model(self, job: dict) -> tuple[tuple, bool, float]:
        """The hf model of a perplexity or logit_lens request (tunelens.generation.served), as early_exit gets it."""
        from tunelens.generation.generate import resolve_backend

        if self.engine is not None or resolve_backend(job.get("backend", "auto"), job.get("device", "auto"))[0] == "vllm":
            raise Declined(f"this server generates with vLLM; {job.get('task')} needs the hf model")
        from tunelens.generation import graphs

        graphs.release_all()  # the forward passes plan their batches from the free memory, as on a fresh load
        return self._hf_model(job)

    def _task_answer(self, output: dict, rows: list, loaded: bool, hf_model: tuple | None = None) -> tuple[dict, list]:
        if hf_model is not None and getattr(hf_model[0], "tunelens_adapter_merged", False):
            # On CUDA the server keeps the fine-tuned variant merged (generation.merge_adapter): say so in the output
            # (absent otherwise, so outputs of the PEFT path keep their bytes).
            output["adapter_merged"] = True
        self.requests += 1
        return {"output": output, "n_rows": len(rows), "execution": {
            "mode": "server", "python": sys.executable, "server_pid": os.getpid(), "loaded": loaded,
            "request": self.requests}}, rows

    def perplexity(self, job: dict) -> tuple[dict, list]:
        """A perplexity job (tunelens.scoring.perplexity.perplexity_output) on the hf model this server keeps. Imported
        by name, not by an import statement: a generate job never runs it, so it must not count in the
        generation code's hash (tunelens.codehash)."""
        hf_model, loaded, load_time = self._task_model(job)
        kwargs = {k: v for k, v in job.items() if k not in ("task", "backend", "gpus", "vllm_options")}
        summary, rows = importlib.import_module("tunelens.scoring.perplexity").perplexity_output(
            **kwargs, model_and_tokenizer=hf_model, load_time_s=load_time)
        return self._task_answer(summary, rows, loaded, hf_model)

    def logit_lens(self, job: dict) -> tuple[dict, list]:
        """A logit_lens job (tunelens.probe.lens.logit_lens_output, the lens without its plots) on the hf model this
        server keeps; imported by name, as perplexity."""
        hf_model, loaded, load_time = self._task_model(job)
        kwargs = {k: v for k, v in job.items() if k not in ("task", "backend", "gpus", "vllm_options")}
        lens = importlib.import_module("tunelens.probe.lens").logit_lens_output(**kwargs, hf_model=hf_model,
                                                                           load_time_s=load_time)
        return self._task_answer(lens, [], loaded, hf_model)

    def generate(self, job: dict) -> tuple[dict, list]:
        from tunelens.generation.generate import build_vllm_engine, generation_output, resolve_backend

        if job.get("task") == "early_exit":
            return self.early_exit(job)
        if job.get("task") == "perplexity":
            return self.perplexity(job)
        if job.get("task") == "logit_lens":
            return self.logit_lens(job)
        if job.get("task") == "bertscore":
            # Imported by name, not by an import statement: a generate job never runs the scoring code, so it
            # must not count in the generation code's hash (tunelens.codehash); the score jobs' hash has it.
            meta, rows = importlib.import_module("tunelens.scoring.metrics").bertscore_task(job)
            self.requests += 1
            meta.update(n_rows=len(rows), execution={"mode": "server", "server_pid": os.getpid(),
                                                     "request": self.requests})
            return meta, rows
        concrete, _ = resolve_backend(job.get("backend", "auto"), job.get("device", "auto"))
        loaded, load_time = False, 0.0
        kwargs = dict(job)
        if concrete == "vllm":
            if self.engine is None:
                started = time.perf_counter()
                options = dict(job.get("vllm_options") or {})
                # LoRA always on: one engine serves the base and the fine-tuned variant (per request).
                self.engine = build_vllm_engine(
                    job["model_path"], enable_lora=True, tensor_parallel_size=job.get("gpus") or 1,
                    seed=job.get("seed", 1234), device=job.get("device", "auto"), **options,
                )
                loaded, load_time = True, time.perf_counter() - started
            kwargs["engine"] = self.engine
        else:
            kwargs["hf_model"], loaded, load_time = self._hf_model(job)
        if os.environ.get(FAULT_ENV) == "exit-during-request":
            os._exit(17)
        meta, rows = generation_output(**kwargs)
        if concrete == "vllm":
            # What the job would have recorded in-process (an engine passed in is reported as such).
            meta["backend_reason"] = resolve_backend(job.get("backend", "auto"), job.get("device", "auto"))[1]
        meta["load_time_s"] = round(load_time, 3)
        self.requests += 1
        meta["execution"] = {"mode": "server", "python": sys.executable, "server_pid": os.getpid(),
                             "loaded": loaded, "request": self.requests}
        return meta, rows

    def handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(30.0)
                request = recv_frame(conn, 30.0)
            except ServerUnavailable:
                return
            op = request.get("op")
            if op == "stop":
                self.stopping = True
                answer: dict = {"ok": True}
            elif op == "ping":
                answer = {"ok": True, "pid": os.getpid(), "requests": self.requests}
            elif op == "generate":
                with self.lock:
                    try:
                        cpu_start = time.process_time()
                        meta, rows = self.worker.submit(self.generate, request["job"]).result()
                        # This request's server CPU seconds (a model load included) and the server's total so
                        # far: the report bills the server's work to the jobs it served (tunelens.report.costs).
                        meta["execution"].update(server_cpu_s=round(time.process_time() - cpu_start, 3),
                                                 server_cpu_total_s=round(time.process_time(), 3))
                        answer = {"ok": True, "meta": meta, "rows": rows}
                    except Declined as exc:  # the client runs the job itself; this server stays
                        answer = {"ok": False, "declined": True, "message": str(exc)}
                    except Exception as exc:  # reported to the client: its error or a reason to fall back
                        log.error("request failed:\n%s", traceback.format_exc())
                        answer = {"ok": False, "error_type": type(exc).__name__, "message": str(exc)}
                    self.last_activity = time.monotonic()
            else:
                answer = {"ok": False, "error_type": "internal", "message": f"unknown op {op!r}"}
            with contextlib.suppress(OSError):
                conn.settimeout(60.0)
                send_frame(conn, answer)

    def close(self) -> None:
        self.worker.shutdown(wait=True)
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
        self.hf_models.clear()
