"""Tests of tunelens.report: tables, statistics, CSV round trip, plots, stability.

Score files are written here in the documented format (docs/ARCHITECTURE.md) with known numbers,
so each assertion checks a value the report must derive from them.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tunelens.errors import DataError
from tunelens import report
from tunelens.scoring import statistics
from tunelens.report import ReportSettings, read_summary_csv, write_report

DEFAULT = "top_k_50_num_beams_1_temp_0.8"
CONFIGS = {
    DEFAULT: {"top_k": 50, "num_beams": 1, "temperature": 0.8, "top_p": 1.0, "repetition_penalty": 1.0},
    "top_k_10_num_beams_1_temp_0.8": {"top_k": 10, "num_beams": 1, "temperature": 0.8, "top_p": 1.0,
                                      "repetition_penalty": 1.0},
    "top_k_50_num_beams_1_temp_0.0": {"top_k": 50, "num_beams": 1, "temperature": 0.0, "top_p": 1.0,
                                      "repetition_penalty": 1.0},
}
IDS = [f"demo-{i:04d}" for i in range(12)]
SAMPLES = 200  # bootstrap resamples in tests: enough for stable percentiles, fast on 2 cores


def settings(configs=CONFIGS, default=DEFAULT) -> ReportSettings:
    return ReportSettings(decoding_configs=configs, default_config=default, bootstrap_samples=SAMPLES,
                          confidence=0.95, seed=7, config_hash="c0ffee", git_commit="abc123")


def metric_entry(values, scale="0-1"):
    values = np.asarray(values, dtype=float)
    return {"value": float(values.mean()), "ci_low": float(values.min()), "ci_high": float(values.max()),
            "scale": scale, "n": int(values.size)}


def write_score(path: Path, model, variant, config, rows: dict[str, list[float]], *, layer=None, skipped=None,
                ids=IDS, with_rows=True):
    """A score file whose metric values are the means of `rows` (the per-row table written next to it)."""
    scales = {"bleu": "0-100", "length": "tokens", "perplexity": ">=1"}
    payload = {
        "model": model, "variant": variant, "config": config, "layer": layer, "n": len(ids),
        "metrics": {m: metric_entry(v, scales.get(m, "0-1")) for m, v in rows.items()},
        "skipped": skipped or {},
        "source": {"backend": "hf", "model": {"name": model, "source": f"embedded:{model}", "path": f"m/{model}"},
                   "variant": variant,
                   "adapter": {"dir": "a", "sha256": "f" * 64} if variant == "finetuned" else None,
                   "decoding_config": {"name": config, **CONFIGS.get(config, {})}},
        "versions": {"python": "3.11", "sacrebleu": "2.6.0"},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))
    if with_rows:
        stem = path.name[: -len(".json")]
        pd.DataFrame({"id": ids, **rows}).to_csv(path.with_name(stem + ".rows.csv"), index=False)
    return path


def ramp(start, step, n=len(IDS)):
    return [start + step * i for i in range(n)]


def build_study(root: Path, models=("smol", "gemma"), configs=CONFIGS, judge=True, layers=(2, 4), finetune=True):
    """Score files for each model/variant/config with known structure:
    - finetuned rows = base rows + 0.1 (rougeL) and + 5 (BLEU): paired differences are exact;
    - config k gets +0.01*k on rougeL, so the last config is the best;
    - judge = rougeL rank order (perfect agreement), length = reversed order (perfect disagreement).
    """
    files = {"score_files": [], "perplexity_files": [], "judge_files": [], "early_exit_files": [],
             "finetune_metrics_files": []}
    variants = ("base", "finetuned") if finetune else ("base",)
    for m_index, model in enumerate(models):
        for v_index, variant in enumerate(variants):
            for c_index, config in enumerate(configs):
                rouge = ramp(0.2 + 0.1 * v_index + 0.01 * c_index + 0.05 * m_index, 0.02)
                rows = {"bleu": ramp(10 + 5 * v_index + c_index, 1.0), "rougeL": rouge,
                        "bertscore": ramp(0.8 + 0.01 * v_index, 0.001), "length": ramp(40, -1.0)}
                files["score_files"].append(write_score(
                    root / f"scores/{model}/{variant}/{config}.json", model, variant, config, rows,
                    skipped={"codebleu": "dataset kind is text"}))
                if judge:
                    files["judge_files"].append(write_score(
                        root / f"judge/{model}/{variant}/{config}.json", model, variant, config,
                        {"judge": [0.0 if r < 0.3 else 1.0 for r in rouge][:6] + ramp(0.5, 0.04, 6)}))
            files["perplexity_files"].append(write_score(
                root / f"perplexity/{model}/{variant}.json", model, variant, None,
                {"perplexity": ramp(12 - 4 * v_index - m_index, 0.1)}, with_rows=False))
            for layer in layers:
                files["early_exit_files"].append(write_score(
                    root / f"probe/{model}/{variant}/early_exit/layer_{layer}.scores.json", model, variant,
                    "top_k_50_num_beams_1_temp_0.0", {"bleu": ramp(layer * 3.0 + v_index, 0.5),
                                                      "rougeL": ramp(layer * 0.05, 0.01)}, layer=layer))
        if finetune:
            ft = root / f"finetune/{model}/metrics.json"
            ft.parent.mkdir(parents=True, exist_ok=True)
            ft.write_text(json.dumps({"train_runtime_s": 12.5, "final_loss": 0.61, "trainable_params": 4900000}))
            with (ft.parent / "train_log.jsonl").open("w") as handle:
                for step in range(5, 55, 5):
                    handle.write(json.dumps({"step": step, "loss": 2.0 / (1 + step / 10), "learning_rate": 2e-4}) + "\n")
            files["finetune_metrics_files"].append(ft)
    return files


def run(root: Path, files: dict, out: str = "out", now=None, **kwargs) -> dict[str, Path]:
    paths = {"summary_md": root / out / "summary.md", "summary_csv": root / out / "summary.csv",
             "summary_html": root / out / "summary.html", "plots_dir": root / out / "plots"}
    write_report(**files, **paths, settings=kwargs.pop("settings", settings()),
                 now=now or dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc), **kwargs)
    return paths


def section(markdown: str, title_start: str) -> str:
    """The text of the `## <title_start>...` section up to the next `## `."""
    match = re.search(rf"^## {re.escape(title_start)}.*?(?=^## |\Z)", markdown, flags=re.S | re.M)
    assert match, f"section '{title_start}' missing"
    return match.group(0)


def table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in text.splitlines()
            if line.startswith("| ") ]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    root = tmp_path_factory.mktemp("report_full")
    files = build_study(root)
    paths = run(root, files)
    return root, files, paths


# --------------------------------------------------------------------------------------------- tables
def test_overview_has_one_row_per_model_variant_with_cis_and_best_marked(full):
    _, _, paths = full
    text = paths["summary_md"].read_text()
    overview = table_rows(section(text, "1. Model overview"))
    header, body = overview[0], overview[1:]
    assert header[:2] == ["Model", "Variant"]
    assert [row[:2] for row in body] == [["smol", "base"], ["smol", "finetuned"], ["gemma", "base"],
                                         ["gemma", "finetuned"]]
    bleu = header.index("BLEU (0-100)")
    # BLEU of smol/finetuned at the default config: mean of ramp(15, 1) over 12 rows = 20.5, CI = [15, 26]
    assert body[1][bleu] in ("20.5 [15.0, 26.0]", "**20.5** [15.0, 26.0]")
    # Perplexity: lower is better -> gemma finetuned (12 - 4 - 1 = 7 + 0.55) is bold; others are not.
    ppl = next(i for i, h in enumerate(header) if h.startswith("Perplexity"))
    assert body[3][ppl].startswith("**7.55**")
    assert not any(row[ppl].startswith("**") for row in body[:3])
    # Judge and the scale statement are there; CodeBLEU was skipped, so no column but a note.
    assert any(h.startswith("Judge") for h in header)
    assert not any(h.startswith("CodeBLEU") for h in header)
    assert "CodeBLEU on `test`: dataset kind is text" in text  # the split it was skipped on
    assert "BLEU 0-100" in text and "Perplexity >=1, lower is better" in text


def test_decoding_table_per_model_and_variant_marks_best_config(full):
    _, _, paths = full
    part = section(paths["summary_md"].read_text(), "2. Decoding configs")
    assert part.count("### ") == 4  # 2 models x 2 variants
    rows = table_rows(part.split("### smol – base")[1].split("###")[0])
    header, body = rows[0], rows[1:]
    assert header[:3] == ["Config", "top_k", "temperature"]  # only the swept fields
    assert [r[0] for r in body] == [f"{DEFAULT} (default)", "top_k_10_num_beams_1_temp_0.8",
                                    "top_k_50_num_beams_1_temp_0.0"]
    rouge = header.index("ROUGE-L")
    assert body[2][rouge].startswith("**") and not body[0][rouge].startswith("**")
    length = header.index("Length")
    assert not any(r[length].startswith("**") for r in body)  # no better direction


def test_layer_table_puts_variants_side_by_side(full):
    _, _, paths = full
    part = section(paths["summary_md"].read_text(), "3. Early exit")
    rows = table_rows(part.split("### smol")[1].split("###")[0])
    assert rows[0] == ["Layer", "BLEU base", "BLEU finetuned", "ROUGE-L base", "ROUGE-L finetuned"]
    assert [r[0] for r in rows[1:]] == ["2", "4"]
    # layer 4 base BLEU: mean of ramp(12, 0.5) = 14.75 -> 14.8 (1 decimal), best in its column
    assert rows[2][1].startswith("**14.8**") or rows[2][1].startswith("**14.7**")


def test_layer_table_gains_a_judge_column_from_the_early_exit_judge_files(tmp_path):
    """Issue 22: the judge's files of the early-exit layers (rule judge_early_exit) give the per-layer table a
    Judge column per variant, with the files' CIs, and paired fine-tuned - base rows per layer; they stay out of
    the best-config table and the agreement statistics (early exit is not a decoding config)."""
    files = build_study(tmp_path, models=("smol",), layers=(2, 4))
    files["early_exit_judge_files"] = []
    for v_index, variant in enumerate(("base", "finetuned")):
        for layer in (2, 4):
            judge = np.asarray([0.25 * ((i + layer + v_index) % 5) for i in range(len(IDS))])
            path = write_score(tmp_path / f"probe/smol/{variant}/early_exit/layer_{layer}.judge.json", "smol",
                               variant, "top_k_50_num_beams_1_temp_0.0", {"judge": list(judge)}, layer=layer)
            # the file's own CI, as the judge stage writes it (here: a hand percentile bootstrap of the rows)
            draws = np.random.default_rng(layer).integers(0, len(IDS), size=(SAMPLES, len(IDS)))
            low, high = np.quantile(judge[draws].mean(axis=1), [0.025, 0.975])
            payload = json.loads(path.read_text())
            payload["metrics"]["judge"].update(ci_low=float(low), ci_high=float(high))
            path.write_text(json.dumps(payload))
            files["early_exit_judge_files"].append(path)
    paths = run(tmp_path, files)
    rows = table_rows(section(paths["summary_md"].read_text(), "3. Early exit"))
    assert rows[0] == ["Layer", "BLEU base", "BLEU finetuned", "ROUGE-L base", "ROUGE-L finetuned", "Judge base",
                       "Judge finetuned"]
    for row, layer in zip(rows[1:], (2, 4)):
        for column, variant in ((5, "base"), (6, "finetuned")):
            entry = json.loads((tmp_path / f"probe/smol/{variant}/early_exit/layer_{layer}.judge.json").read_text())
            judge = entry["metrics"]["judge"]
            assert row[column].replace("**", "") == \
                f"{judge['value']:.3f} [{judge['ci_low']:.3f}, {judge['ci_high']:.3f}]"
    table = read_summary_csv(paths["summary_csv"])
    layered = table[(table["metric"] == "judge") & table["layer"].notna()]
    assert set(zip(layered["variant"], layered["statistic"], layered["layer"])) == {
        (variant, statistic, layer) for layer in (2, 4)
        for variant, statistic in (("base", "score"), ("finetuned", "score"), ("finetuned-base", "paired_difference"))}
    diff = layered[(layered["statistic"] == "paired_difference") & (layered["layer"] == 4)]
    base4 = [0.25 * ((i + 4) % 5) for i in range(len(IDS))]
    tuned4 = [0.25 * ((i + 5) % 5) for i in range(len(IDS))]
    assert diff["value"].iloc[0] == pytest.approx(np.mean(tuned4) - np.mean(base4))
    # best configs and agreement: the same as without the early-exit judge files
    without = build_study(tmp_path / "without", models=("smol",), layers=(2, 4))
    plain = read_summary_csv(run(tmp_path / "without", without)["summary_csv"])
    for pattern in ("_vs_", "best_config"):
        pick = lambda t: t[t["statistic"].str.contains(pattern)].reset_index(drop=True)  # noqa: E731
        assert len(pick(table)) > 0
        pd.testing.assert_frame_equal(pick(table), pick(plain))


def test_paired_difference_pairs_rows_by_id(full):
    _, _, paths = full
    table = read_summary_csv(paths["summary_csv"])
    diffs = table[(table["statistic"] == "paired_difference") & (table["model"] == "smol")
                  & (table["config"] == DEFAULT)].set_index("metric")
    # finetuned = base + 5 BLEU on every row: difference exactly 5 with a zero-width CI
    assert diffs.loc["bleu", "value"] == pytest.approx(5.0)
    assert diffs.loc["bleu", "ci_low"] == pytest.approx(5.0) and diffs.loc["bleu", "ci_high"] == pytest.approx(5.0)
    assert diffs.loc["rougeL", "value"] == pytest.approx(0.1)
    assert diffs.loc["bleu", "n"] == len(IDS)
    assert (diffs["variant"] == "finetuned-base").all()
    md = section(paths["summary_md"].read_text(), "6. Fine-tuned vs base")
    assert "+5.0 [5.0, 5.0] *" in md
    assert "(no per-row values, no CI)" in md  # perplexity has no rows table


def test_paired_difference_uses_only_common_ids_in_any_order(tmp_path):
    base = {"bleu": [1.0, 2.0, 3.0, 4.0]}
    write_score(tmp_path / "scores/m/base/c.json", "m", "base", "c", base, ids=["a", "b", "c", "d"])
    # fine-tuned file lists ids in another order and lacks 'd'; values are base + 10 for a, b, c
    write_score(tmp_path / "scores/m/finetuned/c.json", "m", "finetuned", "c", {"bleu": [13.0, 11.0, 12.0]},
                ids=["c", "a", "b"])
    files = report.load_score_files({"decoding": sorted((tmp_path / "scores").rglob("*.json"))})
    diffs = report.paired_differences(report.long_rows(files), settings({"c": {}}, "c"))
    assert diffs["value"].tolist() == [pytest.approx(10.0)]
    assert diffs["n"].tolist() == [3]


def test_agreement_recovers_known_rank_correlations(full):
    _, _, paths = full
    table = read_summary_csv(paths["summary_csv"])
    agree = table[table["statistic"].str.endswith("_vs_judge") & (table["model"] == "smol")]
    tau = agree[agree["statistic"] == "kendall_tau_vs_judge"].set_index("metric")
    # Within one (variant, config) judge rises with rougeL; across them the judge's ramp is shared while
    # rougeL shifts, so the pooled tau is positive but below 1; length runs against rougeL.
    assert 0 < tau.loc["rougeL", "value"] <= 1
    assert tau.loc["length", "value"] < 0
    assert tau.loc["rougeL", "ci_low"] <= tau.loc["rougeL", "value"] <= tau.loc["rougeL", "ci_high"]
    assert tau.loc["rougeL", "n"] == len(IDS) * len(CONFIGS) * 2
    assert set(table[table["statistic"].str.contains("_vs_")]["model"]) == {"smol", "gemma", "all"}


def test_rank_agreement_exact_cases():
    rng = np.random.default_rng(0)
    x = np.arange(20, dtype=float)
    same = statistics.rank_agreement(x, x ** 2, samples=100, confidence=0.95, rng=rng)
    assert same["kendall_tau"][0] == pytest.approx(1.0) and same["spearman_rho"][0] == pytest.approx(1.0)
    assert same["spearman_rho"][1] == pytest.approx(1.0)  # every resample is monotone too
    opposite = statistics.rank_agreement(x, -x, samples=100, confidence=0.95, rng=rng)
    assert opposite["kendall_tau"][0] == pytest.approx(-1.0)
    constant = statistics.rank_agreement(x, np.ones(20), samples=100, confidence=0.95, rng=rng)
    assert math.isnan(constant["kendall_tau"][0])


def test_vectorised_kendall_matches_scipy_with_ties():
    from scipy import stats

    rng = np.random.default_rng(1)
    xs = rng.integers(0, 5, (20, 30)).astype(float)  # many ties, as in bootstrap resamples
    ys = xs + rng.integers(0, 3, (20, 30))
    expected = [stats.kendalltau(x, y).statistic for x, y in zip(xs, ys)]
    assert statistics.kendall_tau_b_rows(xs, ys) == pytest.approx(expected, abs=1e-12)


def test_best_config_table_and_paired_gain_over_default(full):
    _, _, paths = full
    table = read_summary_csv(paths["summary_csv"])
    best = table[(table["statistic"] == "best_config") & (table["model"] == "smol")
                 & (table["variant"] == "base")].set_index("metric")
    assert best.loc["rougeL", "config"] == "top_k_50_num_beams_1_temp_0.0"  # +0.02 over default
    assert "length" not in best.index  # no better direction
    gain = table[(table["statistic"] == "best_minus_default") & (table["model"] == "smol")
                 & (table["variant"] == "base") & (table["metric"] == "rougeL")]
    assert gain["value"].iloc[0] == pytest.approx(0.02)


# --------------------------------------------------------------------------------------------- edge cases
def test_single_model_single_config_without_finetune_or_judge(tmp_path):
    only = {DEFAULT: CONFIGS[DEFAULT]}
    files = build_study(tmp_path, models=("solo",), configs=only, judge=False, layers=(), finetune=False)
    paths = run(tmp_path, files, settings=settings(only))
    text = paths["summary_md"].read_text()
    overview = table_rows(section(text, "1. Model overview"))
    assert [row[:2] for row in overview[1:]] == [["solo", "base"]]
    assert not any("**" in cell for cell in overview[1])  # a single row has nothing to be best against
    assert "No early-exit scores" in text
    assert "No Judge or Human ratings" in text
    assert "No model has both a base and a fine-tuned variant." in text
    assert "default is best" in section(text, "4. Best")
    assert sorted(p.name for p in paths["plots_dir"].iterdir()) == []  # nothing swept, no layers, no loss


def test_missing_metric_in_one_file_shows_a_dash(tmp_path):
    only = {DEFAULT: CONFIGS[DEFAULT]}
    write_score(tmp_path / f"scores/m/base/{DEFAULT}.json", "m", "base", DEFAULT,
                {"bleu": ramp(10, 1), "bertscore": ramp(0.8, 0.002)})
    write_score(tmp_path / f"scores/m/finetuned/{DEFAULT}.json", "m", "finetuned", DEFAULT, {"bleu": ramp(12, 1)})
    paths = run(tmp_path, {"score_files": sorted((tmp_path / "scores").rglob("*.json"))}, settings=settings(only))
    rows = table_rows(section(paths["summary_md"].read_text(), "1. Model overview"))
    bert = rows[0].index("BERTScore (0-1)")
    assert rows[2][bert] == "–"
    assert rows[1][bert] == "0.811 [0.800, 0.822]"  # no bold: the only value in its column
    assert rows[2][rows[0].index("BLEU (0-100)")].startswith("**17.5**")


def test_best_marking_directions_ties_and_constant_columns():
    cells = [[report.Cell("a"), report.Cell("b"), report.Cell("c")] for _ in range(3)]
    values = [[0.5, 12.0, 0.0], [0.7, 10.0, 0.0], [0.7, 11.0, 0.0]]
    report.mark_best(cells, values, ["rougeL", "perplexity", "exact_match"])
    assert [row[0].best for row in cells] == [False, True, True]  # higher is better, ties both marked
    assert [row[1].best for row in cells] == [False, True, False]  # perplexity: lower is better
    assert not any(row[2].best for row in cells)  # all equal: nothing singled out


def test_human_score_files_and_perplexity_rows_are_paired(tmp_path):
    only = {DEFAULT: CONFIGS[DEFAULT]}
    files = {"score_files": [], "human_files": [], "perplexity_files": []}
    for offset, variant in enumerate(("base", "finetuned")):
        rouge = ramp(0.1 + 0.2 * offset, 0.05)
        files["score_files"].append(write_score(tmp_path / f"scores/m/{variant}/{DEFAULT}.json", "m", variant,
                                                DEFAULT, {"rougeL": rouge}))
        # the human stage rates a sample (8 of 12 ids) in its own files: 1 when rougeL > 0.4
        rated = IDS[::-1][:8]
        human = [1.0 if rouge[IDS.index(i)] > 0.4 else 0.0 for i in rated]
        files["human_files"].append(write_score(tmp_path / f"human/scores/m/{variant}/{DEFAULT}.json", "m",
                                                variant, DEFAULT, {"human": human}, ids=rated))
        # as the perplexity stage writes it: per-row perplexity plus summed nll and token counts
        nll, tokens = np.array(ramp(2.0 - 0.5 * offset, 0.3)), np.array(ramp(5.0, 1.0))
        ppl = write_score(tmp_path / f"perplexity/m/{variant}.json", "m", variant, None,
                          {"perplexity": list(np.exp(nll / tokens))})
        pd.DataFrame({"id": IDS, "perplexity": np.exp(nll / tokens), "nll": nll, "tokens": tokens}).to_csv(
            ppl.with_name(f"{variant}.rows.csv"), index=False)
        files["perplexity_files"].append(ppl)
    paths = run(tmp_path, files, settings=settings(only))
    table = read_summary_csv(paths["summary_csv"])
    tau = table[(table["statistic"] == "kendall_tau_vs_human") & (table["metric"] == "rougeL")]
    assert tau["n"].tolist() == [16] and tau["value"].iloc[0] > 0.5  # rows joined by id across files
    ppl = table[(table["statistic"] == "paired_difference") & (table["metric"] == "perplexity")]
    # the difference of corpus perplexities exp(sum nll / sum tokens), not the mean of per-row ones
    tokens = sum(ramp(5.0, 1.0))
    expected = math.exp(sum(ramp(1.5, 0.3)) / tokens) - math.exp(sum(ramp(2.0, 0.3)) / tokens)
    per_row_mean = np.mean(np.exp(np.array(ramp(1.5, 0.3)) / ramp(5.0, 1.0))
                           - np.exp(np.array(ramp(2.0, 0.3)) / ramp(5.0, 1.0)))
    assert ppl["value"].tolist() == [pytest.approx(expected)] and abs(expected - per_row_mean) > 1e-3
    assert ppl["ci_low"].iloc[0] < expected < ppl["ci_high"].iloc[0] < 0 and ppl["config"].iloc[0] == ""
    assert not table["metric"].isin(["nll", "tokens"]).any()  # helper columns are not metrics
    assert f"{expected:+.2f} [" in section(paths["summary_md"].read_text(), "6. Fine-tuned")
    human = table[(table["statistic"] == "paired_difference") & (table["metric"] == "human")]
    assert human["n"].tolist() == [8]
    assert "Human (0-1)" in section(paths["summary_md"].read_text(), "1. Model overview")


def test_unrated_human_sheet_is_pointed_to(tmp_path):
    only = {DEFAULT: CONFIGS[DEFAULT]}
    score = write_score(tmp_path / f"scores/m/base/{DEFAULT}.json", "m", "base", DEFAULT, {"bleu": ramp(1, 1)})
    paths = run(tmp_path, {"score_files": [score], "human_sheet_files": ["results/human/sheet.csv",
                                                                         "results/human/key.csv"]},
                settings=settings(only))
    assert "Human rating sheet: `results/human/sheet.csv`" in paths["summary_md"].read_text()


def test_bad_score_file_names_file_and_key(tmp_path):
    bad = tmp_path / "scores/m/base/c.json"
    bad.parent.mkdir(parents=True)
    bad.write_text(json.dumps({"model": "m", "variant": "base"}))
    with pytest.raises(DataError, match=r"c\.json: missing key 'metrics'"):
        report.load_score_file(bad, "decoding")
    bad.write_text(json.dumps({"model": "m", "variant": "base", "metrics": {"bleu": {"value": "high"}}}))
    with pytest.raises(DataError, match=r"metrics\.bleu\.value: expected a number"):
        report.load_score_file(bad, "decoding")
    bad.write_text(json.dumps({"model": "m", "variant": "base", "metrics": {"bleu": {"value": 1.0}}}))
    bad.with_name("c.rows.csv").write_text("id,bleu\na,1\nb,oops\n")
    with pytest.raises(DataError, match=r"c\.rows\.csv, line 3, column 'bleu'"):
        report.load_score_file(bad, "decoding")


def test_rows_table_text_columns_are_dropped_metric_columns_checked(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model": "m", "variant": "base", "config": "c",
                                "metrics": {"bleu": {"value": 2.0}, "human": {"value": 1.0}}}))
    # the scoring stage writes `id,<text columns>,<metrics>`; human ratings cover a sample only
    path.with_name("c.rows.csv").write_text("id,finish_reason,bleu,human\na,stop,1.0,1\nb,length,3.0,\nc,stop,nan,0\n")
    rows = report.load_score_file(path, "decoding").rows
    assert list(rows.columns) == ["id", "bleu", "human"]
    assert rows["bleu"].isna().tolist() == [False, False, True]
    assert rows["human"].tolist()[::2] == [1.0, 0.0] and math.isnan(rows["human"].iloc[1])


# --------------------------------------------------------------------------------------------- files
def test_summary_csv_round_trips_and_holds_input_numbers(full):
    _, files, paths = full
    table = read_summary_csv(paths["summary_csv"])
    assert list(table.columns) == list(report.CSV_COLUMNS)
    rewritten = paths["summary_csv"].with_name("again.csv")
    report.write_summary_csv(table, rewritten)
    assert rewritten.read_bytes() == paths["summary_csv"].read_bytes()
    pd.testing.assert_frame_equal(read_summary_csv(rewritten), table)
    # every metric of every input file appears once as a 'score' row with its exact value
    scores = table[table["statistic"] == "score"]
    n_metrics = sum(len(json.loads(Path(p).read_text())["metrics"]) for group in files.values() for p in group
                    if not str(p).endswith("metrics.json"))
    assert len(scores) == n_metrics
    src = json.loads(Path(files["early_exit_files"][1]).read_text())  # smol base layer 4
    row = scores[(scores["model"] == "smol") & (scores["variant"] == "base") & (scores["layer"] == 4)
                 & (scores["metric"] == "bleu")]
    assert row["value"].iloc[0] == src["metrics"]["bleu"]["value"]
    assert row["config"].iloc[0] == "top_k_50_num_beams_1_temp_0.0"
    ppl = scores[scores["metric"] == "perplexity"]
    assert (ppl["config"] == "").all() and ppl["layer"].isna().all()


def test_plots_written_for_sweeps_layers_and_loss(full):
    _, _, paths = full
    names = sorted(p.name for p in paths["plots_dir"].iterdir())
    assert names == sorted([f"sweep_{m}_{f}.png" for m in ("smol", "gemma") for f in ("top_k", "temperature")]
                           + ["layers_smol.png", "layers_gemma.png", "loss_smol.png", "loss_gemma.png"])
    for name in names:
        data = (paths["plots_dir"] / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_html_summary_renders_tables_and_provenance(full):
    _, _, paths = full
    page = paths["summary_html"].read_text()
    separators = [l for l in paths["summary_md"].read_text().splitlines() if re.fullmatch(r"\|(:?-+:?\|)+", l)]
    assert page.count("<table>") == len(separators) > 5  # every Markdown table is an HTML table
    assert "<strong>7.55</strong>" in page
    assert "abc123" in page and "c0ffee" in page
    assert "f" * 16 in page  # adapter hash from the generation meta


def test_same_inputs_same_bytes_except_date_line(tmp_path):
    configs = dict(list(CONFIGS.items())[:2])
    files = build_study(tmp_path, models=("smol",), configs=configs, layers=(2,))
    first = run(tmp_path, files, settings=settings(configs))
    second = run(tmp_path, files, out="out_again", settings=settings(configs),
                 now=dt.datetime(2031, 12, 31, 23, 59, 59, tzinfo=dt.timezone.utc))
    assert len(list(first["plots_dir"].iterdir())) == 3  # sweep, layers, loss
    assert second["summary_csv"].read_bytes() == first["summary_csv"].read_bytes()
    for key in ("summary_md", "summary_html"):
        a = first[key].read_text().splitlines()
        b = second[key].read_text().splitlines()
        assert len(a) == len(b)
        differing = [(x, y) for x, y in zip(a, b) if x != y]
        assert len(differing) == 1, differing
        assert "2025-01-02 03:04:05 UTC" in differing[0][0] and "2031-12-31 23:59:59 UTC" in differing[0][1]
    for name in sorted(p.name for p in first["plots_dir"].iterdir()):
        assert (second["plots_dir"] / name).read_bytes() == (first["plots_dir"] / name).read_bytes()


# ----------------------------------------------------------------------------------------- evaluation sets
def test_extra_evaluation_set_gets_its_overview_paired_table_csv_rows_and_plots(tmp_path):
    """A second set with known numbers: fine-tuned rows = base rows - 0.2 rougeL there (it hurts on the
    new set, while it helps by +0.1 on the default set); its tables, CSV rows and plots carry its name."""
    files = build_study(tmp_path / "default", models=("smol",), judge=False, layers=())
    code = tmp_path / "eval" / "code"
    ids = [f"code-{i:04d}" for i in range(10)]
    set_inputs = {"scores": [], "perplexity": []}
    for v_index, variant in enumerate(("base", "finetuned")):
        for c_index, config in enumerate(CONFIGS):
            rows = {"bleu": ramp(30 - 8 * v_index + c_index, 1.0, 10), "rougeL": ramp(0.6 - 0.2 * v_index, 0.01, 10),
                    "codebleu": ramp(0.5, 0.02, 10)}
            set_inputs["scores"].append(write_score(code / f"scores/smol/{variant}/{config}.json", "smol", variant,
                                                    config, rows, ids=ids))
        set_inputs["perplexity"].append(write_score(code / f"perplexity/smol/{variant}.json", "smol", variant, None,
                                                    {"perplexity": ramp(20 + 5 * v_index, 0.1, 10)}, ids=ids,
                                                    with_rows=False))
    manifest = code / "manifest.json"
    manifest.write_text(json.dumps({"evaluation_set": "code", "source": {"kind": "local", "source": "code.json"},
                                    "counts": {"read": 14, "usable": 13, "test": 10, "beyond_max_rows": 0,
                                               "dropped": {"in_training_split": 3, "empty_output": 1}}}))
    set_inputs["manifest"] = manifest
    paths = run(tmp_path, files, settings=ReportSettings(
        decoding_configs=CONFIGS, default_config=DEFAULT, bootstrap_samples=SAMPLES, seed=7, evaluation_set="alpaca"),
        evaluation_sets={"code": set_inputs})

    table = read_summary_csv(paths["summary_csv"])
    assert list(table.columns)[0] == "evaluation_set"
    assert list(dict.fromkeys(table["evaluation_set"])) == ["alpaca", "code"]
    diff = table[(table["statistic"] == "paired_difference") & (table["config"] == DEFAULT)
                 & (table["metric"] == "rougeL")].set_index("evaluation_set")
    assert diff.loc["alpaca", "value"] == pytest.approx(0.1)
    assert diff.loc["code", "value"] == pytest.approx(-0.2)
    assert diff.loc["code", "ci_high"] < 0 and int(diff.loc["code", "n"]) == 10
    code_scores = table[(table["evaluation_set"] == "code") & (table["statistic"] == "score")]
    assert "codebleu" in set(code_scores["metric"]) and "perplexity" in set(code_scores["metric"])
    assert "codebleu" not in set(table[table["evaluation_set"] == "alpaca"]["metric"])

    md = paths["summary_md"].read_text()
    assert "## 7. Evaluation sets" in md and "`alpaca`" in md
    assert re.search(r"\| code +\| `code\.json` +\| +10 \| +3 \| empty_output 1", md), md
    code_part = md[md.index("### 7. code: model overview"):]
    assert "### 7. code: fine-tuned vs base (paired differences)" in code_part
    overview = code_part[:code_part.index("### 7. code: fine-tuned")]
    base_rouge = code_scores[(code_scores["variant"] == "base") & (code_scores["config"] == DEFAULT)
                             & (code_scores["metric"] == "rougeL")].iloc[0]
    estimate = report.format_estimate(base_rouge["value"], base_rouge["ci_low"], base_rouge["ci_high"], 3)
    assert re.search(r"\| smol +\| base +\|.*\| +" + re.escape(estimate), overview.replace("**", "")), overview
    paired = code_part[code_part.index("### 7. code: fine-tuned"):]
    assert re.search(r"ROUGE-L.*\| +-0\.200 \[-0\.200, -0\.200\] ?\*", paired), paired[:1500]
    # sections 1-6 are unchanged by the extra set: the default set's overview does not show its numbers
    assert "0.600" not in md[:md.index("## 7. Evaluation sets")]

    plots = sorted(p.name for p in paths["plots_dir"].glob("sweep_*.png"))
    assert any(name.endswith("__code.png") for name in plots)
    assert any(not name.endswith("__code.png") for name in plots)
