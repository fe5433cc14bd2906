"""Models larger than one GPU (issue 26), the parts a CPU can check: sharding over the job's GPUs in load_model
(CUDA simulated), inputs on the input embedding's device, the job's GPU count reaching every loader, vLLM's
tensor_parallel_size, and data-parallel fine-tuning that trains the same adapter as one process (gloo)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from tunelens.generation import genserver, server_state
from tunelens.errors import ModelError


# --------------------------------------------------------------------------------------------- load_model
@pytest.fixture
def two_fake_gpus(monkeypatch, tmp_path):
    """torch sees two 80 GiB CUDA devices; from_pretrained records its arguments and loads on the CPU."""
    import torch
    import transformers

    gib = 2**30
    monkeypatch.setenv(genserver.SERVER_DIR_ENV, str(tmp_path / "servers"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=80 * gib))
    calls: list[dict] = []
    original = transformers.AutoModelForCausalLM.from_pretrained

    def recording(path, **kwargs):
        calls.append(kwargs)
        return original(path, dtype=torch.float32)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", recording)
    return calls


def test_load_model_shards_over_the_jobs_gpus_with_per_gpu_caps(tiny_llama_dir, two_fake_gpus):
    from tunelens.models import SHARD_WEIGHT_SHARE, load_model

    load_model(tiny_llama_dir, device="cuda", gpus=2)
    (kwargs,) = two_fake_gpus
    assert kwargs["device_map"] == "balanced"
    cap = int(SHARD_WEIGHT_SHARE * 80 * 2**30)
    assert kwargs["max_memory"] == {0: cap, 1: cap}  # no "cpu"/"disk": never offloaded


def test_a_job_asking_for_more_gpus_than_it_sees_fails_before_loading(tiny_llama_dir, two_fake_gpus):
    from tunelens.models import load_model

    with pytest.raises(ModelError, match=r"asks for 3 GPUs .* but sees 2"):
        load_model(tiny_llama_dir, device="cuda", gpus=3)
    assert two_fake_gpus == []


def test_a_sharded_load_that_spilled_to_cpu_or_disk_is_an_error():
    from tunelens.models import check_on_gpus

    model = SimpleNamespace(hf_device_map={"model.embed_tokens": 0, "model.layers.0": 1, "model.layers.1": "cpu",
                                           "lm_head": "disk"})
    with pytest.raises(ModelError, match=r"model 'big/70b' does not fit 2 GPUs.*2 module\(s\)"):
        check_on_gpus(model, "big/70b", 2)
    check_on_gpus(SimpleNamespace(hf_device_map={"model.embed_tokens": 0, "lm_head": 1}), "ok", 2)


# --------------------------------------------------------------------------------------------- input device
@pytest.fixture
def split_model(tiny_llama_dir):
    """(model, tokenizer, plain model): a tiny Llama whose FIRST listed parameter lives on another device than
    its input embedding, as in a model sharded over GPUs (the meta device stands in for the other GPU)."""
    import torch

    from tunelens.models import load_model

    plain, tokenizer = load_model(tiny_llama_dir, device="cpu")
    model, _ = load_model(tiny_llama_dir, device="cpu")
    model.register_parameter("on_another_gpu", torch.nn.Parameter(torch.zeros(1, device="meta")))
    assert next(model.parameters()).device.type == "meta"
    return model, tokenizer, plain


PROMPTS = ["Tell me a story about a cat.", "Why is the sky blue?", "List three colours"]


def test_generation_perplexity_judge_and_lens_feed_the_input_embeddings_device(split_model):
    import torch

    from tunelens.generation.completions import GenerationSettings
    from tunelens.generation.decoding import DecodingConfig
    from tunelens.generation.generate import hf_generate_batched
    from tunelens.models import input_device
    from tunelens.scoring.perplexity import response_nll
    from tunelens.probe.lens import lens_log_probs

    model, tokenizer, plain = split_model
    assert input_device(model).type == "cpu"
    greedy = DecodingConfig(temperature=0.0)
    settings = GenerationSettings(max_new_tokens=6, batch_size=2)
    got = hf_generate_batched(model, tokenizer, PROMPTS, greedy, settings)
    want = hf_generate_batched(plain, tokenizer, PROMPTS, greedy, settings)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    encoded = [(tokenizer(p)["input_ids"], tokenizer(" yes")["input_ids"]) for p in PROMPTS]
    assert response_nll(model, tokenizer, encoded) == pytest.approx(response_nll(plain, tokenizer, encoded))
    from tunelens.scoring.judge import rate

    assert rate(model, tokenizer, PROMPTS)[1] == pytest.approx(rate(plain, tokenizer, PROMPTS)[1])
    sequence = torch.tensor([tokenizer(PROMPTS[0])["input_ids"]])
    with torch.inference_mode():
        lens = lens_log_probs(model, sequence, [3, 5], [1, 2])
        assert torch.allclose(lens[2], lens_log_probs(plain, sequence, [3, 5], [1, 2])[2])


def test_a_sharded_model_generates_with_the_dynamic_cache_and_says_so(split_model, tmp_path):
    from tunelens.generation.generate import generation_output

    model, tokenizer, _ = split_model
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("".join(json.dumps({"id": f"r{i}", "instruction": p, "input": "", "output": "x"}) + "\n"
                                 for i, p in enumerate(PROMPTS)))
    meta, rows = generation_output(
        test_file, model_name="m", model_path="unused", decoding_config={"name": "greedy", "temperature": 0.0},
        max_new_tokens=4, backend="hf", device="cpu", static_cache=True, hf_model=(model, tokenizer), gpus=2,
    )
    assert meta["kv_cache"] == "dynamic"
    assert meta["sharded_over"] == ["meta", "cpu"]
    assert "sharded by decoder blocks over 2 GPUs" in meta["semantics"]
    assert meta["device"] == "cpu" and len(rows) == 3


# --------------------------------------------------------------------------------------------- the job's GPUs
def test_the_generation_server_loads_with_the_jobs_gpu_count(monkeypatch, tiny_llama_dir):
    import tunelens.models

    seen = {}

    def fake_load(path, **kwargs):
        seen.update(kwargs)
        return "model", "tokenizer"

    monkeypatch.setattr(tunelens.models, "load_model", fake_load)
    state = server_state._Server("k", idle_timeout_s=60)
    try:
        state._hf_model({"model_path": str(tiny_llama_dir), "device": "cpu", "gpus": 2})
    finally:
        state.close()
    assert seen["gpus"] == 2


def test_an_early_exit_job_in_process_keeps_its_gpu_count(monkeypatch, tmp_path):
    import tunelens.probe.probe

    seen = {}

    def fake_early_exit_output(**kwargs):
        seen.update(kwargs)
        return {}, []

    monkeypatch.setattr(tunelens.probe.probe, "early_exit_output", fake_early_exit_output)
    monkeypatch.setattr(tunelens.probe.probe, "write_early_exit", lambda *a: None)
    genserver.run_early_exit_job({"model_path": "m", "layer": 1, "backend": "hf", "gpus": 2, "vllm_options": None},
                                 tmp_path / "x.jsonl", tmp_path / "x.meta.json", server=False)
    assert seen["gpus"] == 2 and "backend" not in seen


def test_vllm_gets_the_jobs_gpus_as_tensor_parallel_size(monkeypatch, tmp_path):
    """In a job and in the generation server (verification: this already held before issue 26)."""
    import tunelens.generation.generate

    class Built(Exception):
        pass

    sizes = []

    def fake_engine(model_path, *, tensor_parallel_size, **kwargs):
        sizes.append(tensor_parallel_size)
        raise Built

    monkeypatch.setattr(tunelens.generation.generate, "build_vllm_engine", fake_engine)
    monkeypatch.setattr(tunelens.generation.generate, "resolve_backend", lambda backend, device: ("vllm", "test"))
    monkeypatch.setattr("tunelens.models.load_tokenizer", lambda *a, **k: SimpleNamespace())
    monkeypatch.setattr(tunelens.generation.generate, "load_prompt_rows", lambda *a, **k: [])
    job = dict(model_name="m", model_path="m", decoding_config={"name": "greedy", "temperature": 0.0},
               backend="vllm", device="cuda", gpus=2)
    with pytest.raises(Built):
        tunelens.generation.generate.generation_output(tmp_path / "t.jsonl", **job)
    state = server_state._Server("k", idle_timeout_s=60)
    try:
        with pytest.raises(Built):
            state.generate({**job, "test_file": str(tmp_path / "t.jsonl")})
    finally:
        state.close()
    assert sizes == [2, 2]


# --------------------------------------------------------------------------------------------- data-parallel fine-tune
def test_data_parallel_split_keeps_rows_per_step():
    from tunelens.training.distributed import data_parallel_settings

    split, how = data_parallel_settings({"batch_size": 4, "gradient_accumulation": 4, "autotune": True}, 2)
    assert (split.batch_size, split.gradient_accumulation, split.autotune) == (4, 2, False)
    split, _ = data_parallel_settings({"batch_size": 4, "gradient_accumulation": 1}, 2)
    assert (split.batch_size, split.gradient_accumulation) == (2, 1)
    with pytest.raises(ValueError, match="cannot be split over 2 processes"):
        data_parallel_settings({"batch_size": 3, "gradient_accumulation": 1}, 2)


def test_two_gloo_processes_train_the_adapter_of_one(tiny_llama_dir, tmp_path):
    """Data-parallel on CPU (torchrun, gloo): the same rows per optimizer step and the same loss normalisation
    give the adapter and the losses of one process, within float rounding."""
    from safetensors.torch import load_file

    from tunelens.training.finetune import finetune

    rows = [{"id": f"t-{i}", "instruction": f"Question {i}: what is {i} plus {i}?", "input": "" if i % 2 else "x",
             "output": f"It is {2 * i}." + " Indeed." * (i % 3)} for i in range(16)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    settings = {
        "enabled": True, "method": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
        "target_modules": "all-linear", "learning_rate": 5e-3, "lr_scheduler": "constant", "warmup_ratio": 0.0,
        "weight_decay": 0.0, "num_epochs": 1, "max_steps": 3, "batch_size": 2, "gradient_accumulation": 2,
        "max_seq_length": 128, "packing": False, "padding_free": False, "gradient_checkpointing": False,
        "liger": False, "logging_steps": 1, "save_steps": 100,
    }

    def run(name, processes):
        root = tmp_path / name
        metrics = finetune(tiny_llama_dir, train, root / "adapter", root / "log.jsonl", root / "metrics.json",
                           root / "loss.png", root / "ckpt", dict(settings), "alpaca", 5, device="cpu",
                           processes=processes)
        losses = [json.loads(line)["loss"] for line in (root / "log.jsonl").read_text().splitlines()]
        return metrics, losses, load_file(str(root / "adapter" / "adapter_model.safetensors"))

    one, one_losses, one_adapter = run("one", 1)
    two, two_losses, two_adapter = run("two", 2)
    assert two["data_parallel"]["processes"] == 2 and "2 processes x micro-batch 2" in two["data_parallel"]["split"]
    assert two["gradient_accumulation_steps"] == 1 and one["gradient_accumulation_steps"] == 2
    assert two["steps"] == one["steps"] == 3
    assert two["train_tokens"] == one["train_tokens"]
    assert two_losses == pytest.approx(one_losses, rel=1e-4)
    assert two_adapter.keys() == one_adapter.keys()
    moved = 0
    for key, tensor in one_adapter.items():
        assert (two_adapter[key] - tensor).abs().max() < 1e-5, key
        moved += int(key.endswith("lora_B.weight") and tensor.abs().max() > 0)
    assert moved  # training changed the adapter (lora_B starts at zero)


# --------------------------------------------------------------------------------------------- fits the GPUs
def fake_weights(folder: Path, parameters: int) -> Path:
    """A model directory whose safetensors header declares `parameters` weights (no data: only headers are read)."""
    folder.mkdir(parents=True, exist_ok=True)
    header = json.dumps({"model.w": {"dtype": "BF16", "shape": [parameters // 8192, 8192], "data_offsets": [0, 0]}})
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header.encode())
    return folder


H200 = 143_771 * 2**20  # bytes, as torch reports one H200


def test_gpu_fit_check_names_the_model_and_the_memory_needed(tmp_path):
    from tunelens.preflight import NF4_BYTES_PER_PARAMETER, gpu_fit_problem, gpu_fit_problems
    from tunelens.settings import ResourcesSection

    model_70b = fake_weights(tmp_path / "70b", 70_553_706_496)
    problem = gpu_fit_problem("llama-70b", model_70b, 1, 2, [H200, H200])
    assert problem.startswith("model 'llama-70b' (70.6 B parameters x 2 bytes = 131.4 GiB of weights) does not fit 1 GPU")
    assert "set models.llama-70b.resources.gpus to at least 2" in problem
    assert gpu_fit_problem("llama-70b", model_70b, 2, 2, [H200, H200]) is None
    assert gpu_fit_problem("llama-70b", model_70b, 1, NF4_BYTES_PER_PARAMETER, [H200]) is None  # QLoRA: one GPU
    assert "node's 2 GPU(s) cannot hold it" in gpu_fit_problem("llama-70b", model_70b, 2, 2, [80 * 2**30] * 2)
    assert "asks for 2 GPUs (models.llama-70b.resources.gpus) but sees 1" in gpu_fit_problem("llama-70b", model_70b, 2, 2, [H200])
    assert gpu_fit_problem("hub", "org/not-local", 1, 2, [H200]) is None  # unknown here: checked in the job
    study = SimpleNamespace(models={"big": SimpleNamespace(resource_settings=ResourcesSection(gpus=1)),
                                    "small": SimpleNamespace(resource_settings=ResourcesSection(gpus=1))})
    dirs = {"big": model_70b, "small": fake_weights(tmp_path / "7b", 6_738_415_616)}
    (only,) = gpu_fit_problems(study, dirs, [H200])
    assert only.startswith("model 'big'")


def test_a_model_too_large_for_the_jobs_gpus_fails_before_loading(tmp_path, two_fake_gpus):
    from tunelens.models import load_model

    model_70b = fake_weights(tmp_path / "70b", 70_553_706_496)
    with pytest.raises(ModelError, match=r"70b' \(70.6 B parameters x 2 bytes = 131.4 GiB of weights\) does not fit 2 GPU\(s\) of 80.0 GiB"):
        load_model(model_70b, device="cuda", gpus=2)
    assert two_fake_gpus == []  # nothing loaded


def test_the_70b_preset_asks_two_gpus_for_every_model_job(tmp_path):
    """configs/llama-70b.yaml through the SLURM profile (dry run): its model rules carry gpu=2 (the plugin's
    --gpus / gres), the CPU rules none."""
    import re
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--configfile", str(root / "configs/llama-70b.yaml"), "--snakefile",
         str(root / "Snakefile"), "--directory", str(tmp_path), "--profile", str(root / "profiles/slurm")],
        capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # Model jobs (the fine-tune, and the generate/early-exit/lens/perplexity jobs SLURM groups per variant) carry
    # the model's resources (mem_mb 200000); every one of them asks for two GPUs.
    model_jobs = [line for line in result.stdout.splitlines() if "resources:" in line and "mem_mb=200000" in line]
    assert len(model_jobs) >= 1 + 2 * 19, len(model_jobs)  # fine-tune + 2 variants x (13 generate, 4 early exit, ...)
    assert all(re.search(r"\bgpu=2\b", line) for line in model_jobs), [l for l in model_jobs if "gpu=2" not in l][:2]
    finetune = re.search(r"^rule finetune:\n(?:    .*\n)*?    resources: (.*)$", result.stdout, re.M)
    assert finetune and "gpu=2" in finetune.group(1).split(", ")
    split = re.search(r"^rule split:\n(?:    .*\n)*?    resources: (.*)$", result.stdout, re.M)
    assert split and not re.search(r"\bgpu=", split.group(1))


def test_a_local_run_with_fewer_gpus_than_a_model_asks_stops_before_any_job(tmp_path):
    """Snakemake alone stops only when it reaches the first 2-GPU job, after the jobs before it ran."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    config = tmp_path / "two.yaml"
    config.write_text((root / "config.yaml").read_text().replace(
        "resources: {gpus: 1, cpus: 1, mem_mb: 8000", "resources: {gpus: 2, cpus: 1, mem_mb: 8000", 1))
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "1", "--resources", "gpu=1", "--configfile", str(config),
         "--snakefile", str(root / "Snakefile"), "--directory", str(tmp_path), "--until", "split"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "models.smollm2.resources.gpus is 2, above this run's gpu limit 1; run with --resources gpu=2" in \
        result.stderr
    assert not (tmp_path / "results").exists()


def test_the_batch_budget_of_a_sharded_model_is_its_tightest_gpus(monkeypatch):
    """KV cache lives with each block: 3 blocks on a GPU with 12 GiB free and 1 on a GPU with 2 GiB free leave
    room for min(0.5 x 12 GiB / 3 blocks, 0.5 x 2 GiB / 1 block) of cache per block-token (the second GPU)."""
    import torch

    import tunelens.generation.backend_hf as backend_hf
    import tunelens.models as models

    gib = 2**30

    def on(device):
        return SimpleNamespace(parameters=lambda: iter([SimpleNamespace(device=torch.device(device))]))

    layers = [on("cuda:0"), on("cuda:0"), on("cuda:0"), on("cuda:1")]
    model = SimpleNamespace(config=SimpleNamespace(get_text_config=lambda: SimpleNamespace(vocab_size=1000)))
    monkeypatch.setattr(models, "input_device", lambda m: torch.device("cuda:0"))
    monkeypatch.setattr(models, "decoder_layers", lambda m: layers)
    monkeypatch.setattr(backend_hf, "kv_bytes_per_token", lambda m: 4 * 1024)  # 1 KiB a block
    free = {0: 12 * gib, 1: 2 * gib}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free[torch.device(device).index], 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 0)
    tokens, row_bytes = backend_hf.auto_token_budget(model)
    assert tokens == int(0.5 * 2 * gib / 1024)  # the second GPU's room (the first has room for twice as many)
    assert row_bytes == 16 * 1000


def test_perplexity_and_lens_jobs_in_process_keep_their_gpu_count():
    from tunelens.generation.served import run_model_task

    seen = {}

    def compute(**kwargs):
        seen.update(kwargs)
        return {}, []

    run_model_task("perplexity", {"model_path": "m", "backend": "hf", "gpus": 2, "vllm_options": None}, compute,
                   server=False)
    assert seen == {"model_path": "m", "gpus": 2}
