"""What every generation backend shares: the settings of a generation job, a completion, the prompt rows,
stop-string cutting, per-row seeds and the decoding-semantics text of the sidecar (tunelens.generation.generate).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from tunelens.generation.decoding import BEAM_MODES, DecodingConfig
from tunelens.errors import ConfigError, DataError
from tunelens.io import read_jsonl
from tunelens.settings import DecodingSection, GenerationSection
from tunelens.settings.base import default_of

log = logging.getLogger(__name__)


BACKENDS = ("auto", "hf", "vllm")
FINISH_REASONS = ("stop", "length", "stop_string")
SPLIT_FIELDS = ("id", "instruction", "input", "output")
# How the static-cache decoding step runs on CUDA: graphs (tunelens.generation.graphs: a CUDA graph of the eager
# step captured by hand per model, depth and batch shape; no compile), inductor (Triton kernels + CUDA graphs, mode
# reduce-overhead: ~33 s per shape, 18 ms a step on the 7B shape), torch.compile's cudagraphs backend (13 s, 41 ms
# a step), or eager (the static cache alone: 50 ms). CPU never compiles. Figures: BENCHMARKS.md, issue 21.
COMPILE_BACKENDS = ("graphs", "inductor", "cudagraphs", "eager")
# decoding.stop's default: what every generation gets unless it says otherwise (the agreement check passes none)
DEFAULT_STOP: tuple[str, ...] = tuple(default_of(DecodingSection, "stop"))


# --------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class GenerationSettings:
    """Everything besides the decoding config that changes what a generation job produces.

    max_new_tokens: cap on generated tokens per row; stop: strings that end an answer (cut before them);
    seed: sampling seed; beam_mode: see module docstring; batch_size: prompts per forward batch (hf), or
    "auto": on CUDA the largest length-sorted batches whose KV cache fits the free GPU memory (a batch that
    still runs out of memory is split, no row lost), on CPU 16 — changes sampled outputs only through the
    random stream, never greedy/beam outputs (the batches used are recorded in the sidecar);
    max_prompt_tokens: a longer prompt is an error naming its row (never silently truncated);
    static_cache: a static KV cache (hf backend, num_beams 1): every batch's rows are padded with copies of its
    last prompt up to a row bucket (`tunelens.generation.backend_hf.row_bucket`) and the cache to a length bucket, so that
    on CUDA transformers compiles the decoding step once per bucket (`compile_backend`), not per request.
    """

    # The config's defaults (tunelens.settings); static_cache is the resolved choice (the config's "auto" is not).
    max_new_tokens: int = default_of(DecodingSection, "max_new_tokens")
    stop: tuple[str, ...] = DEFAULT_STOP
    seed: int = 1234  # the config's top-level `seed` default (a test keeps them equal): ConfigSection itself would
    # make every config section code of every generation job (tunelens.codehash), so a new setting reran them
    beam_mode: str = default_of(DecodingSection, "beam_mode")
    batch_size: int | str = default_of(GenerationSection, "batch_size")
    max_prompt_tokens: int = default_of(GenerationSection, "max_prompt_tokens")
    static_cache: bool = False
    compile_backend: str = default_of(GenerationSection, "compile_backend")

    def as_meta(self) -> dict:
        """The fields every generation sidecar records (JSON types)."""
        return {"seed": self.seed, "max_new_tokens": self.max_new_tokens, "stop": list(self.stop),
                "beam_mode": self.beam_mode, "batch_size": self.batch_size,
                "max_prompt_tokens": self.max_prompt_tokens}

    def __post_init__(self):
        if self.beam_mode not in BEAM_MODES:
            raise ConfigError(f"decoding.beam_mode: '{self.beam_mode}' is unknown; choices: {BEAM_MODES}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"decoding.max_new_tokens: {self.max_new_tokens}; expected >= 1")
        if self.batch_size != "auto" and not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ConfigError(f"generation.batch_size: {self.batch_size!r}; expected 'auto' or an integer >= 1")
        if self.compile_backend not in COMPILE_BACKENDS:
            raise ConfigError(f"generation.compile_backend: '{self.compile_backend}' is unknown; choices: "
                              f"{COMPILE_BACKENDS}")
        if any(not s for s in self.stop):
            raise ConfigError("decoding.stop: contains an empty string; every stop string needs >= 1 character")
        object.__setattr__(self, "stop", tuple(self.stop))


@dataclass
class Completion:
    """One generated answer. `token_ids` are the model's generated ids (EOS/stop tokens included)."""

    text: str
    num_generated_tokens: int
    finish_reason: str
    token_ids: list[int] = field(default_factory=list)


def as_decoding_config(value: DecodingConfig | dict) -> DecodingConfig:
    """Accept a DecodingConfig or its `as_dict()` form (what the Snakemake rule passes as params)."""
    if isinstance(value, DecodingConfig):
        return value
    config = DecodingConfig.from_dict({k: v for k, v in value.items() if k != "name"})
    name = value.get("name")
    if name and name != config.name:  # an explicit name from list mode
        config = DecodingConfig.from_dict(dict(value))
    return config


def describe_semantics(decoding_config: DecodingConfig, beam_mode: str, backend: str) -> str:
    """One paragraph saying how this config's parameters were applied (goes into the meta file)."""
    dc = decoding_config
    rep = (
        f" repetition_penalty={dc.repetition_penalty} applied to prompt and output tokens."
        if dc.repetition_penalty != 1.0
        else " No repetition penalty."
    )
    if dc.is_beam and beam_mode == "beam_search":
        text = (
            f"deterministic beam search, {dc.num_beams} beams, best beam returned; temperature={dc.temperature}, "
            f"top_k={dc.top_k}, top_p={dc.top_p} are ignored (no sampling)."
        )
        if backend == "vllm" and dc.repetition_penalty != 1.0:
            rep = f" repetition_penalty={dc.repetition_penalty} is NOT applied (vLLM beam search has no such option)."
        return f"[{backend}] {text}{rep}"
    if dc.is_beam:  # beam_sample (temperature > 0: tunelens.generation.decoding.check)
        text = (
            f"beam sampling (hf), {dc.num_beams} beams, tokens sampled with temperature={dc.temperature}, "
            f"top_k={dc.top_k or 'off'}, top_p={dc.top_p if dc.top_p < 1 else 'off'}."
        )
        return f"[{backend}] {text}{rep}"
    if dc.temperature == 0.0:
        return (
            f"[{backend}] greedy decoding (temperature 0): argmax at every step; top_k={dc.top_k} and "
            f"top_p={dc.top_p} are not applied.{rep}"
        )
    return (
        f"[{backend}] multinomial sampling: logits / temperature={dc.temperature}, then top_k="
        f"{dc.top_k if dc.top_k else 'off (0)'}, then top_p={dc.top_p if dc.top_p < 1 else 'off (1.0)'}; "
        f"seeded.{rep}"
    )


# --------------------------------------------------------------------------------------------- prompts
@dataclass
class PromptRow:
    id: str
    prompt: str
    reference: str
    num_prompt_tokens: int


def load_prompt_rows(
    test_file: str | Path,
    prompt_format: str,
    tokenizer,
    *,
    max_prompt_tokens: int,
    max_rows: int | None = None,
) -> list[PromptRow]:
    """Read split rows and build their prompts; fail before any generation on an empty or over-long prompt.

    The error names the file, the 1-based line, the row id and the limit.
    """
    from tunelens.prompts import build_prompt

    rows = read_jsonl(test_file, required=SPLIT_FIELDS)
    if max_rows is not None:
        rows = rows[:max_rows]
    if not rows:
        raise DataError(f"{test_file}: no rows to generate for")
    out = []
    for line_no, row in enumerate(rows, start=1):
        if not str(row["instruction"]).strip() and not str(row["input"]).strip():
            raise DataError(
                f"{test_file}, line {line_no} (id {row['id']}): empty prompt: 'instruction' and 'input' are both "
                "empty; remove the row or fill its instruction"
            )
        prompt = build_prompt(row, prompt_format, tokenizer)
        num_tokens = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if num_tokens > max_prompt_tokens:
            raise DataError(
                f"{test_file}, line {line_no} (id {row['id']}): prompt has {num_tokens} tokens, more than "
                f"generation.max_prompt_tokens={max_prompt_tokens}; shorten the row or raise the limit "
                "(prompts are never truncated silently)"
            )
        out.append(PromptRow(row["id"], prompt, row["output"], num_tokens))
    return out


def check_context_room(prompt_rows: Sequence[PromptRow], max_new_tokens: int, model_path: str | Path,
                       where: str | Path | None = None) -> None:
    """Every prompt plus max_new_tokens within the model's context length (its config.json says it; nothing is
    checked when it does not): a row that would run past the model's positions fails, naming its line and id,
    before any generation. The DAG checked max_new_tokens alone (tunelens.preflight); prompt lengths need the
    tokenizer, so they are checked here."""
    from tunelens.modelfiles import ModelFileProblem, context_length, read_config_json

    try:
        context = context_length(read_config_json(model_path))
    except ModelFileProblem:
        return  # a directory without config.json (e.g. a GGUF checkpoint): nothing to compare against
    if not context:
        return
    for line_no, row in enumerate(prompt_rows, start=1):
        if row.num_prompt_tokens + max_new_tokens > context:
            raise DataError(
                f"{where or 'prompt rows'}, line {line_no} (id {row.id}): prompt has {row.num_prompt_tokens} tokens; "
                f"with decoding.max_new_tokens={max_new_tokens} that is {row.num_prompt_tokens + max_new_tokens}, "
                f"beyond the context length {context} of {model_path}; lower max_new_tokens or "
                "generation.max_prompt_tokens (which fails such rows by their length alone)"
            )


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut `text` before the earliest stop string; (text, whether one was found)."""
    positions = [text.find(s) for s in stop if s in text]
    if not positions:
        return text, False
    return text[: min(positions)], True


def _row_seed(seed: int, row_id: str) -> int:
    """Per-row sampling seed (vLLM): independent of row order and batch composition."""
    digest = hashlib.sha256(f"{seed}\x1f{row_id}".encode()).hexdigest()
    return int(digest[:8], 16) & 0x7FFFFFFF
