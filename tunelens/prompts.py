"""Prompt formats shared by fine-tuning, generation, perplexity and the probe.

One function builds the prompt everywhere, so the model is evaluated on exactly the format it was
trained on. The training text is `prompt + response_text`; the loss covers the response only.
"""

from __future__ import annotations

from tunelens.errors import ConfigError

# The Stanford Alpaca templates, verbatim (the study's write-ups use these).
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_FORMATS = ("alpaca", "chat")


def user_message(row: dict) -> str:
    """The instruction and its input as one user turn (chat format)."""
    if row.get("input"):
        return f"{row['instruction']}\n\n{row['input']}"
    return row["instruction"]


def bos_prefix(tokenizer) -> str:
    """The BOS token text when this tokenizer puts one before every sequence by default, else "".

    Every stage tokenizes prompts with add_special_tokens=False (so a chat template's own BOS is not
    doubled); a plain-text prompt therefore carries the BOS in its text, for the models that expect one
    (Llama-2, Gemma: without it Gemma's outputs degrade). SmolLM2 adds none.
    """
    bos = getattr(tokenizer, "bos_token", None)
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if not bos or bos_id is None:
        return ""
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos_id else ""


def build_prompt(row: dict, prompt_format: str, tokenizer=None) -> str:
    """The text the model continues: Alpaca template, or the tokenizer's chat template with a generation prompt.

    The Alpaca prompt starts with the tokenizer's BOS text where the model expects one (see bos_prefix).
    """
    if prompt_format == "alpaca":
        template = ALPACA_WITH_INPUT if row.get("input") else ALPACA_NO_INPUT
        prefix = bos_prefix(tokenizer) if tokenizer is not None else ""
        return prefix + template.format(instruction=row["instruction"], input=row.get("input", ""))
    if prompt_format == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            name = getattr(tokenizer, "name_or_path", "?")
            raise ConfigError(
                f"prompt_format 'chat': tokenizer of '{name}' has no chat template; use prompt_format: alpaca"
            )
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user_message(row)}], tokenize=False, add_generation_prompt=True
        )
    raise ConfigError(f"prompt_format '{prompt_format}' is unknown; choices: {PROMPT_FORMATS}")


def response_text(row: dict, tokenizer=None) -> str:
    """The target continuation: the reference output followed by EOS, so the model learns to stop."""
    eos = getattr(tokenizer, "eos_token", None) or ""
    return row["output"] + eos
