"""Config validation: one test per class of bad value, each checking the message names key and value."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from conftest import apply_changes, gpu_study_standins
import yaml

from tunelens.config import DecodingConfig, load_config, resolve_layers, source_kind
from tunelens.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def base_config() -> dict:
    return {
        "dataset": {"name": "demo", "source": "embedded:demo"},
        "models": {"smollm2": {"source": "embedded:smollm2-135m-instruct"}},
    }


def with_changes(**changes) -> dict:
    return apply_changes(base_config(), changes)


def expect_error(config: dict, *fragments: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(config)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in error message: {message}"
    return message


def test_defaults_are_filled_from_the_schema():
    config = base_config()
    study = load_config(config)
    assert config["seed"] == 1234
    assert config["finetune"]["lora_r"] == 16
    assert config["dataset"]["fields"] == {"instruction": "instruction", "input": "input", "output": "output"}
    assert config["decoding"]["defaults"] == {"top_k": 50, "num_beams": 1, "temperature": 0.8, "top_p": 1.0,
                                              "repetition_penalty": 1.0}
    assert list(study.decoding) == ["top_k_50_num_beams_1_temp_0.8"]
    assert study.models["smollm2"].variants == ("base", "finetuned")
    assert study.models["smollm2"].probe_layers == [8, 15, 23, 30]


def test_unknown_top_level_key():
    expect_error({**base_config(), "finetuning": {}}, "unknown key(s) ['finetuning']")


def test_unknown_nested_key():
    expect_error(with_changes(decoding__defaults__temprature=0.5), "decoding.defaults", "temprature")


def test_wrong_type():
    expect_error(with_changes(finetune__lora_r="sixteen"), "finetune.lora_r", "'sixteen' is not of type 'integer'")


def test_negative_temperature():
    expect_error(with_changes(decoding__defaults__temperature=-0.1), "decoding.defaults.temperature", "-0.1")


def test_negative_temperature_in_sweep():
    expect_error(with_changes(decoding__sweep__temperature=[0.5, -1]), "decoding.sweep.temperature[1]", "-1")


def test_unknown_embedded_model():
    expect_error(with_changes(models={"m": {"source": "embedded:llama-9000"}}), "models.m.source", "llama-9000")


def test_missing_local_model_directory(tmp_path):
    missing = str(tmp_path / "no-such-model")
    expect_error(with_changes(models={"m": {"source": missing}}), "models.m.source", missing, "does not exist")


def test_local_directory_without_config(tmp_path):
    expect_error(with_changes(models={"m": {"source": str(tmp_path)}}), "models.m.source", "config.json")


def test_unknown_model_reference_in_judge():
    config = with_changes(scoring__judge__enabled=True)
    expect_error(config, "scoring.judge.model", "required")


def test_missing_dataset_file(tmp_path):
    missing = str(tmp_path / "train.jsonl")
    expect_error(with_changes(dataset__source=missing), "dataset.source", missing, "does not exist")


def test_dataset_file_with_unsupported_suffix(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("x")
    expect_error(with_changes(dataset__source=str(path)), "dataset.source", ".txt")


def test_fractional_test_size_above_one():
    expect_error(with_changes(dataset__test_size=2.5), "dataset.test_size", "2.5")


def test_layer_beyond_depth():
    expect_error(with_changes(probe__layers=[8, 32]), "smollm2", "32", "30 decoder layers")


def test_layer_beyond_depth_of_local_model(tiny_llama_dir):
    config = with_changes(models={"tiny": {"source": str(tiny_llama_dir)}}, probe__layers=[5])
    expect_error(config, "tiny", "5", "4 decoder layers")


def test_fractional_layers_need_depth_for_hub_models():
    config = with_changes(models={"llama": {"source": "NousResearch/Llama-2-7b-hf"}})
    expect_error(config, "models.llama.num_layers")
    config["models"]["llama"]["num_layers"] = 32
    assert load_config(config).models["llama"].probe_layers == [8, 16, 24, 32]


def test_unknown_per_model_finetune_key():
    config = with_changes(models={"m": {"source": "embedded:smollm2-135m-instruct", "finetune": {"rank": 8}}})
    expect_error(config, "models.m.finetune", "rank")


def test_bad_per_model_finetune_value():
    config = with_changes(models={"m": {"source": "embedded:smollm2-135m-instruct", "finetune": {"lora_r": 0}}})
    expect_error(config, "models.m.finetune.lora_r", "0")


def test_per_model_finetune_override_is_merged():
    config = with_changes(models={"m": {"source": "embedded:smollm2-135m-instruct", "finetune": {"lora_r": 4}}},
                          finetune={"lora_r": 32, "lora_alpha": 8})
    spec = load_config(config).models["m"]
    assert spec.finetune["lora_r"] == 4 and spec.finetune["lora_alpha"] == 8


def test_beam_sample_rejected_with_vllm():
    config = with_changes(decoding__sweep__num_beams=[2], decoding__beam_mode="beam_sample", generation__backend="vllm")
    expect_error(config, "num_beams=2", "beam_sample", "vLLM")


def test_list_mode_needs_configs():
    expect_error(with_changes(decoding__mode="list"), "decoding.configs")


def test_unknown_default_config_for_report():
    expect_error(with_changes(report__default_config="nope"), "report.default_config", "nope")


def test_bad_model_name():
    expect_error(with_changes(models={"my model": {"source": "embedded:smollm2-135m-instruct"}}), "my model")


def test_reserved_model_name():
    expect_error(with_changes(models={"bertscore": {"source": "embedded:smollm2-135m-instruct"}}), "bertscore", "reserved")


def test_empty_config():
    expect_error({}, "empty")


def test_sweep_expansion_one_at_a_time_matches_study():
    config = with_changes(decoding__sweep={"top_k": [10, 25, 40, 75], "num_beams": [2, 3, 5, 10],
                                           "temperature": [0.0, 0.25, 0.5, 1.0]})
    names = list(load_config(config).decoding)
    assert len(names) == 13
    assert names[0] == "top_k_50_num_beams_1_temp_0.8"
    assert "top_k_10_num_beams_1_temp_0.8" in names
    assert "top_k_50_num_beams_10_temp_0.8" in names
    assert "top_k_50_num_beams_1_temp_0.0" in names


def test_grid_and_list_modes():
    grid = with_changes(decoding__mode="grid", decoding__sweep={"top_k": [10, 20], "temperature": [0.0, 1.0]})
    assert len(load_config(grid).decoding) == 5  # defaults + 2x2
    listed = with_changes(decoding__mode="list", decoding__configs=[{"temperature": 0.0}, {"name": "wide", "top_k": 100}])
    study = load_config(listed)
    assert list(study.decoding) == ["top_k_50_num_beams_1_temp_0.0", "wide"]
    assert study.decoding["wide"].top_k == 100 and study.decoding["wide"].temperature == 0.8


def test_canonical_names():
    assert DecodingConfig().name == "top_k_50_num_beams_1_temp_0.8"
    assert DecodingConfig(temperature=0).name == "top_k_50_num_beams_1_temp_0.0"
    assert DecodingConfig(top_p=0.9, repetition_penalty=1.1).name == "top_k_50_num_beams_1_temp_0.8_top_p_0.9_rep_1.1"


@pytest.mark.parametrize("layers, depth, expected", [
    ([0.25, 0.5, 0.75, 1.0], 32, [8, 16, 24, 32]),
    ([0.25, 0.5, 0.75, 1.0], 30, [8, 15, 23, 30]),
    ([0.25, 0.5, 0.75, 1.0], 18, [5, 9, 14, 18]),
    ([0.01], 18, [1]),
    ([8, 16, 0.5], 32, [8, 16]),
])
def test_resolve_layers(layers, depth, expected):
    assert resolve_layers(layers, depth, "m") == expected


def test_source_kind(tmp_path):
    assert source_kind("embedded:demo") == "embedded"
    assert source_kind("tatsu-lab/alpaca") == "hub"
    assert source_kind("./data/x.jsonl") == "local"
    assert source_kind(str(tmp_path)) == "local"


@pytest.mark.parametrize("path", ["config.yaml", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*.yaml"))])
def test_shipped_configs_are_valid(path, tmp_path, monkeypatch):
    config = yaml.safe_load((ROOT / path).read_text())
    if path.endswith("gpu-study.yaml"):
        # Its model and rows are written by bench/bench_gpu_study.py beside the checkout: stand-ins here, read
        # from the working directory as Snakemake would.
        monkeypatch.chdir(gpu_study_standins(tmp_path))
    study = load_config(copy.deepcopy(config))
    assert study.models and study.decoding


def test_alpaca_preset_is_the_study_design():
    study = load_config(yaml.safe_load((ROOT / "configs/alpaca-7b.yaml").read_text()))
    assert len(study.decoding) == 13
    assert set(study.models) == {"llama2-7b", "mistral-7b", "phi-2"}
    assert all(spec.probe_layers == [8, 16, 24, 32] for spec in study.models.values())
    humaneval = study.evaluation_sets["humaneval"]
    assert (humaneval.source_kind, humaneval.kind, humaneval.hub_split) == ("hub", "code", "test")


@pytest.mark.parametrize("preset", ["configs/alpaca-7b.yaml", "configs/gpu-study.yaml"])
def test_7b_presets_pack_rows(preset, tmp_path, monkeypatch):
    """On GPUs packing is the recommended setting (issue 24: no padding, 2.6-2.7x the tokens/s on an H200 with
    the rows kept apart); the 7B presets turn it on for every model."""
    if preset.endswith("gpu-study.yaml"):
        monkeypatch.chdir(gpu_study_standins(tmp_path))
    study = load_config(yaml.safe_load((ROOT / preset).read_text()))
    assert all(spec.finetune["packing"] for spec in study.models.values())


# ----------------------------------------------------------------------------------------- evaluation sets
def eval_set_file(tmp_path: Path, name: str = "extra.jsonl") -> str:
    path = tmp_path / name
    path.write_text('{"instruction": "a", "input": "", "output": "b"}\n')
    return str(path)


def test_evaluation_sets_default_to_none_and_fill_their_defaults(tmp_path):
    assert load_config(base_config()).evaluation_sets == {}
    source = eval_set_file(tmp_path)
    config = with_changes(evaluation_sets=[{"name": "extra", "source": source}, {"name": "held", "source": "embedded:demo-holdout", "kind": "code"}])
    study = load_config(config)
    assert list(study.evaluation_sets) == ["extra", "held"]
    extra = study.evaluation_sets["extra"]
    assert (extra.source_kind, extra.kind, extra.max_rows, extra.hub_split) == ("local", "text", None, "test")
    assert extra.fields == {"instruction": "instruction", "input": "input", "output": "output"}
    assert study.evaluation_sets["held"].source_kind == "embedded"


def test_duplicate_evaluation_set_name(tmp_path):
    source = eval_set_file(tmp_path)
    expect_error(with_changes(evaluation_sets=[{"name": "extra", "source": source}, {"name": "extra", "source": source}]),
                 "evaluation_sets[1].name", "duplicate", "'extra'", "evaluation_sets[0]")


def test_evaluation_set_named_like_the_dataset(tmp_path):
    expect_error(with_changes(evaluation_sets=[{"name": "demo", "source": eval_set_file(tmp_path)}]),
                 "evaluation_sets[0].name", "'demo'", "dataset.name")


def test_missing_evaluation_set_file(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    expect_error(with_changes(evaluation_sets=[{"name": "extra", "source": missing}]),
                 "evaluation_sets[0].source", missing, "does not exist")


def test_evaluation_set_bad_suffix_unknown_embedded_and_bad_name(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text("x")
    expect_error(with_changes(evaluation_sets=[{"name": "x", "source": str(path)}]), "evaluation_sets[0].source", ".txt")
    expect_error(with_changes(evaluation_sets=[{"name": "x", "source": "embedded:nope"}]),
                 "evaluation_sets[0].source", "unknown embedded dataset 'nope'")
    expect_error(with_changes(evaluation_sets=[{"name": "a/b", "source": "embedded:demo-holdout"}]),
                 "evaluation_sets[0].name")


def test_lora_rank_above_vllm_max_lora_rank_fails_at_load_not_after_training():
    expect_error(with_changes(finetune__lora_r=128, generation__vllm_max_lora_rank=64),
                 "models.smollm2", "lora_r=128", "vllm_max_lora_rank=64", "backend: hf")
    per_model = with_changes(models={"m": {"source": "embedded:smollm2-135m-instruct", "finetune": {"lora_r": 32}}},
                             generation={"backend": "vllm", "vllm_max_lora_rank": 16})
    expect_error(per_model, "models.m", "lora_r=32")
    load_config(with_changes(finetune__lora_r=128, generation__vllm_max_lora_rank=128))
    load_config(with_changes(finetune__lora_r=128, generation__backend="hf"))  # hf has no such limit
    load_config(with_changes(finetune__lora_r=128, finetune__enabled=False))  # no adapter at all


def test_every_schema_key_has_a_description():
    from tunelens.config import _load_schema

    missing = []

    def walk(node, path):
        for key, value in (node.get("properties") or {}).items():
            where = f"{path}.{key}" if path else key
            if not isinstance(value, dict) or not value.get("description"):
                missing.append(where)
            if isinstance(value, dict):
                walk(value, where)
                if isinstance(value.get("items"), dict):
                    walk(value["items"], where + "[]")

    schema = _load_schema()
    walk(schema, "")
    for name, definition in schema["$defs"].items():
        walk(definition, f"$defs.{name}")
    assert not missing, f"schema keys without a description: {missing}"
