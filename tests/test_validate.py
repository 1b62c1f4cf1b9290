"""The Great Expectations gate: real GX runs on the embedded variants, passing and broken."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import fmpipe, run_data_steps
from pipeline.quality.expectations import init_command
from pipeline.quality.gate import require_passed
from pipeline.runner import run_step
import yaml

from pipeline.errors import FmpipeError
from pipeline.manifest import reseal


@pytest.fixture
def cleaned(project) -> Path:
    """The scratch project with data/<variant>/clean/ in place for both variants."""
    for variant in ("digits", "iris"):
        run_data_steps(variant, "collect", "clean")
    return project


def _edit_manifest(variant: str, change) -> None:
    path = Path("data") / variant / "clean" / "manifest.parquet"
    manifest = pd.read_parquet(path)
    change(manifest)
    manifest.to_parquet(path, index=False)
    reseal(path.parent)  # a deliberate edit: the validate gate, not the digest check, is under test


def _set_validate_params(variant: str, **values) -> None:
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["variants"][variant]["validate"].update(values)
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.parametrize("variant", ["digits", "iris", "binary"])
def test_embedded_variants_pass(cleaned, variant):
    """The committed suites pass on their variants' data; binary's too (not enabled by default,
    yet shipped: a fresh clone that enables it runs it through this gate)."""
    if variant == "binary":
        run_data_steps(variant, "collect", "clean")
    summary = run_step("validate", variant)
    out = Path("data") / variant / "validate"
    assert summary["success"] and summary["failed"] == []
    assert json.loads((out / "summary.json").read_text()) == summary
    results = json.loads((out / "results.json").read_text())
    assert results["success"] is True
    assert len(results["validation"]["results"]) == summary["expectations"] > 40
    # Every severity is in use and the suite covers what the issue lists.
    assert set(summary["by_severity"]) == {"critical", "warning", "info"}
    covers = {r["covers"].split(":")[0] for r in summary["table"]}
    assert {"contract", "rows", "rows per split", "label set", "class balance", "no leakage left after cleaning"} <= covers
    if variant == "digits":
        assert {"image shape", "pixel mean range", "pixel std range"} <= covers
    index = (out / "data_docs" / "index.html").read_text()
    assert variant in index
    # GX ran in memory: no GX project scaffolded in the working directory.
    assert not any(p.name in ("gx", "great_expectations", "great_expectations.yml") for p in cleaned.rglob("*"))
    require_passed(Path(f"data/{variant}/validate/summary.json"), variant)  # does not raise
    run_step("annotate", variant)


def test_row_count_threshold_fails_and_annotate_refuses(cleaned):
    # All 1797 rows (more would be refused at load, before any step): clean left 1793.
    _set_validate_params("digits", min_rows=1797, max_rows=2000)
    with pytest.raises(FmpipeError) as failure:
        run_step("validate", "digits")
    message = str(failure.value)
    assert "expect_table_row_count_to_be_between" in message and "observed 1793" in message
    # The outputs are there to read even though the gate failed.
    out = Path("data/digits/validate")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["success"] is False
    assert [f["expectation"] for f in summary["failed"]] == ["expect_table_row_count_to_be_between"]
    assert summary["failed"][0]["observed"] == 1793  # 1797 minus 4 leaked training copies
    assert (out / "data_docs" / "index.html").exists()
    with pytest.raises(FmpipeError, match="fmpipe validate --stage digits"):
        run_step("annotate", "digits")


def test_corrupt_manifest_names_each_broken_expectation(cleaned):
    def corrupt(m: pd.DataFrame) -> None:
        m.loc[3, "label"] = 42  # outside the 10 classes
        m.loc[5, "id"] = m.loc[6, "id"]  # a duplicated id

    _edit_manifest("digits", corrupt)
    with pytest.raises(FmpipeError) as failure:
        run_step("validate", "digits")
    failed = json.loads(Path("data/digits/validate/summary.json").read_text())["failed"]
    # label 42 also breaks the label/label_name pairing; nothing else is wrong.
    assert {(f["expectation"], f["column"]) for f in failed} == {
        ("expect_column_values_to_be_in_set", "label"),
        ("expect_column_values_to_be_unique", "id"),
        ("expect_column_pair_values_to_be_in_set", "label,label_name"),
    }
    # The error has one line per failure, each naming expectation, column and what was seen.
    lines = str(failure.value).splitlines()
    assert lines[0].startswith("3 critical expectation(s) of expectations/digits.json failed") and len(lines) == 4
    (label_line,) = [line for line in lines if "expect_column_values_to_be_in_set on column label " in line]
    assert "e.g. [42] at id ['digits/0003']" in label_line
    (id_line,) = [line for line in lines if "expect_column_values_to_be_unique on column id" in line]
    assert "2 unexpected value(s)" in id_line


def test_class_count_thresholds_name_the_class(cleaned):
    # The suite's per-class bounds are $PARAMETERs filled from params at run time.
    _set_validate_params("iris", min_rows_per_class=50)
    with pytest.raises(FmpipeError) as failure:
        run_step("validate", "iris")
    failed = json.loads(Path("data/iris/validate/summary.json").read_text())["failed"]
    # 150 iris rows minus one duplicate: only virginica (label 2) is below 50.
    assert [(f["expectation"], f["where"], f["observed"]) for f in failed] == [
        ("expect_table_row_count_to_be_between", "label==2", 49)]
    assert "expect_table_row_count_to_be_between on table where label==2" in str(failure.value)
    # At most floor(0.335 * 149) = 49 rows per class (below 1/3 the schema refuses at load).
    _set_validate_params("iris", min_rows_per_class=1, max_class_fraction=0.335)
    with pytest.raises(FmpipeError):
        run_step("validate", "iris")
    failed = json.loads(Path("data/iris/validate/summary.json").read_text())["failed"]
    assert sorted(f["where"] for f in failed) == ["label==0", "label==1"]  # 50 rows each; virginica 49


def test_missing_split_and_infinite_feature_fail(cleaned):
    def no_test_split(m: pd.DataFrame) -> None:
        m.loc[m["split"] == "test", "split"] = "train"

    _edit_manifest("iris", no_test_split)
    features_path = Path("data/iris/clean/features.parquet")
    features = pd.read_parquet(features_path)
    features.iloc[2, 1] = np.inf
    features.to_parquet(features_path, index=False)
    reseal(features_path.parent)
    with pytest.raises(FmpipeError) as failure:
        run_step("validate", "iris")
    message = str(failure.value)
    assert "expect_column_distinct_values_to_contain_set on column split" in message and "['test']" in message
    assert f"expect_column_values_to_be_between on column {features.columns[1]}" in message
    # The split sizes moved too: warnings, recorded beside the critical failures.
    summary = json.loads(Path("data/iris/validate/summary.json").read_text())
    assert {w["where"] for w in summary["warnings"] if w["severity"] == "warning"} == {'split=="train"', 'split=="test"'}
    # inf is kept readable but the files stay strict JSON.
    json.loads(Path("data/iris/validate/results.json").read_text(), parse_constant=pytest.fail)


def test_require_passed_without_validation(cleaned):
    with pytest.raises(FmpipeError, match=r"not been validated.*fmpipe validate --stage iris"):
        require_passed(Path("data/iris/validate/summary.json"), "iris")
    with pytest.raises(FmpipeError, match="fmpipe validate --stage iris"):
        run_step("annotate", "iris")


def test_cli_exits_nonzero_naming_the_expectation(cleaned):
    _edit_manifest("digits", lambda m: m.loc.__setitem__((0, "sha256"), "not-a-hash"))
    proc = fmpipe("validate", "--stage", "digits", timeout=120)
    assert proc.returncode != 0
    assert "expect_column_values_to_match_regex on column sha256" in proc.stderr
    assert "not-a-hash" in proc.stderr
    assert json.loads(Path("data/digits/validate/summary.json").read_text())["success"] is False


def _edit_suite(variant: str, change) -> None:
    path = Path("expectations") / f"{variant}.json"
    suite = json.loads(path.read_text())
    change(suite["expectations"])
    path.write_text(json.dumps(suite, indent=2))


def _pixel_mean(expectations):
    (e,) = [e for e in expectations
            if e["type"] == "expect_column_mean_to_be_between" and e["kwargs"]["column"] == "mean"]
    return e


def test_warning_failure_continues_and_is_recorded(cleaned):
    def impossible(expectations):
        e = _pixel_mean(expectations)
        e["kwargs"].update(min_value=200, max_value=210)
        assert e["severity"] == "warning"

    _edit_suite("digits", impossible)
    summary = run_step("validate", "digits")
    assert summary["success"] is True and summary["failed"] == []
    (warning,) = summary["warnings"]
    assert warning["expectation"] == "expect_column_mean_to_be_between" and warning["severity"] == "warning"
    assert 70 < warning["observed"] < 90
    assert json.loads(Path("data/digits/validate/summary.json").read_text())["warnings"] == summary["warnings"]
    require_passed(Path("data/digits/validate/summary.json"), "digits")
    run_step("annotate", "digits")  # the pipeline goes on


def test_critical_failure_stops_with_the_expectations_name(cleaned):
    def critical(expectations):
        e = _pixel_mean(expectations)
        e["kwargs"].update(min_value=200, max_value=210)
        e["severity"] = "critical"

    _edit_suite("digits", critical)
    with pytest.raises(FmpipeError, match=r"\[critical\] expect_column_mean_to_be_between on column mean"):
        run_step("validate", "digits")
    with pytest.raises(FmpipeError, match="failed validation"):
        run_step("annotate", "digits")


def test_leakage_left_after_cleaning_is_critical(cleaned):
    _edit_manifest("digits", lambda m: m.loc.__setitem__((4, "leaked"), True))
    with pytest.raises(FmpipeError, match="expect_column_values_to_be_in_set on column leaked.*digits/0004"):
        run_step("validate", "digits")


def test_broken_suites_are_clear_errors_naming_the_file(cleaned):
    path = Path("expectations/iris.json")
    good = path.read_text()
    path.write_text(good[:-20])
    with pytest.raises(FmpipeError, match=r"expectations/iris.json:\d+: not valid JSON"):
        run_step("validate", "iris")
    suite = json.loads(good)
    suite["expectations"][10]["kwargs"]["column"] = "petal_colour"
    path.write_text(json.dumps(suite))
    with pytest.raises(FmpipeError, match=r"expectations/iris.json: expectations\[10\] .* names column 'petal_colour'"):
        run_step("validate", "iris")
    suite = json.loads(good)
    suite["expectations"][3]["severity"] = "fatal"
    path.write_text(json.dumps(suite))
    with pytest.raises(FmpipeError, match="severity 'fatal' is not one of critical, warning, info"):
        run_step("validate", "iris")
    path.unlink()
    with pytest.raises(FmpipeError, match=r"expectations/iris.json: not found.*--init"):
        run_step("validate", "iris")


def test_init_writes_a_suite_that_passes_and_does_not_overwrite(cleaned):
    with pytest.raises(FmpipeError, match="exists .*--force"):
        init_command("iris")
    Path("expectations/iris.json").unlink()
    proc = fmpipe("validate", "--stage", "iris", "--init", timeout=120)
    assert proc.returncode == 0, proc.stderr
    written = json.loads(Path("expectations/iris.json").read_text())
    # Deterministic (no ids, no versions): the committed suite is what --init writes today.
    assert written == json.loads((Path(__file__).parents[1] / "expectations/iris.json").read_text())
    proc = fmpipe("validate", "--stage", "iris", timeout=120)
    assert proc.returncode == 0, proc.stderr
    # All passed: one summary line (under `dvc repro` the table was 48 lines of "pass").
    assert proc.stdout == "" and re.search(r"validate --stage iris: (\d+)/\1 expectations passed", proc.stderr)
    assert "expectation  " not in proc.stderr
    # A failure prints the table, failures marked, to read them in context.
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["variants"]["iris"]["validate"]["min_rows_per_class"] = 50
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = fmpipe("validate", "--stage", "iris", timeout=120)
    assert proc.returncode == 1
    header = proc.stdout.splitlines()[0].split()
    assert header == ["expectation", "severity", "result", "observed"]
    assert re.search(r"table_row_count_to_be_between · table where label==2 +critical +FAIL +49\n", proc.stdout)
