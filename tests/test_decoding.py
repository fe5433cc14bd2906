"""The decoding knobs change what is generated, as they claim to (hf backend; vLLM: tests/test_vllm.py).

Each test compares tunelens' output with a reference computed without tunelens' decoding code (greedy,
transformers' own beam search, an exactly known next-token distribution), and each is built so that a knob
that is silently not applied makes it fail:
  - top_k=1 at temperature 1, and a top_p small enough to keep one token, equal greedy: on a random model
    the next-token distribution is nearly flat over 49k tokens, so unrestricted sampling leaves greedy
    at the first token;
  - temperature: a model whose logits are a fixed vector b (LayerNorm weight and bias 0, so the LM head
    sees 0 and returns its bias) makes every draw an independent sample of softmax(b / T); a chi-square
    test over many seeded draws accepts softmax(b / T) and rejects the distribution of the other T;
  - beam search equals `model.generate(num_beams=k)` called directly, and differs from greedy;
  - a generation_config.json with repetition_penalty 2 (and sampling defaults) does not change the
    output, while the same penalty passed in the decoding config does.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tunelens.config import DecodingConfig
from tunelens.generation.generate import GenerationSettings, generate, hf_generate_batched

from test_generate import ROWS  # the generation tests' three prompts

os.environ.setdefault("OMP_NUM_THREADS", "1")

MAX_NEW_TOKENS = 10
GREEDY = {"top_k": 0, "num_beams": 1, "temperature": 0.0}


@pytest.fixture(scope="module")
def tiny(tiny_model_factory) -> Path:
    return tiny_model_factory("llama", 2)


@pytest.fixture(scope="module")
def test_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("decoding") / "test.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def run(model_path, test_file, out_dir: Path, decoding: dict, **overrides) -> list[dict]:
    """Generate through tunelens' public stage function (the path the generate rule takes)."""
    name = "_".join(f"{k}{v}" for k, v in sorted({**decoding, **overrides}.items()))
    out = out_dir / f"{name}.jsonl"
    kwargs = dict(model_name="tiny", model_path=model_path, decoding_config=decoding, max_new_tokens=MAX_NEW_TOKENS,
                  seed=3, backend="hf", batch_size=3, device="cpu")
    kwargs.update(overrides)
    generate(test_file, out, **kwargs)
    return [json.loads(line) for line in out.read_text().splitlines()]


def texts(rows) -> list[str]:
    return [row["generated"] for row in rows]


@pytest.fixture(scope="module")
def greedy_rows(tiny, test_file, tmp_path_factory):
    return run(tiny, test_file, tmp_path_factory.mktemp("greedy"), GREEDY)


@pytest.mark.parametrize("seed", [3, 4])
def test_top_k_1_at_temperature_1_equals_greedy(tiny, test_file, tmp_path, greedy_rows, seed):
    top1 = run(tiny, test_file, tmp_path, {"top_k": 1, "num_beams": 1, "temperature": 1.0}, seed=seed)
    assert texts(top1) == texts(greedy_rows)
    # The same sampling without the top_k restriction leaves greedy: the test can see top_k not applied.
    free = run(tiny, test_file, tmp_path, {"top_k": 0, "num_beams": 1, "temperature": 1.0}, seed=seed)
    assert all(a != b for a, b in zip(texts(free), texts(greedy_rows)))


@pytest.mark.parametrize("seed", [3, 4])
def test_top_p_keeping_one_token_equals_greedy(tiny, test_file, tmp_path, greedy_rows, seed):
    # On a nearly flat distribution the top token has p ~ 2e-5: top_p 1e-9 keeps exactly that one.
    nucleus = run(tiny, test_file, tmp_path, {"top_k": 0, "num_beams": 1, "temperature": 1.0, "top_p": 1e-9},
                  seed=seed)
    assert texts(nucleus) == texts(greedy_rows)
    wide = run(tiny, test_file, tmp_path, {"top_k": 0, "num_beams": 1, "temperature": 1.0, "top_p": 0.9},
               seed=seed)
    assert all(a != b for a, b in zip(texts(wide), texts(greedy_rows)))


# --------------------------------------------------------------------------------------------- temperature
KNOWN_LOGITS = {0: 2.0, 1: 1.0, 2: 0.0, 3: -1.0}  # index into the chosen tokens -> logit


@pytest.fixture(scope="module")
def known_distribution_model(tmp_path_factory, smollm2_tokenizer_dir):
    """A tiny Phi whose next-token logits are the LM head's bias, whatever the prompt: final LayerNorm weight
    and bias 0 make the head's input 0. The bias is -1000 except 4 ordinary word tokens (KNOWN_LOGITS)."""
    import torch
    from transformers import AutoTokenizer, PhiConfig, PhiForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    config = PhiConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = PhiForCausalLM(config)
    tokens = [tokenizer(word, add_special_tokens=False)["input_ids"] for word in (" red", " blue", " green", " cat")]
    assert all(len(ids) == 1 for ids in tokens)
    token_ids = [ids[0] for ids in tokens]
    with torch.no_grad():
        model.model.final_layernorm.weight.zero_()
        model.model.final_layernorm.bias.zero_()
        model.lm_head.bias.fill_(-1000.0)
        for index, logit in KNOWN_LOGITS.items():
            model.lm_head.bias[token_ids[index]] = logit
    out = tmp_path_factory.mktemp("known_distribution")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out, token_ids


def first_token_counts(model, tokenizer, token_ids, temperature: float, draws: int, seed: int) -> np.ndarray:
    prompts = ["Pick a word:"] * draws
    config = DecodingConfig(top_k=0, num_beams=1, temperature=temperature)
    settings = GenerationSettings(max_new_tokens=1, seed=seed, batch_size=draws)
    completions = hf_generate_batched(model, tokenizer, prompts, config, settings)
    firsts = [c.token_ids[0] for c in completions]
    assert set(firsts) <= set(token_ids), "a token outside the 4 allowed ones was drawn"
    return np.asarray([firsts.count(t) for t in token_ids])


def expected_probs(temperature: float) -> np.ndarray:
    logits = np.asarray([KNOWN_LOGITS[i] for i in range(4)]) / temperature
    p = np.exp(logits - logits.max())
    return p / p.sum()


def test_temperature_changes_the_distribution_as_softmax_of_logits_over_t(known_distribution_model):
    from scipy.stats import chisquare

    from tunelens.models import load_model

    path, token_ids = known_distribution_model
    model, tokenizer = load_model(path, device="cpu")
    draws = 1500
    counts = {t: first_token_counts(model, tokenizer, token_ids, t, draws, seed=11) for t in (0.5, 2.0)}
    for temperature, observed in counts.items():
        # The drawn frequencies fit softmax(b / T) ...
        assert chisquare(observed, draws * expected_probs(temperature)).pvalue > 1e-3, (temperature, observed)
        # ... and not the distribution of the other temperature, nor T = 1 (temperature not applied).
        for other in {0.5, 2.0, 1.0} - {temperature}:
            assert chisquare(observed, draws * expected_probs(other)).pvalue < 1e-6, (temperature, other, observed)
    # The direction: a low temperature concentrates on the top token.
    assert counts[0.5][0] / draws > 0.8 > 0.5 > counts[2.0][0] / draws


# --------------------------------------------------------------------------------------------- beams
def test_beam_search_equals_transformers_beam_search_called_directly(tiny, test_file, tmp_path, greedy_rows):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # temperature/top_k set, as in the sweep: beam_search mode must ignore them.
    beams = run(tiny, test_file, tmp_path, {"top_k": 50, "num_beams": 3, "temperature": 0.8})
    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    for row in beams:
        ids = tokenizer(row["prompt"], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**ids, num_beams=3, do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                                 pad_token_id=tokenizer.pad_token_id)
        direct = out[0, ids["input_ids"].shape[1]:].tolist()
        assert row["generated"] == tokenizer.decode(direct, skip_special_tokens=True)
        assert row["num_generated_tokens"] == len(direct)
    # Beams that silently ran greedy would fail here.
    assert texts(beams) != texts(greedy_rows)


# --------------------------------------------------------------------------------------------- generation_config.json
def test_generation_config_json_is_not_read(tiny, test_file, tmp_path, greedy_rows):
    """Settings come from the decoding config only: a model's generation_config.json with
    repetition_penalty 2 (and sampling defaults) leaves greedy output unchanged."""
    model_dir = tmp_path / "with_generation_config"
    shutil.copytree(tiny, model_dir)
    config = json.loads((model_dir / "generation_config.json").read_text())
    config.update(repetition_penalty=2.0, do_sample=True, temperature=0.6, top_k=5, top_p=0.5, num_beams=2,
                  no_repeat_ngram_size=2, max_new_tokens=3)
    (model_dir / "generation_config.json").write_text(json.dumps(config))
    rows = run(model_dir, test_file, tmp_path, GREEDY)
    assert texts(rows) == texts(greedy_rows)
    assert [r["num_generated_tokens"] for r in rows] == [r["num_generated_tokens"] for r in greedy_rows]
    # The same penalty passed in the decoding config does change the output: the test would see it read.
    penalised = run(tiny, test_file, tmp_path, {**GREEDY, "repetition_penalty": 2.0})
    assert texts(penalised) != texts(greedy_rows)
