"""Probe stage: logit lens and early exit on tiny random models of each supported architecture."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from tunelens.config import DecodingConfig, resolve_layers  # noqa: E402
from tunelens.errors import ConfigError, ModelError  # noqa: E402
from tunelens.io import read_json, read_jsonl, write_jsonl_atomic  # noqa: E402
from tunelens.models import decoder_layers, load_model, num_decoder_layers  # noqa: E402
from tunelens.generation.generate import GenerationSettings, hf_generate_batched  # noqa: E402
from tunelens.probe.lens import encode_prompts, logit_lens, run_logit_lens  # noqa: E402
from tunelens.probe.probe import check_probe_layers, run_early_exit, truncated_decoder  # noqa: E402

ARCHS = ["llama", "mistral", "gemma3", "phi"]
GREEDY = DecodingConfig(temperature=0.0)
PROMPTS = ["Calculate the atomic mass for lithium.", "Write a Python function that adds two numbers, please"]
TEST_ROWS = [
    {"id": f"demo-{i}", "instruction": f"Say the number {i} in words.", "input": "" if i % 2 else "digits",
     "output": f"number {i}"}
    for i in range(5)
]


@pytest.fixture(autouse=True)
def _one_thread():
    # 2 shared cores: one thread is faster under load and keeps float results deterministic.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _load(path):
    return load_model(path, device="cpu")


def _prompt_ids(tokenizer):
    return encode_prompts(tokenizer, PROMPTS)


def _generate(model, tokenizer, max_new_tokens, prompts=PROMPTS):
    """The generation stage's greedy loop (what early exit runs on the truncated model)."""
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=2)
    return hf_generate_batched(model, tokenizer, prompts, GREEDY, settings)


# --------------------------------------------------------------------------------------------- logit lens
@pytest.mark.parametrize("arch", ARCHS)
def test_lens_at_last_layer_equals_the_models_own_logits(tiny_model_factory, arch):
    model, tokenizer = _load(tiny_model_factory(arch, 4))
    ids = _prompt_ids(tokenizer)
    lens = logit_lens(model, tokenizer, ids, [1, 2, 4], top_k=5, new_tokens=3)
    for prompt_ids, readout in zip(ids, lens):
        sequence = torch.tensor([prompt_ids + readout["continuation_ids"]])
        with torch.no_grad():
            probs = torch.softmax(model(input_ids=sequence).logits[0].float(), dim=-1)
        assert len(readout["positions"]) == 4  # prompt's last token + 3 continuation tokens
        for entry in readout["positions"]:
            last = entry["layers"][-1]
            assert last["layer"] == 4
            expected = torch.topk(probs[entry["position"]], 5)
            assert [t["id"] for t in last["top"]] == expected.indices.tolist()
            assert [t["prob"] for t in last["top"]] == pytest.approx(expected.values.tolist(), abs=1e-5)
            assert last["kl_to_final"] == pytest.approx(0.0, abs=1e-6)
            # The greedy continuation is what the last layer ranks first.
        steps = [e["layers"][-1]["top"][0]["id"] for e in readout["positions"][:-1]]
        assert steps == readout["continuation_ids"][: len(steps)]


def test_lens_applies_gemma_final_logit_softcapping(tiny_model_factory):
    model, tokenizer = _load(tiny_model_factory("gemma3", 4))
    model.config.final_logit_softcapping = 0.5  # tiny so it visibly squashes the random logits
    ids = _prompt_ids(tokenizer)[:1]
    readout = logit_lens(model, tokenizer, ids, [4], top_k=3, new_tokens=1)[0]  # self-check inside passes
    sequence = torch.tensor([ids[0] + readout["continuation_ids"]])
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=sequence).logits[0], dim=-1)
    entry = readout["positions"][0]
    assert [t["prob"] for t in entry["layers"][0]["top"]] == pytest.approx(
        torch.topk(probs[entry["position"]], 3).values.tolist(), abs=1e-6)


def test_lens_of_an_inner_layer_is_norm_plus_head_of_its_hidden_state(tiny_model_factory):
    model, tokenizer = _load(tiny_model_factory("llama", 4))
    ids = _prompt_ids(tokenizer)[:1]
    readout = logit_lens(model, tokenizer, ids, [2], top_k=3, new_tokens=2)[0]
    sequence = torch.tensor([ids[0] + readout["continuation_ids"]])
    with torch.no_grad():
        hidden = model(input_ids=sequence, output_hidden_states=True).hidden_states[2][0]
        probs = torch.softmax(model.lm_head(model.model.norm(hidden)), dim=-1)
    for entry in readout["positions"]:
        layer = entry["layers"][0]
        p = probs[entry["position"]]
        assert [t["id"] for t in layer["top"]] == torch.topk(p, 3).indices.tolist()
        assert layer["entropy"] == pytest.approx(float(-(p * p.log()).sum()), rel=1e-4)
        assert layer["kl_to_final"] > 0  # a random 2-block read-out differs from the 4-block one


def test_lens_rejects_a_layer_beyond_depth(tiny_model_factory):
    model, tokenizer = _load(tiny_model_factory("llama", 4))
    with pytest.raises(ConfigError, match=r"\[5\].*1\.\.4 decoder layers"):
        logit_lens(model, tokenizer, _prompt_ids(tokenizer), [2, 5])


def test_unsupported_architecture_fails_clearly(smollm2_tokenizer_dir):
    from transformers import BartConfig, BartForCausalLM

    model = BartForCausalLM(BartConfig(vocab_size=128, d_model=16, decoder_layers=2, decoder_attention_heads=2,
                                       decoder_ffn_dim=32, encoder_layers=1, encoder_attention_heads=2,
                                       encoder_ffn_dim=32, max_position_embeddings=64)).eval()
    with pytest.raises(ModelError, match="unsupported architecture BartForCausalLM"):
        logit_lens(model, None, [[1, 2, 3]], [1])
    with pytest.raises(ModelError, match="unsupported architecture BartForCausalLM"):
        with truncated_decoder(model, 1):
            pass


# --------------------------------------------------------------------------------------------- early exit
@pytest.mark.parametrize("arch", ARCHS)
def test_early_exit_at_last_layer_equals_normal_greedy_generation(tiny_model_factory, arch):
    model, tokenizer = _load(tiny_model_factory(arch, 4))
    expected = _generate(model, tokenizer, 6)
    with truncated_decoder(model, 4):
        answers = _generate(model, tokenizer, 6)
    assert [a.token_ids for a in answers] == [e.token_ids for e in expected]
    assert all(len(a.token_ids) == 6 for a in answers)


@pytest.mark.parametrize("arch", ARCHS)
def test_early_exit_equals_a_model_built_with_only_the_first_blocks(tiny_model_factory, arch):
    """Layer L of an N-block model generates exactly what an L-block model with the same weights does:
    first L blocks, then the final norm and LM head, KV cache and all."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = tiny_model_factory(arch, 4)
    model, tokenizer = _load(path)
    config = AutoConfig.from_pretrained(path)
    config.num_hidden_layers = 2
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:2]
    shallow = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32).eval()
    expected = _generate(shallow, tokenizer, 8)
    with truncated_decoder(model, 2):
        answers = _generate(model, tokenizer, 8)
    full = _generate(model, tokenizer, 8)
    assert [a.token_ids for a in answers] == [e.token_ids for e in expected]
    assert [a.token_ids for a in answers] != [f.token_ids for f in full]  # the top blocks did change the answer
    assert num_decoder_layers(model) == 4


def _block_calls(model):
    calls = [0] * num_decoder_layers(model)
    handles = [
        block.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, block in enumerate(decoder_layers(model))
    ]
    return calls, handles


def test_early_exit_at_layer_1_runs_only_the_first_block(tiny_model_factory):
    model, tokenizer = _load(tiny_model_factory("llama", 4))
    calls, handles = _block_calls(model)
    with truncated_decoder(model, 1):
        answers = _generate(model, tokenizer, 5)
    assert all(len(a.token_ids) == 5 for a in answers)
    assert calls[0] == 5 and calls[1:] == [0, 0, 0]  # one call per generation step, top blocks never run
    _generate(model, tokenizer, 5)
    assert calls == [10, 5, 5, 5]  # restored: the full model runs every block again
    for handle in handles:
        handle.remove()


def test_layer_list_is_restored_after_an_error(tiny_model_factory):
    model, tokenizer = _load(tiny_model_factory("llama", 4))
    original = decoder_layers(model)

    def explode(*_):
        raise RuntimeError("boom in block 2")

    handle = original[1].register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom in block 2"):
            with truncated_decoder(model, 3):
                assert num_decoder_layers(model) == 3
                _generate(model, tokenizer, 3)
    finally:
        handle.remove()
    assert decoder_layers(model) is original and num_decoder_layers(model) == 4


def test_truncation_beyond_depth_fails(tiny_model_factory):
    model, _ = _load(tiny_model_factory("llama", 4))
    with pytest.raises(ConfigError, match=r"layer 5 is outside the model's depth \(1\.\.4"):
        with truncated_decoder(model, 5):
            pass
    assert num_decoder_layers(model) == 4


# --------------------------------------------------------------------------------------------- layers
@pytest.mark.parametrize("depth, expected", [(4, [1, 2, 3, 4]), (18, [5, 9, 14, 18]), (30, [8, 15, 23, 30]),
                                             (32, [8, 16, 24, 32])])
def test_fractions_resolve_for_models_of_different_depth(tiny_model_factory, depth, expected):
    assert resolve_layers([0.25, 0.5, 0.75, 1.0], depth, "m") == expected
    if depth <= 18:  # small enough to build: the loaded model's real depth is what counts
        model, _ = _load(tiny_model_factory("llama", depth))
        assert check_probe_layers([0.25, 0.5, 0.75, 1.0], expected, model, "m") == expected


def test_planned_layers_that_do_not_match_the_loaded_model_fail(tiny_model_factory):
    model, _ = _load(tiny_model_factory("llama", 4))
    with pytest.raises(ConfigError, match=r"model 'tiny'.*\[1, 2, 3, 4\].*4 decoder layers.*\[8, 16\]"):
        check_probe_layers([0.25, 0.5, 0.75, 1.0], [8, 16], model, "tiny")
    with pytest.raises(ConfigError, match=r"model 'tiny': probe layer 8 is beyond its depth \(4 decoder layers\)"):
        check_probe_layers([2, 8], None, model, "tiny")


# --------------------------------------------------------------------------------------------- stage outputs
def test_run_logit_lens_writes_json_and_plots(tiny_model_factory, tmp_path):
    path = tiny_model_factory("gemma3", 4)
    test_path = tmp_path / "test.jsonl"
    write_jsonl_atomic(test_path, TEST_ROWS)
    out = tmp_path / "probe"
    run_logit_lens(
        model_name="tiny", source="local", model_path=path, adapter_dir=None, variant="base", test_path=test_path,
        output_json=out / "lens.json", output_heatmap=out / "lens_heatmap.png", output_entropy=out / "lens_entropy.png",
        layer_specs=[0.5, 1.0], expected_layers=[2, 4], prompt_format="chat", lens_prompts=PROMPTS[:1],
        lens_test_prompts=2, top_k=4, new_tokens=3, seed=7, device="cpu",
    )
    lens = read_json(out / "lens.json")
    assert lens["layers"] == [2, 4] and lens["num_layers"] == 4 and lens["seed"] == 7
    assert [p["id"] for p in lens["prompts"]] == ["lens-1", "demo-0", "demo-1"]
    assert lens["prompts"][0]["prompt"].startswith("<|im_start|>")  # the chat template was applied
    for prompt in lens["prompts"]:
        assert len(prompt["positions"]) == 4
        assert all([c["layer"] for c in e["layers"]] == [2, 4] and len(e["layers"][0]["top"]) == 4
                   for e in prompt["positions"])
    assert "torch" in lens["versions"] and lens["adapter"] is None
    for png in ("lens_heatmap.png", "lens_entropy.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_run_early_exit_writes_generation_rows_and_meta(tiny_model_factory, tmp_path):
    path = tiny_model_factory("phi", 4)
    test_path = tmp_path / "test.jsonl"
    write_jsonl_atomic(test_path, TEST_ROWS)
    jsonl, meta_path = tmp_path / "layer_2.jsonl", tmp_path / "layer_2.meta.json"
    run_early_exit(
        model_name="tiny", source="local", model_path=path, adapter_dir=None, variant="base", test_path=test_path,
        output_jsonl=jsonl, output_meta=meta_path, layer=2, layer_specs=[0.5, 1.0], expected_layers=[2, 4],
        prompt_format="alpaca", decoding={"temperature": 0.0}, max_test_rows=3, max_new_tokens=5, batch_size=2,
        seed=3, device="cpu",
    )
    rows = read_jsonl(jsonl)
    assert [list(r) for r in rows] == [
        ["id", "prompt", "reference", "generated", "num_generated_tokens", "finish_reason"]] * 3
    assert [r["id"] for r in rows] == ["demo-0", "demo-1", "demo-2"]
    assert rows[0]["reference"] == "number 0" and "### Input:\ndigits" in rows[0]["prompt"]
    assert all(r["finish_reason"] in ("stop", "length", "stop_string") for r in rows)
    meta = json.loads(meta_path.read_text())
    assert meta["early_exit"] == {"layer": 2, "num_layers": 4, "fraction": 0.5} and meta["layer"] == 2
    assert meta["decoding_config"]["name"] == "top_k_50_num_beams_1_temp_0.0"
    assert "greedy" in meta["semantics"] and "blocks 3..4 not run" in meta["semantics"]
    assert meta["n_rows"] == 3 and meta["generated_tokens"] == sum(r["num_generated_tokens"] for r in rows)
    assert {"backend", "model", "variant", "adapter", "seed", "load_time_s", "generation_time_s", "tokens_per_s",
            "versions"} <= set(meta)


def test_run_early_exit_rejects_a_layer_that_is_not_planned(tiny_model_factory, tmp_path):
    test_path = tmp_path / "test.jsonl"
    write_jsonl_atomic(test_path, TEST_ROWS)
    with pytest.raises(ConfigError, match=r"early-exit layer 3 is not one of its probe layers \[2, 4\]"):
        run_early_exit(
            model_name="tiny", source="local", model_path=tiny_model_factory("llama", 4), adapter_dir=None,
            variant="base", test_path=test_path, output_jsonl=tmp_path / "x.jsonl", output_meta=tmp_path / "x.json",
            layer=3, layer_specs=[2, 4], expected_layers=[2, 4], prompt_format="alpaca",
            decoding={"temperature": 0.0}, device="cpu",
        )
    assert not (tmp_path / "x.jsonl").exists()


def test_finetuned_variant_reads_the_adapter(tiny_model_factory, tmp_path):
    from peft import LoraConfig, get_peft_model

    from tunelens.io import sha256_dir

    path = tiny_model_factory("llama", 4)
    base, _ = _load(path)
    torch.manual_seed(0)
    # Random (not zero) LoRA B so the adapter changes the outputs.
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    test_path = tmp_path / "test.jsonl"
    write_jsonl_atomic(test_path, TEST_ROWS)
    common = dict(model_name="tiny", source="local", model_path=path, test_path=test_path, layer_specs=[1.0],
                  expected_layers=[4], prompt_format="alpaca", lens_prompts=PROMPTS[:1], lens_test_prompts=0,
                  top_k=3, new_tokens=2, device="cpu")
    lenses = {}
    for variant, adapter_dir in (("base", None), ("finetuned", adapter)):
        out = tmp_path / variant
        lenses[variant] = run_logit_lens(variant=variant, adapter_dir=adapter_dir, output_json=out / "lens.json",
                                         output_heatmap=out / "h.png", output_entropy=out / "e.png", **common)
    assert lenses["finetuned"]["adapter"] == {"dir": str(adapter), "sha256": sha256_dir(adapter)}
    top = {v: [e["layers"][0]["top"][0]["prob"] for e in lens["prompts"][0]["positions"]] for v, lens in lenses.items()}
    assert top["base"] != top["finetuned"]
    with pytest.raises(ConfigError, match="variant 'base' was given an adapter"):
        run_logit_lens(variant="base", adapter_dir=adapter, output_json=tmp_path / "x.json",
                       output_heatmap=tmp_path / "h.png", output_entropy=tmp_path / "e.png", **common)
