"""Prompt formats: the Alpaca template, chat templates, and the BOS policy shared by every stage."""

from __future__ import annotations

import os

import pytest

from tunelens.errors import ConfigError
from tunelens.prompts import ALPACA_NO_INPUT, bos_prefix, build_prompt, response_text

ROW = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 + 3 = 5."}


class FakeTokenizer:
    """A tokenizer that, like Llama-2's or Gemma's, puts BOS first by default."""

    bos_token, bos_token_id, eos_token, chat_template = "<bos>", 2, "<eos>", None

    def __call__(self, text, add_special_tokens=True):
        ids = [ord(c) for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


def test_alpaca_template_with_and_without_input():
    assert build_prompt(ROW, "alpaca").endswith("### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n")
    no_input = build_prompt({**ROW, "input": ""}, "alpaca")
    assert no_input == ALPACA_NO_INPUT.format(instruction="Add the numbers.")
    assert "### Input:" not in no_input


def test_bos_is_in_the_prompt_text_only_for_tokenizers_that_add_one(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    assert build_prompt(ROW, "alpaca", FakeTokenizer()).startswith("<bos>Below is an instruction")
    smollm2 = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    assert bos_prefix(smollm2) == ""  # SmolLM2 adds no BOS by default
    assert build_prompt(ROW, "alpaca", smollm2).startswith("Below is an instruction")


def test_chat_template_and_response(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    prompt = build_prompt(ROW, "chat", tokenizer)
    assert "Add the numbers.\n\n2 and 3" in prompt
    assert prompt.rstrip().endswith("assistant")  # generation prompt opened for the answer
    assert response_text(ROW, tokenizer) == "2 + 3 = 5." + tokenizer.eos_token


def test_chat_without_template_is_a_clear_error():
    with pytest.raises(ConfigError, match="has no chat template"):
        build_prompt(ROW, "chat", FakeTokenizer())
    with pytest.raises(ConfigError, match="prompt_format 'plain' is unknown"):
        build_prompt(ROW, "plain")


def test_adapter_hash_ignores_snakemake_timestamp(tmp_path):
    from tunelens.io import sha256_dir

    (tmp_path / "adapter_model.safetensors").write_bytes(b"weights")
    before = sha256_dir(tmp_path)
    (tmp_path / ".snakemake_timestamp").write_text("")
    assert sha256_dir(tmp_path) == before
    (tmp_path / "adapter_model.safetensors").write_bytes(b"other weights")
    assert sha256_dir(tmp_path) != before


def test_atomic_directory_replaces_only_on_success(tmp_path):
    from tunelens.io import atomic_directory

    target = tmp_path / "out" / "adapter"
    with atomic_directory(target) as staging:
        (staging / "a.txt").write_text("first")
        assert not target.exists()  # nothing visible until the block ends
    assert (target / "a.txt").read_text() == "first"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as staging:
            (staging / "a.txt").write_text("half")
            raise RuntimeError("killed")
    assert (target / "a.txt").read_text() == "first"  # the old directory stays, the staging one is gone
    assert sorted(p.name for p in target.parent.iterdir()) == ["adapter"]
    umask = os.umask(0)
    os.umask(umask)
    assert (target.stat().st_mode & 0o777) == 0o777 & ~umask  # not mkdtemp's private 0700
    assert ((target / "a.txt").stat().st_mode & 0o777) == 0o666 & ~umask


def test_save_figure_atomic_writes_a_readable_png(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tunelens.io import save_figure_atomic

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    save_figure_atomic(fig, tmp_path / "plots" / "p.png", metadata={"Software": None})
    plt.close(fig)
    path = tmp_path / "plots" / "p.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["p.png"]  # no temp file left
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~umask
