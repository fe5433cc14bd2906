"""Shared fixtures: tiny random-weight models built locally (no hub), with a real tokenizer.

The tokenizer is SmolLM2's (from the embedded GGUF package), so text round-trips like a real model's;
the weights are random and tiny so tests run in seconds on a 2-core CPU.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------- the local SLURM
# One cluster per test session (tests/slurm/start-slurm.sh), shared by every xdist worker and stopped when the
# whole session ends, not after the SLURM tests. Reason: snakemake-executor-plugin-slurm 2.8.0 runs
# `scontrol show config` when Snakemake imports it, and with the SLURM client installed but no controller
# answering that blocks ~9 s (no CPU) in EVERY snakemake process; once the SLURM tests had installed the
# client and stopped the cluster, each later test that ran snakemake paid it (BENCHMARKS.md, issue 13).
# (tests/slurm/stop-slurm.sh now leaves a conf on which clients fail at once, for the runs after a stop.)
# A cluster that is already up (.ci/run starts it beside the installs) is used and left alone.
SLURM_DIR = REPO_ROOT / "tests" / "slurm"
SLURM_LOCK = Path("/tmp/tunelens-test-slurm.lock")
SLURM_OWNER = Path("/tmp/tunelens-test-slurm.owner")  # holds the PID of the pytest session that started it


def _session_pid() -> int:
    """The PID of this test session's main process: under xdist a worker's parent is the controller."""
    return os.getppid() if os.environ.get("PYTEST_XDIST_WORKER") else os.getpid()


def slurm_up() -> bool:
    try:
        out = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10).stdout
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False
    return "UP" in out


@pytest.fixture(scope="session")
def slurm_cluster():
    """The local one-node cluster, started (under a lock, so two workers never both start it) unless it is
    already up; pytest_sessionfinish below stops it if this session started it."""
    with open(SLURM_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not slurm_up():
            if os.geteuid() != 0:
                pytest.fail("the slurm tests start a local SLURM and need root (tests/slurm/start-slurm.sh)")
            subprocess.run([str(SLURM_DIR / "start-slurm.sh")], check=True, timeout=900)
            SLURM_OWNER.write_text(str(_session_pid()))
    yield


def pytest_sessionfinish(session, exitstatus):
    """In the session's main process (the xdist controller, or pytest alone): stop a cluster this session
    started, after every worker has finished."""
    if os.environ.get("PYTEST_XDIST_WORKER") or not SLURM_OWNER.exists():
        return
    if SLURM_OWNER.read_text().strip() == str(os.getpid()):
        subprocess.run([str(SLURM_DIR / "stop-slurm.sh")], timeout=120, capture_output=True)
        SLURM_OWNER.unlink()


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct's tokenizer (with chat template) saved as a plain HF tokenizer dir."""
    from transformers import AutoTokenizer

    from tunelens.models import EMBEDDED_MODELS, _module_dir

    entry = EMBEDDED_MODELS["smollm2-135m-instruct"]
    tokenizer = AutoTokenizer.from_pretrained(_module_dir(entry), gguf_file=entry["gguf"])
    out = tmp_path_factory.mktemp("smollm2_tokenizer")
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def gemma_tokenizer_dir(tmp_path_factory) -> Path:
    """Gemma 3's real tokenizer (adds a BOS; 262k vocabulary), from the embedded GGUF package, saved as a
    plain HF tokenizer dir. Reading it from the GGUF takes ~15 s of CPU: once per session."""
    from transformers import AutoTokenizer

    from tunelens.models import EMBEDDED_MODELS, _gguf_path

    work = tmp_path_factory.mktemp("gemma_gguf")
    gguf = _gguf_path("gemma3-270m", EMBEDDED_MODELS["gemma3-270m"], work)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf.unlink()  # 250 MB
    out = tmp_path_factory.mktemp("gemma_tokenizer")
    tokenizer.save_pretrained(out)
    return out


def _build_tiny(out: Path, tokenizer_dir: Path, arch: str, num_layers: int, seed: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    if arch == "llama":
        from transformers import LlamaConfig as Config, LlamaForCausalLM as Model
    elif arch == "mistral":
        from transformers import MistralConfig as Config, MistralForCausalLM as Model
    elif arch == "gemma3":
        from transformers import Gemma3TextConfig as Config, Gemma3ForCausalLM as Model

        common.update(head_dim=16, sliding_window=64)
    elif arch == "phi":
        from transformers import PhiConfig as Config, PhiForCausalLM as Model

        common.pop("num_key_value_heads")
        common["tie_word_embeddings"] = False
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = Model(Config(**common))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory, smollm2_tokenizer_dir):
    """Build (and cache per session) a tiny random model: tiny_model_factory('llama', num_layers=4)."""
    cache: dict = {}

    def make(arch: str = "llama", num_layers: int = 4) -> Path:
        key = (arch, num_layers)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tiny_{arch}_{num_layers}")
            cache[key] = _build_tiny(out, smollm2_tokenizer_dir, arch, num_layers)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_factory) -> Path:
    """A 4-layer random Llama with SmolLM2's tokenizer and chat template."""
    return tiny_model_factory("llama", 4)


def apply_changes(config: dict, changes: dict) -> dict:
    """`config` with each `a__b__c=value` of `changes` set at config["a"]["b"]["c"] (missing levels created)."""
    for dotted, value in changes.items():
        node = config
        keys = dotted.split("__")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return config


def run_on_package_copy(tmp_path: Path, edit, script: str, *args: str, cwd: Path) -> tuple[dict, Path]:
    """Copy tunelens/ and schemas/ to tmp_path/tree, apply `edit(package_dir)`, run `script` (`python -c`, with
    `args`) in `cwd` with the copy first on the path, and return (its last stdout line as JSON, the copied
    package's directory). How a test shows that one declaration reaches every place (a new setting or knob)."""
    import json
    import shutil
    import sys

    package = tmp_path / "tree" / "tunelens"
    shutil.copytree(REPO_ROOT / "tunelens", package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO_ROOT / "schemas", tmp_path / "tree" / "schemas")
    edit(package)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "tree"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script, *args], env=env, cwd=cwd, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), package


def gpu_study_standins(root: Path) -> Path:
    """What bench/bench_gpu_study.py writes for configs/gpu-study.yaml, as stand-ins under `root`: a 32-layer
    model config and a safetensors file holding no tensor (parse-time checks read headers, dry runs load no
    weights) and 100 Alpaca-format rows."""
    import json

    model = root / "gpu-study" / "llama2-7b-random"
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                   "num_hidden_layers": 32, "max_position_embeddings": 4096}))
    (model / "model.safetensors").write_bytes((2).to_bytes(8, "little") + b"{}")
    (root / "gpu-study" / "code_alpaca.json").write_text(json.dumps(
        [{"instruction": f"Write code number {i}.", "input": "", "output": f"print({i})"} for i in range(100)]))
    return root


def pytest_collection_modifyitems(session, config, items):
    """Modules with SLURM, vLLM or slow tests first (stable order otherwise): `make test` hands whole modules to
    xdist workers (--dist loadscope) in this order, so the longest ones start at once instead of last."""
    rank = {"slurm": 3, "vllm": 2, "slow": 1}
    weight: dict[str, int] = {}
    for item in items:
        module = item.nodeid.split("::")[0]
        marks = [rank[mark.name] for mark in item.iter_markers() if mark.name in rank]
        weight[module] = max(weight.get(module, 0), *marks, 0)
    items.sort(key=lambda item: -weight[item.nodeid.split("::")[0]])
