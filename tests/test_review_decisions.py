"""People's decisions: Label Studio exports and CSVs read, voted, applied with provenance.

Pure functions in memory first; then the annotate step and `fmpipe review import` on iris.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.errors import FmpipeError
from pipeline.review.decisions import (
    ReadStats,
    apply_decisions,
    parse_decisions_csv,
    parse_label_studio_export,
    read_decisions,
    resolve,
)
from helpers import fmpipe, run_data_steps
from ls_export import annotation, dumps, task

CLASSES = ["cat", "dog", "fox"]


def manifest(n: int = 6) -> pd.DataFrame:
    return pd.DataFrame({
        "id": pd.array([f"img/{i}" for i in range(n)], dtype="string"),
        "split": pd.array(["train"] * (n - 2) + ["test"] * 2, dtype="string"),
        "label": np.array([i % 3 for i in range(n)], dtype=np.int64),
        "label_name": pd.array([CLASSES[i % 3] for i in range(n)], dtype="string"),
        "sha256": pd.array([f"h{i}" for i in range(n)], dtype="string"),
    })


def export(*tasks) -> str:
    return dumps(list(tasks))


def test_export_gives_relabel_confirm_drop_and_ignores_cancelled():
    text = export(
        task("img/0", [annotation("dog", user=1, note="ears")]),              # cat -> dog
        task("img/1", [annotation("dog", user={"id": 2, "email": "b@x.org"})]),  # confirm
        task("img/2", [annotation("drop", user=1)]),
        task("img/3", [annotation("fox", user=1, cancelled=True)]),            # skipped
        task("img/4", []),
    )
    stats = ReadStats(files=[])
    votes = parse_label_studio_export(text, "ann/a.json", CLASSES, stats)
    assert [(v.id, v.option) for v in votes] == [("img/0", "1"), ("img/1", "1"), ("img/2", "drop")]
    assert votes[0].note == "ears" and votes[1].annotator == "b@x.org" and votes[0].annotator == "label-studio-user:1"
    assert stats.cancelled_ignored == 1 and stats.tasks_without_annotations == 1

    m, keep, found = apply_decisions(manifest(), CLASSES, resolve(votes))
    assert (found["relabelled"], found["confirmed"], found["dropped"], found["untouched"]) == (1, 1, 1, 3)
    assert keep.tolist() == [True, True, False, True, True, True]
    row = m.set_index("id").loc["img/0"]
    assert (row["label"], row["label_name"], row["previous_label"], row["decision"]) == (1, "dog", 0, "relabel")
    assert row["label_source"] == "annotation" and row["annotator"] == "label-studio-user:1"
    assert row["annotated_at"] == "2026-11-24T10:00:00.000000Z" and row["decision_file"] == "ann/a.json"
    confirmed = m.set_index("id").loc["img/1"]
    assert confirmed["decision"] == "confirm" and confirmed["label"] == 1 and confirmed["previous_label"] == 1
    untouched = m.set_index("id").loc["img/3"]
    assert untouched["label_source"] == "source" and pd.isna(untouched["previous_label"])
    assert pd.isna(untouched["annotator"]) and untouched["label"] == 0
    assert found["removed"] == [{"id": "img/2", "reason": "dropped_by_annotation",
                                 "annotator": "label-studio-user:1", "decision_file": "ann/a.json"}]


def test_majority_wins_and_a_tie_goes_to_the_latest_vote():
    text = export(
        task("img/0", [annotation("dog", user=1, at="2026-11-24T10:00:00Z"),
                       annotation("dog", user=2, at="2026-11-24T10:01:00Z"),
                       annotation("fox", user=3, at="2026-11-24T10:09:00Z")]),
        task("img/1", [annotation("fox", user=1, at="2026-11-24T10:05:00Z"),
                       annotation("cat", user=2, at="2026-11-24T10:02:00Z")]),
    )
    res = resolve(parse_label_studio_export(text, "a.json", CLASSES))
    assert (res["img/0"].label, res["img/0"].rule) == (1, "majority")
    assert (res["img/1"].label, res["img/1"].rule) == (2, "tie, latest wins")
    m, _, found = apply_decisions(manifest(), CLASSES, res)
    assert found["contested"] == 2
    change = next(c for c in found["changes"] if c["id"] == "img/0")
    assert change["annotator"] == "label-studio-user:1, label-studio-user:2"
    assert {v["choice"] for v in change["votes"]} == {"dog", "fox"}


def test_one_vote_per_annotator_so_a_project_exported_twice_counts_once():
    first = export(task("img/0", [annotation("dog", user=1, at="2026-11-24T10:00:00Z")]))
    later = export(task("img/0", [annotation("dog", user=1, at="2026-11-24T10:00:00Z"),
                                  annotation("fox", user=2, at="2026-11-24T11:00:00Z")]))
    votes = parse_label_studio_export(first, "a.json", CLASSES) + parse_label_studio_export(later, "b.json", CLASSES)
    res = resolve(votes)["img/0"]
    # user 1 counted once: 1 vs 1, the latest (user 2, fox) wins the tie
    assert len(res.votes) == 2 and res.superseded == 1 and res.label == 2


def test_annotator_changing_their_mind_counts_their_latest():
    votes = parse_decisions_csv("id,label,annotator,annotated_at\nimg/0,dog,ann,2026-11-24T09:00:00Z\n",
                                "a.csv", CLASSES)
    votes += parse_decisions_csv("id,label,annotator,annotated_at\nimg/0,cat,ann,2026-11-24T12:00:00Z\n",
                                 "b.csv", CLASSES)
    res = resolve(votes)["img/0"]
    assert res.label == 0 and res.superseded == 1


@pytest.mark.parametrize("text, message", [
    ("{", "a.json:1: not a Label Studio JSON export: expected a list"),
    ("[\n  {\"data\": {\"fmpipe_id\": \"img/0\"},\n  \"annotations\": [}\n]", "a.json:3: not valid JSON"),
    ("[\n {\"annotations\": []}\n]", "a.json:2: task 0: no 'data' object"),
    ("[\n {\"data\": {\"image\": \"x\"}, \"annotations\": []}\n]", "data.fmpipe_id is missing"),
])
def test_malformed_export_names_file_and_line(text, message):
    with pytest.raises(FmpipeError) as err:
        parse_label_studio_export(text, "a.json", CLASSES)
    assert message in str(err.value)


def test_unknown_class_names_file_line_task_and_id():
    text = export(task("img/0", [annotation("dog")]), task("img/1", [annotation("wolf")]))
    with pytest.raises(FmpipeError) as err:
        parse_label_studio_export(text, "ann/x.json", CLASSES)
    msg = str(err.value)
    line = text.splitlines().index("  {", 3) + 1  # the second task's first line
    assert f"ann/x.json:{line}: task 1 (id img/1), annotation 0: label 'wolf'" in msg and "is not a class" in msg


def test_unknown_id_is_an_error_and_an_id_removed_by_clean_a_warning():
    votes = parse_label_studio_export(export(task("img/99", [annotation("dog")])), "a.json", CLASSES)
    with pytest.raises(FmpipeError, match=r"a\.json:2: task 0 \(id img/99\).*not in the cleaned dataset"):
        apply_decisions(manifest(), CLASSES, resolve(votes))
    _, keep, found = apply_decisions(manifest(), CLASSES, resolve(votes), {"img/99": "duplicate"})
    assert keep.all() and found["skipped_removed_by_clean"][0]["clean_reason"] == "duplicate"


@pytest.mark.parametrize("text, message", [
    ("", "a.csv: empty file"),
    ("identifier,label\n", "a.csv:1: expected columns id,label"),
    ("id,label,note\nimg/0,dog,\nimg/0,fox,\n", "a.csv:3: id 'img/0' is annotated twice (first on line 2)"),
    ("id,label,note\n\nimg/0,wolf,x\n", "a.csv:3: label 'wolf' for id 'img/0' is not a class"),
    ("id,label\nimg/0,7\n", "a.csv:2: label '7'"),
    ("id,label,annotated_at\nimg/0,dog,yesterday\n", "a.csv:2: timestamp 'yesterday' is not ISO 8601"),
])
def test_bad_csv_names_file_and_line(text, message):
    with pytest.raises(FmpipeError) as err:
        parse_decisions_csv(text, "a.csv", CLASSES)
    assert message in str(err.value)


def test_csv_accepts_names_indices_and_drop():
    votes = parse_decisions_csv("id,label,note\nimg/0,dog,x\nimg/1,2,\nimg/2,drop,dup\n", "a.csv", CLASSES)
    assert [v.option for v in votes] == ["1", "2", "drop"] and votes[0].annotator == "csv:a.csv"


def test_directory_reads_json_and_csv_and_refuses_other_files(tmp_path):
    (tmp_path / "labels.csv").write_text("id,label,note\nimg/0,dog,\n")
    (tmp_path / "project-1.json").write_text(export(task("img/1", [annotation("cat")])))
    (tmp_path / "README.md").write_text("notes\n")
    votes, stats = read_decisions(tmp_path, CLASSES)
    assert sorted(v.id for v in votes) == ["img/0", "img/1"] and len(stats.files) == 2
    (tmp_path / "export.xlsx").write_bytes(b"PK")
    with pytest.raises(FmpipeError, match="export.xlsx: not a decision file"):
        read_decisions(tmp_path, CLASSES)


# ---------------------------------------------------------------- the annotate step and the CLI


@pytest.fixture
def iris_clean(project):
    run_data_steps("iris", "collect", "clean", "validate")
    return project


def test_annotate_applies_an_imported_export_with_provenance(iris_clean, tmp_path):
    from pipeline.manifest import read_dataset
    from pipeline.runner import run_step

    before = read_dataset("data/iris/clean").manifest.set_index("id")
    src = tmp_path / "project-3-at-2026-11-24.json"
    src.write_text(export(
        task("iris/000", [annotation("versicolor", user=7, note="petals")], extra_data={"split": "train"}),
        task("iris/001", [annotation("setosa", user=7)]),
        task("iris/002", [annotation("drop", user=7)]),
        task("iris/003", [annotation("virginica", user=7, cancelled=True)]),
    ))
    result = fmpipe("review", "import", str(src), "--stage", "iris")
    assert result.returncode == 0, result.stderr
    assert "1 relabel, 1 confirm, 1 drop" in result.stdout
    dest = iris_clean / "annotations/iris" / src.name
    assert dest.read_bytes() == src.read_bytes()
    assert "already imported" in fmpipe("review", "import", str(src), "--stage", "iris").stdout

    report = run_step("annotate", "iris")
    assert (report["relabelled"], report["confirmed"], report["dropped"], report["cancelled_ignored"]) == (1, 1, 1, 1)
    assert report["rows_in"] == report["rows_out"] + report["rows_removed"] == len(before)
    assert report["removed"][0]["id"] == "iris/002"
    m = read_dataset("data/iris/annotate").manifest.set_index("id")
    assert "iris/002" not in m.index
    assert m.at["iris/000", "label_name"] == "versicolor" and m.at["iris/000", "previous_label"] == 0
    assert m.at["iris/000", "annotator"] == "label-studio-user:7"
    assert m.at["iris/000", "decision_file"] == f"annotations/iris/{src.name}"
    untouched = m.drop(index=["iris/000", "iris/001"])
    assert (untouched["label_source"] == "source").all()
    assert (untouched["label"] == before.loc[untouched.index, "label"]).all()
    assert (untouched["sha256"] == before.loc[untouched.index, "sha256"]).all()


def test_import_refuses_a_bad_export_and_writes_nothing(iris_clean, tmp_path):
    src = tmp_path / "bad.json"
    src.write_text(export(task("iris/000", [annotation("tulip")])))
    result = fmpipe("review", "import", str(src), "--stage", "iris")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{src}:2: task 0 (id iris/000), annotation 0: label 'tulip'" in result.stderr
    assert not (iris_clean / "annotations/iris/bad.json").exists()
    src.write_text(export(task("iris/777", [annotation("setosa")])))
    result = fmpipe("review", "import", str(src), "--stage", "iris")
    assert result.returncode == 1 and "id 'iris/777' is not in the cleaned dataset" in result.stderr
    src.write_text(export(task("iris/000", [annotation("setosa", cancelled=True)])))
    result = fmpipe("review", "import", str(src), "--stage", "iris")
    assert result.returncode == 1 and "contains no decisions (1 cancelled" in result.stderr


def test_legacy_csv_location_is_refused_with_the_move_command(iris_clean):
    (iris_clean / "annotations/iris.csv").write_text("id,label,note\n")
    result = fmpipe("annotate", "--stage", "iris")
    assert result.returncode == 1
    assert "git mv annotations/iris.csv annotations/iris/labels.csv" in result.stderr


def test_bad_decision_file_stops_annotate_and_keeps_previous_output(iris_clean):
    from pipeline.io import sha256_file
    from pipeline.runner import run_step

    run_step("annotate", "iris")
    before = sha256_file("data/iris/annotate/manifest.parquet")
    (iris_clean / "annotations/iris/x.json").write_text(json.dumps([{"data": {"fmpipe_id": "iris/000"},
                                                                       "annotations": [{"result": [], "completed_by": 1,
                                                                                        "was_cancelled": False}]},
                                                                      {"data": {}}], indent=1))
    result = fmpipe("annotate", "--stage", "iris")
    assert result.returncode == 1 and "annotations/iris/x.json:" in result.stderr and "task 1" in result.stderr
    assert sha256_file("data/iris/annotate/manifest.parquet") == before


def readme_label_studio_example() -> str:
    """docs/review.md's Label Studio export example: its first ```json block."""
    section = (Path(__file__).resolve().parents[1] / "docs" / "review.md").read_text()
    start = section.index("```json\n") + len("```json\n")
    return section[start:section.index("```", start)]


def test_readme_label_studio_example_is_what_the_real_import_reads(project, tmp_path):
    """The export format a newcomer copies from docs/review.md goes through `fmpipe review import`
    and annotate as that page says: one relabel (with its note), one drop, one confirm."""
    from pipeline.runner import run_step

    run_step("collect", "digits")
    run_step("clean", "digits")
    src = tmp_path / "project-1-at-2026-11-24-12-00-abcd.json"
    src.write_text(readme_label_studio_example())
    result = fmpipe("review", "import", str(src), "--stage", "digits")
    assert result.returncode == 0, result.stderr
    assert "1 relabel, 1 confirm, 1 drop" in result.stdout
    run_step("validate", "digits")
    report = run_step("annotate", "digits")
    assert (report["relabelled"], report["confirmed"], report["dropped"]) == (1, 1, 1)
    change = next(c for c in report["changes"] if c["id"] == "digits/0421")
    assert change["note"] == "looks like a 9"
