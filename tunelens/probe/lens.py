"""The logit lens: next-token distributions read out of each probe layer, and the `logit_lens` rule's job.

Layers are numbered as everywhere in tunelens (tunelens.probe.probe): layer L is the output of decoder block L,
1-based; layer N (the model's depth) is the model's own next-token distribution.

One forward pass with `output_hidden_states=True` over the prompt plus its greedy continuation gives every
block's hidden state at once. Each configured layer is read out with the model's own final norm and LM head
(plus Gemma's final logit soft-capping when the config sets it). transformers returns `hidden_states[N]` with
the final norm already applied, so the last layer gets the LM head alone; this is checked against the model's
own logits from the same pass (a mismatch raises instead of writing a wrong lens). Probabilities are in [0, 1],
entropies and KL divergences in nats; `kl_to_final` is KL(p_final || p_layer), 0 at the last layer.

The generation server imports this module by name only (importlib), so the lens is no code of generation.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Sequence

from tunelens.errors import ConfigError, DataError, ModelError
from tunelens.io import library_versions, read_jsonl, write_json_atomic
from tunelens.models import final_norm, input_device, lm_head, load_model, num_decoder_layers
from tunelens.probe.probe import _model_record, check_probe_layers
from tunelens.prompts import build_prompt

log = logging.getLogger(__name__)


TEST_ROW_KEYS = ("id", "instruction", "input", "output")


# --------------------------------------------------------------------------------------------- encoding
def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each full prompt text. As in the generation stage (tunelens.generation.generate), no special tokens
    are added beyond what the prompt text (chat template) already holds, so the lens reads the very
    sequences the model is evaluated on."""
    return [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]


def _eos_ids(model, tokenizer) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = eos if isinstance(eos, list) else [eos]
    ids = {int(e) for e in eos if e is not None}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


# --------------------------------------------------------------------------------------------- logit lens
def _readout(model, hidden, *, apply_norm: bool):
    """Next-token logits (float32) from hidden states: [final norm] + LM head + Gemma-style soft-capping."""
    import torch

    if apply_norm:
        hidden = final_norm(model)(hidden)
    logits = lm_head(model)(hidden).float()
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)()
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def logit_lens(
    model,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    layers: Sequence[int],
    *,
    top_k: int = 5,
    new_tokens: int = 8,
) -> list[dict]:
    """Next-token distributions read out of `layers` for each prompt.

    Positions read: the prompt's last token, then each of up to `new_tokens` greedy continuation tokens of
    the full model (fewer if it emits EOS). Returns per prompt: `continuation_ids`, and `positions`, each
    with the token at that position, the full model's greedy next token, and per layer the `top` tokens
    (id, text, prob in [0, 1]), `entropy` (nats) and `kl_to_final` (KL(p_final || p_layer), nats).
    """
    import torch

    depth = num_decoder_layers(model)
    layers = list(layers)
    bad = [layer for layer in layers if not 1 <= layer <= depth]
    if bad:
        raise ConfigError(f"logit lens layers {bad} are outside the model's depth (1..{depth} decoder layers)")
    eos_ids = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results = []
    # No autograd anywhere in the lens: the read-outs of many layers would otherwise keep graphs alive.
    with torch.inference_mode():
        for ids in prompt_ids:
            results.append(_lens_one_prompt(model, tokenizer, list(ids), layers, depth, top_k, new_tokens, eos_ids, pad))
    return results


def _lens_one_prompt(model, tokenizer, ids: list[int], layers: list[int], depth: int, top_k: int, new_tokens: int,
                     eos_ids: set[int], pad: int) -> dict:
    import torch

    device = input_device(model)
    prompt = torch.tensor([ids], dtype=torch.long, device=device)
    generated = model.generate(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
        do_sample=False, num_beams=1, pad_token_id=pad, eos_token_id=sorted(eos_ids),
    )
    continuation = generated[0, prompt.shape[1]:].tolist()
    if any(token in eos_ids for token in continuation):
        continuation = continuation[: next(i for i, t in enumerate(continuation) if t in eos_ids) + 1]
    sequence = torch.tensor([ids + continuation], dtype=torch.long, device=device)
    # Positions predicting the first continuation token, ..., the token after the last one read.
    read = list(range(len(ids) - 1, sequence.shape[1]))
    if continuation and continuation[-1] in eos_ids:
        read = read[:-1]  # nothing follows EOS
    per_layer = lens_log_probs(model, sequence, read, layers)
    final_logp = per_layer[depth]
    positions = []
    for row, position in enumerate(read):
        entry = {
            "position": position,
            "step": row,  # 0 = the prompt's last token; k = the k-th continuation token
            "token": _token_text(tokenizer, int(sequence[0, position])),
            "greedy_next": _token_text(tokenizer, int(final_logp[row].argmax())),
            "layers": [],
        }
        for layer in layers:
            logp = per_layer[layer][row]
            probs = logp.exp()
            top = torch.topk(probs, k=min(top_k, probs.shape[-1]))
            entropy = float(-(probs * logp).sum())
            kl = float((final_logp[row].exp() * (final_logp[row] - logp)).sum())
            entry["layers"].append({
                "layer": layer,
                "top": [
                    {"id": int(i), "token": _token_text(tokenizer, int(i)), "prob": round(float(p), 6)}
                    for p, i in zip(top.values, top.indices)
                ],
                "entropy": round(entropy, 6),
                "kl_to_final": round(max(kl, 0.0), 6),
            })
        positions.append(entry)
    return {"continuation_ids": continuation, "positions": positions}


def lens_log_probs(model, sequence, positions: Sequence[int], layers: Sequence[int]) -> dict:
    """Log-probabilities (float32, [len(positions), vocab]) of the next token read out of each layer in
    `layers` and of the last layer, from ONE forward pass over `sequence` ([1, seq] token ids).

    Layers below the last get the final norm + LM head; the last gets the LM head alone (transformers
    returns it already normed), and is checked against the model's own logits from the same pass.
    """
    import torch

    depth = num_decoder_layers(model)
    first = min(positions)
    # The model's own logits only where they are read (the self-check), not over the whole prompt.
    outputs = model(
        input_ids=sequence, attention_mask=torch.ones_like(sequence), output_hidden_states=True, use_cache=False,
        logits_to_keep=sequence.shape[1] - first,
    )
    hidden_states = outputs.hidden_states
    if len(hidden_states) != depth + 1:
        raise ModelError(
            f"{type(model).__name__}: forward returned {len(hidden_states)} hidden states, expected "
            f"{depth + 1} (embeddings + {depth} blocks); cannot map them to layers"
        )
    index = torch.tensor(list(positions), device=sequence.device)
    read_layers = sorted(set(layers) | {depth})
    norm = final_norm(model)
    # A model sharded over GPUs has its norm and head on the last GPU: every read-out goes there.
    head_device = lm_head(model).weight.device
    # hidden_states[depth] already went through the final norm inside the model; the others get it here.
    stacked = torch.cat([
        (hidden_states[layer][0, index.to(hidden_states[layer].device)] if layer == depth
         else norm(hidden_states[layer][0, index.to(hidden_states[layer].device)])).to(head_device)
        for layer in read_layers
    ])
    # One LM-head GEMM for all layers: at a few positions the head is bound by reading its weights
    # (vocab x hidden), so per-layer GEMMs would read them once per layer (measured 3.9x a forward on CPU).
    logp = torch.log_softmax(_readout(model, stacked, apply_norm=False), dim=-1)
    per_layer = dict(zip(read_layers, logp.split(len(positions))))
    own_logits = outputs.logits[0, (index - first).to(outputs.logits.device)].float().to(head_device)
    _check_last_layer(per_layer[depth], own_logits, model)
    return per_layer


def _check_last_layer(lens_logp, model_logits, model) -> None:
    """Raise if the last layer's read-out is not the model's own distribution (same forward pass)."""
    import torch

    model_logp = torch.log_softmax(model_logits, dim=-1)
    if next(model.parameters()).dtype == torch.float32:
        atol = 1e-3
    else:
        # bf16/fp16 logits carry 8-11 significant bits: allow two units in the last place of the largest
        # logit, since the head may run as a differently shaped (differently rounded) GEMM.
        largest = float(model_logits.abs().max())
        atol = max(0.05, 2.0 ** (math.floor(math.log2(max(largest, 1e-6))) - 6))
    error = float((lens_logp - model_logp).abs().max())
    if not math.isfinite(error) or error > atol:
        raise ModelError(
            f"{type(model).__name__}: the logit lens at the last layer differs from the model's own logits "
            f"(max |log p| difference {error:.3g} > {atol:.3g}); this architecture's read-out (hidden_states[-1] "
            "already normed, then LM head and optional final_logit_softcapping) is not the one tunelens expects"
        )


def _read_test_rows(test_path: str | Path, limit: int | None) -> list[dict]:
    rows = read_jsonl(test_path, required=TEST_ROW_KEYS)
    return rows if limit is None else rows[:limit]


def _check_prompt_lengths(ids: Sequence[Sequence[int]], row_ids: Sequence[str], max_prompt_tokens: int, where: str):
    for row_id, row in zip(row_ids, ids):
        if len(row) > max_prompt_tokens:
            raise DataError(
                f"{where}, row '{row_id}': prompt is {len(row)} tokens, above generation.max_prompt_tokens="
                f"{max_prompt_tokens} (prompts are never truncated silently)"
            )


def logit_lens_output(
    *,
    model_name: str,
    source: str,
    model_path: str | Path,
    adapter_dir: str | Path | None,
    variant: str,
    test_path: str | Path,
    layer_specs: Sequence[float],
    expected_layers: Sequence[int] | None,
    prompt_format: str,
    lens_prompts: Sequence[str],
    lens_test_prompts: int,
    top_k: int,
    new_tokens: int,
    max_prompt_tokens: int = 1024,
    seed: int = 0,
    device: str = "auto",
    gpus: int = 1,
    hf_model: tuple | None = None,
    load_time_s: float = 0.0,
) -> dict:
    """Rule `logit_lens` computed but not written: the lens dict (lens.json) of one (model, variant).
    `hf_model`: (model, tokenizer) already loaded by load_model(model_path, adapter_dir, device), as the
    generation server (tunelens.generation.genserver) keeps it, and `load_time_s` what that load cost this request.
    `gpus`: the job's GPU count; on CUDA with more than one the model is sharded over them (load_model)."""
    import torch

    from tunelens.generation.generate import adapter_record, check_variant

    test_rows = _read_test_rows(test_path, lens_test_prompts) if lens_test_prompts else []
    items = [{"id": f"lens-{i}", "source": "config", "instruction": text, "input": ""}
             for i, text in enumerate(lens_prompts, start=1)]
    items += [{"id": row["id"], "source": "test", "instruction": row["instruction"], "input": row["input"]}
              for row in test_rows]
    if not items:
        raise ConfigError("probe.lens_prompts is empty and probe.lens_test_prompts is 0: nothing to lens")
    check_variant(model_name, variant, adapter_dir)

    started = time.perf_counter()
    model, tokenizer = hf_model or load_model(model_path, adapter_dir=adapter_dir, device=device, gpus=gpus)
    load_time = time.perf_counter() - started if hf_model is None else load_time_s
    layers = check_probe_layers(layer_specs, expected_layers, model, model_name)
    prompts = [build_prompt(item, prompt_format, tokenizer) for item in items]
    ids = encode_prompts(tokenizer, prompts)
    _check_prompt_lengths(ids, [item["id"] for item in items], max_prompt_tokens, str(test_path))

    torch.manual_seed(seed)
    started = time.perf_counter()
    readouts = logit_lens(model, tokenizer, ids, layers, top_k=top_k, new_tokens=new_tokens)
    lens_time = time.perf_counter() - started
    lens = {
        "model": _model_record(model_name, source, model_path),
        "variant": variant,
        "adapter": adapter_record(adapter_dir),
        "num_layers": num_decoder_layers(model),
        "layer_specs": list(layer_specs),
        "layers": layers,
        "top_k": top_k,
        "new_tokens": new_tokens,
        "prompt_format": prompt_format,
        "method": "final norm + LM head on each layer's hidden state (hidden_states[L], L = output of block L; "
                  "the last one already normed), one forward pass over prompt + greedy continuation",
        "units": {"prob": "0-1", "entropy": "nats", "kl_to_final": "KL(p_final || p_layer), nats"},
        "seed": seed,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": str(input_device(model)),
        "load_time_s": round(load_time, 3),
        "lens_time_s": round(lens_time, 3),
        "versions": library_versions(),
        "prompts": [
            {**{k: item[k] for k in ("id", "source", "instruction", "input")}, "prompt": prompt,
             "continuation": tokenizer.decode(readout["continuation_ids"], skip_special_tokens=True),
             "positions": readout["positions"]}
            for item, prompt, readout in zip(items, prompts, readouts)
        ],
    }
    log.info("logit lens of %s (%s): %d prompts x %d layers in %.1f s", model_name, variant, len(items),
             len(layers), lens_time)
    return lens


def write_logit_lens(lens: dict, output_json: str | Path, output_heatmap: str | Path,
                     output_entropy: str | Path) -> None:
    """A logit_lens job's files: the two plots, then lens.json."""
    # Imported here, not at the top: the generation server imports this module (for logit_lens_output), and
    # plotting is no code of the server's (a plot fix must not touch it; tunelens.codehash).
    from tunelens.probe.plots import plot_lens_entropy, plot_lens_heatmap

    plot_lens_heatmap(lens, output_heatmap)
    plot_lens_entropy(lens, output_entropy)
    write_json_atomic(output_json, lens)  # last: its presence means the plots are complete too


def run_logit_lens(*, output_json: str | Path, output_heatmap: str | Path, output_entropy: str | Path,
                   **job) -> dict:
    """Rule `logit_lens` in this process: logit_lens_output(**job) written as lens.json plus its two plots.
    Returns the lens dict."""
    lens = logit_lens_output(**job)
    write_logit_lens(lens, output_json, output_heatmap, output_entropy)
    return lens


def run_logit_lens_job(job: dict, output_json: str | Path, output_heatmap: str | Path, output_entropy: str | Path,
                       **server_options) -> dict:
    """Rule `logit_lens`: `job` = logit_lens_output's keyword arguments plus what keys the model's generation
    server (backend, gpus, vllm_options). A request to that server, which keeps the model loaded, else in this
    process (tunelens.generation.served.run_model_task, whose keyword arguments `server_options` are); the plots are drawn
    here either way. Same bytes as in this process, apart from the timings and `execution`. Returns the lens."""
    from tunelens.generation.served import run_model_task

    lens, _, execution = run_model_task("logit_lens", job, lambda **kwargs: (logit_lens_output(**kwargs), []),
                                        **server_options)
    lens["execution"] = execution
    write_logit_lens(lens, output_json, output_heatmap, output_entropy)
    return lens
