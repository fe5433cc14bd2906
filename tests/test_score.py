"""Scoring: every metric against its reference library on known pairs, bootstrap CIs, the score-file
pipeline, perplexity and the judge on tiny random models."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from tunelens.errors import ConfigError, DataError
from tunelens.scoring.codebleu_stats import codebleu_components
from tunelens.scoring.metrics import METRICS, BertScoreSettings, ScoringContext
from tunelens.scoring.score import paired_rows, read_rows_csv, score_generation_file
from tunelens.scoring.statistics import bootstrap_ci, bootstrap_distribution, paired_bootstrap, resample_counts

TEXT = ScoringContext(dataset_kind="text")
CODE = ScoringContext(dataset_kind="code", code_language="python")

# (generated, reference) pairs covering the cases the issue names.
PAIRS = {
    "identical": ("The cat sat on the mat today.", "The cat sat on the mat today."),
    "disjoint": ("zebra quantum violin", "The cat sat on the mat today."),
    "partial": ("The cat sat on a red mat.", "The cat sat on the mat today."),
    "empty": ("", "The cat sat on the mat today."),
    "unicode": ("Größe: 5 € für naïve Kunden — ok", "Größe: 5 € für naïve Käufer — ok"),
}
PY_REF = "def add(a, b):\n    total = a + b\n    return total\n"
PY_PAIRS = [
    (PY_REF, PY_REF),
    ("def add(x, y):\n    s = x + y\n    return s\n", PY_REF),
    ("def mul(a, b):\n    # multiply\n    return a * b\n", PY_REF),
    ("", "def square(n):\n    result = n * n\n    return result\n"),
    ("for i in range(3):\n    print(i)\n", "for k in range(10):\n    if k % 2:\n        print(k)\n"),
    ("import os\nprint(os.getcwd())", "x = [i * 2 for i in range(5)]\ny = sum(x)\nprint(y)\n"),
]


def run(name, pairs, context=TEXT, rows=None):
    generated = [g for g, _ in pairs]
    references = [r for _, r in pairs]
    rows = rows or [{"num_generated_tokens": len(g.split())} for g in generated]
    return METRICS[name].compute(generated, references, rows, context)


# --------------------------------------------------------------------------------------------- BLEU
def test_bleu_matches_sacrebleu_per_row_and_corpus():
    import sacrebleu

    pairs = list(PAIRS.values())
    result = run("bleu", pairs)
    for (hyp, ref), value in zip(pairs, result.per_row):
        assert value == pytest.approx(sacrebleu.sentence_bleu(hyp, [ref]).score, abs=1e-12)
    assert result.value == pytest.approx(
        sacrebleu.corpus_bleu([h for h, _ in pairs], [[r for _, r in pairs]]).score, abs=1e-12
    )
    assert result.scale == "0-100"
    # The per-row statistics reduce to the corpus value, also on a subset (what the bootstrap relies on).
    assert result.reduce(result.stats.sum(axis=0)) == pytest.approx(result.value, abs=1e-12)
    subset = [0, 2, 2, 4]
    expected = sacrebleu.corpus_bleu([pairs[i][0] for i in subset], [[pairs[i][1] for i in subset]]).score
    assert result.reduce(result.stats[subset].sum(axis=0)) == pytest.approx(expected, abs=1e-12)


def test_bleu_identical_is_100_and_empty_or_unrelated_is_exactly_zero():
    result = run("bleu", [PAIRS["identical"], PAIRS["disjoint"], PAIRS["empty"]])
    assert result.per_row.tolist() == pytest.approx([100.0, 0.0, 0.0], abs=1e-9)
    assert result.per_row[1] == 0.0 and result.per_row[2] == 0.0  # exactly, not a smoothed epsilon
    # A corpus of empty or unrelated outputs: 0, not a smoothed 0.5 (the study's "BLEU 0.50 every layer").
    gibberish = [("zebra quantum violin", PAIRS["identical"][1]), ("", "Another reference sentence here.")]
    assert run("bleu", gibberish).value == 0.0
    assert run("bleu", [PAIRS["identical"]] * 3).value == pytest.approx(100.0)


# --------------------------------------------------------------------------------------------- ROUGE-L
def test_rouge_l_matches_rouge_score_with_stemming():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    pairs = list(PAIRS.values()) + [("The cats were sitting", "the cat sits")]
    result = run("rougeL", pairs)
    expected = [scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in pairs]
    assert result.per_row.tolist() == pytest.approx(expected, abs=1e-12)
    assert result.per_row[0] == 1.0 and result.per_row[1] == 0.0 and result.per_row[3] == 0.0
    assert 0 < result.per_row[2] < 1
    # Stemming: "cats"/"cat", "sitting"/"sits" count as matches.
    assert result.per_row[-1] > scorer.score("the cat sits", "The dogs were lying")["rougeL"].fmeasure
    assert result.value == pytest.approx(np.mean(expected))


# --------------------------------------------------------------------------------------------- simple
def test_exact_match_and_length():
    pairs = [("  answer\n", "answer"), ("Answer", "answer"), ("", "")]
    rows = [{"num_generated_tokens": n} for n in (3, 1, 0)]
    assert run("exact_match", pairs).per_row.tolist() == [1.0, 0.0, 1.0]
    length = run("length", pairs, rows=rows)
    assert length.per_row.tolist() == [3.0, 1.0, 0.0] and length.value == pytest.approx(4 / 3)


# --------------------------------------------------------------------------------------------- CodeBLEU
def test_codebleu_on_python_matches_calc_codebleu():
    from codebleu import calc_codebleu

    result = run("codebleu", PY_PAIRS, CODE)
    references = [r for _, r in PY_PAIRS]
    generated = [g for g, _ in PY_PAIRS]
    library = calc_codebleu(references, generated, "python")
    assert result.value == pytest.approx(library["codebleu"], abs=1e-12)
    for key, value in result.details["components"].items():
        assert value == pytest.approx(library[key], abs=1e-12)
    for (hyp, ref), value in zip(PY_PAIRS, result.per_row):
        assert value == pytest.approx(calc_codebleu([ref], [hyp], "python")["codebleu"], abs=1e-12)
    assert result.per_row[0] == pytest.approx(1.0)
    assert result.per_row[1] < 1.0 and result.per_row[2] < result.per_row[1]
    # Resampled corpora (with repeats), as the bootstrap builds them.
    for subset in ([0, 0, 3], [1, 2, 4, 5, 5], [3]):
        expected = calc_codebleu([references[i] for i in subset], [generated[i] for i in subset], "python")
        assert result.reduce(result.stats[subset].sum(axis=0)) == pytest.approx(expected["codebleu"], abs=1e-12)


def test_codebleu_on_real_python_is_between_the_extremes(tmp_path):
    """A non-trivial Python corpus (not only identical/empty pairs) gives a value strictly inside (0, 1)."""
    references = [PY_REF, "class Stack:\n    def __init__(self):\n        self.items = []\n\n"
                  "    def push(self, item):\n        self.items.append(item)\n"]
    generated = ["def add(a, b):\n    return a + b\n", "class Stack:\n    def __init__(self):\n"
                 "        self.data = []\n\n    def push(self, x):\n        self.data.append(x)\n"]
    value = run("codebleu", list(zip(generated, references)), CODE).value
    assert 0.3 < value < 1.0


def test_codebleu_skipped_not_zero_for_text_datasets(tmp_path):
    gen = write_generation_file(tmp_path / "g.jsonl", [PAIRS["partial"], PAIRS["identical"]])
    summary = score_generation_file(gen, tmp_path / "s.json", tmp_path / "s.rows.csv",
                                    metrics=["bleu", "codebleu"], context=TEXT, samples=200, seed=1)
    assert "codebleu" not in summary["metrics"]
    assert "text" in summary["skipped"]["codebleu"]
    assert "codebleu" not in (tmp_path / "s.rows.csv").read_text().splitlines()[0]


def test_codebleu_components_dataflow_quirk_is_the_librarys():
    """codebleu counts a dataflow score of 0 as 1 (`or 1`); kept so values match the library."""
    from codebleu import calc_codebleu

    sums = np.zeros(23)
    sums[[4, 5, 6, 7, 12, 13, 14, 15]] = 1  # denominators
    sums[19], sums[21] = 3, 2  # syntax total, dataflow total; no matches anywhere
    assert codebleu_components(sums)["codebleu"] == pytest.approx(0.25)
    assert calc_codebleu(["x = 1\ny = x"], [""], "python")["codebleu"] == pytest.approx(0.25)


def test_unknown_code_language_fails_clearly():
    with pytest.raises(ConfigError, match="code_language"):
        run("codebleu", PY_PAIRS[:1], ScoringContext(dataset_kind="code", code_language="cobol"))


# --------------------------------------------------------------------------------------------- BERTScore
@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory):
    from tunelens.models import materialize_embedded

    return materialize_embedded("all-minilm-l6-v2", tmp_path_factory.mktemp("minilm") / "bertscore")


def test_bertscore_matches_bert_score_called_directly(minilm_dir):
    import bert_score

    pairs = [PAIRS["identical"], PAIRS["partial"], PAIRS["disjoint"], PAIRS["unicode"]]
    context = ScoringContext(bertscore=BertScoreSettings(model=str(minilm_dir), num_layers=6, batch_size=2),
                             device="cpu")
    result = run("bertscore", pairs, context)
    _, _, f1 = bert_score.score([g for g, _ in pairs], [r for _, r in pairs], model_type=str(minilm_dir),
                                num_layers=6, device="cpu")
    assert result.per_row.tolist() == pytest.approx(f1.tolist(), abs=1e-6)
    assert result.per_row[0] == pytest.approx(1.0, abs=1e-5)
    assert result.per_row[1] > result.per_row[2]
    assert result.details["rescaled"] is False and result.details["num_layers"] == 6


def test_bertscore_empty_output_scores_zero(minilm_dir):
    """bert-score defines an empty candidate's raw F1 as 0 (its own empty path crashes on transformers 5)."""
    import bert_score

    pairs = [PAIRS["partial"], PAIRS["empty"], ("   ", "Some reference."), PAIRS["identical"]]
    context = ScoringContext(bertscore=BertScoreSettings(model=str(minilm_dir), num_layers=6), device="cpu")
    result = run("bertscore", pairs, context)
    assert result.per_row[1] == 0.0 and result.per_row[2] == 0.0
    _, _, f1 = bert_score.score([PAIRS["partial"][0], PAIRS["identical"][0]], [PAIRS["partial"][1], PAIRS["identical"][1]],
                                model_type=str(minilm_dir), num_layers=6, device="cpu")
    assert [result.per_row[0], result.per_row[3]] == pytest.approx(f1.tolist(), abs=1e-6)
    assert result.details["empty_pairs"] == 2


def test_bertscore_rescaling_needs_a_baseline_file(minilm_dir):
    settings = BertScoreSettings(model=str(minilm_dir), num_layers=6, rescale_with_baseline=True)
    with pytest.raises(ConfigError, match="baseline_path"):
        run("bertscore", [PAIRS["partial"]], ScoringContext(bertscore=settings, device="cpu"))


def test_bertscore_local_model_needs_num_layers(minilm_dir):
    settings = BertScoreSettings(model=str(minilm_dir), num_layers=None)
    with pytest.raises(ConfigError, match="num_layers"):
        run("bertscore", [PAIRS["partial"]], ScoringContext(bertscore=settings, device="cpu"))


def test_bertscore_rescaled_with_a_baseline_file(minilm_dir, tmp_path):
    import bert_score

    baseline = tmp_path / "baseline.csv"
    baseline.write_text("LAYER,P,R,F\n" + "".join(f"{layer},0.2,0.2,0.3\n" for layer in range(7)))
    pairs = [PAIRS["partial"], PAIRS["disjoint"]]
    settings = BertScoreSettings(model=str(minilm_dir), num_layers=6, rescale_with_baseline=True,
                                 baseline_path=str(baseline))
    result = run("bertscore", pairs + [PAIRS["empty"]], ScoringContext(bertscore=settings, device="cpu"))
    _, _, raw = bert_score.score([g for g, _ in pairs], [r for _, r in pairs], model_type=str(minilm_dir),
                                 num_layers=6, device="cpu")
    assert result.per_row.tolist() == pytest.approx(((raw - 0.3) / 0.7).tolist() + [-0.3 / 0.7], abs=1e-6)


# --------------------------------------------------------------------------------------------- bootstrap
def test_bootstrap_is_seeded_and_reproducible():
    values = np.linspace(0, 1, 25) ** 2
    first = bootstrap_ci(values, samples=500, seed=7)
    assert first == bootstrap_ci(values, samples=500, seed=7)
    assert first != bootstrap_ci(values, samples=500, seed=8)
    assert first["ci_low"] < first["value"] < first["ci_high"]
    assert first["value"] == pytest.approx(values.mean())
    # A wider confidence gives a wider interval on the same resamples.
    wide = bootstrap_ci(values, samples=500, seed=7, confidence=0.99)
    assert wide["ci_low"] <= first["ci_low"] and wide["ci_high"] >= first["ci_high"]


def test_bootstrap_degenerate_all_rows_equal():
    ci = bootstrap_ci(np.full(20, 0.3), samples=300, seed=1)
    assert ci["value"] == pytest.approx(0.3) and ci["ci_low"] == pytest.approx(0.3) and ci["ci_high"] == pytest.approx(0.3)
    one_row = bootstrap_ci([42.0], samples=100, seed=1)
    assert one_row["ci_low"] == one_row["ci_high"] == 42.0


def test_resample_counts_are_with_replacement_over_rows():
    counts = resample_counts(10, 200, seed=3)
    assert counts.shape == (200, 10) and (counts.sum(axis=1) == 10).all()
    assert (counts > 1).any()  # rows repeat in some resample
    # Each row is drawn about once per resample on average.
    assert counts.mean(axis=0) == pytest.approx(np.ones(10), abs=0.25)


def test_bleu_bootstrap_from_statistics_equals_recomputed_corpus_bleu():
    import sacrebleu

    pairs = list(PAIRS.values()) * 2
    result = run("bleu", pairs)
    counts = resample_counts(len(pairs), 5, seed=11)
    fast = bootstrap_distribution(stats=result.stats, reduce=result.reduce, counts=counts)
    for row_counts, value in zip(counts, fast):
        index = np.repeat(np.arange(len(pairs)), row_counts.astype(int))
        slow = sacrebleu.corpus_bleu([pairs[i][0] for i in index], [[pairs[i][1] for i in index]]).score
        assert value == pytest.approx(slow, abs=1e-9)


def test_paired_bootstrap():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1, 40)
    same = paired_bootstrap(a, a, samples=300, seed=2)
    assert same["diff"] == 0.0 and same["ci_low"] == 0.0 and same["ci_high"] == 0.0 and same["p_value"] == 1.0
    better = paired_bootstrap(a + 0.2 + rng.normal(0, 0.01, 40), a, samples=300, seed=2)
    assert better["diff"] == pytest.approx(0.2, abs=0.01)
    assert better["ci_low"] > 0 and better["p_value"] < 0.01
    with pytest.raises(ValueError):
        paired_bootstrap(a, a[:-1])


# --------------------------------------------------------------------------------------------- pipeline
def write_generation_file(path: Path, pairs, meta_extra=None, tokens=None) -> Path:
    rows = [
        {"id": f"demo-{i:03d}", "prompt": f"Q{i}", "reference": ref, "generated": gen,
         "num_generated_tokens": tokens[i] if tokens else len(gen.split()), "finish_reason": "stop"}
        for i, (gen, ref) in enumerate(pairs)
    ]
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    meta = {"backend": "hf", "model": {"name": "tiny", "source": "embedded:x", "path": "results/models/tiny"},
            "variant": "base", "adapter": None, "decoding_config": {"name": "top_k_50_num_beams_1_temp_0.8"},
            "seed": 1234, "n_rows": len(rows), **(meta_extra or {})}
    path.with_name(path.name.replace(".jsonl", ".meta.json")).write_text(json.dumps(meta))
    return path


def test_score_file_format_and_rows(tmp_path):
    pairs = list(PAIRS.values())
    gen = write_generation_file(tmp_path / "cfg.jsonl", pairs, tokens=[7, 3, 6, 0, 9])
    out, rows_csv = tmp_path / "cfg.json", tmp_path / "cfg.rows.csv"
    summary = score_generation_file(gen, out, rows_csv, metrics=["bleu", "rougeL", "exact_match", "length"],
                                    context=TEXT, samples=300, seed=5, layer=None)
    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["model"] == "tiny" and on_disk["variant"] == "base"
    assert on_disk["config"] == "top_k_50_num_beams_1_temp_0.8" and on_disk["layer"] is None and on_disk["n"] == 5
    assert on_disk["source"]["seed"] == 1234 and "sacrebleu" in on_disk["versions"]
    assert on_disk["bootstrap"]["samples"] == 300 and on_disk["bootstrap"]["seed"] == 5
    bleu = on_disk["metrics"]["bleu"]
    assert bleu["scale"] == "0-100" and bleu["n"] == 5
    assert bleu["ci_low"] <= bleu["value"] <= bleu["ci_high"]
    assert on_disk["metrics"]["length"]["value"] == pytest.approx(5.0)
    assert on_disk["metrics"]["exact_match"]["value"] == pytest.approx(0.2)
    with rows_csv.open() as handle:
        table = list(csv.DictReader(handle))
    # Metric columns, then corpus BLEU's per-row sufficient statistics (what the report's paired corpus
    # differences resample), equal to sacrebleu's own counts of each row.
    from sacrebleu.metrics.bleu import BLEU

    from tunelens.scoring.metrics import BLEU_STATS, bleu_corpus_value

    assert list(table[0]) == ["id", "bleu", "rougeL", "exact_match", "length", *BLEU_STATS]
    for row, (generated, reference) in zip(table, pairs):
        own = BLEU(effective_order=True).sentence_score(generated, [reference])
        assert [float(row[c]) for c in BLEU_STATS] == [own.sys_len, own.ref_len, *own.counts, *own.totals]
    sums = np.asarray([[float(row[c]) for c in BLEU_STATS] for row in table]).sum(axis=0)
    assert bleu_corpus_value(sums) == pytest.approx(
        BLEU().corpus_score([g for g, _ in pairs], [[r for _, r in pairs]]).score, abs=1e-9)
    assert [row["id"] for row in table] == [f"demo-{i:03d}" for i in range(5)]
    assert float(table[0]["bleu"]) == pytest.approx(100.0) and float(table[3]["bleu"]) == 0.0
    assert read_rows_csv(rows_csv)["demo-002"]["length"] == 6.0
    # Same inputs, same seed: byte-identical CI numbers.
    again = score_generation_file(gen, tmp_path / "b.json", tmp_path / "b.rows.csv",
                                  metrics=["bleu", "rougeL", "exact_match", "length"], context=TEXT, samples=300, seed=5)
    assert again["metrics"] == summary["metrics"]


def test_paired_rows_match_by_id(tmp_path):
    a = write_generation_file(tmp_path / "a.jsonl", [PAIRS["identical"], PAIRS["partial"], PAIRS["empty"]])
    b = write_generation_file(tmp_path / "b.jsonl", [PAIRS["empty"], PAIRS["partial"], PAIRS["identical"]])
    for name in ("a", "b"):
        score_generation_file(tmp_path / f"{name}.jsonl", tmp_path / f"{name}.json", tmp_path / f"{name}.rows.csv",
                              metrics=["exact_match"], context=TEXT, samples=100)
    left, right, ids = paired_rows(tmp_path / "a.rows.csv", tmp_path / "b.rows.csv", "exact_match")
    assert ids == ["demo-000", "demo-001", "demo-002"]
    assert left.tolist() == [1.0, 0.0, 0.0] and right.tolist() == [0.0, 0.0, 1.0]
    assert a.exists() and b.exists()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda lines: lines[:1] + ['{"id": "demo-001", "prompt": "Q1", "reference": "x", "gen'], "line 2: not valid JSON"),
        (lambda lines: [lines[0], json.dumps({k: v for k, v in json.loads(lines[1]).items() if k != "generated"})],
         r"line 2: missing field\(s\) \['generated'\]"),
        (lambda lines: [lines[0], json.dumps({**json.loads(lines[1]), "num_generated_tokens": "7"})],
         "line 2: 'num_generated_tokens' is '7'"),
        (lambda lines: [lines[0], lines[0]], "line 2: id 'demo-000' already on line 1"),
        (lambda lines: [], "no rows"),
    ],
)
def test_bad_generation_file_fails_before_scoring(tmp_path, mutate, message):
    gen = write_generation_file(tmp_path / "bad.jsonl", [PAIRS["identical"], PAIRS["partial"]])
    lines = gen.read_text().splitlines()
    gen.write_text("\n".join(mutate(lines)) + ("\n" if mutate(lines) else ""))
    with pytest.raises(DataError, match=message) as info:
        score_generation_file(gen, tmp_path / "s.json", tmp_path / "s.rows.csv", metrics=["bleu"], context=TEXT)
    assert str(gen) in str(info.value)
    assert not (tmp_path / "s.json").exists() and not (tmp_path / "s.rows.csv").exists()


def test_truncated_file_against_meta_row_count(tmp_path):
    gen = write_generation_file(tmp_path / "t.jsonl", [PAIRS["identical"], PAIRS["partial"]], meta_extra={"n_rows": 3})
    with pytest.raises(DataError, match="n_rows=3"):
        score_generation_file(gen, tmp_path / "s.json", tmp_path / "s.rows.csv", metrics=["bleu"], context=TEXT)


def test_unknown_metric_name():
    from tunelens.scoring.metrics import check_metric_names

    with pytest.raises(ConfigError, match="unknown metric"):
        check_metric_names(["bleu", "meteor"])


# --------------------------------------------------------------------------------------------- perplexity
SPLIT_ROWS = [
    {"id": "demo-a", "instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"id": "demo-b", "instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is 5."},
    {"id": "demo-c", "instruction": "Write a long greeting for a friend who is moving away to another city.",
     "input": "", "output": "Dear friend, I will miss you very much. Good luck in your new home, and write soon!"},
]


def write_split(path: Path, rows=SPLIT_ROWS) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_perplexity_is_response_only_and_batch_invariant(tmp_path, tiny_llama_dir):
    import torch

    from tunelens.models import load_model
    from tunelens.scoring.perplexity import reference_perplexity
    from tunelens.prompts import build_prompt, response_text

    torch.manual_seed(0)
    loaded = load_model(tiny_llama_dir, device="cpu")
    model, tokenizer = loaded
    test_file = write_split(tmp_path / "test.jsonl")
    out, rows_csv = tmp_path / "ppl.json", tmp_path / "ppl.rows.csv"
    summary = reference_perplexity(test_file, out, rows_csv, model_name="tiny", model_path=tiny_llama_dir,
                                   prompt_format="alpaca", batch_size=2, samples=200, seed=3,
                                   model_and_tokenizer=loaded)
    # Independent computation: one row at a time, HF's own masked loss over the response tokens.
    total_nll, total_tokens, per_row = 0.0, 0, []
    for row in SPLIT_ROWS:
        prompt = tokenizer(build_prompt(row, "alpaca", tokenizer), add_special_tokens=False)["input_ids"]
        response = tokenizer(response_text(row, tokenizer), add_special_tokens=False)["input_ids"]
        assert response[-1] == tokenizer.eos_token_id
        ids = torch.tensor([prompt + response])
        labels = ids.clone()
        labels[0, : len(prompt)] = -100
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss.item()
        per_row.append(math.exp(loss))
        total_nll += loss * len(response)
        total_tokens += len(response)
    entry = json.loads(out.read_text())["metrics"]["perplexity"]
    assert entry["value"] == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-4)
    assert entry["value"] >= 1 and entry["ci_low"] <= entry["value"] <= entry["ci_high"]
    assert entry["response_tokens"] == total_tokens
    table = read_rows_csv(rows_csv)
    assert [table[row["id"]]["perplexity"] for row in SPLIT_ROWS] == pytest.approx(per_row, rel=1e-4)
    assert summary["source"]["prompt_format"] == "alpaca" and summary["config"] is None
    # A random model is far from the references: perplexity is large, of the order of the vocabulary.
    assert entry["value"] > 100


def test_perplexity_rejects_rows_beyond_the_context(tmp_path, tiny_llama_dir):
    from tunelens.scoring.perplexity import encode_rows
    from tunelens.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_llama_dir)
    with pytest.raises(DataError, match="id demo-c"):
        encode_rows(SPLIT_ROWS, tokenizer, "alpaca", max_tokens=64, source="test.jsonl")
    lengths = [len(p) + len(r) for p, r in encode_rows(SPLIT_ROWS[:2], tokenizer, "alpaca", max_tokens=64)]
    assert max(lengths) <= 64


# --------------------------------------------------------------------------------------------- judge
def test_judge_rates_every_row_deterministically(tmp_path, tiny_llama_dir):
    from tunelens.scoring.judge import RUBRIC_VERSION, judge_generation_file, rating_token_ids
    from tunelens.models import load_model

    loaded = load_model(tiny_llama_dir, device="cpu")
    test_file = write_split(tmp_path / "test.jsonl")
    pairs = [("Blue.", "Blue."), ("7", "The sum is 5."), ("", SPLIT_ROWS[2]["output"])]
    gen = write_generation_file(tmp_path / "g.jsonl", pairs)
    rows = [json.loads(line) for line in gen.read_text().splitlines()]
    for row, split_row in zip(rows, SPLIT_ROWS):
        row["id"] = split_row["id"]
    gen.write_text("".join(json.dumps(row) + "\n" for row in rows))
    kwargs = dict(judge_model="tiny", judge_path=str(tiny_llama_dir), batch_size=2, samples=100,
                  model_and_tokenizer=loaded)
    first = judge_generation_file(gen, test_file, tmp_path / "j.json", tmp_path / "j.rows.csv", **kwargs)
    table = read_rows_csv(tmp_path / "j.rows.csv")
    ratings = [table[row["id"]]["judge_rating"] for row in SPLIT_ROWS]
    assert all(r in (1, 2, 3, 4, 5) for r in ratings)
    assert [table[row["id"]]["judge"] for row in SPLIT_ROWS] == [(r - 1) / 4 for r in ratings]
    assert first["metrics"]["judge"]["value"] == pytest.approx(np.mean([(r - 1) / 4 for r in ratings]))
    assert first["judge"]["rubric_version"] == RUBRIC_VERSION
    assert sum(first["judge"]["rating_counts"].values()) == 3
    second = judge_generation_file(gen, test_file, tmp_path / "k.json", tmp_path / "k.rows.csv", **kwargs)
    assert second["metrics"] == first["metrics"]
    assert all(len(ids) >= 1 for ids in rating_token_ids(loaded[1]))


def vocabulary_digit_ids(tokenizer) -> dict[int, list[int]]:
    """For each digit 1-5, every single token that reads as it ("4", " 4"), found by decoding the whole
    vocabulary: independent of tunelens.scoring.judge.rating_token_ids (which encodes the digit strings)."""
    pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return {d: [i for i, piece in enumerate(pieces) if piece.strip() == str(d)] for d in range(1, 6)}


def test_judge_rating_reads_the_rating_tokens(tiny_llama_dir):
    """Boost the vocabulary's own tokens for one digit: the rating must follow the logits, for every digit
    and every spelling of it."""
    import torch

    from tunelens.scoring.judge import rate, rating_token_ids
    from tunelens.models import load_model

    model, tokenizer = load_model(tiny_llama_dir, device="cpu")
    digits = vocabulary_digit_ids(tokenizer)
    for rating, digit_ids in digits.items():
        assert digit_ids and set(rating_token_ids(tokenizer)[rating - 1]) <= set(digit_ids)
        for boosted in (digit_ids, digit_ids[:1], digit_ids[-1:]):  # every spelling, and each one alone
            hook = model.get_output_embeddings().register_forward_hook(
                lambda module, args, output: output.index_fill(-1, torch.tensor(boosted), 50.0)
            )
            try:
                ratings, expected = rate(model, tokenizer, ["Rate this.", "Another prompt, longer than the first."])
            finally:
                hook.remove()
            assert ratings.tolist() == [rating, rating], (rating, boosted)
            assert expected.tolist() == pytest.approx([rating, rating], abs=1e-6)


def test_meta_sidecar_is_the_one_given(tmp_path):
    """The rule declares the sidecar as an input and the script passes it: that file is the one read."""
    gen = write_generation_file(tmp_path / "g.jsonl", [PAIRS["identical"], PAIRS["partial"]])
    declared = tmp_path / "elsewhere" / "declared.meta.json"
    declared.parent.mkdir()
    (tmp_path / "g.meta.json").rename(declared)
    score = score_generation_file(gen, tmp_path / "s.json", tmp_path / "s.rows.csv", metrics=["exact_match"],
                                  context=TEXT, samples=100, meta_file=declared)
    assert score["source"]["n_rows"] == 2
    declared.write_text(json.dumps({"n_rows": 5}))
    with pytest.raises(DataError, match="declared.meta.json says n_rows=5"):
        score_generation_file(gen, tmp_path / "s.json", tmp_path / "s.rows.csv", metrics=["exact_match"],
                              context=TEXT, samples=100, meta_file=declared)
