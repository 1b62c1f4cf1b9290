"""collect -> clean on the embedded variants: the dataset contract and its accounting."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.manifest import REQUIRED_COLUMNS, read_dataset, read_report
from pipeline.runner import run_step


def test_collect_digits_follows_contract(project):
    report = run_step("collect", "digits")
    ds = read_dataset("data/digits/collect")
    assert len(ds) == 1797 and ds.images.shape == (1797, 8, 8, 1) and ds.images.dtype == np.uint8
    assert set(REQUIRED_COLUMNS) <= set(ds.manifest.columns)
    assert ds.manifest["id"].is_unique
    assert report["rows_in"] == report["rows_out"] + report["rows_removed"]
    # Stratified: every class is in every split, test share close to 20%.
    counts = pd.crosstab(ds.manifest["label"], ds.manifest["split"])
    assert (counts > 0).all().all()
    assert abs(report["rows_by_split"]["test"] / 1797 - 0.2) < 0.01


def test_collect_is_deterministic(project):
    run_step("collect", "iris")
    first = read_dataset("data/iris/collect").manifest
    run_step("collect", "iris")
    again = read_dataset("data/iris/collect").manifest
    pd.testing.assert_frame_equal(first, again)


def test_clean_removes_iris_duplicate_keeping_test_copy(project):
    run_step("collect", "iris")
    report = run_step("clean", "iris")
    assert report["rows_in"] == 150 and report["rows_out"] == 149
    (removed,) = report["removed"]
    assert removed["reason"] == "exact_duplicate"
    kept = read_dataset("data/iris/clean").manifest.set_index("id")
    assert removed["id"] not in kept.index and removed["dup_of"] in kept.index
    assert read_report("data/iris/clean").rows_removed == 1


def test_clean_digits_defaults_flag_few_and_account_for_everything(project):
    """digits has genuinely near-identical 8x8 images; its threshold (params) keeps the
    default pipeline running: a handful of findings, every removal a leak's training copy."""
    run_step("collect", "digits")
    report = run_step("clean", "digits")
    assert report["rows_in"] == report["rows_out"] + report["rows_removed"]
    assert set(report["removed_by_reason"]) <= {"leakage", "exact_duplicate"}
    assert 0 < report["rows_removed"] <= 20 and report["leaked_rows_remaining"] == 0
    findings = pd.read_parquet("data/digits/clean/findings.parquet")
    assert len(findings) == report["findings"] <= 30
    leaks = findings[findings["rule"] == "leakage"]
    assert (leaks["split"] == "train").all() and (leaks["other_split"] != "train").all()
    assert (leaks["distance"] <= 0.005).all() and (leaks["action"] == "drop").all()
    assert report["near_duplicate_index"][0]["method"] == "exact"
    assert "digits/" in open("data/digits/clean/contact_sheet.html").read()
