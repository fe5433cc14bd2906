"""A fine-tune setting is one FinetuneSection field (tunelens/settings/finetune.py); the config schema is derived from
the sections (tunelens.settings), so nothing else lists the keys.

The slow test adds `max_grad_norm` exactly that way, to a copy of the package, and follows it: the config schema
documents and validates it (type, default, description from the field), load_config fills and merges it per model,
the fine-tune builds TRL's SFTConfig with it (`sft="max_grad_norm"` on the field) and records it in metrics.json.
Any other place that lists the fine-tune settings by hand would miss the new one, and this test would fail there.

The other tests: the schema is the sections' (every key with its default and description, in declaration order),
and `decoding.stop` has one default, the config's, which a generation without an explicit `stop` also gets.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import run_on_package_copy

from tunelens.config import _load_schema, load_config
from tunelens.settings import ConfigSection, DecodingSection, FinetuneSection
from tunelens.settings.base import default_of, settings_fields

REPO = Path(__file__).resolve().parents[1]

NEW_FIELD = '''
    max_grad_norm: float = setting(1.0, "Gradient norm clipping threshold (per optimizer step).",
        schema={"type": "number", "exclusiveMinimum": 0}, sft="max_grad_norm")
'''
ANCHOR = '''    save_steps: int = setting(25, "Checkpoint every N steps (resume after interruption).",
        schema={"type": "integer", "minimum": 1}, sft="save_steps")
'''

SCRIPT = textwrap.dedent('''
    import json, sys
    from pathlib import Path

    import tunelens
    from transformers import TrainerCallback
    from tunelens.config import _load_schema, load_config
    from tunelens.training.finetune import finetune

    tiny, work = sys.argv[1], Path(sys.argv[2])
    out = {"package": tunelens.__file__}
    out["schema"] = _load_schema()["properties"]["finetune"]["properties"].get("max_grad_norm")
    config = {"dataset": {"name": "demo", "source": "embedded:demo"},
              "models": {"tiny": {"source": tiny, "finetune": {"max_grad_norm": 0.5}},
                         "other": {"source": tiny}},
              "finetune": {"max_steps": 2, "batch_size": 2, "logging_steps": 1, "save_steps": 2, "lora_r": 4,
                           "lora_dropout": 0.0}}
    study = load_config(config)
    out["merged"] = {name: spec.finetune.get("max_grad_norm") for name, spec in study.models.items()}
    out["typed"] = study.models["tiny"].finetune_settings.max_grad_norm
    try:
        load_config({**config, "models": {"tiny": {"source": tiny, "finetune": {"max_grad_norm": -1}}}})
    except Exception as exc:
        out["rejected"] = str(exc)

    class Seen(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            out["sft_config"] = args.max_grad_norm

    metrics = finetune(tiny, work / "train.jsonl", work / "adapter", work / "train_log.jsonl", work / "metrics.json",
                       work / "loss.png", work / "checkpoints", settings=study.models["tiny"].finetune,
                       prompt_format="alpaca", seed=1, device="cpu", model_name="tiny", callbacks=[Seen()])
    out["metrics"] = json.loads((work / "metrics.json").read_text())["settings"]
    print(json.dumps(out))
''')


def add_max_grad_norm(package: Path) -> None:
    """The whole change a contributor makes for a new fine-tune setting that is an SFTConfig argument."""
    path = package / "settings" / "finetune.py"
    source = path.read_text()
    assert source.count(ANCHOR) == 1, "tunelens/settings/finetune.py changed shape"
    path.write_text(source.replace(ANCHOR, ANCHOR + NEW_FIELD))


@pytest.mark.slow
def test_new_finetune_setting_reaches_schema_sft_config_and_metrics(tiny_llama_dir, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    rows = [{"id": f"t-{i}", "instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(4)]
    (work / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    out, package = run_on_package_copy(tmp_path, add_max_grad_norm, SCRIPT, str(tiny_llama_dir), str(work), cwd=work)
    assert out["package"] == str(package / "__init__.py")  # the changed copy ran, not the checkout

    assert out["schema"] == {"type": "number", "exclusiveMinimum": 0, "default": 1.0,
                             "description": "Gradient norm clipping threshold (per optimizer step)."}
    assert out["merged"] == {"tiny": 0.5, "other": 1.0}  # the per-model override, the default filled
    assert out["typed"] == 0.5
    assert "models.tiny.finetune.max_grad_norm: -1" in out["rejected"]
    assert out["sft_config"] == 0.5
    assert out["metrics"]["max_grad_norm"] == 0.5


def test_finetune_schema_is_the_section():
    schema = _load_schema()["properties"]["finetune"]
    assert list(schema["properties"]) == [spec.name for spec in settings_fields(FinetuneSection)]
    for spec in settings_fields(FinetuneSection):
        entry = schema["properties"][spec.name]
        assert entry["default"] == default_of(FinetuneSection, spec.name)
        assert entry["description"] == spec.metadata["help"]
    assert schema["additionalProperties"] is False


def test_sections_read_a_loaded_config_back_unchanged():
    import yaml

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    study = load_config(config)
    assert study.settings.as_dict() == study.config
    assert json.dumps(study.settings.as_dict()) == json.dumps(study.config)  # key order too (records' bytes)
    assert study.settings.finetune.lora_r == config["finetune"]["lora_r"] == 8
    assert study.models["gemma3"].finetune_settings.max_steps == 8  # config.yaml's per-model override
    assert study.models["smollm2"].resource_settings.cpus == 1
    with pytest.raises(Exception, match=r"unknown key\(s\) \['lora_rank'\]"):
        FinetuneSection.from_dict({"lora_rank": 8}, where="finetune settings")
    assert dataclasses.is_dataclass(ConfigSection)


def test_stop_has_one_default_the_configs():
    """decoding.stop: the schema's default (what every workflow generation gets), the section's default, and what a
    generation called without `stop` gets are one value; the hf-vs-vLLM agreement check passes none on purpose."""
    from tunelens.generation.completions import DEFAULT_STOP, GenerationSettings
    from tunelens.generation.generate import generation_output
    from tunelens.probe.probe import early_exit_output

    schema_default = _load_schema()["properties"]["decoding"]["properties"]["stop"]["default"]
    assert schema_default == default_of(DecodingSection, "stop") == ["### Instruction:"]
    assert GenerationSettings().stop == DEFAULT_STOP == tuple(schema_default)
    for function in (generation_output, early_exit_output):
        assert inspect.signature(function).parameters["stop"].default == DEFAULT_STOP
    study = load_config({"dataset": {"name": "d", "source": "embedded:demo"},
                         "models": {"m": {"source": "embedded:smollm2-135m-instruct"}}})
    assert study.settings.decoding.stop == ["### Instruction:"]


def test_agreement_check_generates_without_stop_strings(monkeypatch, tmp_path):
    import tunelens.generation.agreement as agreement

    seen = []

    def fake_request(request):
        seen.append(request["settings"]["stop"])
        raise RuntimeError("stop here")

    monkeypatch.setattr(agreement, "completions_request", fake_request)
    with pytest.raises(RuntimeError, match="stop here"):
        agreement.agreement(tmp_path / "model", tmp_path / "test.jsonl", tmp_path / "out.json", device="cpu")
    assert seen == [()]


HASHES = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    from tunelens.codehash import code_hash
    scripts = Path(sys.argv[1])
    import tunelens
    assert tunelens.__file__.startswith(str(scripts.parent)), tunelens.__file__  # the copy, not the checkout
    print(json.dumps({script.name: code_hash(script) for script in sorted(scripts.glob("*.py"))}))
''')


def test_a_help_text_is_documentation_and_reruns_no_job(tmp_path):
    """A key's help text is the schema's description (it was YAML, outside every job's code hash): editing it
    changes no rule's code hash (tunelens.codehash reads it as documentation), editing the key's default does."""
    tree = tmp_path / "tree"
    shutil.copytree(REPO / "tunelens", tree / "tunelens", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "scripts", tree / "scripts")
    path = tree / "tunelens" / "settings" / "finetune.py"
    original = path.read_text()

    def hashes() -> dict:
        result = subprocess.run([sys.executable, "-c", HASHES, str(tree / "scripts")], capture_output=True, text=True,
                                env={**os.environ, "PYTHONPATH": str(tree)}, cwd=tree, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout)

    before = hashes()
    help_text = '"LoRA rank; at most 1024 (adapter memory grows linearly with it)."'
    assert original.count(help_text) == 1
    path.write_text(original.replace(help_text, '"The LoRA rank (reworded)."'))
    assert hashes() == before
    path.write_text(original.replace("lora_r: int = setting(16,", "lora_r: int = setting(32,"))
    after = hashes()
    assert after["finetune.py"] != before["finetune.py"]
