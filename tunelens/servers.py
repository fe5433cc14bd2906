"""Generation servers as other jobs see them: where they live, their processes, stopping them, GPU room.

Kept apart from tunelens.genserver (which runs generation and so imports tunelens.generate) so that a job that
only needs to stop servers or check the GPU's room, such as tunelens.models.load_model, does not pull the
generation code into its code hash (tunelens.codehash): editing generate.py must not rerun the score jobs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import socket
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("tunelens.genserver")

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
    return b"tunelens.genserver" in cmdline and key.encode() in cmdline


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
    path = Path(path)
    if not path.is_dir():
        return None
    parameters = 0
    for index in path.glob("*.safetensors"):
        with index.open("rb") as handle:  # safetensors header: 8-byte length, then JSON with each tensor's shape
            length = struct.unpack("<Q", handle.read(8))[0]
            header = json.loads(handle.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                count = 1
                for dim in entry["shape"]:
                    count *= dim
                parameters += count
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
