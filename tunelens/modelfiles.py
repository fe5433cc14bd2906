"""What a model directory's files say, read without loading the model: config.json (architecture, depth,
context length) and the headers of its weight files. Used before any job (tunelens.config, tunelens.preflight)
so a corrupt, truncated or wrong model is named with its path instead of failing inside transformers.

No torch/transformers imports: this runs on every Snakemake invocation. A safetensors file is an 8-byte
little-endian header length, a JSON header ({tensor: {dtype, shape, data_offsets}}, plus __metadata__), then
the tensor data; the header alone tells the size the file must have.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

MAX_SAFETENSORS_HEADER = 100 * 1024**2  # the safetensors library's own limit
# config.json keys that hold the context length (positions the model was trained for), by family.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
# Heads that make an architecture class a causal LM (AutoModelForCausalLM loads it with its own LM head).
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
# Classes of encoder-only models (masked-LM pretraining heads); other non-causal heads say "not a causal LM".
ENCODER_SUFFIXES = ("ForMaskedLM", "ForPreTraining", "ForNextSentencePrediction")
ENCODER_MODEL_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2",
                       "camembert", "mpnet", "modernbert", "ernie", "xlm", "flaubert", "megatron-bert", "nomic_bert"}


class ModelFileProblem(Exception):
    """A model file that cannot be used; the message names the file."""


def read_config_json(directory: str | Path) -> dict:
    """config.json of a model directory as a dict; an empty, unreadable, non-JSON or non-object file raises
    ModelFileProblem naming its path (and the line and column of a JSON error)."""
    path = Path(directory) / "config.json"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelFileProblem(f"{path}: cannot be read ({exc})") from None
    if not text.strip():
        raise ModelFileProblem(f"{path}: the file is empty; expected the model's JSON config")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelFileProblem(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(data, dict):
        raise ModelFileProblem(f"{path}: expected a JSON object (the model's config), got a JSON "
                               f"{_json_type(data)}")
    return data


def _json_type(value) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(value), "null")


def _holders(config: dict) -> list[dict]:
    """The config and its text part (multimodal configs such as Gemma 3 keep the LM's sizes in text_config)."""
    text = config.get("text_config")
    return [config] + ([text] if isinstance(text, dict) else [])


def _first_int(config: dict, keys) -> int | None:
    for holder in _holders(config):
        for key in keys:
            value = holder.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def num_layers(config: dict) -> int | None:
    """Decoder depth from a config.json dict, or None when it does not say."""
    return _first_int(config, DEPTH_KEYS)


def context_length(config: dict) -> int | None:
    """Positions (tokens) the model takes, prompt and generated tokens together; None when it does not say."""
    return _first_int(config, CONTEXT_KEYS)


def architecture_problem(config: dict) -> str | None:
    """Why a config.json does not describe a causal language model (what it is instead), or None.

    A causal LM is what fine-tuning, generation and the logit lens need: AutoModelForCausalLM would load an
    encoder such as BERT too (BertLMHeadModel), but with a freshly initialised LM head.
    """
    model_type = config.get("model_type")
    architectures = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    named = f"model_type '{model_type}'" + (f", architectures {architectures}" if architectures else "")
    if any(a.endswith(CAUSAL_SUFFIXES) for a in architectures):
        return None
    if config.get("is_encoder_decoder") is True:
        return f"{named}: an encoder-decoder (sequence-to-sequence) model; tunelens needs a decoder-only causal LM"
    if any(a.endswith(ENCODER_SUFFIXES) for a in architectures) or (
            model_type in ENCODER_MODEL_TYPES and not config.get("is_decoder")):
        return (f"{named}: an encoder-only model, not a causal language model (it would be fine-tuned with a "
                "freshly initialised LM head); use a decoder-only causal LM")
    if architectures and not any(a.endswith("ForConditionalGeneration") for a in architectures):
        return (f"{named}: not a causal language model (its weights have no LM head for generation); "
                "use a checkpoint saved as *ForCausalLM")
    return None


# --------------------------------------------------------------------------------------------- weights
def safetensors_header(path: str | Path) -> dict:
    """The JSON header of a safetensors file, after checking that the file has the size it declares
    (a truncated download is caught here, not in the middle of loading)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ModelFileProblem(f"{path}: truncated: {size} bytes, shorter than the 8-byte header length "
                                       "every safetensors file starts with")
            header_length = int.from_bytes(prefix, "little")
            if header_length > min(size - 8, MAX_SAFETENSORS_HEADER):
                raise ModelFileProblem(
                    f"{path}: corrupt or truncated: the header declares {header_length} bytes of JSON but the file "
                    f"has {size} bytes")
            raw = handle.read(header_length)
    except OSError as exc:
        raise ModelFileProblem(f"{path}: cannot be read ({exc})") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelFileProblem(f"{path}: corrupt: the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ModelFileProblem(f"{path}: corrupt: the header is not a JSON object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ModelFileProblem(f"{path}: corrupt: the header entry of tensor '{name}' has no data_offsets")
        end = max(end, offsets[1])
    expected = 8 + header_length + end
    if size < expected:
        raise ModelFileProblem(f"{path}: truncated: {size} bytes, but its header describes {expected} bytes "
                               f"({size - expected:+d}); download or copy it again")
    if size > expected:
        raise ModelFileProblem(f"{path}: corrupt: {size} bytes, but its header describes {expected} bytes")
    return header


def weight_files_problems(directory: str | Path) -> tuple[list[str], set[str]]:
    """(problems, tensor names) of a model directory's weight files, from their headers only.

    safetensors (single or sharded through model.safetensors.index.json) are checked against their headers;
    a zipped PyTorch checkpoint (pytorch_model*.bin) must have an intact zip directory. No weight file at all
    is a problem too. Tensor names come from the safetensors headers (empty for .bin checkpoints).
    """
    directory = Path(directory)
    problems: list[str] = []
    names: set[str] = set()
    safetensors = sorted(directory.glob("*.safetensors"))
    bins = sorted(directory.glob("pytorch_model*.bin"))
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if not index.is_file():
            continue
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, AttributeError, TypeError):
            problems.append(f"{index}: corrupt: expected a JSON object with a weight_map")
            continue
        missing = [shard for shard in shards if not (directory / shard).is_file()]
        if missing:
            problems.append(f"{index}: names shard(s) {missing}, missing from {directory}")
    if not safetensors and not bins:
        problems.append(f"{directory}: no weight files (*.safetensors or pytorch_model*.bin)")
    for path in safetensors:
        try:
            names |= {name for name in safetensors_header(path) if name != "__metadata__"}
        except ModelFileProblem as exc:
            problems.append(str(exc))
    for path in bins:
        with path.open("rb") as handle:
            zipped = handle.read(2) == b"PK"
        if zipped and not zipfile.is_zipfile(path):
            problems.append(f"{path}: truncated or corrupt: its zip directory (at the end of the file) is missing")
    return problems, names


def module_names(tensor_names: set[str]) -> set[str]:
    """Module names LoRA can target ('q_proj' of 'model.layers.0.self_attn.q_proj.weight')."""
    return {name.split(".")[-2] for name in tensor_names if name.count(".") >= 1}


def safetensors_parameters(model_dir: str | Path) -> int | None:
    """Parameters of the model in `model_dir`, read from its safetensors headers (no weights read); None when it
    is not a local directory with safetensors files (a hub id, or not downloaded yet)."""
    import struct

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return None
    parameters = 0
    for shard in sorted(model_dir.glob("*.safetensors")):
        with shard.open("rb") as handle:  # 8-byte header length, then JSON with each tensor's shape
            header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
        for name, entry in header.items():
            if name != "__metadata__":
                count = 1
                for dim in entry["shape"]:
                    count *= dim
                parameters += count
    return parameters or None
