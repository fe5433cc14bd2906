"""Generation servers as other jobs see them: where they live, their processes, stopping them, GPU room.

Kept apart from tunelens.generation.genserver (which runs generation and so imports
tunelens.generation.generate) so that a job that only needs to stop servers or check the GPU's room, such as
tunelens.models.load_model, does not pull the generation code into its code hash (tunelens.codehash): editing
generate.py must not rerun the score jobs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("tunelens.generation.genserver")

SERVER_DIR_ENV = "TUNELENS_SERVER_DIR"
# Fault injection for tests/test_genserver.py only: the server exits hard inside a generate request.
FAULT_ENV = "TUNELENS_GENSERVER_FAULT"
IN_SERVER_ENV = "TUNELENS_IN_GENERATION_SERVER"
DEFAULT_SERVER_DIR = Path(".tunelens") / "servers"
MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes on Linux
_HEADER = struct.Struct(">Q")


class ServerUnavailable(Exception):
    """The server could not serve this request (not started, died, timed out, internal error)."""


# --------------------------------------------------------------------------------------------- framing
def send_frame(sock: socket.socket, obj: Any) -> None:
    data = json.dumps(obj).encode("utf-8")
    sock.sendall(_HEADER.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int, deadline: float, alive) -> bytes:
    chunks, got = [], 0
    while got < n:
        if time.monotonic() > deadline:
            raise ServerUnavailable("timed out waiting for the server's answer")
        try:
            chunk = sock.recv(min(n - got, 1 << 20))
        except socket.timeout:
            if not alive():
                raise ServerUnavailable("the server process died during the request") from None
            continue
        except OSError as exc:
            raise ServerUnavailable(f"connection to the server failed: {exc}") from None
        if not chunk:
            raise ServerUnavailable("the server closed the connection before answering in full")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket, timeout_s: float, alive=lambda: True) -> Any:
    """One length-prefixed JSON frame; a short or broken frame is ServerUnavailable, never a partial object."""
    deadline = time.monotonic() + timeout_s
    (length,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size, deadline, alive))
    try:
        return json.loads(_recv_exact(sock, length, deadline, alive).decode("utf-8"))
    except ValueError as exc:
        raise ServerUnavailable(f"the server's answer is not valid JSON: {exc}") from None


# --------------------------------------------------------------------------------------------- keys and paths


def server_dir(base: str | Path | None = None) -> Path:
    """The run-local folder of this host's servers: $TUNELENS_SERVER_DIR or .tunelens/servers, per host."""
    root = Path(base or os.environ.get(SERVER_DIR_ENV) or DEFAULT_SERVER_DIR).absolute()
    return root / socket.gethostname()


def _socket_path(folder: Path, key: str) -> str:
    path = str(folder / f"{key}.sock")
    if len(path.encode()) <= MAX_SOCKET_PATH:
        return path
    # Too long for sun_path: a private folder under the temp dir, named after the run folder.
    short = Path(tempfile.gettempdir()) / f"tunelens-{os.getuid()}"
    short.mkdir(mode=0o700, exist_ok=True)
    return str(short / f"{hashlib.sha256(str(folder).encode()).hexdigest()[:10]}-{key}.sock")


def _read_info(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _is_our_server(pid: int, key: str) -> bool:
    """The pid is alive and is a tunelens generation server for `key` (not a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"tunelens.generation.genserver" in cmdline and key.encode() in cmdline


def _connect(path: str, timeout_s: float = 5.0) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    return sock


# --------------------------------------------------------------------------------------------- stopping
MARKER_ENV = "TUNELENS_GENSERVER_MARK"  # set in a server's (or one-shot worker's) environment; inherited


def marked_processes(mark: str | None = None) -> list[int]:
    """PIDs (of this user) whose environment marker starts with `mark`: a server and every process it
    started (vLLM's EngineCore and workers), found even after the server itself died. None: any marker."""
    prefix = f"{MARKER_ENV}={mark or ''}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            entries = environ.read_bytes().split(b"\0")
            state = (environ.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        pid = int(environ.parent.name)
        if pid == os.getpid() or state == "Z":
            continue
        if any(entry.startswith(prefix) for entry in entries):
            found.append(pid)
    return found


def server_mark(folder: Path, key: str) -> str:
    """The marker of one server: its run folder's digest (stop_servers finds a run's strays by it) + key."""
    return f"{hashlib.sha256(str(folder).encode()).hexdigest()[:12]}-{key}"


def kill_marked(mark: str, grace_s: float = 10.0) -> None:
    """SIGTERM every process whose marker starts with `mark`, then SIGKILL whatever is left after `grace_s` (by PID)."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        pids = marked_processes(mark)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and marked_processes(mark):
            time.sleep(0.1)


def stop_server(info_file: Path, *, graceful_s: float = 20.0) -> None:
    """Stop one server: ask it to exit (it shuts its engine down), then kill its process group."""
    info = _read_info(info_file)
    if info is None:
        info_file.unlink(missing_ok=True)
        return
    pid, key = int(info["pid"]), info["key"]
    if _is_our_server(pid, key):
        sock = _connect(info["socket"])
        if sock is not None:
            with contextlib.suppress(OSError, ServerUnavailable):
                send_frame(sock, {"op": "stop"})
                recv_frame(sock, 5.0)
            sock.close()
            deadline = time.monotonic() + graceful_s
            while time.monotonic() < deadline and _is_our_server(pid, key):
                time.sleep(0.1)
    # Whatever is left of it (engine processes; the server itself if it did not exit).
    kill_marked(server_mark(info_file.parent, key))
    info_file.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        if Path(info["socket"]).is_socket():
            os.unlink(info["socket"])


def release_gpu_for_this_job(needed_bytes: int | None = None) -> None:
    """Before a job outside the servers loads a model on a GPU: stop this run's generation servers on this
    host when their models/engines (vLLM takes most of the GPU's memory) would leave too little for the job.
    `needed_bytes` is what the job is about to load (weights plus headroom); when the GPU has that much free,
    the servers stay: a 7B server and a probe job fit side by side on a large GPU, and stopping the server
    there only makes the next generate job load the model again. Unknown (None): always stop. Called by
    tunelens.models.load_model and the fine-tune on CUDA; cheap when there are none."""
    if os.environ.get(IN_SERVER_ENV):
        return
    folder = server_dir()
    if not (folder.is_dir() and any(folder.glob("*.json"))):
        return
    if needed_bytes is not None:
        import torch

        free, _ = torch.cuda.mem_get_info()
        if free >= needed_bytes:
            log.info("generation servers kept: %.1f GiB free on the GPU, this job needs about %.1f GiB",
                     free / 2**30, needed_bytes / 2**30)
            return
    log.info("stopping this run's generation servers before loading a model on the GPU")
    stop_servers()


def gpu_bytes_to_load(path: str | Path, dtype_bytes: int = 2) -> int | None:
    """About what loading the model at `path` takes on the GPU in `dtype_bytes`-wide weights, with headroom
    for activations and the allocator: 1.25 x the weights + 2 GiB. None when `path` is not a local directory
    (a hub id: its size is unknown here)."""
    from tunelens.modelfiles import safetensors_parameters

    parameters = safetensors_parameters(path)
    if not parameters:
        return None
    return int(1.25 * parameters * dtype_bytes) + 2 * 2**30


def stop_servers(base: str | Path | None = None, *, except_key: str | None = None, gpu_only: bool = False) -> int:
    """Stop every generation server of this run on this host (the Snakefile calls it when the run ends);
    `gpu_only`: only those that hold a GPU (a server records it; one that has not is counted as holding one).
    Returns how many were found."""
    folder = server_dir(base)
    if not folder.is_dir():
        return 0
    found = 0
    for info_file in sorted(folder.glob("*.json")):
        if except_key and info_file.stem == except_key:
            continue
        if gpu_only and (_read_info(info_file) or {}).get("gpu") is False:
            continue
        found += 1
        stop_server(info_file)
    if except_key is None:
        kill_marked(server_mark(folder, ""))  # strays of servers that died before recording themselves
    return found


# --------------------------------------------------------------------------------------------- client


# --------------------------------------------------------------------------------------------- starting and asking a server
# Here rather than in tunelens.generation.genserver so that a score job's client (bertscore_runner) does not pull the
# generation code into its code hash (tunelens.codehash): editing generate.py must not rerun the score jobs.
def _code_digest() -> str:
    """sha256 of tunelens' own sources: a server started by older code is never reused."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):  # the stage packages (tunelens/generation/...) too
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def server_key(job: dict, python: str) -> str:
    """What must be equal for two jobs to share a server: everything that shapes the loaded model/engine."""
    fields = {
        "python": os.path.realpath(python) if os.path.exists(python) else python,
        "code": _code_digest(),
        "host": socket.gethostname(),
        # Per allocation and GPU set: a server started by one SLURM job must not serve another's GPUs.
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "threads": os.environ.get("OMP_NUM_THREADS"),  # CPU numerics follow the thread count
        "model_path": str(job["model_path"]),
        "backend": job.get("backend", "auto"),
        "device": job.get("device", "auto"),
        "gpus": job.get("gpus", 1),
        "seed": job.get("seed"),
        "vllm_options": job.get("vllm_options"),
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _start_time(pid: int) -> str | None:
    """A process's start time (clock ticks since boot), to tell it from a later process with its pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def snakemake_ancestor() -> str | None:
    """'pid:starttime' of the nearest ancestor process that is Snakemake (the process that runs this job:
    the main one locally, the one inside the allocation on a cluster), or None (not run by Snakemake)."""
    pid = os.getppid()
    while pid > 1:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return None
        if any(Path(a.decode(errors="replace")).name == "snakemake" for a in argv[:2]) or argv[1:3] == [b"-m", b"snakemake"]:
            return f"{pid}:{_start_time(pid)}"
        pid = parent
    return None


# --------------------------------------------------------------------------------------------- the job's runner
# Under the SLURM executor, every allocation runs `snakemake --executor slurm-jobstep --jobs 1 --target-jobs ...`
# in its batch step (the allocation's runner), which starts each of its jobs in a job step of its own (srun),
# under a Snakemake process of that step. A server started by one job would end with that job's Snakemake
# process, although the next job of a group (profiles/slurm: one allocation per model and variant) could use it.
# The runner tells its jobs about itself through the environment (srun passes it on): its pid:starttime when it
# runs several jobs (the servers watch it instead), RUNNER_SINGLE when it runs one (no server: nothing could
# reuse it). Not set: the jobs run under the main Snakemake process (locally), as before.
RUNNER_ENV = "TUNELENS_ALLOCATION_RUNNER"
RUNNER_SINGLE = "single"


def _argv_option(argv: list[str], *names: str) -> list[str]:
    """The values of a Snakemake option in `argv` (`--name v1 v2 ...` up to the next option, or `--name=v`)."""
    for i, arg in enumerate(argv):
        if arg in names:
            values = []
            for value in argv[i + 1:]:
                if value.startswith("-"):
                    break
                values.append(value)
            return values
        for name in names:
            if name.startswith("--") and arg.startswith(name + "="):
                return [arg.split("=", 1)[1]]
    return []


def announce_job_runner(*, remote: bool, argv: list[str]) -> str | None:
    """Called by rules/common.smk in every Snakemake process (when it parses the workflow; the target jobs are
    read from `argv`, Snakemake's settings do not hold them yet). In an allocation's runner (remote mode,
    executor slurm-jobstep) sets RUNNER_ENV for the jobs it starts: its own pid:starttime when it runs more than
    one job (a group), else RUNNER_SINGLE. Elsewhere (the main process, the Snakemake process of one job step)
    leaves the environment as it is. Returns the value set, or None."""
    if not (remote and _argv_option(argv, "--executor", "-e") == ["slurm-jobstep"]):
        return None
    several = len(_argv_option(argv, "--target-jobs")) > 1
    value = f"{os.getpid()}:{_start_time(os.getpid())}" if several else RUNNER_SINGLE
    os.environ[RUNNER_ENV] = value
    return value


def server_reusable() -> bool:
    """Whether a server started by this job can serve another job: not when the job's allocation runs only it."""
    return os.environ.get(RUNNER_ENV) != RUNNER_SINGLE


def server_watch() -> str | None:
    """'pid:starttime' of the Snakemake process a new server must end with: the allocation's runner when the
    job runs in a group's allocation, else the nearest Snakemake ancestor (locally: the main process)."""
    runner = os.environ.get(RUNNER_ENV)
    if runner and runner != RUNNER_SINGLE:
        return runner
    return snakemake_ancestor()


def _watched_alive(watch: str | None) -> bool:
    if not watch:
        return True
    pid, started = watch.split(":", 1)
    return _start_time(int(pid)) == started


def _start_server(python: str, folder: Path, key: str, idle_timeout_s: float, device: str = "auto") -> subprocess.Popen:
    log_file = folder / f"{key}.log"
    cmd = [python, "-m", "tunelens.generation.genserver", "serve", "--dir", str(folder), "--key", key,
           "--socket", _socket_path(folder, key), "--idle-timeout", str(idle_timeout_s), "--device", device]
    watch = server_watch()
    if watch:  # the server ends with the Snakemake process that runs its jobs, however that one ends
        cmd += ["--watch", watch]
    log.info("starting generation server: %s (log %s)", " ".join(cmd), log_file)
    with open(log_file, "ab") as out:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True,
                                env={**os.environ, MARKER_ENV: server_mark(folder, key)})


@contextlib.contextmanager
def _file_lock(path: Path, timeout_s: float):
    with open(path, "a") as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ServerUnavailable(f"timed out after {timeout_s:.0f} s waiting for the lock {path}") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _server_connection(python: str, folder: Path, key: str, *, start_timeout_s: float,
                       idle_timeout_s: float, gpu: bool, device: str = "auto") -> tuple[socket.socket, int]:
    """A connection to the live server for `key`, starting it if needed; (socket, server pid)."""
    folder.mkdir(parents=True, exist_ok=True)
    info_file = folder / f"{key}.json"
    with _file_lock(folder / f"{key}.lock", start_timeout_s):
        info = _read_info(info_file)
        if info and _is_our_server(int(info["pid"]), key):
            sock = _connect(info["socket"])
            if sock is not None:
                return sock, int(info["pid"])
            stop_server(info_file)  # alive but not accepting: wedged
        elif info:
            stop_server(info_file)  # stale record of a dead server
        if gpu:  # one model at a time on the GPU: another model's server on it would take its memory
            stop_servers(folder.parent, except_key=key, gpu_only=True)  # servers on the CPU stay
        proc = _start_server(python, folder, key, idle_timeout_s, device)
        deadline = time.monotonic() + start_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ServerUnavailable(f"the generation server exited at start (code {proc.returncode}); "
                                        f"see {folder / (key + '.log')}")
            info = _read_info(info_file)
            if info and int(info["pid"]) == proc.pid:
                sock = _connect(info["socket"])
                if sock is not None:
                    return sock, proc.pid
            time.sleep(0.1)
        kill_marked(server_mark(folder, key), grace_s=2.0)
        info_file.unlink(missing_ok=True)
        raise ServerUnavailable(f"the generation server did not start within {start_timeout_s:.0f} s")


def generate_via_server(job: dict, *, python: str, base: str | Path | None = None, start_timeout_s: float = 120.0,
                        request_timeout_s: float = 24 * 3600.0, idle_timeout_s: float = 120.0,
                        exclusive_gpu: bool = True) -> tuple[dict, list]:
    """(meta, rows) for `job` from the server for its key. Raises the job's own TunelensError as is, and
    ServerUnavailable (after stopping that server) when the server cannot serve it. `exclusive_gpu`: starting
    this server on a GPU stops the others there (a model's; not the small BERTScore server's)."""
    from tunelens import errors

    folder = server_dir(base)
    key = server_key(job, python)
    sock, pid = _server_connection(python, folder, key, start_timeout_s=start_timeout_s, idle_timeout_s=idle_timeout_s,
                                   gpu=exclusive_gpu and job.get("device", "auto") != "cpu",
                                   device=job.get("device", "auto"))
    try:
        sock.settimeout(5.0)
        try:
            send_frame(sock, {"op": "generate", "job": job})
        except OSError as exc:
            raise ServerUnavailable(f"could not send the request: {exc}") from None
        answer = recv_frame(sock, request_timeout_s, alive=lambda: _is_our_server(pid, key))
    except ServerUnavailable:
        stop_server(folder / f"{key}.json")
        raise
    finally:
        sock.close()
    if answer.get("declined"):  # a request this server does not serve (early exit beside a vLLM engine)
        raise ServerUnavailable(f"the server declined: {answer.get('message')}")
    if answer.get("ok"):
        meta, rows = answer["meta"], answer["rows"]
        if not isinstance(rows, list) or len(rows) != meta.get("n_rows"):
            stop_server(folder / f"{key}.json")
            raise ServerUnavailable("the server's answer is inconsistent (row count differs from its meta)")
        return meta, rows
    error_class = getattr(errors, answer.get("error_type", ""), None)
    if isinstance(error_class, type) and issubclass(error_class, errors.TunelensError):
        raise error_class(answer["message"])
    stop_server(folder / f"{key}.json")
    raise ServerUnavailable(f"the server failed internally: {answer.get('message')}")
