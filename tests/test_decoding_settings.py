"""A decoding parameter is one DecodingConfig field plus one line in each backend mapping (tunelens/generation/decoding.py).

The test adds `min_p` exactly that way, to a copy of the package, and follows it through the stages: the config
schema accepts it in `decoding.sweep` (type, default and description from the field), the canonical names carry
it, the hf GenerationConfig and the vLLM SamplingParams arguments get it, the generation sidecar records it, and
the report's sweep table has a column for it. Any other place that lists the decoding parameters by hand
would miss the new one, and this test would fail there.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from conftest import run_on_package_copy

from tunelens.generation.decoding import DecodingConfig, knob_names

REPO = Path(__file__).resolve().parents[1]

NEW_FIELD = '''
    min_p: float = knob(0.0, "Sampling: drop tokens below min_p times the top token's probability; 0 = off.",
                        schema={"type": "number", "minimum": 0, "maximum": 1}, tag="min_p")
'''
ANCHOR_FIELD = '        schema={"type": "number", "exclusiveMinimum": 0}, tag="rep")\n'
ANCHOR_MAPPING = '        "repetition_penalty": dc.repetition_penalty,\n'


def add_min_p(package: Path) -> None:
    """The whole change a contributor makes for a new decoding parameter."""
    source = (package / "generation" / "decoding.py").read_text()
    assert source.count(ANCHOR_FIELD) == 1 and source.count(ANCHOR_MAPPING) == 2, "decoding.py changed shape"
    source = source.replace(ANCHOR_FIELD, ANCHOR_FIELD + NEW_FIELD)
    hf, vllm = source.split("def vllm_sampling_kwargs")
    hf = hf.replace(ANCHOR_MAPPING, ANCHOR_MAPPING + '        "min_p": (dc.min_p or None) if sample else None,\n')
    vllm = vllm.replace(ANCHOR_MAPPING, ANCHOR_MAPPING + '        "min_p": 0.0 if greedy else dc.min_p,\n')
    (package / "generation" / "decoding.py").write_text(hf + "def vllm_sampling_kwargs" + vllm)


SCRIPT = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    from tunelens.config import load_config, _load_schema
    from tunelens.generation.decoding import DecodingConfig, hf_generation_kwargs, vllm_sampling_kwargs
    from tunelens.generation.generate import generate, hf_generation_config
    from tunelens.models import load_model
    from tunelens.report import ReportSettings, write_report
    from tunelens.scoring.score import score_generation_file

    tiny, work = sys.argv[1], Path(sys.argv[2])
    import tunelens
    out = {"package": tunelens.__file__}
    sweep = _load_schema()["properties"]["decoding"]["properties"]["sweep"]["properties"]
    out["sweep_schema"] = sweep.get("min_p")
    study = load_config({"dataset": {"name": "demo", "source": "embedded:demo"},
                         "models": {"smollm2": {"source": "embedded:smollm2-135m-instruct"}},
                         "decoding": {"sweep": {"min_p": [0.3]}}})
    out["names"] = list(study.decoding)
    configs = {name: dc.as_dict() for name, dc in study.decoding.items()}
    swept = study.decoding[out["names"][1]]
    out["hf_kwargs"] = hf_generation_kwargs(swept, sample=True)["min_p"]
    out["vllm_kwargs"] = vllm_sampling_kwargs(swept, greedy=False)["min_p"]
    model, tokenizer = load_model(tiny, device="cpu")

    class Settings:
        beam_mode, max_new_tokens, stop = "beam_search", 4, ()
    out["hf_generation_config"] = hf_generation_config(model, tokenizer, swept, Settings).min_p

    score_files = []
    for name, values in configs.items():
        meta = generate(work / "test.jsonl", work / f"{name}.jsonl", model_name="tiny", model_path=tiny,
                        decoding_config=values, max_new_tokens=4, seed=7, backend="hf", batch_size=2,
                        device="cpu")
        out.setdefault("sidecar", {})[name] = meta["decoding_config"]
        score_generation_file(work / f"{name}.jsonl", work / f"{name}.score.json", work / f"{name}.rows.csv",
                              metrics=["exact_match", "length"], context={"dataset_kind": "text"}, samples=100)
        score_files.append(work / f"{name}.score.json")
    write_report(score_files=score_files, summary_md=work / "summary.md", summary_csv=work / "summary.csv",
                 summary_html=work / "summary.html", plots_dir=work / "plots",
                 settings=ReportSettings(decoding_configs={n: {k: v for k, v in c.items() if k != "name"}
                                                           for n, c in configs.items()},
                                         default_config=out["names"][0], bootstrap_samples=100))
    print(json.dumps(out))
''')


def test_builtin_parameters_are_the_dataclass_fields():
    assert knob_names() == ("top_k", "num_beams", "temperature", "top_p", "repetition_penalty")
    # names unchanged by deriving them from the fields
    assert DecodingConfig().name == "top_k_50_num_beams_1_temp_0.8"
    assert DecodingConfig(temperature=1, top_p=0.9, repetition_penalty=1.2).name == (
        "top_k_50_num_beams_1_temp_1.0_top_p_0.9_rep_1.2")


@pytest.mark.slow
def test_new_decoding_parameter_reaches_schema_backends_sidecar_and_sweep_table(tiny_llama_dir, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    rows = [{"id": f"t-{i}", "instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(3)]
    (work / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    out, package = run_on_package_copy(tmp_path, add_min_p, SCRIPT, str(tiny_llama_dir), str(work), cwd=work)
    assert out["package"] == str(package / "__init__.py")  # the changed copy ran, not the checkout

    assert out["sweep_schema"]["items"] == {"type": "number", "minimum": 0, "maximum": 1}
    default_name, swept_name = out["names"]
    assert default_name == "top_k_50_num_beams_1_temp_0.8"  # a parameter at its default does not rename files
    assert swept_name == "top_k_50_num_beams_1_temp_0.8_min_p_0.3"
    assert out["hf_kwargs"] == out["vllm_kwargs"] == out["hf_generation_config"] == 0.3
    assert out["sidecar"][swept_name]["min_p"] == 0.3 and out["sidecar"][default_name]["min_p"] == 0.0
    decoding_section = (work / "summary.md").read_text().split("## 2.")[1].split("## 3.")[0]
    header = next(line for line in decoding_section.splitlines() if line.startswith("| Config"))
    assert [c.strip() for c in header.strip("|").split("|")][:2] == ["Config", "min_p"]
    row = next(line for line in decoding_section.splitlines() if line.startswith(f"| {swept_name}"))
    assert [c.strip() for c in row.strip("|").split("|")][1] == "0.3"


def test_generation_settings_seed_default_is_the_configs():
    """GenerationSettings writes the config's top-level seed default as a literal (referring to ConfigSection would
    make every config section code of every generation job): the two stay equal."""
    from tunelens.generation.completions import GenerationSettings
    from tunelens.settings import ConfigSection
    from tunelens.settings.base import default_of

    assert GenerationSettings().seed == default_of(ConfigSection, "seed")
