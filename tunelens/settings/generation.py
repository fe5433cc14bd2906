"""Config sections `decoding` (besides the decoding parameters themselves: tunelens.generation.decoding) and `generation`."""

from __future__ import annotations

from dataclasses import dataclass

from tunelens.generation.decoding import sweep_schema_properties
from tunelens.settings.base import Section, setting


@dataclass(frozen=True, kw_only=True)
class DecodingSection(Section):
    mode: str = setting("one_at_a_time",
        "one_at_a_time: defaults plus each sweep value with the others at default (the study design); grid: the full"
        " product of the sweeps; list: exactly `configs`.",
        schema={"enum": ["one_at_a_time", "grid", "list"]})
    defaults: dict = setting({},
        "The decoding config every sweep starts from (mode one_at_a_time and grid) and list entries fill up from.",
        schema={"$ref": "#/$defs/decoding_config"})
    sweep: dict = setting({},
        "Decoding parameter -> values to sweep (see mode). One property per DecodingConfig field, filled in from "
        "tunelens/generation/decoding.py at load time.",
        schema=lambda: {"type": "object", "additionalProperties": False, "properties": sweep_schema_properties()})
    configs: list = setting([], "Explicit configs for mode=list (missing fields take `defaults`).",
        schema={"type": "array", "items": {"$ref": "#/$defs/decoding_config"}})
    beam_mode: str = setting("beam_search",
        "num_beams > 1: beam_search = deterministic beam search, temperature/top_k/top_p ignored (both backends); "
        "beam_sample = HF beam sampling with temperature/top_k/top_p (hf backend only).",
        schema={"enum": ["beam_search", "beam_sample"]})
    max_new_tokens: int = setting(128, "Cap on generated tokens per answer.",
        schema={"type": "integer", "minimum": 1, "maximum": 32768})
    stop: list = setting(["### Instruction:"], "Stop strings; the output is cut before the first one.",
        schema={"type": "array", "items": {"type": "string", "minLength": 1}})
    max_test_rows: int | None = setting(None,
        "The evaluation size: generate (and compute perplexity) for the first N rows of test.jsonl only; null = all."
        " Never changes the split, so raising it runs only the new generation and scoring jobs, no fine-tune. "
        "(Replaces dataset.max_test, which moved test rows into train.)",
        schema={"type": ["integer", "null"], "minimum": 1})


@dataclass(frozen=True, kw_only=True)
class GenerationSection(Section):
    backend: str = setting("auto", "auto = vllm when importable and usable, else hf.",
        schema={"enum": ["auto", "hf", "vllm"]})
    batch_size: int | str = setting("auto",
        "Prompts per batch (hf backend; vLLM schedules its own batches). auto: on CUDA, length-sorted prompts go in "
        "the largest batches whose KV cache fits half the free GPU memory, and a batch that still runs out of memory"
        " is split (no row lost; the batches used are in each sidecar); on CPU, 16. Sampled outputs depend on the "
        "batches through the random stream; greedy and beam outputs do not.",
        schema={"oneOf": [{"type": "integer", "minimum": 1, "maximum": 4096}, {"const": "auto"}]})
    max_prompt_tokens: int = setting(1024,
        "A prompt longer than this fails with its row id (never silently truncated).",
        schema={"type": "integer", "minimum": 1, "maximum": 1048576})
    vllm_gpu_memory_utilization: float = setting(0.85, "Fraction of GPU memory vLLM may take (CUDA only).",
        schema={"type": "number", "exclusiveMinimum": 0, "maximum": 1})
    vllm_max_lora_rank: int = setting(64,
        "Largest LoRA rank the vLLM engine accepts (vLLM's allowed values); must be >= finetune.lora_r.",
        schema={"enum": [8, 16, 32, 64, 128, 256, 320, 512]})
    vllm_python: str | None = setting(None,
        "Python with vllm + tunelens, used by generate jobs with backend vllm and by the agreement check when vllm "
        "is not importable in the Python running the job (null: generate jobs use the checkout's "
        ".venv-vllm/bin/python from `make vllm-venv` when it exists).",
        schema={"type": ["string", "null"]})
    server: bool = setting(True,
        "Generate jobs of one model (and its early_exit jobs, hf backend) share a generation server that keeps the "
        "model (hf) or vLLM engine loaded (tunelens/generation/genserver.py); false = every job loads its own. Outputs are the "
        "same either way.",
        schema={"type": "boolean"})
    static_cache: bool | str = setting("auto",
        "hf backend, sampling and greedy configs (and early exit): decode with a static KV cache, batches padded to "
        "row and length buckets so that the decoding step is captured (or compiled) once per model and bucket. "
        "With compile_backend graphs beam search runs on it too (its beams reordered in place over the generated "
        "positions); the other backends keep the dynamic cache for beams. auto = on CUDA; with a compiling backend (inductor, cudagraphs) "
        "or eager only when max_new_tokens >= 128, since on an H200 the inductor compile took ~33 s per shape, "
        "which short answers never repay. Greedy rows equal the dynamic cache's in float32; in bf16 the padded "
        "batch changes the matmul shapes and so the rounding; sampled rows depend on the bucket through the "
        "random stream (reproducible for the same seed and batches). The sidecar's kv_cache and semantics say "
        "which ran.",
        schema={"enum": ["auto", True, False]})
    compile_backend: str = setting("graphs",
        "How the static-cache decoding step runs on CUDA: graphs (tunelens captures the one-token forward as a CUDA "
        "graph per model, depth and batch shape, and replays it: no compile, the eager step's kernels, outputs "
        "equal to transformers' static cache), inductor (torch.compile reduce-overhead: Triton kernels + CUDA "
        "graphs, ~33 s per shape, 18 ms a step on a 7B shape), torch.compile's cudagraphs backend (~13 s, 41 ms), "
        "or eager (no compile, 50 ms). Figures: BENCHMARKS.md, issue 21.",
        schema={"enum": ["graphs", "inductor", "cudagraphs", "eager"]})
    merge_adapter: bool | str = setting("auto",
        "hf backend: generate (and probe) the fine-tuned variant from the LoRA merged into a copy of the base "
        "weights instead of PEFT's per-layer adapter (auto = on CUDA, where the unmerged adapter doubles the "
        "decoding step). The server keeps it beside the base weights when the GPU has room, else swaps. The "
        "sidecar's adapter_merged and semantics say which ran.",
        schema={"enum": ["auto", True, False]})
    server_idle_timeout_s: float = setting(120, "A generation server exits after this many seconds without requests.",
        schema={"type": "number", "exclusiveMinimum": 0, "maximum": 86400})
    server_start_timeout_s: float = setting(120,
        "A job waits this long for its model's server to start, then generates itself.",
        schema={"type": "number", "exclusiveMinimum": 0, "maximum": 86400})
    agreement_rows: int = setting(16, "Test rows the hf-vs-vllm agreement check decodes.",
        schema={"type": "integer", "minimum": 1, "maximum": 10000})
    agreement_max_new_tokens: int = setting(32, "Greedy tokens per row in the agreement check.",
        schema={"type": "integer", "minimum": 1, "maximum": 4096})

    @classmethod
    def of_config(cls, config: dict) -> "GenerationSection":
        """The raw (workflow-validated) config dict's `generation` section, typed alone: a job that types only
        what it reads has no other section in its code hash (tunelens.codehash), so a setting added elsewhere does
        not rerun it."""
        return cls.from_dict(config.get("generation") or {}, where="generation", lenient=True)
