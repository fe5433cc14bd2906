"""The split: determinism, leakage, bad rows, every input format, the embedded demo set."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tunelens.data.data import split_dataset
from tunelens.data.demo_data import generate_demo_rows
from tunelens.errors import ConfigError, DataError
from tunelens.io import read_jsonl

FIELDS = {"instruction": "instruction", "input": "input", "output": "output"}


def make_rows(n: int) -> list[dict]:
    return [{"instruction": f"Task {i}", "input": f"x{i % 3}", "output": f"answer {i}"} for i in range(n)]


def run_split(tmp_path: Path, source: str, name: str = "ds", out: str = "out", **kwargs) -> dict:
    options = dict(fields=FIELDS, seed=1, test_size=0.2, max_train=None, hub_split="train")
    options.update(kwargs)
    target = tmp_path / out
    return split_dataset(source=source, name=name, train_path=target / "train.jsonl",
                         test_path=target / "test.jsonl", manifest_path=target / "manifest.json", **options)


def write_json(path: Path, rows) -> str:
    path.write_text(json.dumps(rows))
    return str(path)


def test_same_seed_same_bytes_whatever_the_input_order(tmp_path):
    rows = make_rows(50)
    a = write_json(tmp_path / "a.json", rows)
    b = write_json(tmp_path / "b.json", list(reversed(rows)))
    run_split(tmp_path, a, out="a")
    run_split(tmp_path, b, out="b")
    for name in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_other_seed_other_split(tmp_path):
    source = write_json(tmp_path / "a.json", make_rows(50))
    run_split(tmp_path, source, out="s1", seed=1)
    run_split(tmp_path, source, out="s2", seed=2)
    assert (tmp_path / "s1/test.jsonl").read_bytes() != (tmp_path / "s2/test.jsonl").read_bytes()


def test_test_size_fraction_count_and_train_cap(tmp_path):
    source = write_json(tmp_path / "a.json", make_rows(50))
    assert run_split(tmp_path, source, out="f", test_size=0.2)["counts"]["test"] == 10
    assert run_split(tmp_path, source, out="c", test_size=7)["counts"]["test"] == 7
    manifest = run_split(tmp_path, source, out="t", test_size=5, max_train=10)
    assert manifest["counts"]["train"] == 10


def test_test_size_leaving_nothing_to_train(tmp_path):
    source = write_json(tmp_path / "a.json", make_rows(5))
    with pytest.raises(DataError, match="nothing would be left for training"):
        run_split(tmp_path, source, test_size=5)


def test_duplicates_removed_and_no_test_prompt_in_train(tmp_path):
    rows = make_rows(40)
    rows += rows[:10]  # exact duplicates
    # Same instruction+input with other outputs: must never straddle the split.
    rows += [{"instruction": "Task 3", "input": "x0", "output": f"alternative {k}"} for k in range(5)]
    source = write_json(tmp_path / "a.json", rows)
    manifest = run_split(tmp_path, source, test_size=0.3)
    assert manifest["counts"]["dropped"]["duplicate"] == 10
    train = read_jsonl(tmp_path / "out/train.jsonl")
    test = read_jsonl(tmp_path / "out/test.jsonl")
    train_prompts = {(r["instruction"], r["input"]) for r in train}
    assert not train_prompts & {(r["instruction"], r["input"]) for r in test}
    assert len({r["id"] for r in train + test}) == len(train) + len(test)
    assert len(test) == len({(r["instruction"], r["input"]) for r in test})


def test_bad_rows_dropped_and_counted_by_reason(tmp_path):
    rows = make_rows(20) + [
        {"instruction": "", "input": "", "output": "x"},
        {"instruction": "   ", "input": "", "output": "x"},
        {"instruction": "no output", "input": ""},
        {"instruction": "null output", "input": "", "output": None},
        {"instruction": "empty output", "input": "", "output": ""},
        {"instruction": 5, "input": "", "output": "x"},
        {"instruction": "null input is fine", "input": None, "output": "x"},
    ]
    source = write_json(tmp_path / "a.json", rows)
    manifest = run_split(tmp_path, source)
    assert manifest["counts"]["dropped"] == {"empty_instruction": 2, "missing_output": 2, "empty_output": 1,
                                              "non_string_instruction": 1}
    assert manifest["counts"]["usable"] == 21
    assert manifest["counts"]["read"] == 27


def test_zero_usable_rows_is_an_error(tmp_path):
    source = write_json(tmp_path / "a.json", [{"instruction": "", "input": "", "output": "x"}] * 3)
    with pytest.raises(DataError, match="no usable rows"):
        run_split(tmp_path, source)


def test_missing_column_names_the_field(tmp_path):
    source = write_json(tmp_path / "a.json", [{"prompt": "a", "completion": "b"}] * 3)
    with pytest.raises(ConfigError, match=r"dataset.fields.instruction: column 'instruction'.*\['completion', 'prompt'\]"):
        run_split(tmp_path, source)


def test_field_mapping(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(10)]
    source = write_json(tmp_path / "a.json", rows)
    run_split(tmp_path, source, fields={"instruction": "prompt", "input": None, "output": "completion"}, test_size=2)
    test = read_jsonl(tmp_path / "out/test.jsonl")
    assert all(r["input"] == "" and r["instruction"].startswith("p") and r["output"].startswith("c") for r in test)


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_every_file_format_gives_the_same_split(tmp_path, suffix):
    rows = make_rows(30)
    path = tmp_path / f"data{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps({"data": rows}))
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".csv":
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    reference = write_json(tmp_path / "reference.json", rows)
    run_split(tmp_path, reference, out="ref")
    manifest = run_split(tmp_path, str(path), out="fmt")
    assert manifest["source"]["sha256"]
    assert (tmp_path / "fmt/test.jsonl").read_bytes() == (tmp_path / "ref/test.jsonl").read_bytes()


def test_malformed_jsonl_line_is_dropped_and_counted_or_an_error_naming_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [json.dumps(row) for row in make_rows(20)]
    rows.insert(3, '{"instruction": "c", "outp')
    path.write_text("\n".join(rows) + "\n")
    manifest = run_split(tmp_path, str(path))
    assert manifest["counts"]["dropped"]["malformed_json_line"] == 1
    assert manifest["counts"]["dropped_examples"]["malformed_json_line"] == ["line 4"]
    assert manifest["counts"]["read"] == 21 and manifest["counts"]["usable"] == 20
    with pytest.raises(DataError, match=r"data.jsonl, line 4: malformed json line"):
        run_split(tmp_path, str(path), out="strict", on_bad_rows="error")


def test_hub_source_fails_clearly_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(DataError, match="cannot load hub dataset 'no-such-org/no-such-dataset'"):
        run_split(tmp_path, "no-such-org/no-such-dataset")


def test_manifest_records_provenance(tmp_path):
    source = write_json(tmp_path / "a.json", make_rows(30))
    manifest = run_split(tmp_path, source)
    on_disk = json.loads((tmp_path / "out/manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["seed"] == 1 and manifest["source"]["kind"] == "local"
    assert len(manifest["sha256"]["test.jsonl"]) == 64
    assert manifest["counts"]["train"] + manifest["counts"]["test"] == 30


def test_demo_dataset_is_deterministic_and_varied(tmp_path):
    rows = generate_demo_rows()
    assert rows == generate_demo_rows()
    assert 300 <= len(rows) <= 600
    assert len({(r["instruction"], r["input"]) for r in rows}) == len(rows)
    families = {r["instruction"].split()[0] for r in rows}
    assert len(families) >= 8
    assert any(r["output"].startswith("def ") for r in rows)
    manifest = run_split(tmp_path, "embedded:demo", name="demo", test_size=24)
    assert manifest["counts"]["test"] == 24 and manifest["counts"]["dropped"] == {}


# ----------------------------------------------------------------------------------------- evaluation sets
def prepare_set(tmp_path: Path, source: str, train_path: Path, name: str = "extra", out: str = "eval", **kwargs):
    from tunelens.data.data import prepare_evaluation_set

    options = dict(fields=FIELDS, seed=1, max_rows=None, hub_split="test")
    options.update(kwargs)
    target = tmp_path / out
    return prepare_evaluation_set(name=name, source=source, train_path=train_path, test_path=target / "test.jsonl",
                                  manifest_path=target / "manifest.json", **options)


def split_for_eval(tmp_path: Path) -> tuple[Path, list[dict]]:
    run_split(tmp_path, write_json(tmp_path / "train_source.json", make_rows(40)), out="split")
    train_path = tmp_path / "split" / "train.jsonl"
    return train_path, read_jsonl(train_path)


def test_evaluation_set_drops_and_counts_rows_leaked_from_training(tmp_path):
    train_path, train = split_for_eval(tmp_path)
    test = read_jsonl(tmp_path / "split" / "test.jsonl")
    new = [{"instruction": f"New task {i}", "input": "", "output": f"new {i}"} for i in range(5)]
    leaked = [{**row, "output": "another answer"} for row in train[:3]]  # same instruction+input as training rows
    rows = [*new, *leaked, dict(test[0]), {"instruction": "New task 0", "input": "", "output": "second reference"},
            {"instruction": "", "input": "", "output": "x"}, dict(new[1])]
    manifest = prepare_set(tmp_path, write_json(tmp_path / "extra.json", rows), train_path)
    assert manifest["counts"] == {"read": 12, "usable": 10, "beyond_max_rows": 0, "test": 6,
                                  "dropped": {"duplicate": 1, "duplicate_prompt": 1, "empty_instruction": 1,
                                              "in_training_split": 3}}
    out = read_jsonl(tmp_path / "eval" / "test.jsonl")
    train_prompts = {(r["instruction"], r["input"]) for r in train}
    assert not {(r["instruction"], r["input"]) for r in out} & train_prompts
    # the training data's own test row is not training data: it stays
    assert (test[0]["instruction"], test[0]["input"]) in {(r["instruction"], r["input"]) for r in out}
    assert all(r["id"].startswith("extra-") for r in out)
    listed = manifest["dropped_rows"]["in_training_split"]
    assert sorted((r["instruction"], r["input"]) for r in listed) == sorted((r["instruction"], r["input"]) for r in leaked)
    assert manifest["source"]["sha256"] and manifest["sha256"]["test.jsonl"]
    assert manifest["training_split"]["rows"] == len(train)
    assert json.loads((tmp_path / "eval" / "manifest.json").read_text()) == manifest


def test_evaluation_set_is_input_order_independent_and_capped_by_a_seeded_sample(tmp_path):
    train_path, _ = split_for_eval(tmp_path)
    rows = [{"instruction": f"Other {i}", "input": "", "output": str(i)} for i in range(30)]
    prepare_set(tmp_path, write_json(tmp_path / "a.json", rows), train_path, out="a", max_rows=8)
    prepare_set(tmp_path, write_json(tmp_path / "b.json", rows[::-1]), train_path, out="b", max_rows=8)
    a, b = (tmp_path / "a" / "test.jsonl").read_bytes(), (tmp_path / "b" / "test.jsonl").read_bytes()
    assert a == b
    kept = read_jsonl(tmp_path / "a" / "test.jsonl")
    assert len(kept) == 8
    assert [r["instruction"] for r in kept] != [f"Other {i}" for i in range(8)]  # a sample, not the file's head
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["counts"]["beyond_max_rows"] == 22 and manifest["counts"]["test"] == 8


def test_evaluation_set_with_every_row_in_training_is_an_error(tmp_path):
    train_path, train = split_for_eval(tmp_path)
    with pytest.raises(DataError, match=r"evaluation set 'extra'.*no usable rows left after the leakage check"):
        prepare_set(tmp_path, write_json(tmp_path / "extra.json", train[:5]), train_path)
    assert not (tmp_path / "eval" / "test.jsonl").exists()


def test_evaluation_set_missing_column_names_the_set(tmp_path):
    train_path, _ = split_for_eval(tmp_path)
    source = write_json(tmp_path / "extra.json", [{"question": "q", "answer": "a"}])
    with pytest.raises(ConfigError, match=r"evaluation_sets\[name=extra\]\.fields\.instruction: column 'instruction'"):
        prepare_set(tmp_path, source, train_path)
    manifest = prepare_set(tmp_path, source, train_path,
                           fields={"instruction": "question", "input": None, "output": "answer"})
    assert manifest["counts"]["test"] == 1


def test_embedded_holdout_set_is_disjoint_from_the_demo_training_data(tmp_path):
    from tunelens.data.demo_data import generate_holdout_rows

    holdout = generate_holdout_rows()
    assert len(holdout) == 12 and generate_holdout_rows() == holdout
    demo = {(r["instruction"], r["input"]) for r in generate_demo_rows()}
    assert not demo & {(r["instruction"], r["input"]) for r in holdout}


def test_check_evaluation_sets_before_any_job_matches_the_job(tmp_path):
    """The DAG-time check computes the training split in memory exactly as rule `split` does."""
    from tunelens.config import load_config
    from tunelens.data.data import check_evaluation_sets

    source = write_json(tmp_path / "train_source.json", make_rows(40))
    run_split(tmp_path, source, name="ds", out="split")  # seed 1, test_size 0.2 as below
    train = read_jsonl(tmp_path / "split" / "train.jsonl")
    extra = write_json(tmp_path / "extra.json", [*train[:4], {"instruction": "fresh", "input": "", "output": "y"}])
    config = {"seed": 1, "dataset": {"name": "ds", "source": source, "test_size": 0.2},
              "evaluation_sets": [{"name": "extra", "source": extra}],
              "models": {"m": {"source": "embedded:smollm2-135m-instruct"}}}
    checked = check_evaluation_sets(load_config(config))
    job = prepare_set(tmp_path, extra, tmp_path / "split" / "train.jsonl", seed=1)
    assert checked["extra"] == job["counts"]
    assert checked["extra"]["dropped"] == {"in_training_split": 4}
    all_leaked = write_json(tmp_path / "leaked.json", train[:4])
    config["evaluation_sets"] = [{"name": "extra", "source": extra}, {"name": "leaky", "source": all_leaked}]
    with pytest.raises(DataError, match=r"evaluation set 'leaky'.*no usable rows left after the leakage check"):
        check_evaluation_sets(load_config(config))


# ----------------------------------------------------------------------------------------- encodings, columns
def test_utf8_with_bom_is_read_in_every_text_format(tmp_path):
    rows = make_rows(20)
    reference = run_split(tmp_path, write_json(tmp_path / "ref.json", rows), out="ref")
    bom = b"\xef\xbb\xbf"
    (tmp_path / "bom.json").write_bytes(bom + json.dumps(rows).encode())
    (tmp_path / "bom.jsonl").write_bytes(bom + "\n".join(json.dumps(r) for r in rows).encode())
    lines = ["instruction,input,output"] + [f"{r['instruction']},{r['input']},{r['output']}" for r in rows]
    (tmp_path / "bom.csv").write_bytes(bom + "\r\n".join(lines).encode())  # what Excel's "CSV UTF-8" writes
    for name in ("bom.json", "bom.jsonl", "bom.csv"):
        manifest = run_split(tmp_path, str(tmp_path / name), out="out-" + name)
        assert manifest["counts"]["dropped"] == {}, name
        assert (tmp_path / ("out-" + name) / "test.jsonl").read_bytes() == (tmp_path / "ref/test.jsonl").read_bytes(), name
    assert reference["counts"]["usable"] == 20


def test_non_utf8_file_names_path_line_and_byte_offset(tmp_path):
    path = tmp_path / "latin1.jsonl"
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in make_rows(3)) + '\n{"instruction": "caf\u00e9", "output": "x"}\n'
    path.write_bytes(text.encode("latin-1"))
    offset = text.encode("latin-1").index(b"\xe9")
    with pytest.raises(DataError, match=rf"latin1.jsonl: not UTF-8 at line 4, column 21 \(byte offset {offset}: 0xe9\)"):
        run_split(tmp_path, str(path))


def test_explicitly_mapped_input_column_must_exist(tmp_path):
    source = write_json(tmp_path / "a.json", [{"instruction": f"t{i}", "output": f"o{i}"} for i in range(20)])
    with pytest.raises(ConfigError, match=r"dataset.fields.input: column 'context' is not in"):
        run_split(tmp_path, source, fields={**FIELDS, "input": "context"}, required_fields=("instruction", "output", "input"))
    # The default mapping of input may find no column: every input is "", and the manifest says so.
    manifest = run_split(tmp_path, source, out="default")
    assert manifest["absent_columns"] == {"input": "input"}


def test_missing_field_rows_are_counted_or_an_error(tmp_path):
    rows = make_rows(20) + [{"instruction": "only an instruction", "input": ""}]
    source = write_json(tmp_path / "a.json", rows)
    assert run_split(tmp_path, source)["counts"]["dropped"] == {"missing_output": 1}
    with pytest.raises(DataError, match=r"row 21: missing output"):
        run_split(tmp_path, source, out="strict", on_bad_rows="error")
