"""Embedded models: materialise from their PyPI packages, reload as plain HF dirs, generate."""

from __future__ import annotations

import json

import pytest

from tunelens.errors import ModelError
from tunelens.models import (
    EMBEDDED_MODELS, decoder_layers, final_norm, lm_head, load_model, materialize_embedded, num_decoder_layers,
)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma3-270m"])
def test_materialise_embedded_llm_then_load_and_generate(tmp_path_factory, name):
    import torch

    out = tmp_path_factory.mktemp("models") / name
    materialize_embedded(name, out)
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    assert (out / "tokenizer.json").exists() or (out / "tokenizer.model").exists()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert json.loads((out / "tunelens_source.json").read_text())["embedded"] == name
    assert not list(out.parent.glob(f".{name}.*")), "staging directory left behind"

    model, tokenizer = load_model(out, device="cpu")
    assert num_decoder_layers(model) == EMBEDDED_MODELS[name]["num_layers"]
    assert final_norm(model) is not None and lm_head(model) is not None
    # A real model (not random weights, not a broken dequantisation) names Paris. The instruct model ends a
    # bare "Answer:" turn at once and the base model rambles after a sentence stem, so offer both phrasings.
    answers = []
    for prompt in ("The capital of France is", "Question: What is the capital of France?\nAnswer:"):
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        answers.append(tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    assert any("Paris" in answer for answer in answers), answers
    # ...and finds English far likelier than the same tokens shuffled.
    ids = tokenizer("The quick brown fox jumps over the lazy dog because it was late for dinner.",
                    return_tensors="pt")["input_ids"]
    shuffled = ids.clone()
    shuffled[0, 1:] = ids[0, 1:][torch.randperm(ids.shape[1] - 1, generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        natural_loss = model(ids, labels=ids).loss.item()
        shuffled_loss = model(shuffled, labels=shuffled).loss.item()
    assert natural_loss < shuffled_loss - 2.0, (natural_loss, shuffled_loss)


def test_materialise_embedded_encoder(tmp_path):
    out = materialize_embedded("all-minilm-l6-v2", tmp_path / "bertscore")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bert" and config["num_hidden_layers"] == 6
    assert (out / "model.safetensors").stat().st_size > 80_000_000


def test_unknown_embedded_model(tmp_path):
    with pytest.raises(ModelError, match="unknown embedded model 'nope'"):
        materialize_embedded("nope", tmp_path / "x")


def test_architecture_accessors_on_tiny_models(tiny_model_factory):
    for arch in ("llama", "mistral", "gemma3", "phi"):
        model, _ = load_model(tiny_model_factory(arch, 3), device="cpu")
        assert len(decoder_layers(model)) == 3
        assert final_norm(model).__class__.__name__.lower().endswith("norm")


def test_unsupported_architecture_is_named():
    import torch

    class Odd(torch.nn.Module):
        def get_output_embeddings(self):
            return None

    with pytest.raises(ModelError, match="unsupported architecture Odd"):
        decoder_layers(Odd())


def test_missing_adapter_is_named(tiny_llama_dir, tmp_path):
    with pytest.raises(ModelError, match="has no adapter_config.json"):
        load_model(tiny_llama_dir, adapter_dir=tmp_path, device="cpu")
