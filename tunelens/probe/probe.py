"""Per-layer probe: the probe layers, early-exit generation ("premature layers", as in DoLa) and what the logit
lens (tunelens.probe.lens) shares with it.

Layer numbering (everywhere in tunelens): layer L is the output of decoder block L, 1-based; layer N (the
model's depth) is the last block, whose read-out is the model's own next-token distribution.

Early exit
    The decoder's block list is cut in place to its first L blocks for the duration of generation (the
    KV cache works unchanged) and restored afterwards, even on error. The final norm and LM head then read
    block L's output, so layer L costs about L/N of a full pass; the top blocks never run.
    Generation itself is the generation stage's batched HF loop (tunelens.generation.generate.hf_generate_batched) run on
    the truncated model; rows are written in the generation row format (docs/ARCHITECTURE.md) so scoring
    treats them like any generation file.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from tunelens.config import DecodingConfig, resolve_layers
from tunelens.generation.completions import DEFAULT_STOP
from tunelens.generation.decoding import check as check_decoding
from tunelens.errors import ConfigError
from tunelens.io import library_versions, write_json_atomic, write_jsonl_atomic
from tunelens.settings import GenerationSection
from tunelens.settings.base import default_of
from tunelens.models import (
    decoder_layers,
    input_device,
    load_model,
    num_decoder_layers,
    set_decoder_layers,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- layers
def check_probe_layers(
    layer_specs: Sequence[float], expected_layers: Sequence[int] | None, model, model_name: str
) -> list[int]:
    """Resolve the configured layer specs against the loaded model's real depth.

    The DAG resolved `expected_layers` from the depth known before loading (embedded registry, config.json
    or `models.<name>.num_layers`); a model that turns out deeper or shallower than that would silently
    probe other layers than the file names say, so that is an error naming both depths.
    """
    depth = num_decoder_layers(model)
    resolved = resolve_layers(list(layer_specs), depth, model_name)
    if expected_layers is not None and list(expected_layers) != resolved:
        raise ConfigError(
            f"model '{model_name}': probe layers {list(layer_specs)} resolve to {resolved} for the loaded model "
            f"({depth} decoder layers), but the workflow planned layers {list(expected_layers)}; "
            f"set models.{model_name}.num_layers to {depth}"
        )
    return resolved


@contextlib.contextmanager
def truncated_decoder(model, num_layers: int) -> Iterator[Any]:
    """Run `model` with only its first `num_layers` decoder blocks inside the `with` block.

    The block list is replaced in place (a shallow copy of the model would share and mutate the same
    modules) and always restored, so an exception mid-generation leaves the model whole.
    """
    layers = decoder_layers(model)
    depth = len(layers)
    if not 1 <= num_layers <= depth:
        raise ConfigError(
            f"early-exit layer {num_layers} is outside the model's depth (1..{depth} decoder layers)"
        )
    set_decoder_layers(model, layers[:num_layers])
    try:
        yield model
    finally:
        set_decoder_layers(model, layers)


# --------------------------------------------------------------------------------------------- stage entry points


def _model_record(model_name: str, source: str, model_path: str | Path) -> dict:
    return {"name": model_name, "source": source, "path": str(model_path)}


def early_exit_output(
    *,
    model_name: str,
    source: str,
    model_path: str | Path,
    adapter_dir: str | Path | None,
    variant: str,
    test_path: str | Path,
    layer: int,
    layer_specs: Sequence[float],
    expected_layers: Sequence[int] | None,
    prompt_format: str,
    decoding: DecodingConfig | dict,
    beam_mode: str = "beam_search",
    max_test_rows: int | None = None,
    max_new_tokens: int = 64,
    stop: Sequence[str] = DEFAULT_STOP,
    batch_size: int | str = "auto",
    max_prompt_tokens: int = 1024,
    seed: int = 0,
    device: str = "auto",
    gpus: int = 1,
    hf_model: tuple | None = None,
    static_cache: bool | str = "auto",
    compile_backend: str = default_of(GenerationSection, "compile_backend"),
) -> tuple[dict, list[dict]]:
    """Rule `early_exit` computed but not written: (meta, rows), the answers to the first `max_test_rows` test
    rows from the first `layer` blocks.

    The generation loop is the generation stage's own (tunelens.generation.generate.hf_generate_batched: batching,
    stop strings, finish reasons, token counts), run on the truncated model, so layer N reproduces the
    main greedy generation token for token. The meta is the generation `.meta.json` sidecar
    (docs/ARCHITECTURE.md) with `layer` and `early_exit` (layer, depth, fraction) added; times are seconds.
    `hf_model`: (model, tokenizer) already loaded by load_model(model_path, adapter_dir, device), as the
    generation server (tunelens.generation.genserver) keeps it; the model is truncated only inside this call.
    """
    from tunelens.generation.generate import (
        GenerationSettings,
        adapter_record,
        as_decoding_config,
        check_variant,
        completion_summary,
        describe_semantics,
        generation_rows,
        hf_generate_batched,
        load_prompt_rows,
        speed_semantics,
        uses_static_cache,
        with_static_cache,
    )

    decoding_config = as_decoding_config(decoding)
    settings = GenerationSettings(
        max_new_tokens=max_new_tokens, stop=tuple(stop), seed=seed, beam_mode=beam_mode, batch_size=batch_size,
        max_prompt_tokens=max_prompt_tokens, compile_backend=compile_backend,
    )
    check_decoding(decoding_config, beam_mode, ["hf"], f"probe.early_exit.decoding ({decoding_config.name})")
    semantics = describe_semantics(decoding_config, beam_mode, "hf")
    check_variant(model_name, variant, adapter_dir)

    started = time.perf_counter()
    model, tokenizer = hf_model or load_model(model_path, adapter_dir=adapter_dir, device=device, gpus=gpus)
    load_time = time.perf_counter() - started if hf_model is None else 0.0
    layers = check_probe_layers(layer_specs, expected_layers, model, model_name)
    if layer not in layers:
        raise ConfigError(f"model '{model_name}': early-exit layer {layer} is not one of its probe layers {layers}")
    depth = num_decoder_layers(model)
    settings = with_static_cache(settings, static_cache, model)  # as the generate jobs resolve it
    kv_cache = "static" if uses_static_cache(decoding_config, settings, model) else "dynamic"
    rows = load_prompt_rows(
        test_path, prompt_format, tokenizer, max_prompt_tokens=max_prompt_tokens, max_rows=max_test_rows
    )

    started = time.perf_counter()
    with truncated_decoder(model, layer):
        completions = hf_generate_batched(model, tokenizer, [row.prompt for row in rows], decoding_config, settings)
    generation_time = time.perf_counter() - started
    out_rows = generation_rows(rows, completions)
    summary = completion_summary(completions, round(generation_time, 3))
    meta = {
        "backend": "hf",
        "model": _model_record(model_name, source, model_path),
        "variant": variant,
        "adapter": adapter_record(adapter_dir),
        "decoding_config": decoding_config.as_dict(),
        "semantics": f"{semantics} Early exit after decoder block {layer} of {depth}, then the model's final norm "
                     f"and LM head (blocks {layer + 1}..{depth} not run)."
                     + (" Fine-tuned weights: the LoRA adapter merged into a copy of the base weights, not applied "
                        "per layer by PEFT." if getattr(model, "tunelens_adapter_merged", False) else "")
                     + speed_semantics(kv_cache, None, compile_backend, str(input_device(model)),
                                       decoding_config.num_beams),
        "kv_cache": kv_cache,
        "layer": layer,
        "early_exit": {"layer": layer, "num_layers": depth, "fraction": round(layer / depth, 4)},
        **settings.as_meta(),
        "prompt_format": prompt_format,
        "test_file": str(test_path),
        "device": str(input_device(model)),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "load_time_s": round(load_time, 3),
        **summary,
        "versions": library_versions(),
    }
    log.info("early exit %s (%s) layer %d/%d: %d rows, %d tokens in %.1f s", model_name, variant, layer, depth,
             len(out_rows), summary["generated_tokens"], generation_time)
    return meta, out_rows


def write_early_exit(output_meta: str | Path, output_jsonl: str | Path, meta: dict, rows: list[dict]) -> None:
    """An early_exit job's two files, the meta first: the rows file appearing means the job completed."""
    write_json_atomic(output_meta, meta)
    write_jsonl_atomic(output_jsonl, rows)


def run_early_exit(*, output_jsonl: str | Path, output_meta: str | Path, **job) -> dict:
    """Rule `early_exit` in this process: early_exit_output(**job) written as generation rows + the `.meta.json`
    sidecar. Returns the meta dict."""
    meta, rows = early_exit_output(**job)
    write_early_exit(output_meta, output_jsonl, meta, rows)
    return meta

