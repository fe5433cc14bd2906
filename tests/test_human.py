"""Human rating sheets: blind sheet + key out, filled sheets back in as a Human score; malformed sheets fail
with the file, line and column at fault."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tunelens.errors import DataError
from tunelens.scoring.human import SHEET_COLUMNS, human_scores, read_key, write_human_sheet
from tunelens.scoring.score import read_rows_csv

GROUPS = [("smol", "base", "cfg_a"), ("smol", "finetuned", "cfg_a"), ("gemma", "base", "cfg_b")]
N_ROWS = 6


def known_answers(g: int, i: int) -> str:
    """Group g answers rows i < 2g correctly: known fractions to recover."""
    return f"answer {i}" if i < 2 * g else f"wrong {i}"


def build(tmp_path: Path, sample_size=4, seed=9, groups=GROUPS, answers=known_answers):
    """A test split, one generation file per group (answers(g, i): group g's answer to row i), the sheet."""
    test_rows = [{"id": f"demo-{i}", "instruction": f"Task {i}", "input": "", "output": f"answer {i}"}
                 for i in range(N_ROWS)]
    tmp_path.mkdir(parents=True, exist_ok=True)
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("".join(json.dumps(row) + "\n" for row in test_rows))
    files = {}
    for g, group in enumerate(groups):
        path = tmp_path / f"{'__'.join(group)}.jsonl"
        rows = [{"id": f"demo-{i}", "prompt": f"P{i}", "reference": f"answer {i}", "generated": answers(g, i),
                 "num_generated_tokens": 2, "finish_reason": "stop"} for i in range(N_ROWS)]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        files[group] = path
    sheet, key = tmp_path / "human/sheet.csv", tmp_path / "human/key.csv"
    info = write_human_sheet(files, test_file, sheet, key, sample_size=sample_size, seed=seed)
    return sheet, key, info


def read_csv(path):
    with Path(path).open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def fill(sheet: Path, out: Path, rate=lambda row: "1" if row["answer"] == row["reference"] else "0", rows=None):
    rows = rows if rows is not None else read_csv(sheet)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(SHEET_COLUMNS))
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "correct": rate(row)})
    return out


def outputs_for(tmp_path):
    return {g: (tmp_path / f"out/{'_'.join(g)}.json", tmp_path / f"out/{'_'.join(g)}.rows.csv") for g in GROUPS}


def test_sheet_is_blind_shuffled_and_keyed(tmp_path):
    sheet, key_file, info = build(tmp_path)
    rows = read_csv(sheet)
    assert info == {"items": 4 * len(GROUPS), "rows_per_group": 4, "groups": len(GROUPS)}
    assert list(rows[0]) == list(SHEET_COLUMNS)
    text = sheet.read_text()
    for word in ("smol", "gemma", "base", "finetuned", "cfg_a", "cfg_b", "demo-"):
        assert word not in text  # nothing says which model, variant, config or test row produced an answer
    assert all(row["correct"] == "" for row in rows)
    key = read_key(key_file)
    assert sorted(key) == sorted(row["item"] for row in rows)
    # The same test rows for every group (paired), and not simply in group order.
    ids_by_group = {g: sorted(k["id"] for k in key.values() if (k["model"], k["variant"], k["config"]) == g)
                    for g in GROUPS}
    assert len({tuple(ids) for ids in ids_by_group.values()}) == 1
    order = [(key[row["item"]]["model"], key[row["item"]]["variant"]) for row in rows]
    assert order != sorted(order)
    # Seeded: the same seed gives the same sheet; another seed another order.
    again, _, _ = build(tmp_path / "again")
    assert again.read_text() == text
    other, _, _ = build(tmp_path / "other", seed=10)
    assert other.read_text() != text


def test_round_trip_recovers_the_ratings(tmp_path):
    sheet, key_file, _ = build(tmp_path, sample_size=N_ROWS)  # every row, so the fractions are exact
    filled = fill(sheet, tmp_path / "ratings/alice.csv")
    summaries = human_scores([filled], key_file, outputs_for(tmp_path), samples=200, seed=3)
    for g, group in enumerate(GROUPS):
        entry = summaries[group]["metrics"]["human"]
        assert entry["value"] == pytest.approx(min(2 * g, N_ROWS) / N_ROWS)
        assert entry["scale"] == "0-1" and entry["n"] == N_ROWS
        assert entry["ci_low"] <= entry["value"] <= entry["ci_high"]
        on_disk = json.loads(outputs_for(tmp_path)[group][0].read_text())
        assert on_disk["model"] == group[0] and on_disk["config"] == group[2] and on_disk["layer"] is None
        rows = read_rows_csv(outputs_for(tmp_path)[group][1])
        assert {row_id: r["human"] for row_id, r in rows.items()} == {
            f"demo-{i}": float(i < 2 * g) for i in range(N_ROWS)
        }
    # The first group has no correct answer: a degenerate CI at 0.
    first = summaries[GROUPS[0]]["metrics"]["human"]
    assert first["ci_low"] == first["ci_high"] == 0.0


def test_two_raters_are_averaged_per_item(tmp_path):
    sheet, key_file, _ = build(tmp_path, sample_size=N_ROWS)
    alice = fill(sheet, tmp_path / "ratings/alice.csv")
    bob = fill(sheet, tmp_path / "ratings/bob.csv", rate=lambda row: "1")
    summaries = human_scores([alice, bob], key_file, outputs_for(tmp_path), samples=100)
    # group 1: alice says 2/6 correct, bob 6/6 -> mean of per-item means = (2 + 6) / 12
    assert summaries[GROUPS[1]]["metrics"]["human"]["value"] == pytest.approx(8 / 12)
    assert summaries[GROUPS[1]]["metrics"]["human"]["raters_per_item"] == 2


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda rows: [{**rows[0], "correct": ""}] + rows[1:], r"line 2, column 'correct': empty"),
        (lambda rows: rows[:2] + [{**rows[2], "correct": "yes"}] + rows[3:], r"line 4, column 'correct': 'yes'"),
        (lambda rows: rows[:1] + [{**rows[1], "item": "item-999"}] + rows[2:], r"line 3, column 'item': 'item-999'"),
        (lambda rows: rows + [rows[0]], r"column 'item': 'item-\w+' already rated on line 2"),
    ],
)
def test_malformed_sheet_names_line_and_column(tmp_path, edit, message):
    sheet, key_file, _ = build(tmp_path)
    rows = [{**row, "correct": "1"} for row in read_csv(sheet)]
    filled = fill(sheet, tmp_path / "ratings/r.csv", rate=lambda row: row["correct"], rows=edit(rows))
    with pytest.raises(DataError, match=message) as info:
        human_scores([filled], key_file, outputs_for(tmp_path))
    assert str(filled) in str(info.value)
    assert not any(path.exists() for pair in outputs_for(tmp_path).values() for path in pair)


def test_sheet_without_correct_column_and_unrated_group(tmp_path):
    sheet, key_file, _ = build(tmp_path)
    broken = tmp_path / "ratings/broken.csv"
    broken.parent.mkdir(parents=True)
    broken.write_text("item,answer\nitem-01,x\n")
    with pytest.raises(DataError, match="line 1: no column 'correct'"):
        human_scores([broken], key_file, outputs_for(tmp_path))
    key = read_key(key_file)
    only_smol = [row for row in read_csv(sheet) if key[row["item"]]["model"] == "smol"]
    partial = fill(sheet, tmp_path / "ratings/partial.csv", rows=only_smol)
    with pytest.raises(DataError, match="no ratings for model 'gemma'"):
        human_scores([partial], key_file, outputs_for(tmp_path))


# --------------------------------------------------------------------------------------------- stable items
def build_groups(tmp_path: Path, groups, answers=known_answers):
    """build() with every row sampled, for any list of groups."""
    sheet, key, _ = build(tmp_path, sample_size=N_ROWS, groups=groups, answers=answers)
    return sheet, key


def rated_without_answers(sheet: Path, out: Path) -> Path:
    """A rater's file that kept only item and correct (spreadsheets often drop or reorder columns)."""
    rows = read_csv(sheet)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("item,correct\n" + "".join(
        f"{row['item']},{1 if row['answer'] == row['reference'] else 0}\n" for row in rows))
    return out


def test_adding_a_group_keeps_item_ids_so_old_ratings_stay_with_their_answers(tmp_path):
    """A sheet rated, then a group added (new model or config) and the sheet rebuilt: the old ratings must
    still belong to the same (group, row), never be renumbered onto other answers."""
    two = GROUPS[:2]
    sheet, key_file = build_groups(tmp_path / "before", two)
    rated = rated_without_answers(sheet, tmp_path / "ratings/alice.csv")
    before = read_key(key_file)
    sheet_after, key_after = build_groups(tmp_path / "after", [*two, ("new", "base", "cfg_z")])
    after = read_key(key_after)
    assert all(after[item] == entry for item, entry in before.items())  # old items: same group and row
    outputs = {g: (tmp_path / f"out/{'_'.join(g)}.json", tmp_path / f"out/{'_'.join(g)}.rows.csv") for g in two}
    summaries = human_scores([rated], key_after, outputs, samples=100)
    # Group g answers rows i < 2g correctly: the ratings recover exactly that, per row.
    for g, group in enumerate(two):
        assert summaries[group]["metrics"]["human"]["value"] == pytest.approx(min(2 * g, N_ROWS) / N_ROWS)
        rows = read_rows_csv(outputs[group][1])
        assert {row_id: r["human"] for row_id, r in rows.items()} == {f"demo-{i}": float(i < 2 * g) for i in range(N_ROWS)}


def test_ratings_of_changed_answers_are_rejected_not_misattributed(tmp_path):
    """Generations rerun (another adapter, another seed) after rating: the answers changed, so a rated file
    without its `answer` column cannot be matched to the new answers and must fail, naming the item."""
    sheet, key_file = build_groups(tmp_path / "before", GROUPS)
    rated = rated_without_answers(sheet, tmp_path / "ratings/alice.csv")
    def changed(g, i):  # group 1 regenerated: its right answers are now wrong and vice versa
        if g == 1:
            return f"wrong {i}" if i < 2 * g else f"answer {i}"
        return f"answer {i}" if i < 2 * g else f"wrong {i}"

    sheet_after, key_after = build_groups(tmp_path / "after", GROUPS, answers=changed)
    with pytest.raises(DataError, match=r"alice.csv, line \d+, column 'item': 'item-\w+' is not an item of") as info:
        human_scores([rated], key_after, outputs_for(tmp_path), sheet_csv=sheet_after)
    assert "rebuilt" in str(info.value)
    # Only the regenerated group's items changed id; the other groups' items are still those of the key.
    key_before, key_now = read_key(key_file), read_key(key_after)
    regenerated = {item for item, entry in key_before.items() if (entry["model"], entry["variant"]) == ("smol", "finetuned")}
    assert regenerated and not regenerated & set(key_now)
    assert all(key_now[item] == key_before[item] for item in set(key_before) - regenerated)
