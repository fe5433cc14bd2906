"""Where a generate job runs: a per-model generation server, in this process, or in the vLLM Python.

Every generate job used to start Python, import torch/transformers and load its model (or build a vLLM
engine: 35-55 s on CPU) for one decoding config. Snakemake keeps one job and one output file per
(model, variant, decoding config) -- that is what makes partial reruns exact -- so the jobs stay, but
they become thin clients of a generation server:

    run_generation_job(job, python=..., server=True)     # what scripts/generate.py calls

  1. The job connects to the server for its key (Python, tunelens code, host, SLURM allocation, visible
     GPUs, model, backend, device, seed, vLLM options) through a Unix socket under the run-local
     `.tunelens/servers/<host>/`. If there is none, the first job starts one (`python -m
     tunelens.generation.genserver serve`, its own session, so it outlives the job) under a file lock, so two jobs
     never start two servers for one key.
  2. The server keeps the model loaded (its state: tunelens.generation.server_state): hf keeps (model,
     tokenizer) per adapter; vLLM keeps ONE engine built with LoRA enabled, serving base and fine-tuned
     requests (LoRA is chosen per request) and every decoding config. Requests run one at a time, each exactly
     as `tunelens.generation.generate.generation_output` runs in a job, so the rows are byte-identical to
     in-process generation (tests/test_genserver.py).
  3. The server answers with (meta, rows); the job writes the files atomically. A server never writes an
     output, so a server that crashes or is killed cannot leave a wrong or partial output.
  4. Anything that goes wrong on the server side (it cannot start within start_timeout_s, dies, answers
     nonsense, exceeds request_timeout_s) makes the job stop that server and generate itself: in this
     process, or for `backend: vllm` when vLLM is not importable here, in a one-shot `python -m
     tunelens.generation.genserver once` under the vLLM Python. Errors in the job's own input (TunelensError: an
     over-long prompt, a bad adapter) are raised as they are, with no retry.
  5. A server exits after idle_timeout_s without requests; the Snakefile's onsuccess/onerror stop every
     server of the run (`stop_servers`), and the server's whole process group (vLLM's EngineCore and
     workers included) is killed. On SLURM the allocation's end kills it too.

Every meta file records how its rows were produced under `execution` (mode, server pid, whether this
request loaded the model or built the engine, and the load time it paid; for a served request also the server
CPU seconds it took, `server_cpu_s`, and the server's total so far, `server_cpu_total_s`: the report bills the
server's work to the jobs it served). early_exit, perplexity and logit_lens jobs are requests to the same server
(run_early_exit_job; tunelens.generation.served), on its hf model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from tunelens.generation.server_state import _Server

# Server registry, framing and stopping live in tunelens.servers (re-exported: tests and callers use them here).
from tunelens.servers import (  # noqa: F401
    SERVER_DIR_ENV, FAULT_ENV, IN_SERVER_ENV, DEFAULT_SERVER_DIR, MAX_SOCKET_PATH, _HEADER, ServerUnavailable,
    send_frame, _recv_exact, recv_frame, server_dir, _socket_path, _read_info, _is_our_server, _connect, MARKER_ENV,
    marked_processes, server_mark, kill_marked, stop_server, release_gpu_for_this_job, gpu_bytes_to_load,
    stop_servers, _code_digest, server_key, _start_time, snakemake_ancestor, _watched_alive, _start_server,
    _file_lock, _server_connection, generate_via_server,
)

log = logging.getLogger(__name__)


def _run_once_in(python: str, job: dict, timeout_s: float) -> tuple[dict, list]:
    """The job in a one-shot `python -m tunelens.generation.genserver once` (e.g. the vLLM venv), own session; its
    leftover processes (vLLM engine) are killed by process group when it ends."""
    from tunelens import errors

    with tempfile.TemporaryDirectory(prefix="tunelens-once-") as workdir:
        request, answer_file = Path(workdir) / "job.json", Path(workdir) / "answer.json"
        request.write_text(json.dumps(job))
        cmd = [python, "-m", "tunelens.generation.genserver", "once", str(request), str(answer_file)]
        log.info("running %s", " ".join(cmd))
        mark = f"once-{os.getpid()}-{time.time_ns()}"
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, MARKER_ENV: mark})
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise errors.ModelError(f"{' '.join(cmd)} did not finish within {timeout_s:.0f} s") from None
        finally:
            kill_marked(mark, grace_s=5.0)  # the engine processes it leaves behind
            proc.wait()
        answer = _read_info(answer_file)
        if answer is None:
            raise errors.ModelError(f"{' '.join(cmd)} failed (exit {proc.returncode}) without an answer")
    if answer.get("ok"):
        return answer["meta"], answer["rows"]
    error_class = getattr(errors, answer.get("error_type", ""), None)
    if isinstance(error_class, type) and issubclass(error_class, errors.TunelensError):
        raise error_class(answer["message"])
    raise errors.ModelError(f"generation under {python} failed: {answer.get('message')}")


def job_python(backend: str, vllm_python: str | None) -> str:
    """The Python a job's generation runs in: this one, or for `backend: vllm` when vLLM is not
    importable here, `vllm_python`. Never falls back to hf: without either, the error says how to get vLLM."""
    from tunelens.generation.generate import _require_vllm, vllm_importable

    if backend != "vllm" or vllm_importable():
        return sys.executable
    if vllm_python:
        if not Path(vllm_python).exists():
            from tunelens.errors import ConfigError

            raise ConfigError(f"generation.vllm_python: '{vllm_python}' does not exist (build it with `make vllm-venv`)")
        return vllm_python
    _require_vllm()  # raises, naming how to install vLLM or switch to hf
    raise AssertionError("unreachable")


def run_generation_job(job: dict, output_file: str | Path, meta_file: str | Path | None = None, *,
                       vllm_python: str | None = None, server: bool = True, base: str | Path | None = None,
                       threads: int | None = None, start_timeout_s: float = 120.0,
                       request_timeout_s: float = 24 * 3600.0, idle_timeout_s: float = 120.0) -> dict:
    """Run one generate job (`job` = keyword arguments of tunelens.generation.generate.generation_output) and write
    its two files. Through the model's generation server when `server`, else (or when the server cannot
    serve it) in this process or a one-shot process under the vLLM Python. `threads`: the job's CPU
    threads, given to torch when it generates in this process (a server or subprocess reads them from
    the OpenMP variables it inherits). Returns the meta."""
    from tunelens.generation.generate import generation_output, write_generation

    python = job_python(job.get("backend", "auto"), vllm_python)
    meta = rows = None
    if server:
        started = time.perf_counter()
        try:
            meta, rows = generate_via_server(job, python=python, base=base, start_timeout_s=start_timeout_s,
                                             request_timeout_s=request_timeout_s, idle_timeout_s=idle_timeout_s)
            meta["execution"]["client_wait_s"] = round(time.perf_counter() - started, 3)
        except ServerUnavailable as exc:
            log.warning("generation server unavailable (%s); generating without it", exc)
    if meta is None:
        started = time.perf_counter()
        if python == sys.executable:
            if job.get("device", "auto") != "cpu":
                stop_servers(base)  # a failed server must not keep GPU memory from this job
            if threads:
                from tunelens.jobs import use_job_threads

                use_job_threads(threads)
            meta, rows = generation_output(**job)
            mode = "in-process"
        else:
            meta, rows = _run_once_in(python, job, request_timeout_s)
            mode = "subprocess"
        meta["execution"] = {"mode": mode, "python": python, "loaded": True,
                             "client_wait_s": round(time.perf_counter() - started, 3)}
    write_generation(output_file, meta_file, meta, rows)
    return meta


def run_early_exit_job(job: dict, output_file: str | Path, meta_file: str | Path, *, server: bool = True,
                       base: str | Path | None = None, threads: int | None = None, start_timeout_s: float = 120.0,
                       request_timeout_s: float = 24 * 3600.0, idle_timeout_s: float = 120.0) -> dict:
    """Run one early_exit job and write its two files (meta first). `job` = keyword arguments of
    tunelens.probe.probe.early_exit_output plus what keys the model's generation server (backend, gpus,
    vllm_options, as its generate jobs give them): with `server`, the job is a request to that server, which
    keeps the model loaded across the probe layers, both variants and the generate jobs, instead of each job
    importing torch and loading the model. The rows are the same bytes as in-process
    (tests/test_genserver.py). A model generated with vLLM (or a server that cannot serve) runs the job
    here, as before. Returns the meta."""
    from tunelens.probe.probe import write_early_exit  # torch-free at import

    meta = rows = None
    if server and job.get("backend", "auto") != "vllm":
        started = time.perf_counter()
        try:
            meta, rows = generate_via_server({**job, "task": "early_exit"}, python=sys.executable, base=base,
                                             start_timeout_s=start_timeout_s, request_timeout_s=request_timeout_s,
                                             idle_timeout_s=idle_timeout_s)
            meta["execution"]["client_wait_s"] = round(time.perf_counter() - started, 3)
        except ServerUnavailable as exc:
            log.warning("generation server unavailable (%s); running the early exit without it", exc)
    if meta is None:
        from tunelens.probe.probe import early_exit_output

        started = time.perf_counter()
        if threads:
            from tunelens.jobs import use_job_threads

            use_job_threads(threads)
        kwargs = {k: v for k, v in job.items() if k not in ("backend", "vllm_options")}
        meta, rows = early_exit_output(**kwargs)
        meta["execution"] = {"mode": "in-process", "python": sys.executable, "loaded": True,
                             "client_wait_s": round(time.perf_counter() - started, 3)}
    write_early_exit(meta_file, output_file, meta, rows)
    log.info("early exit layer %s: %d rows (%s) -> %s", job.get("layer"), len(rows), meta["execution"]["mode"],
             output_file)
    return meta


# --------------------------------------------------------------------------------------------- server
def serve(folder: Path, key: str, socket_path: str, idle_timeout_s: float, watch: str | None = None,
          device: str = "auto") -> None:
    os.environ[IN_SERVER_ENV] = "1"
    if os.environ.get(FAULT_ENV) == "exit-at-start":
        os._exit(18)
    from tunelens.models import pick_device

    # Recorded for the next server's start: only a server on the GPU is stopped for another model's
    # (tunelens.servers.stop_servers(gpu_only=True)); on a CPU two models' servers live side by side.
    on_gpu = pick_device(device) != "cpu"
    state = _Server(key, idle_timeout_s)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)  # the client holds the start lock and found no live server on it
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    os.chmod(socket_path, 0o600)
    listener.listen(64)
    listener.settimeout(0.5)
    info_file = folder / f"{key}.json"
    tmp = info_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "key": key, "socket": socket_path, "python": sys.executable,
                               "started": time.time(), "gpu": on_gpu}))
    os.replace(tmp, info_file)
    log.info("generation server %s listening on %s (idle timeout %.0f s), %.1f s after its process started", key,
             socket_path, idle_timeout_s, _process_age_s())
    signal.signal(signal.SIGTERM, lambda *_: setattr(state, "stopping", True))
    threads: list[threading.Thread] = []
    try:
        while True:
            threads = [t for t in threads if t.is_alive()]
            busy = bool(threads) or state.lock.locked()
            if state.stopping and not busy:
                break
            if not busy and time.monotonic() - state.last_activity > idle_timeout_s:
                log.info("idle for %.0f s: exiting", idle_timeout_s)
                break
            if not busy and not _watched_alive(watch):
                log.info("the Snakemake process %s that ran its jobs is gone: exiting", watch)
                break
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            state.last_activity = time.monotonic()
            thread = threading.Thread(target=state.handle, args=(conn,), daemon=True)
            thread.start()
            threads.append(thread)
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(socket_path)
        info = _read_info(info_file)
        if info and int(info["pid"]) == os.getpid():
            info_file.unlink(missing_ok=True)
        state.close()
        log.info("generation server %s stopped after %d requests", key, state.requests)


def _process_age_s() -> float:
    """Seconds since this process started (from /proc; 0.0 where there is none)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(uptime - ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return 0.0


def once(request_file: str, answer_file: str) -> int:
    """Run one job from a JSON file and write {"ok", "meta", "rows"} or the error (the vLLM venv's worker)."""
    from tunelens.generation.generate import generation_output

    job = json.loads(Path(request_file).read_text())
    try:
        meta, rows = generation_output(**job)
        answer = {"ok": True, "meta": meta, "rows": rows}
    except Exception as exc:
        log.error("generation failed:\n%s", traceback.format_exc())
        answer = {"ok": False, "error_type": type(exc).__name__, "message": str(exc)}
    Path(answer_file).write_text(json.dumps(answer))
    return 0 if answer["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tunelens.generation.genserver")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("serve", help="(internal) a generation server; started on demand by generate jobs")
    run.add_argument("--dir", required=True)
    run.add_argument("--key", required=True)
    run.add_argument("--socket", required=True)
    run.add_argument("--idle-timeout", type=float, default=120.0)
    run.add_argument("--watch", default=None, help="pid:starttime of the Snakemake process; exit when it is gone")
    run.add_argument("--device", default="auto", help="the jobs' device (auto, cpu, cuda): whether it holds a GPU")
    one = sub.add_parser("once", help="(internal) run one generate job from a JSON file")
    one.add_argument("request")
    one.add_argument("answer")
    stop = sub.add_parser("stop", help="stop every generation server of a run folder on this host")
    stop.add_argument("--dir", default=None, help=f"run folder (default ${SERVER_DIR_ENV} or {DEFAULT_SERVER_DIR})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        serve(Path(args.dir), args.key, args.socket, args.idle_timeout, args.watch, args.device)
        return 0
    if args.command == "once":
        return once(args.request, args.answer)
    print(f"stopped {stop_servers(args.dir)} generation server(s)")
    return 0


if __name__ == "__main__":
    # vLLM spawns engine processes that re-import __main__: everything runs under this guard.
    sys.exit(main())
