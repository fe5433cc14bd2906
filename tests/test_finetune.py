"""Fine-tuning stage (tunelens.training.finetune) on tiny random models, CPU only.

Each test trains for a handful of steps on a few rows; together they take well under a minute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tunelens.errors import ConfigError, DataError
from tunelens.training.finetune import build_trainer, finetune
from tunelens.prompts import build_prompt, response_text

REPO_ROOT = Path(__file__).resolve().parent.parent

# Short, distinct rows: enough for a tiny model to learn their responses in a few dozen steps.
ROWS = [
    {"instruction": "Name the colour of the sky.", "input": "", "output": "Blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hello in French.", "input": "", "output": "Bonjour."},
    {"instruction": "Reverse the word.", "input": "abc", "output": "cba"},
    {"instruction": "Give the capital of Italy.", "input": "", "output": "Rome."},
    {"instruction": "Write a Python expression for two squared.", "input": "", "output": "2 ** 2"},
    {"instruction": "Count the letters.", "input": "tree", "output": "4"},
    {"instruction": "Answer yes or no: is ice cold?", "input": "", "output": "Yes."},
]

# The same answer to every instruction: a tiny random model learns it within ~16 steps (distinct answers
# would take hundreds), which is enough to show the loss falls and the adapter changes what is generated.
ANSWER = "The answer is ready."
LEARNABLE_ROWS = [{**row, "output": ANSWER} for row in ROWS]


def settings(**overrides) -> dict:
    """The schema's defaults, shrunk for a tiny CPU run."""
    base = {
        "enabled": True, "method": "auto", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "target_modules": "all-linear", "learning_rate": 5e-3, "lr_scheduler": "constant",
        "warmup_ratio": 0.0, "weight_decay": 0.0, "num_epochs": 1, "max_steps": 12, "batch_size": 4,
        "gradient_accumulation": 1, "max_seq_length": 256, "packing": False, "padding_free": False,
        "gradient_checkpointing": "auto", "liger": "auto", "logging_steps": 1, "save_steps": 4,
    }
    base.update(overrides)
    return base


@pytest.fixture
def train_jsonl(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    with path.open("w") as handle:
        for index, row in enumerate(ROWS):
            handle.write(json.dumps({"id": f"t-{index}", **row}) + "\n")
    return path


def outputs(root: Path) -> dict:
    return {
        "adapter_dir": root / "finetune" / "adapter",
        "train_log": root / "finetune" / "train_log.jsonl",
        "metrics_json": root / "finetune" / "metrics.json",
        "loss_png": root / "finetune" / "loss.png",
        "checkpoint_dir": root / "checkpoints",
    }


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def adapter_tensors(adapter_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


# ------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def sharp_llama_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny Llama with its (tied) embeddings scaled x10.

    With the default init (std 0.02, hidden size 64) the LM head's logits stay within about +-1.3 whatever
    the hidden state, so the loss cannot fall much below log(vocab) ~ 10.8 and LoRA has nothing to show.
    Real models have larger logits; scaling restores that, so a short run can visibly learn.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("sharp_llama")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(10)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def trained(sharp_llama_dir, tmp_path_factory):
    """One 16-step run, shared by the tests that inspect its outputs."""
    root = tmp_path_factory.mktemp("trained")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"id": f"t-{i}", **row}) + "\n" for i, row in enumerate(LEARNABLE_ROWS)))
    paths = outputs(root)
    metrics = finetune(
        sharp_llama_dir, data, settings=settings(max_steps=16, learning_rate=1e-2, logging_steps=2, save_steps=8),
        prompt_format="alpaca", seed=7, device="cpu", model_name="tiny", **paths,
    )
    return metrics, paths


def test_loss_decreases_and_outputs_are_complete(trained):
    metrics, paths = trained
    rows = read_log(paths["train_log"])
    assert [row["step"] for row in rows] == [1] + list(range(2, 17, 2))
    first, last = rows[0]["loss"], sum(row["loss"] for row in rows[-2:]) / 2
    assert last < 0.5 * first, (first, last)
    assert all(row["tokens"] > 0 and row["tokens_per_s"] > 0 for row in rows)
    assert metrics["method"] == "lora" and metrics["device"] == "cpu" and metrics["compute_dtype"] == "float32"
    assert any("quantisation is off on CPU" in reason for reason in metrics["plan_reasons"])
    assert metrics["steps"] == 16 and metrics["steps_this_job"] == 16 and metrics["resumed_from_step"] is None
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    assert metrics["final_loss"] == rows[-1]["loss"]
    # 9 logged steps: windows of 1 step (10% rounded up), the means of the log's first and last rows
    assert metrics["logged_steps"] == 9 and metrics["loss_window_steps"] == 1
    assert metrics["first_loss_window_mean"] == pytest.approx(rows[0]["loss"], abs=1e-6)
    assert metrics["last_loss_window_mean"] == pytest.approx(rows[-1]["loss"], abs=1e-6)
    assert metrics["train_tokens"] == sum(row["tokens"] for row in rows)
    assert metrics["adapter"]["sha256"] and "torch" in metrics["versions"]
    assert paths["loss_png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not paths["checkpoint_dir"].exists(), "checkpoints must be deleted when the job completes"
    config = json.loads((paths["adapter_dir"] / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["peft_type"] == "LORA"
    # all-linear on Llama: the 7 projections of each block, not the LM head
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # written in sorted order, not PEFT's set order (which follows the hash seed), so the adapter's hash is stable
    assert config["target_modules"] == sorted(config["target_modules"])


def test_adapter_reloads_and_changes_generations(trained, sharp_llama_dir):
    import torch
    from peft import PeftModel

    from tunelens.models import load_model

    _, paths = trained
    base, tokenizer = load_model(sharp_llama_dir, device="cpu")
    tuned, _ = load_model(sharp_llama_dir, adapter_dir=paths["adapter_dir"], device="cpu")
    assert isinstance(tuned, PeftModel)
    prompt = build_prompt({"instruction": ROWS[4]["instruction"], "input": ""}, "alpaca")
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        base_ids = base.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        tuned_ids = tuned.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert base_ids.tolist() != tuned_ids.tolist()
    # The fine-tuned model starts the answer it was trained on; the random base does not.
    first_token = tokenizer(ANSWER)["input_ids"][0]
    assert tuned_ids[0] == first_token and base_ids[0] != first_token


# ------------------------------------------------------------------------------------------ loss mask
@pytest.mark.parametrize("prompt_format", ["alpaca", "chat"])
def test_prompt_tokens_carry_no_loss(tiny_llama_dir, train_jsonl, tmp_path, prompt_format):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    run = build_trainer(tiny_llama_dir, train_jsonl, tmp_path / "ckpt", settings(), prompt_format, seed=1,
                        device="cpu")
    batch = next(iter(run.trainer.get_train_dataloader()))
    by_prompt = {build_prompt({**row}, prompt_format, tokenizer): row for row in ROWS}
    assert batch["labels"].shape[0] == 4
    for input_ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        real = mask.bool()
        trained_positions = (labels != -100) & real
        prompt_positions = (labels == -100) & real
        prompt_text = tokenizer.decode(input_ids[prompt_positions])
        row = by_prompt[prompt_text]  # the unlabelled tokens are exactly the generation prompt
        # ... with the ids the generation stage feeds (full text, no special tokens added)
        assert input_ids[prompt_positions].tolist() == tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        # the labelled tokens are exactly the reference output and EOS, labelled with themselves
        assert tokenizer.decode(input_ids[trained_positions]) == response_text(row, tokenizer)
        assert (labels[trained_positions] == input_ids[trained_positions]).all()
        assert (labels[~real] == -100).all()
        # prompt first, then the response: no labelled token precedes an unlabelled real one
        first_label = int(trained_positions.nonzero()[0])
        assert not prompt_positions[first_label:].any()


def test_padding_free_batch_gives_the_padded_loss(tiny_llama_dir, train_jsonl, tmp_path):
    """Padding-free flattens the batch into one sequence; sequences must not attend to each other, so the
    loss equals the padded batch's (same rows: same seed, same sampler)."""
    import torch

    losses = {}
    for padding_free in (False, True):
        run = build_trainer(tiny_llama_dir, train_jsonl, tmp_path / f"ckpt{padding_free}",
                            settings(padding_free=padding_free), "alpaca", seed=1, device="cpu")
        batch = next(iter(run.trainer.get_train_dataloader()))
        assert ("attention_mask" in batch) is not padding_free
        with torch.no_grad():
            losses[padding_free] = run.trainer.compute_loss(run.trainer.model, batch).item()
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


# ------------------------------------------------------------------------------------------ bad options
def test_missing_target_module_fails_before_training(tiny_llama_dir, train_jsonl, tmp_path):
    paths = outputs(tmp_path)
    with pytest.raises(ConfigError) as error:
        finetune(tiny_llama_dir, train_jsonl, settings=settings(target_modules=["q_proj", "qkv_proj"]),
                 prompt_format="alpaca", seed=1, device="cpu", **paths)
    message = str(error.value)
    assert "'qkv_proj' does not exist" in message and "'gate_proj'" in message and "'lm_head'" not in message
    assert not paths["checkpoint_dir"].exists() and not paths["adapter_dir"].exists()


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"target_modules": ["lm_head"]}, "is the LM head"),
        ({"target_modules": r".*\.mlp\.nothing"}, "matches no linear module"),
        ({"method": "qlora"}, "'qlora' needs a CUDA device"),
        ({"liger": True}, "needs a CUDA device"),
        ({"warmup_ratio": 1.0}, "fraction in [0, 1)"),
        ({"lora_rank": 8}, "unknown key(s) ['lora_rank']"),
    ],
)
def test_bad_option_fails_clearly(tiny_llama_dir, train_jsonl, tmp_path, overrides, expected):
    with pytest.raises(ConfigError, match=None) as error:
        build_trainer(tiny_llama_dir, train_jsonl, tmp_path / "ckpt", settings(**overrides), "alpaca", seed=1,
                      device="cpu")
    assert expected in str(error.value)
    assert not (tmp_path / "ckpt").exists()


def test_epochs_over_a_hub_dataset_are_bounded_before_training(tiny_llama_dir, tmp_path):
    """Issue 23: the DAG estimates the optimizer steps when the rows are known before the split (local data);
    a hub dataset's rows are first known here: 1,001 rows x 1000 epochs at 1 row per step is over the bound."""
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"id": f"t-{i}", "instruction": f"Task {i}", "input": "", "output": "ok"})
                             + "\n" for i in range(1001)))
    with pytest.raises(ConfigError) as error:
        build_trainer(tiny_llama_dir, train, tmp_path / "ckpt", settings(max_steps=None, num_epochs=1000,
                                                                         batch_size=1), "alpaca", seed=1, device="cpu")
    assert "finetune.num_epochs: 1000 over 1001 training rows" in str(error.value)
    assert "1001000 optimizer steps, at most 1000000" in str(error.value)
    assert not (tmp_path / "ckpt").exists()


def test_prompt_longer_than_max_seq_length_is_dropped_and_counted(tiny_llama_dir, train_jsonl, tmp_path):
    n_rows = len(train_jsonl.read_text().splitlines())
    run = build_trainer(tiny_llama_dir, train_jsonl, tmp_path / "ckpt", settings(max_seq_length=40), "alpaca",
                        seed=1, device="cpu")
    # the three rows with an input have the longest prompts (about 50 tokens): left out, counted, not fatal
    assert run.stats.dropped_rows == {"prompt_fills_max_seq_length": 3}
    assert run.stats.rows == n_rows - 3 == len(run.trainer.train_dataset)
    assert run.stats.truncated_rows > 0  # the others are cut to 40 tokens, also counted


def test_prompt_longer_than_max_seq_length_names_the_row_when_bad_rows_are_errors(tiny_llama_dir, train_jsonl,
                                                                                   tmp_path):
    with pytest.raises(DataError) as error:
        build_trainer(tiny_llama_dir, train_jsonl, tmp_path / "ckpt", settings(max_seq_length=40), "alpaca",
                      seed=1, device="cpu", on_bad_rows="error")
    message = str(error.value)
    assert "3 row(s)" in message and "line 2 (id 't-1'" in message and "max_seq_length=40" in message
    assert "on_bad_rows" in message


@pytest.mark.parametrize("losses, fragment", [
    ([2.3, 2.1, float("nan")], "loss is nan at step 3"),
    ([2.3, float("inf")], "loss is inf at step 2"),
    ([2.3, 3.0, 9.5], "loss rose from 2.3 (step 1) to 9.5 (step 3)"),
    ([(12.7, 0.8), (10.8, 0.0), (10.8, 0.0)], "gradient norm is 0 from step 2 on, with the loss stuck at 10.8"),
    ([(2.3, 0.8), (2.2, float("nan"))], "gradient norm is nan at step 2"),
])
def test_divergence_is_an_error(losses, fragment):
    from tunelens.training.finetune import DivergenceError, check_divergence

    rows = [{"step": i + 1, "loss": loss[0], "grad_norm": loss[1]} if isinstance(loss, tuple)
            else {"step": i + 1, "loss": loss} for i, loss in enumerate(losses)]
    with pytest.raises(DivergenceError) as error:
        check_divergence(rows, {"learning_rate": 1e9}, "tiny")
    assert fragment in str(error.value) and "learning_rate (1000000000.0)" in str(error.value)


def test_noisy_or_converged_loss_is_not_divergence():
    from tunelens.training.finetune import check_divergence

    check_divergence([{"step": 1, "loss": 2.3}, {"step": 2, "loss": 2.6}, {"step": 3, "loss": 2.4}], {}, "m")
    check_divergence([{"step": 1, "loss": 0.05}, {"step": 2, "loss": 0.3}], {}, "m")  # 6x, but a 0.25 rise
    check_divergence([{"step": 1, "loss": 2.0, "grad_norm": 0.0}, {"step": 2, "loss": 1.9, "grad_norm": 0.4}], {}, "m")


def test_learning_rate_1e9_fails_the_finetune_and_writes_no_adapter(sharp_llama_dir, train_jsonl, tmp_path):
    from tunelens.training.finetune import DivergenceError

    paths = outputs(tmp_path)
    with pytest.raises(DivergenceError, match="fine-tune of 'tiny' diverged"):
        finetune(sharp_llama_dir, train_jsonl, settings=settings(max_steps=6, learning_rate=1e9, logging_steps=1,
                                                                  save_steps=100),
                 prompt_format="alpaca", seed=7, device="cpu", model_name="tiny", **paths)
    assert not paths["metrics_json"].exists() and not (paths["adapter_dir"] / "adapter_model.safetensors").exists()


def test_bad_train_row_names_file_and_line(tiny_llama_dir, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"id": "a", **ROWS[0]}) + "\n" + json.dumps({"id": "b", **ROWS[1], "instruction": " "}) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl, line 2 \(id 'b'\): 'instruction' is empty"):
        build_trainer(tiny_llama_dir, path, tmp_path / "ckpt", settings(), "alpaca", seed=1, device="cpu")


# ------------------------------------------------------------------------------------------ resume
KILLER = textwrap.dedent(
    """
    import json, os, signal, sys
    from transformers import TrainerCallback
    from tunelens.training.finetune import finetune

    spec = json.loads(sys.argv[1])

    class KillAfterCheckpoint(TrainerCallback):
        # on_save runs once the checkpoint is fully written: die there, like a SLURM kill or preemption.
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == spec["kill_at"]:
                os.kill(os.getpid(), signal.SIGKILL)

    callbacks = [KillAfterCheckpoint()] if spec["kill_at"] else []
    finetune(spec["model"], spec["data"], settings=spec["settings"], prompt_format="alpaca", seed=3,
             device="cpu", callbacks=callbacks, **spec["paths"])
    """
)


def run_training(model, data, paths, settings_, kill_at=None):
    spec = {"model": str(model), "data": str(data), "settings": settings_, "kill_at": kill_at,
            "paths": {key: str(value) for key, value in paths.items()}}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-c", KILLER, json.dumps(spec)], env=env, capture_output=True,
                          text=True, timeout=600)


def test_killed_run_resumes_and_matches_uninterrupted(tiny_llama_dir, train_jsonl, tmp_path):
    import torch

    # dropout on, so the resumed run must also restore the RNG state to match
    run_settings = settings(max_steps=6, save_steps=2, logging_steps=1, lora_dropout=0.1, batch_size=2)

    reference = outputs(tmp_path / "reference")
    finetune(tiny_llama_dir, train_jsonl, settings=run_settings, prompt_format="alpaca", seed=3, device="cpu",
             **reference)

    interrupted = outputs(tmp_path / "interrupted")
    killed = run_training(tiny_llama_dir, train_jsonl, interrupted, run_settings, kill_at=4)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not interrupted["metrics_json"].exists() and not interrupted["adapter_dir"].exists()
    assert (interrupted["checkpoint_dir"] / "checkpoint-4" / "trainer_state.json").exists()

    resumed = run_training(tiny_llama_dir, train_jsonl, interrupted, run_settings)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads(interrupted["metrics_json"].read_text())
    assert metrics["resumed_from_step"] == 4
    assert metrics["steps_this_job"] == 2  # steps 1-4 were not redone
    assert metrics["steps"] == 6
    assert not interrupted["checkpoint_dir"].exists()

    # The train log holds each step once, the killed job's rows included, and matches the reference run.
    resumed_log, reference_log = read_log(interrupted["train_log"]), read_log(reference["train_log"])
    assert [row["step"] for row in resumed_log] == list(range(1, 7))
    for ours, theirs in zip(resumed_log, reference_log):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-3, abs=1e-4), ours["step"]

    ours, theirs = adapter_tensors(interrupted["adapter_dir"]), adapter_tensors(reference["adapter_dir"])
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-3, atol=1e-5, msg=name)


def fake_checkpoint(checkpoint_dir: Path, step: int, complete: bool = True) -> Path:
    path = checkpoint_dir / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"x")
    (path / "optimizer.pt").write_bytes(b"x")
    if complete:  # the trainer writes trainer_state.json last
        (path / "trainer_state.json").write_text("{}")
    return path


def test_resume_picks_the_last_complete_checkpoint_of_the_same_run(tiny_llama_dir, train_jsonl, tmp_path):
    from tunelens.training.finetune import prepare_checkpoint_dir, resolve_plan, run_fingerprint

    checkpoint_dir = tmp_path / "ckpt"
    plan = resolve_plan(settings(), "cpu")
    fingerprint = run_fingerprint(str(tiny_llama_dir), train_jsonl, settings(), "alpaca", 3, plan)
    assert prepare_checkpoint_dir(checkpoint_dir, fingerprint) is None  # fresh run
    fake_checkpoint(checkpoint_dir, 4)
    fake_checkpoint(checkpoint_dir, 8)
    fake_checkpoint(checkpoint_dir, 12, complete=False)  # killed while saving
    assert prepare_checkpoint_dir(checkpoint_dir, fingerprint) == checkpoint_dir / "checkpoint-8"

    # the user changes lora_r (or the data, seed, model) before rerunning: never resume the old run
    changed = run_fingerprint(str(tiny_llama_dir), train_jsonl, settings(lora_r=4), "alpaca", 3, plan)
    assert prepare_checkpoint_dir(checkpoint_dir, changed) is None
    assert not list(checkpoint_dir.glob("checkpoint-*"))
    assert json.loads((checkpoint_dir / "tunelens_run.json").read_text())["settings"]["lora_r"] == 4
    train_jsonl.write_text(train_jsonl.read_text() + json.dumps({"id": "new", **ROWS[0]}) + "\n")
    fake_checkpoint(checkpoint_dir, 4)
    other_data = run_fingerprint(str(tiny_llama_dir), train_jsonl, settings(lora_r=4), "alpaca", 3, plan)
    assert prepare_checkpoint_dir(checkpoint_dir, other_data) is None


# ------------------------------------------------------------------------------------------ packing
def _per_token_nll(model, input_ids, labels, position_ids=None, attention_mask=None):
    """Per-token cross-entropy (nats) at every labelled position, row after row, in order."""
    import torch

    with torch.no_grad():
        kwargs = {"position_ids": position_ids} if position_ids is not None else {}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        logits = model(input_ids=input_ids, **kwargs).logits.float()
    out = []
    for row in range(input_ids.shape[0]):
        logprobs = torch.log_softmax(logits[row, :-1], dim=-1)
        targets = labels[row, 1:]
        keep = targets != -100
        out.append(-logprobs[keep].gather(-1, targets[keep, None])[:, 0])
    return torch.cat(out)


def _packed_vs_alone(model, batch):
    """Max |per-token loss of each packed row - the same row run alone|, over all trained tokens (the batch as
    trained: one row of everything, or a row per packed sequence)."""
    import torch

    packed = _per_token_nll(model, batch["input_ids"], batch["labels"], batch["position_ids"],
                            batch.get("attention_mask"))  # the batch as the trainer passes it
    alone, pieces = [], 0
    for row in range(batch["input_ids"].shape[0]):
        ids, labels = batch["input_ids"][row:row + 1], batch["labels"][row:row + 1]
        starts = (batch["position_ids"][row] == 0).nonzero().flatten().tolist() + [ids.shape[1]]
        for a, b in zip(starts[:-1], starts[1:]):
            if bool((labels[:, a:b] != -100).any()):
                pieces += 1
                alone.append(_per_token_nll(model, ids[:, a:b], labels[:, a:b]))
    alone = torch.cat(alone)
    assert pieces >= 3, "the batch must pack several rows for the test to mean anything"
    assert packed.shape == alone.shape
    return float((packed - alone).abs().max())


@pytest.mark.parametrize("mode", ["packing", "padding_free", "packing as one row"])
def test_packed_rows_do_not_attend_to_each_other(sharp_llama_dir, train_jsonl, tmp_path, mode):
    """The per-token losses of packed rows equal those of the same rows alone (SDPA, the default kernel), with
    packed sequences as rows of their own (packing's default under SDPA) or all in one row (TRL's form, padding-free
    batches). Without the block-diagonal mask a packed row attends to the rows before it: the same comparison on
    the unmasked model must show it, or this test could not tell the difference."""
    from transformers import AutoModelForCausalLM

    import tunelens.training.finetune as finetune_module

    if mode == "packing as one row":
        finetune_module_rows = finetune_module.packed_sequences_as_rows
        finetune_module.packed_sequences_as_rows = lambda collator: False
    try:
        run = build_trainer(sharp_llama_dir, train_jsonl, tmp_path / "ckpt",
                            settings(**{mode.split()[0]: True}, batch_size=4), "alpaca", seed=1, device="cpu")
    finally:
        if mode == "packing as one row":
            finetune_module.packed_sequences_as_rows = finetune_module_rows
    assert run.row_separation and "block-diagonal" in run.row_separation
    batch = next(iter(run.trainer.get_train_dataloader()))
    rows = batch["input_ids"].shape[0]
    assert rows == (2 if mode == "packing" else 1), rows  # 8 rows packed into 2 sequences of <= 256 tokens
    model = run.trainer.model.eval()
    assert _packed_vs_alone(model, batch) < 1e-4

    plain = AutoModelForCausalLM.from_pretrained(sharp_llama_dir).eval()  # no hook: TRL's inputs as they are
    assert _packed_vs_alone(plain, batch) > 1e-2


def test_packed_rows_separated_under_eager_attention(sharp_llama_dir, train_jsonl, tmp_path):
    """Eager attention adds its mask to the scores: the hook gives it the additive form."""
    from transformers import AutoModelForCausalLM

    from tunelens.training.finetune import separate_packed_rows

    run = build_trainer(sharp_llama_dir, train_jsonl, tmp_path / "ckpt", settings(packing=True, batch_size=4),
                        "alpaca", seed=1, device="cpu")
    batch = next(iter(run.trainer.get_train_dataloader()))
    eager = AutoModelForCausalLM.from_pretrained(sharp_llama_dir, attn_implementation="eager").eval()
    assert "eager" in separate_packed_rows(eager)
    assert _packed_vs_alone(eager, batch) < 1e-4


# ------------------------------------------------------------------------------------------ autotune
from tunelens.training.speed import _probe as REAL_PROBE  # noqa: E402
@pytest.fixture
def fake_gpu(monkeypatch):
    """A pretend 20 GiB-free GPU for the autotuner on CPU: peak memory per probe is 4 GiB a row without
    checkpointing and 1 GiB a row with it; checkpointing-off steps are the faster ones."""
    import torch

    import tunelens.training.speed as ft

    probes = []

    def probe(trainer, batch, repeats=3):
        checkpointing = getattr(trainer.args, ft._checkpointing_key(trainer.args))
        rows = int(batch["input_ids"].shape[0])
        probes.append((checkpointing, rows))
        seconds = rows * (0.013 if checkpointing else 0.01)
        return seconds, rows * (1 if checkpointing else 4) * 2**30

    monkeypatch.setattr(ft, "_probe", probe)
    for name, value in {"mem_get_info": lambda *a: (20 * 2**30, 80 * 2**30), "memory_reserved": lambda *a: 0,
                        "get_rng_state_all": lambda: [], "set_rng_state_all": lambda state: None,
                        "empty_cache": lambda: None}.items():
        monkeypatch.setattr(torch.cuda, name, value)
    return probes


def test_autotune_keeps_rows_per_step_and_picks_the_fastest_that_fits(tiny_llama_dir, train_jsonl, tmp_path, fake_gpu):
    """8 rows per step: without checkpointing 8 rows need 32 GiB (over the ~18 GiB budget), 4 rows 16 GiB fit
    and beat checkpointing; the trainer then runs micro-batches of 4 with 2 accumulation steps."""
    from tunelens.training.finetune import AUTOTUNE_FILE, autotune_cuda

    config = settings(batch_size=4, gradient_accumulation=2)
    run = build_trainer(tiny_llama_dir, train_jsonl, tmp_path / "ckpt", config, "alpaca", seed=1, device="cpu")
    choice = autotune_cuda(run.trainer, config, run.plan, tmp_path / "ckpt")
    assert (choice["micro_batch_size"], choice["gradient_checkpointing"]) == (4, False)
    args = run.trainer.args
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, run.trainer._train_batch_size) == (4, 2, 4)
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 8  # the configured step
    assert not run.trainer.model.is_gradient_checkpointing
    assert [t["fits"] for t in choice["trials"] if not t["gradient_checkpointing"]] == [False, True]
    assert fake_gpu[:2] == [(False, 8), (False, 4)]  # the largest micro-batch is measured first
    # A resumed run reuses the recorded choice without measuring again.
    assert (tmp_path / "ckpt" / AUTOTUNE_FILE).exists()
    fake_gpu.clear()
    again = build_trainer(tiny_llama_dir, train_jsonl, tmp_path / "ckpt", config, "alpaca", seed=1, device="cpu")
    assert autotune_cuda(again.trainer, config, again.plan, tmp_path / "ckpt")["micro_batch_size"] == 4
    assert fake_gpu == []


def test_autotune_respects_explicit_checkpointing(tiny_llama_dir, train_jsonl, tmp_path, fake_gpu):
    from tunelens.training.finetune import autotune_cuda

    config = settings(batch_size=8, gradient_checkpointing=True)
    run = build_trainer(tiny_llama_dir, train_jsonl, tmp_path / "ckpt", config, "alpaca", seed=1, device="cpu")
    choice = autotune_cuda(run.trainer, config, run.plan, tmp_path / "ckpt")
    assert choice["gradient_checkpointing"] is True and choice["micro_batch_size"] == 8
    assert all(checkpointing for checkpointing, _ in fake_gpu)


def test_autotune_does_not_change_the_training(tiny_llama_dir, train_jsonl, tmp_path, fake_gpu):
    """Probing runs forward+backward without an optimizer step and restores the random state: the same
    batch gives the same loss after the autotuner ran as before."""
    import torch

    import tunelens.training.speed as speed

    config = settings(batch_size=4, lora_dropout=0.1)
    run = build_trainer(tiny_llama_dir, train_jsonl, tmp_path / "ckpt", config, "alpaca", seed=1, device="cpu")
    batch = next(iter(run.trainer.get_train_dataloader()))
    weights = {k: v.clone() for k, v in run.trainer.model.named_parameters() if v.requires_grad}
    torch.manual_seed(5)
    before = run.trainer.model.train()(**batch).loss.item()
    speed._probe = REAL_PROBE  # the real forward+backward (monkeypatch restores the fake after the test)
    torch.manual_seed(5)
    speed.autotune_cuda(run.trainer, config, run.plan, tmp_path / "ckpt")
    after = run.trainer.model.train()(**batch).loss.item()
    assert after == before
    assert all(torch.equal(v, weights[k]) for k, v in run.trainer.model.named_parameters() if v.requires_grad)


# ------------------------------------------------------------------------------------------ step speed (issue 24)
def _count_ops(names: tuple[str, ...], unless_called_from: str | None = None):
    """A TorchDispatchMode counting calls of the given aten ops (e.g. `_local_scalar_dense`: every `.item()`,
    `bool(tensor)` and `float(tensor)`, i.e. every host sync on a GPU), except those made from a module whose
    file name contains `unless_called_from`."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0
            self.total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.total += not func.is_view  # views launch no kernel
            if func.__name__.split(".")[0] in names and not (
                    unless_called_from and any(unless_called_from in f.filename for f in traceback.extract_stack())):
                self.count += 1
            return func(*args, **(kwargs or {}))

    return Counter()


@pytest.mark.parametrize("packing", [False, True])
def test_training_steps_between_log_rows_read_nothing_back_from_the_device(tiny_llama_dir, train_jsonl, tmp_path,
                                                                          packing):
    """TRL turns its metrics into floats on every micro-batch and the Trainer reads the loss and the token count
    back on every micro-batch: each a device sync on a GPU. tunelens' trainer keeps them on the device until a
    row is logged: the steps between log rows read nothing back (but for transformers' attention-mask builder,
    which checks whether the padding mask is all ones) and send no host value to the device (`lift_fresh`:
    `torch.tensor(value, device=...)`, a blocking copy that waits for the GPU as a read does). Packed sequences
    as rows carry no attention mask: their token count and TRL's token metric must not read back either. The
    logged rows are TRL's, value for value."""
    from transformers import TrainerCallback

    counter = _count_ops(("_local_scalar_dense", "lift_fresh"), unless_called_from="masking_utils")
    per_step: list[int] = []

    class Steps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = counter.count

        def on_step_end(self, args, state, control, **kwargs):
            per_step.append(counter.count - self.start)

    logs = {}
    for sync_free in (True, False):
        per_step.clear()
        run = build_trainer(tiny_llama_dir, train_jsonl, tmp_path / f"ckpt{sync_free}",
                            settings(max_steps=6, logging_steps=3, save_steps=100, lora_dropout=0.1, packing=packing),
                            "alpaca", seed=3, device="cpu", callbacks=[Steps()], sync_free=sync_free)
        if packing:
            batch = run.trainer.data_collator([run.trainer.train_dataset[0]])
            assert "input_ids" in batch and "attention_mask" not in batch
        with counter:
            run.trainer.train()
        logs[sync_free] = [row for row in run.trainer.state.log_history if "loss" in row]
        if sync_free:
            assert per_step == [0] * 6, per_step  # the log rows' reads happen after on_step_end
            tokens_seen = run.trainer.state.num_input_tokens_seen
        else:
            assert min(per_step) >= 3, per_step  # TRL and the Trainer: several reads per micro-batch
            assert run.trainer.state.num_input_tokens_seen == tokens_seen
    assert [row["step"] for row in logs[True]] == [1, 3, 6]
    for fast, slow in zip(logs[True], logs[False]):
        for key in ("loss", "grad_norm", "mean_token_accuracy", "entropy", "num_tokens"):
            assert fast[key] == pytest.approx(slow[key], rel=1e-6, abs=1e-9), key


def test_a_log_row_is_read_back_while_the_next_step_runs(tiny_llama_dir, train_jsonl, tmp_path):
    """Logging a row reads its values back from the device; transformers does it at once, so the GPU idles while
    the CPU writes the row and prepares the next batch. tunelens' trainer logs each row after the next step has
    ended (its work queued), with TRL's values, step, epoch, learning rate and token counts; a row at a step that
    saves or ends training is logged at once, so each checkpoint holds every row up to its own. A row's tokens/s
    runs from the end of the step before it to the end of its own, not to when it was logged."""
    import time

    from transformers import TrainerCallback

    events: list[tuple[str, int]] = []
    step_end: dict[int, float] = {}

    class Events(TrainerCallback):  # runs after the stage's log callback, microseconds apart
        def on_step_end(self, args, state, control, **kwargs):
            events.append(("end", state.global_step))
            step_end[state.global_step] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            events.append(("log", state.global_step))

    rows = {}
    for sync_free in (True, False):
        events.clear()
        run = build_trainer(tiny_llama_dir, train_jsonl, tmp_path / f"ckpt{sync_free}",
                            settings(max_steps=6, batch_size=1, logging_steps=1, save_steps=3, lora_dropout=0.1),
                            "alpaca", seed=3, device="cpu", callbacks=[Events()], sync_free=sync_free)
        run.trainer.train()  # one epoch is 8 steps: an epoch's end also logs a row at once
        rows[sync_free] = [row for row in run.trainer.state.log_history if "loss" in row]
        logged = [step for kind, step in events if kind == "log"][:6]
        if sync_free:
            assert events[:12] == [("end", 1), ("end", 2), ("log", 1), ("end", 3), ("log", 2), ("log", 3),
                                   ("end", 4), ("end", 5), ("log", 4), ("end", 6), ("log", 5), ("log", 6)], events
            saved = json.loads((tmp_path / "ckptTrue" / "checkpoint-3" / "trainer_state.json").read_text())
            assert [row["step"] for row in saved["log_history"] if "loss" in row] == [1, 2, 3]
            for row in rows[True][1:]:  # row 3 is logged right after row 2: a rate to the log would be ~infinite
                seconds = step_end[row["step"]] - step_end[row["step"] - 1]
                assert row["tokens_per_s"] == pytest.approx(row["tokens"] / seconds, rel=0.05), row
        else:
            assert events[:4] == [("end", 1), ("log", 1), ("end", 2), ("log", 2)], events
        assert logged == [1, 2, 3, 4, 5, 6]
    for fast, slow in zip(rows[True], rows[False], strict=True):
        for key in ("step", "epoch", "learning_rate", "num_input_tokens_seen", "tokens", "loss", "grad_norm",
                    "mean_token_accuracy", "entropy", "num_tokens"):
            assert fast[key] == pytest.approx(slow[key], rel=1e-6, abs=1e-9), key


def test_a_log_rows_rate_is_timed_on_the_clock_of_the_device_that_ran_its_step(tiny_llama_dir, train_jsonl, tmp_path):
    """On a GPU the CPU queues a step and moves on, so the host's time at a step's end is when the step was queued;
    with no read-back between rows, that is about when the step before it finished on the GPU. Rates timed on the
    host then pair each step's tokens with its predecessor's time, which for steps of different sizes biases the
    per-row rates (the unpacked default read 7% low on an H200 against job-level throughput). The stage times a
    step's end on the device's clock (a CUDA event there). Here a fake device clock whose marks are far apart and
    unevenly spaced stands in for it: every row's tokens/s must be its tokens over the device time between the
    ends of its own step and the step before."""
    from tunelens.training.finetune import DeviceClock, HostClock

    class DeviceLike:
        def __init__(self):
            self.marks = []

        def mark(self):
            self.marks.append(0.1 * len(self.marks) + 0.007 * len(self.marks) ** 2)  # gaps 0.107, 0.121, 0.135 s, ...
            return len(self.marks) - 1

        def seconds(self, start, end):
            return self.marks[end] - self.marks[start]

    assert isinstance(_make_clock_for("cpu"), HostClock)
    with pytest.MonkeyPatch.context() as patch:  # no GPU here: the event it would record is not made
        patch.setattr(DeviceClock, "mark", lambda self: 0)
        assert isinstance(_make_clock_for("cuda"), DeviceClock)
    clock = DeviceLike()
    run = build_trainer(tiny_llama_dir, train_jsonl, tmp_path / "ckpt",
                        settings(max_steps=5, batch_size=1, logging_steps=1, save_steps=100),
                        "alpaca", seed=3, device="cpu")
    run.log_callback.clock = clock
    run.trainer.train()
    rows = [row for row in run.trainer.state.log_history if "loss" in row]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5]
    # mark 0: train begin; mark k: step k's end (rows are logged after their step's end, deferred or not)
    assert len(clock.marks) >= 6
    tokens = [row["tokens"] for row in rows]
    assert len(set(tokens)) > 1, tokens  # steps of different sizes, or the pairing would not matter
    for k, row in enumerate(rows, start=1):
        assert row["tokens_per_s"] == pytest.approx(row["tokens"] / (clock.marks[k] - clock.marks[k - 1]), rel=1e-3), (k, row)


def _make_clock_for(device_type: str):
    """The clock the stage's log callback picks for a device type, as it does at train begin."""
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    from tunelens.training.finetune import _make_log_callback

    callback = _make_log_callback()
    callback.on_train_begin(SimpleNamespace(device=SimpleNamespace(type=device_type)), TrainerState(), TrainerControl())
    return callback.clock


def test_lean_lora_forward_computes_the_peft_forward_in_fewer_ops(tiny_llama_dir):
    """The lean LoRA forward (base + dropout + lora_A + one addmm) gives PEFT's outputs and gradients, draws the
    same dropout masks, and runs fewer operators per step: the scaling and the addition go into the matmul, two
    kernels fewer per layer and step (on a 4-bit base also the clone and, with the dequantized weights, the
    dequantization; bitsandbytes is not on this CPU machine)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunelens.training.finetune import lean_lora_forward

    def model_and_step():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules="all-linear",
                                                 init_lora_weights=False, task_type="CAUSAL_LM"))
        model.train()
        ids = torch.randint(0, 1000, (2, 12))

        def step():
            torch.manual_seed(5)  # the dropout masks
            model.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            return loss.detach(), grads

        return model, step

    model, step = model_and_step()
    counter = _count_ops(())
    with counter:
        loss_peft, grads_peft = step()
    ops_peft = counter.total
    assert lean_lora_forward(model) == 4 * 7  # 4 layers x q, k, v, o, gate, up, down
    counter = _count_ops(())
    with counter:
        loss_lean, grads_lean = step()
    assert counter.total <= ops_peft - 2 * 28, (counter.total, ops_peft)
    assert float(loss_lean) == pytest.approx(float(loss_peft), abs=1e-5)
    for name, grad in grads_peft.items():
        torch.testing.assert_close(grads_lean[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    with model.disable_adapter():  # adapters off: PEFT's own path, the base model's loss
        torch.manual_seed(5)
        assert lean_lora_forward(model) == 0  # already lean


def test_dequantized_4bit_base_gives_bitsandbytes_results(tiny_llama_dir):
    """The autotuner's dequantized base (`dequantize_base_weights`) computes with the very numbers bitsandbytes
    dequantizes on every call: loss and LoRA gradients are bit-identical. Runs where bitsandbytes is installed
    (the GPU image; on this CPU machine with its wheel on PYTHONPATH: bitsandbytes 0.50.2 has a CPU 4-bit path)."""
    pytest.importorskip("bitsandbytes")
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tunelens.training.speed import dense_base_bytes, dequantize_base_weights, lean_lora_forward

    device = "cuda" if torch.cuda.is_available() else "cpu"
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": device})
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear",
                                             init_lora_weights=False, task_type="CAUSAL_LM"))
    model.train()
    ids = torch.randint(0, 1000, (2, 16), device=device)

    def step():
        torch.manual_seed(5)
        model.zero_grad()
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    assert lean_lora_forward(model) == 4 * 7
    loss_4bit, grads_4bit = step()
    expected = dense_base_bytes(model)
    assert dequantize_base_weights(model) == expected > 0
    loss_dense, grads_dense = step()
    assert torch.equal(loss_dense, loss_4bit)
    for name, grad in grads_4bit.items():
        assert torch.equal(grads_dense[name], grad), name


# ------------------------------------------------------------------------------------------ layer graphs (issue 24)
def fake_make_graphed(callables, sample_args, num_warmup_iters=3, allow_unused_input=False, pool=None):
    """A CPU stand-in for torch.cuda.make_graphed_callables with its memory semantics: each callable gets fixed
    input, output and gradient buffers; a call copies its inputs into them, the backward writes the gradients into
    fixed buffers and hands out views of them (so autograd may keep one as a parameter's .grad, as on CUDA).
    Instead of replaying a graph it runs the callable's own forward (no warm-up: the same random draws as eager)."""
    import torch

    fake_make_graphed.calls += 1
    for module, args in zip(callables, sample_args):
        _fake_graph(module, args)
    return tuple(callables)


def _fake_graph(module, args):
    import torch

    params = tuple(module.parameters())
    static_in = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
    run, state = module.forward, {}

    class Graphed(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            with torch.no_grad():
                for buffer, value in zip(static_in, inputs):
                    buffer.copy_(value)
            with torch.enable_grad():
                state["out"] = run(*static_in)
            if "static_out" not in state:
                state["static_out"] = torch.empty_like(state["out"])
            state["static_out"].copy_(state["out"].detach())
            return state["static_out"].detach()

        @staticmethod
        def backward(ctx, grad):
            wanted = [t for t in static_in + params if t.requires_grad]
            grads = torch.autograd.grad(state.pop("out"), wanted, grad, allow_unused=True)
            if "static_grads" not in state:
                state["static_grads"] = [None if g is None else torch.empty_like(g) for g in grads]
            for buffer, g in zip(state["static_grads"], grads):
                if buffer is not None:
                    buffer.copy_(g)
            it = iter(state["static_grads"])
            return tuple(next(it).detach() if t.requires_grad else None for t in static_in + params)

    module.forward = lambda *user_args: Graphed.apply(*user_args, *params)


fake_make_graphed.calls = 0


def _lora_llama(tiny_llama_dir, dropout=0.1):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunelens.training.speed import lean_lora_forward

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                             init_lora_weights=False, task_type="CAUSAL_LM"))
    lean_lora_forward(model)
    return model.train()


def _train_steps(model, batches, accumulation: int):
    """AdamW over `batches`, `accumulation` micro-batches per step, clipping as the Trainer does."""
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(7)  # the dropout masks
    losses = []
    for start in range(0, len(batches), accumulation):
        for batch in batches[start:start + accumulation]:
            loss = model(**batch).loss / accumulation
            loss.backward()
            losses.append(float(loss.detach()))
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _padded_batches(shapes):
    import torch

    generator = torch.Generator().manual_seed(3)
    batches = []
    for rows, length, shortest in shapes:
        ids = torch.randint(0, 1000, (rows, length), generator=generator)
        mask = torch.ones(rows, length, dtype=torch.long)
        mask[-1, shortest:] = 0  # the last row is padded
        labels = ids.masked_fill(mask == 0, -100)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels, "use_cache": False})
    return batches


@pytest.mark.parametrize("accumulation", [1, 2])
def test_layer_graphs_train_as_the_eager_layers(tiny_llama_dir, accumulation):
    """Decoder layers dispatched to their graphs (the CPU stand-in above, with the graphs' fixed gradient buffers)
    give the eager run's losses and weights, with dropout and gradient accumulation; one capture per shape; an
    evaluation pass runs eagerly."""
    import torch

    from tunelens.training.graphed import LayerGraphs

    batches = _padded_batches([(3, 16, 10), (3, 16, 12), (3, 24, 20), (3, 16, 9), (3, 24, 11), (3, 24, 24)])
    eager_losses, eager_weights = _train_steps(_lora_llama(tiny_llama_dir), batches, accumulation)
    model = _lora_llama(tiny_llama_dir)
    fake_make_graphed.calls = 0
    graphs = LayerGraphs(model, make_graphed=fake_make_graphed, device_types=("cpu",))
    losses, weights = _train_steps(model, batches, accumulation)
    assert losses == pytest.approx(eager_losses, rel=1e-6)
    for name, value in eager_weights.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-7, msg=name)
    summary = graphs.summary()
    # 16 and 24 tokens, and the last batch has no padding (no mask): three shapes, each captured once
    assert fake_make_graphed.calls == 3 and len(summary["shapes"]) == 3
    assert summary["graphed_passes"] == 6 and summary["eager_passes"] == {}
    with torch.no_grad():
        model.eval()(**batches[0])
    assert graphs.summary()["eager_passes"] == {"not training (eval or no_grad)": 1}
    graphs.uninstall()
    assert all("forward" not in vars(layer) for layer in graphs.layers)


def test_layer_graphs_run_eagerly_past_their_limits(tiny_llama_dir):
    """A shape beyond max_shapes or the memory budget, or an argument the graph cannot follow, runs the layers'
    own forward, and says why."""
    import torch

    from tunelens.training.graphed import LayerGraphs

    batches = _padded_batches([(2, 16, 10), (2, 24, 10), (2, 32, 10)])
    model = _lora_llama(tiny_llama_dir, dropout=0.0)
    graphs = LayerGraphs(model, make_graphed=fake_make_graphed, device_types=("cpu",), max_shapes=1)
    for batch in batches:
        model(**batch).loss.backward()
    assert graphs.summary()["graphed_passes"] == 1
    assert graphs.summary()["eager_passes"] == {"more than 1 shapes": 2}
    graphs.uninstall()
    # 16 tokens: 4 layers x (input, output and their gradients, 2 x 16 x 64 float32, + mask, positions, cos, sin)
    # = 150,016 bytes; 24 tokens would add 225,024
    graphs = LayerGraphs(model, make_graphed=fake_make_graphed, device_types=("cpu",), memory_budget=200_000)
    model(**batches[0]).loss.backward()
    model(**batches[1]).loss.backward()
    summary = graphs.summary()
    assert summary["graphed_passes"] == 1 and summary["static_mib"] == 0
    assert list(summary["eager_passes"]) == ["graph memory budget: 0 MiB of fixed buffers over 0 MiB"]
    graphs.uninstall()
    graphs = LayerGraphs(model, make_graphed=fake_make_graphed, device_types=("cpu",))
    first = model.get_base_model().model.layers[0]
    first(torch.zeros(2, 16, 64), position_embeddings=(torch.zeros(2, 16, 16), torch.zeros(2, 16, 16)),
          output_router_logits=True)
    assert graphs.summary()["eager_passes"] == {"arguments ['output_router_logits']": 1}


def _graphs_on_the_fake_gpu(monkeypatch, graph_seconds: float, capture_repeats: int):
    """The autotuner on the fake GPU with layer graphs possible: the CPU stand-in for the capture, a 4-bit base's
    dense copy, and a probe that really runs the graphed step (`capture_repeats` times) and reports
    `graph_seconds`. Returns tunelens.training.speed."""
    import tunelens.training.speed as speed

    monkeypatch.setattr(speed, "LAYER_GRAPH_OPTIONS", {"make_graphed": fake_make_graphed, "device_types": ("cpu",)})
    monkeypatch.setattr(speed, "_choose_dense_base", lambda trainer: {"on": True, "reason": "as on a 4-bit base"})
    fake_probe = speed._probe

    def probe(trainer, batch, repeats=3):
        if getattr(trainer, "tunelens_layer_graphs", None) is None:
            return fake_probe(trainer, batch, repeats)
        REAL_PROBE(trainer, batch, repeats=capture_repeats)
        return graph_seconds, 2**30

    monkeypatch.setattr(speed, "_probe", probe)
    return speed


@pytest.mark.parametrize("packing", [False, True])
def test_autotune_keeps_layer_graphs_that_measure_faster_and_the_training_is_unchanged(
        tiny_llama_dir, train_jsonl, tmp_path, fake_gpu, monkeypatch, packing):
    """The autotuner measures the eager and the graphed step on median-length rows (padded to the bucket multiple)
    and keeps the graphs when faster and the longest rows' capture fits; training then replays them for every step
    (one shape here) and logs the losses of a run without graphs; a resumed run reinstalls them from the recorded
    choice without measuring. Packed: the packed sequences as rows, their block-diagonal mask and restarting position
    ids go through the graphs too."""
    speed = _graphs_on_the_fake_gpu(monkeypatch, graph_seconds=0.001, capture_repeats=2)
    losses = {}
    for graphs_on in (False, True):
        config = settings(batch_size=4 if not packing else 2, max_steps=4, cuda_graphs=graphs_on, packing=packing)
        run = build_trainer(tiny_llama_dir, train_jsonl, tmp_path / f"ckpt{graphs_on}", config, "alpaca", seed=1,
                            device="cpu")
        fake_make_graphed.calls = 0
        choice = speed.autotune_cuda(run.trainer, config, run.plan, tmp_path / f"ckpt{graphs_on}")
        assert choice["layer_graphs"]["on"] is graphs_on, choice["layer_graphs"]
        run.trainer.train()
        losses[graphs_on] = [row["loss"] for row in run.trainer.state.log_history if "loss" in row]
    assert choice["layer_graphs"]["pad_to_multiple_of"] == run.trainer.data_collator.pad_to_multiple_of == 64
    summary = run.trainer.tunelens_layer_graphs.summary()
    shapes = [s["shape"][:2] for s in summary["shapes"]]
    # one capture per shape: the 8 rows in padded batches of 64 tokens, or packed into 2 sequences, both in every
    # step as 2 rows padded to 256 tokens
    assert fake_make_graphed.calls == len(shapes) and shapes == ([[2, 256]] if packing else [[4, 64]])
    # the probes' 2 + 2 (longest rows, then median-length rows: one shape here), then the 4 steps
    assert summary["graphed_passes"] == 4 + 4 and summary["eager_passes"] == {}
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    again = build_trainer(tiny_llama_dir, train_jsonl, tmp_path / "ckptTrue", config, "alpaca", seed=1, device="cpu")
    fake_gpu.clear()
    assert speed.autotune_cuda(again.trainer, config, again.plan, tmp_path / "ckptTrue")["layer_graphs"]["on"]
    assert fake_gpu == [] and again.trainer.tunelens_layer_graphs is not None
    assert again.trainer.data_collator.pad_to_multiple_of == 64


def test_autotune_drops_layer_graphs_that_are_not_faster(tiny_llama_dir, train_jsonl, tmp_path, fake_gpu, monkeypatch):
    """Graphs that measure slower than the eager step are removed again: the layers' own forward, the collator's
    padding as configured, and the reason in the choice."""
    speed = _graphs_on_the_fake_gpu(monkeypatch, graph_seconds=10.0, capture_repeats=1)
    config = settings(batch_size=4)
    run = build_trainer(tiny_llama_dir, train_jsonl, tmp_path / "ckpt", config, "alpaca", seed=1, device="cpu")
    choice = speed.autotune_cuda(run.trainer, config, run.plan, tmp_path / "ckpt")["layer_graphs"]
    assert not choice["on"] and choice["reason"].startswith("not faster")
    assert run.trainer.tunelens_layer_graphs is None and run.trainer.data_collator.pad_to_multiple_of is None
    from tunelens.models import decoder_layers

    assert all("forward" not in vars(layer) for layer in decoder_layers(run.trainer.model))
