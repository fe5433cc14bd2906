"""Gemma (half of the embedded default) through fine-tune, generation, perplexity and the probe.

Gemma's real tokenizer adds a BOS (SmolLM2's, used by the other tiny models, adds none), so this is where
a missing or doubled BOS would show. The model is a tiny random Gemma 3 with that tokenizer. A global
forward pre-hook records the token ids every embedding lookup of the model receives, in every stage,
independently of how each stage builds them; each sequence (padding stripped) must start with exactly one
BOS and hold no other.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest

from tunelens.config import DecodingConfig

ROWS = [
    {"id": "g-1", "instruction": "Name the colour of the sky.", "input": "", "output": "Blue."},
    {"id": "g-2", "instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"id": "g-3", "instruction": "Say hello in French.", "input": "", "output": "Bonjour."},
    {"id": "g-4", "instruction": "Reverse the word.", "input": "abc", "output": "cba"},
]


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory, gemma_tokenizer_dir) -> Path:
    from conftest import _build_tiny

    return _build_tiny(tmp_path_factory.mktemp("tiny_gemma"), gemma_tokenizer_dir, "gemma3", 2)


@contextmanager
def embedding_inputs(vocab_size: int):
    """Collect the id sequences (prefill only: length > 1) fed to any embedding of `vocab_size` rows."""
    import torch
    from torch.nn.modules.module import register_module_forward_pre_hook

    seen: list[list[int]] = []

    def hook(module, args):
        if isinstance(module, torch.nn.Embedding) and module.num_embeddings == vocab_size and args:
            ids = args[0]
            if ids.dim() == 2 and ids.shape[1] > 1:
                seen.extend(ids.detach().cpu().tolist())

    handle = register_module_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def assert_one_leading_bos(sequences, tokenizer, stage: str):
    assert sequences, f"{stage}: the model saw no sequence (hook not reached?)"
    bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id
    assert bos is not None and bos != pad
    for ids in sequences:
        start = next(i for i, t in enumerate(ids) if t != pad)  # left padding (generation)
        body = ids[start:]
        assert body[0] == bos, f"{stage}: sequence starts with {body[:3]}, not BOS {bos}"
        assert body.count(bos) == 1, f"{stage}: {body.count(bos)} BOS in {body[:6]}..."


@pytest.mark.slow
def test_gemma_every_stage_sees_exactly_one_bos(tiny_gemma, tmp_path):
    from transformers import AutoTokenizer

    from tunelens.training.finetune import finetune
    from tunelens.generation.generate import generate
    from tunelens.scoring.perplexity import reference_perplexity
    from tunelens.probe.lens import run_logit_lens
    from tunelens.probe.probe import run_early_exit

    tokenizer = AutoTokenizer.from_pretrained(tiny_gemma)
    assert tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id  # the tokenizer adds a BOS by itself
    vocab = len(tokenizer)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))

    with embedding_inputs(vocab) as seen:
        settings = {
            "enabled": True, "method": "auto", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
            "target_modules": "all-linear", "learning_rate": 1e-3, "lr_scheduler": "constant", "warmup_ratio": 0.0,
            "weight_decay": 0.0, "num_epochs": 1, "max_steps": 1, "batch_size": 4, "gradient_accumulation": 1,
            "max_seq_length": 128, "packing": False, "padding_free": False, "gradient_checkpointing": "auto",
            "liger": "auto", "logging_steps": 1, "save_steps": 10,
        }
        adapter = tmp_path / "ft/adapter"
        finetune(tiny_gemma, data, adapter, tmp_path / "ft/log.jsonl", tmp_path / "ft/metrics.json",
                 tmp_path / "ft/loss.png", tmp_path / "ckpt", settings, "alpaca", 3, device="cpu", model_name="gemma")
    assert_one_leading_bos(seen, tokenizer, "fine-tune")
    assert len(seen) == len(ROWS)  # one step of batch 4: every training row was checked

    with embedding_inputs(vocab) as seen:
        generate(data, tmp_path / "gen.jsonl", model_name="gemma", model_path=tiny_gemma, variant="finetuned",
                 adapter_dir=adapter, decoding_config=DecodingConfig(temperature=0.0).as_dict(), max_new_tokens=3,
                 backend="hf", batch_size=4, device="cpu")
    assert_one_leading_bos(seen, tokenizer, "generation")
    rows = [json.loads(line) for line in (tmp_path / "gen.jsonl").read_text().splitlines()]
    assert all(row["prompt"].startswith(tokenizer.bos_token) for row in rows)

    with embedding_inputs(vocab) as seen:
        reference_perplexity(data, tmp_path / "ppl.json", tmp_path / "ppl.rows.csv", model_name="gemma",
                             model_path=tiny_gemma, device="cpu", samples=50)
    assert_one_leading_bos(seen, tokenizer, "perplexity")

    with embedding_inputs(vocab) as seen:
        run_logit_lens(
            model_name="gemma", source="local", model_path=tiny_gemma, adapter_dir=adapter, variant="finetuned",
            test_path=data, output_json=tmp_path / "lens.json", output_heatmap=tmp_path / "lens.png",
            output_entropy=tmp_path / "entropy.png", layer_specs=[1, 2], expected_layers=[1, 2],
            prompt_format="alpaca", lens_prompts=["The capital of France is"], lens_test_prompts=2, top_k=3,
            new_tokens=2, seed=1, device="cpu",
        )
    assert_one_leading_bos(seen, tokenizer, "logit lens")

    with embedding_inputs(vocab) as seen:
        run_early_exit(
            model_name="gemma", source="local", model_path=tiny_gemma, adapter_dir=adapter, variant="finetuned",
            test_path=data, output_jsonl=tmp_path / "ee.jsonl", output_meta=tmp_path / "ee.meta.json", layer=1,
            layer_specs=[1, 2], expected_layers=[1, 2], prompt_format="alpaca", decoding={"temperature": 0.0},
            max_test_rows=2, max_new_tokens=3, batch_size=2, seed=1, device="cpu",
        )
    assert_one_leading_bos(seen, tokenizer, "early exit")
