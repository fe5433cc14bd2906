"""Generation stage, hf backend, on tiny random models; decoding-config naming/expansion/validation.

The vllm backend's tests are in tests/test_vllm.py (they run in the separate .venv-vllm).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tunelens.config import DecodingConfig, _expand_decoding, check_decoding_config
from tunelens.errors import ConfigError, DataError, ModelError
from tunelens.generation.generate import (
    GenerationSettings,
    cut_at_stop,
    describe_semantics,
    generate,
    hf_generate_batched,
    resolve_backend,
)
from tunelens.generation.agreement import token_agreement

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROWS = [
    {"id": "t-1", "instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"id": "t-2", "instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"id": "t-3", "instruction": "Write a Python function that returns the square of x.", "input": "",
     "output": "def f(x):\n    return x * x"},
]
ROW_KEYS = ["id", "prompt", "reference", "generated", "num_generated_tokens", "finish_reason"]


def write_rows(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def test_file(tmp_path) -> Path:
    return write_rows(tmp_path / "test.jsonl", ROWS)


@pytest.fixture(scope="module")
def tiny(tiny_model_factory):
    return tiny_model_factory("llama", 2)


@pytest.fixture(scope="module")
def tiny_adapter(tiny, tmp_path_factory) -> Path:
    """A LoRA adapter with random (non-zero) A and B, so it changes the model's outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny)
    config = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    out = tmp_path_factory.mktemp("adapter")
    get_peft_model(model, config).save_pretrained(out)
    return out


def run(tiny, test_file, out, **overrides):
    kwargs = dict(
        model_name="tiny", model_path=tiny, decoding_config=DecodingConfig(temperature=0.8).as_dict(),
        max_new_tokens=12, seed=7, backend="hf", batch_size=2, device="cpu",
    )
    kwargs.update(overrides)
    meta = generate(test_file, out, **kwargs)
    rows = [json.loads(line) for line in Path(out).read_text().splitlines()]
    return rows, meta


# --------------------------------------------------------------------------------------------- outputs
def test_output_rows_and_meta_follow_the_contract(tiny, test_file, tmp_path):
    out = tmp_path / "gen" / "top_k_50_num_beams_1_temp_0.8.jsonl"
    rows, meta = run(tiny, test_file, out)
    assert [row["id"] for row in rows] == ["t-1", "t-2", "t-3"]  # test-file order, despite length sorting
    assert all(list(row) == ROW_KEYS for row in rows)
    assert [row["reference"] for row in rows] == [r["output"] for r in ROWS]
    assert "### Input:\n2 and 3" in rows[1]["prompt"]
    assert all(0 < row["num_generated_tokens"] <= 12 for row in rows)
    assert all(row["finish_reason"] in ("stop", "length", "stop_string") for row in rows)
    on_disk = json.loads((tmp_path / "gen" / "top_k_50_num_beams_1_temp_0.8.meta.json").read_text())
    assert on_disk == json.loads(json.dumps(meta))
    assert meta["backend"] == "hf" and meta["variant"] == "base" and meta["adapter"] is None
    assert meta["decoding_config"] == {"name": "top_k_50_num_beams_1_temp_0.8", "top_k": 50, "num_beams": 1,
                                       "temperature": 0.8, "top_p": 1.0, "repetition_penalty": 1.0}
    assert meta["seed"] == 7 and meta["n_rows"] == 3
    assert meta["generated_tokens"] == sum(row["num_generated_tokens"] for row in rows)
    assert "multinomial sampling" in meta["semantics"] and "top_k=50" in meta["semantics"]
    assert meta["versions"]["transformers"] and meta["load_time_s"] >= 0 and meta["tokens_per_s"] > 0


def test_same_seed_same_output_other_seed_differs(tiny, test_file, tmp_path):
    first, _ = run(tiny, test_file, tmp_path / "a.jsonl", seed=11)
    again, _ = run(tiny, test_file, tmp_path / "b.jsonl", seed=11)
    other, _ = run(tiny, test_file, tmp_path / "c.jsonl", seed=12)
    assert [r["generated"] for r in first] == [r["generated"] for r in again]
    # A random tiny model has a nearly flat distribution over 49k tokens: another seed changes the samples.
    assert [r["generated"] for r in first] != [r["generated"] for r in other]


def test_temperature_zero_is_greedy_and_ignores_seed_and_top_k(tiny, test_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    greedy = DecodingConfig(top_k=10, temperature=0.0).as_dict()
    rows, meta = run(tiny, test_file, tmp_path / "a.jsonl", decoding_config=greedy, seed=1, batch_size=3)
    rows_other, _ = run(tiny, test_file, tmp_path / "b.jsonl", decoding_config={**greedy, "top_k": 50}, seed=2,
                        batch_size=1)
    assert [r["generated"] for r in rows] == [r["generated"] for r in rows_other]
    assert "greedy" in meta["semantics"]
    # Equal to a plain argmax loop written independently of tunelens (one prompt, no batching, no cache).
    import torch

    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    ids = tokenizer(rows[2]["prompt"], return_tensors="pt", add_special_tokens=False)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(rows[2]["num_generated_tokens"]):
            token = int(model(ids).logits[0, -1].argmax())
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    assert rows[2]["generated"] == tokenizer.decode(new, skip_special_tokens=True)


def test_batched_equals_one_at_a_time_for_greedy(tiny):
    from tunelens.models import load_model

    model, tokenizer = load_model(tiny, device="cpu")
    side = tokenizer.padding_side
    prompts = ["Hi", "A much longer prompt that needs plenty of left padding in a batch", "Tell me"]
    greedy = DecodingConfig(temperature=0.0)
    batched = hf_generate_batched(model, tokenizer, prompts, greedy, GenerationSettings(max_new_tokens=8, batch_size=3))
    single = hf_generate_batched(model, tokenizer, prompts, greedy, GenerationSettings(max_new_tokens=8, batch_size=1))
    assert [c.token_ids for c in batched] == [c.token_ids for c in single]
    assert tokenizer.padding_side == side  # restored for the caller


def test_beam_search_runs_and_is_deterministic(tiny, test_file, tmp_path):
    beam = DecodingConfig(num_beams=3, temperature=0.8).as_dict()
    rows, meta = run(tiny, test_file, tmp_path / "a.jsonl", decoding_config=beam, seed=1)
    again, _ = run(tiny, test_file, tmp_path / "b.jsonl", decoding_config=beam, seed=99)
    assert [r["generated"] for r in rows] == [r["generated"] for r in again]  # beam_search ignores sampling
    assert all(r["num_generated_tokens"] > 0 for r in rows)
    assert "beam search, 3 beams" in meta["semantics"] and "ignored" in meta["semantics"]
    sampled, meta_sample = run(tiny, test_file, tmp_path / "c.jsonl", decoding_config=beam, beam_mode="beam_sample")
    assert "beam sampling" in meta_sample["semantics"] and len(sampled) == 3


def test_lora_variant_differs_from_base(tiny, tiny_adapter, test_file, tmp_path):
    from tunelens.io import sha256_dir

    greedy = DecodingConfig(temperature=0.0).as_dict()
    base, _ = run(tiny, test_file, tmp_path / "base.jsonl", decoding_config=greedy)
    tuned, meta = run(tiny, test_file, tmp_path / "ft.jsonl", decoding_config=greedy, variant="finetuned",
                      adapter_dir=tiny_adapter)
    assert [r["generated"] for r in base] != [r["generated"] for r in tuned]
    assert meta["adapter"] == {"dir": str(tiny_adapter), "sha256": sha256_dir(tiny_adapter)}
    with pytest.raises(ConfigError, match="needs an adapter"):
        run(tiny, test_file, tmp_path / "x.jsonl", variant="finetuned")
    with pytest.raises(ModelError, match="adapter_config.json"):
        run(tiny, test_file, tmp_path / "x.jsonl", variant="finetuned", adapter_dir=tmp_path)


def test_stop_string_cuts_output(tiny, test_file, tmp_path):
    # Sampling from a random model gives varied text (greedy repeats one token); same seed = same tokens.
    sampled = DecodingConfig(top_k=0, temperature=1.0).as_dict()
    free, _ = run(tiny, test_file, tmp_path / "a.jsonl", decoding_config=sampled, max_new_tokens=16)
    text = free[2]["generated"]
    middle = next(i for i in range(len(text) // 2, len(text) - 2) if text[i : i + 3].strip() == text[i : i + 3])
    stop = text[middle : middle + 3]  # a piece from the middle of the free-running answer
    cut, meta = run(tiny, test_file, tmp_path / "b.jsonl", decoding_config=sampled, max_new_tokens=16, stop=[stop])
    assert cut[2]["generated"] == text[: text.find(stop)]
    assert cut[2]["finish_reason"] == "stop_string"
    assert cut[2]["num_generated_tokens"] < free[2]["num_generated_tokens"]  # generation stopped early
    assert meta["stop"] == [stop] and meta["finish_reasons"]["stop_string"] >= 1
    assert cut_at_stop("abc### Instruction: x", ["###", "c#"]) == ("ab", True)
    assert cut_at_stop("abc", ["z"]) == ("abc", False)


def test_empty_prompt_fails_naming_the_row(tiny, tmp_path):
    bad = write_rows(tmp_path / "test.jsonl", [ROWS[0], {"id": "t-empty", "instruction": "  ", "input": "",
                                                          "output": "x"}])
    with pytest.raises(DataError, match=r"line 2 \(id t-empty\): empty prompt"):
        run(tiny, bad, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_over_long_prompt_fails_naming_the_row_and_limit(tiny, tmp_path):
    long_row = {"id": "t-long", "instruction": "Summarise: " + "word " * 150, "input": "", "output": "x"}
    bad = write_rows(tmp_path / "test.jsonl", ROWS[:2] + [long_row])
    with pytest.raises(DataError, match=r"line 3 \(id t-long\): prompt has \d+ tokens, more than "
                                        r"generation.max_prompt_tokens=100"):
        run(tiny, bad, tmp_path / "out.jsonl", max_prompt_tokens=100)
    assert not list(tmp_path.glob("out*"))
    rows, _ = run(tiny, bad, tmp_path / "out.jsonl", max_prompt_tokens=400, max_new_tokens=2)  # raised limit: ok
    assert rows[2]["id"] == "t-long"


def test_prompt_plus_max_new_tokens_beyond_the_context_fails_naming_the_row(tiny, tmp_path):
    """Issue 23: max_new_tokens plus the longest prompt against the model's context length (512 positions in
    the tiny model's config.json), before any generation; nothing compared them before."""
    long_row = {"id": "t-long", "instruction": "Summarise: " + "word " * 150, "input": "", "output": "x"}
    bad = write_rows(tmp_path / "test.jsonl", ROWS[:2] + [long_row])
    with pytest.raises(DataError, match=r"test.jsonl, line 3 \(id t-long\): prompt has \d+ tokens; with "
                                        r"decoding.max_new_tokens=400 that is \d+, beyond the context length 512"):
        run(tiny, bad, tmp_path / "out.jsonl", max_new_tokens=400)
    assert not list(tmp_path.glob("out*"))


def test_max_test_rows_limits_rows(tiny, test_file, tmp_path):
    rows, meta = run(tiny, test_file, tmp_path / "out.jsonl", max_test_rows=2)
    assert [r["id"] for r in rows] == ["t-1", "t-2"] and meta["n_rows"] == 2


def test_killed_job_leaves_no_complete_looking_file(tiny, test_file, tmp_path):
    """SIGKILL a generation in mid-run: neither the .jsonl nor its .meta.json may exist afterwards."""
    out = tmp_path / "gen" / "cfg.jsonl"
    script = textwrap.dedent(f"""
        import sys, time
        import tunelens.generation.generate as g
        real = g.hf_generate_batched
        def slow(*args, **kwargs):
            result = real(*args, **kwargs)
            print("GENERATED", flush=True)
            time.sleep(60)  # killed here, after generation, before any output is written
            return result
        g.hf_generate_batched = slow
        g.generate({str(test_file)!r}, {str(out)!r}, model_name="tiny", model_path={str(tiny)!r},
                   decoding_config={{"temperature": 0.0}}, max_new_tokens=4, backend="hf", device="cpu")
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "GENERATED"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not out.exists() and not out.with_suffix(".meta.json").exists()
    # And a complete run leaves exactly the two files, no temp files.
    run(tiny, test_file, out, max_new_tokens=2)
    assert sorted(p.name for p in out.parent.iterdir()) == ["cfg.jsonl", "cfg.meta.json"]


def test_backend_resolution():
    assert resolve_backend("hf")[0] == "hf"
    backend, reason = resolve_backend("auto", "cpu")
    assert backend == "hf" and "vllm" in reason  # this venv has no vllm (it lives in .venv-vllm)
    with pytest.raises(ModelError, match="vllm is not installed"):
        resolve_backend("vllm")
    with pytest.raises(ConfigError, match="unknown"):
        resolve_backend("tgi")


def test_token_agreement_counts_prefixes():
    report = token_agreement([[1, 2, 3], [4, 5], []], [[1, 2, 9], [4, 5], []])
    assert report["exact_match"] == pytest.approx(2 / 3)
    assert report["rows"][0]["prefix"] == 2 and report["rows"][0]["agreement"] == pytest.approx(2 / 3)
    assert report["mean_first_divergence"] == 2
    with pytest.raises(DataError):
        token_agreement([[1]], [])


# --------------------------------------------------------------------------------------------- decoding configs
def _decoding(**overrides):
    base = {"mode": "one_at_a_time", "defaults": {"top_k": 50, "num_beams": 1, "temperature": 0.8, "top_p": 1.0,
                                                    "repetition_penalty": 1.0},
            "sweep": {}, "configs": []}
    base.update(overrides)
    return base


def test_canonical_names():
    assert DecodingConfig().name == "top_k_50_num_beams_1_temp_0.8"
    assert DecodingConfig(temperature=0).name == "top_k_50_num_beams_1_temp_0.0"
    assert DecodingConfig(temperature=1).name == "top_k_50_num_beams_1_temp_1.0"
    assert DecodingConfig(top_p=0.9, repetition_penalty=1.2).name == "top_k_50_num_beams_1_temp_0.8_top_p_0.9_rep_1.2"


def test_one_at_a_time_expansion_matches_the_study():
    sweep = {"top_k": [10, 25, 40, 75], "num_beams": [2, 3, 5, 10], "temperature": [0.0, 0.25, 0.5, 1.0]}
    names = [c.name for c in _expand_decoding(_decoding(sweep=sweep))]
    assert len(names) == 13 and len(set(names)) == 13
    assert names[0] == "top_k_50_num_beams_1_temp_0.8"
    assert "top_k_10_num_beams_1_temp_0.8" in names and "top_k_50_num_beams_10_temp_0.8" in names
    assert "top_k_50_num_beams_1_temp_0.0" in names


def test_grid_and_list_expansion():
    grid = _expand_decoding(_decoding(mode="grid", sweep={"top_k": [10, 20], "temperature": [0.5, 1.0]}))
    assert {c.name for c in grid[1:]} == {f"top_k_{k}_num_beams_1_temp_{t}" for k in (10, 20) for t in (0.5, 1.0)}
    listed = _expand_decoding(_decoding(mode="list", configs=[{"name": "greedy", "temperature": 0.0}, {"top_k": 5}]))
    assert [c.name for c in listed] == ["greedy", "top_k_5_num_beams_1_temp_0.8"]
    assert listed[0].is_greedy
    with pytest.raises(ConfigError, match="empty"):
        _expand_decoding(_decoding(mode="list"))


def test_invalid_combinations_fail_with_the_reason():
    beam = DecodingConfig(num_beams=4, temperature=0.8)
    with pytest.raises(ConfigError, match="vLLM only does deterministic beam search"):
        check_decoding_config(beam, "beam_sample", {"vllm"}, "decoding (x)")
    with pytest.raises(ConfigError, match="temperature 0 is undefined"):
        check_decoding_config(DecodingConfig(num_beams=4, temperature=0.0), "beam_sample", {"hf"}, "decoding (x)")
    check_decoding_config(beam, "beam_search", {"vllm", "hf"}, "decoding (x)")  # valid: no error


def test_semantics_text_states_what_was_applied():
    assert "ignored" in describe_semantics(DecodingConfig(num_beams=2), "beam_search", "hf")
    assert "NOT applied" in describe_semantics(DecodingConfig(num_beams=2, repetition_penalty=1.3), "beam_search",
                                               "vllm")
    assert "top_k=off (0)" in describe_semantics(DecodingConfig(top_k=0), "beam_search", "vllm")
    with pytest.raises(ConfigError):
        GenerationSettings(beam_mode="nucleus")


# ------------------------------------------------------------------------------------------ adaptive batches
PROMPTS_10 = [f"Question {i}: " + "word " * (i * 3) + "what comes next?" for i in range(10)]


def test_out_of_memory_batch_is_split_and_no_row_is_lost(tiny):
    """A batch that runs out of GPU memory is split in two and retried until it fits: every row gets its
    answer, the same as without the failure (greedy), and the sidecar's batch log shows the splits."""
    import torch

    from tunelens.models import load_model

    model, tokenizer = load_model(tiny, device="cpu")
    greedy = DecodingConfig(temperature=0.0)
    settings = GenerationSettings(max_new_tokens=6, batch_size=8)
    reference = hf_generate_batched(model, tokenizer, PROMPTS_10, greedy, settings)

    real_generate = model.generate
    seen = []

    def generate_or_oom(**kwargs):  # the GPU "holds" at most 3 rows
        seen.append(kwargs["input_ids"].shape[0])
        if kwargs["input_ids"].shape[0] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_generate(**kwargs)

    model.generate = generate_or_oom
    try:
        batch_log = []
        got = hf_generate_batched(model, tokenizer, PROMPTS_10, greedy, settings, batch_log)
    finally:
        del model.generate
    assert [c.token_ids for c in got] == [c.token_ids for c in reference]
    assert all(c is not None for c in got)
    run = [entry["rows"] for entry in batch_log if "rows" in entry]
    assert sum(run) == len(PROMPTS_10) and max(run) <= 3
    assert [entry["out_of_memory"] for entry in batch_log if "out_of_memory" in entry] == [8, 4, 4]
    assert seen[0] == 8  # the plan was tried first, not pre-shrunk


def test_single_row_out_of_memory_is_an_error_naming_the_prompt_size(tiny):
    import torch

    from tunelens.models import load_model

    model, tokenizer = load_model(tiny, device="cpu")

    def always_oom(**kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    model.generate = always_oom
    with pytest.raises(ModelError, match="out of memory generating a single prompt of .* tokens"):
        hf_generate_batched(model, tokenizer, PROMPTS_10[:2], DecodingConfig(temperature=0.0),
                            GenerationSettings(max_new_tokens=4, batch_size=2))


def test_auto_batches_fill_the_token_budget_longest_first():
    """auto on CUDA: each batch grows while rows x (its longest prompt + new tokens) x beams fit the budget."""
    from tunelens.generation.generate import plan_batches

    lengths = [100, 10, 50, 30, 70]
    order = sorted(range(5), key=lambda i: -lengths[i])  # 0, 4, 2, 3, 1
    settings = GenerationSettings(max_new_tokens=20, batch_size="auto")
    # budget 300 tokens, no per-row logits charge: (100+20)x2 = 240 fits, x3 = 360 does not
    assert plan_batches(lengths, order, settings, 1, (300, 0)) == [[0, 4], [2, 3, 1]]
    # two beams double every row's cache: one row per batch until the prompts get short
    assert plan_batches(lengths, order, settings, 2, (300, 0)) == [[0], [4], [2, 3], [1]]
    # a huge budget: one batch; CPU (no budget): batches of 16; a fixed size cuts every n rows
    assert plan_batches(lengths, order, settings, 1, (10**9, 0)) == [order]
    assert plan_batches(list(range(40)), list(range(40)), settings, 1, None) == [list(range(16)), list(range(16, 32)),
                                                                                   list(range(32, 40))]
    assert plan_batches(lengths, order, GenerationSettings(batch_size=2), 1, None) == [[0, 4], [2, 3], [1]]


def test_auto_batch_size_runs_on_cpu(tiny, test_file, tmp_path):
    meta = generate(test_file, tmp_path / "out.jsonl", model_name="tiny", model_path=tiny,
                    decoding_config=DecodingConfig(temperature=0.0), max_new_tokens=4, backend="hf", device="cpu",
                    batch_size="auto")
    assert meta["batch_size"] == "auto"
    assert [b["rows"] for b in meta["batches"]] == [len(ROWS)]
