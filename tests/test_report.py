"""The report page and the offline DVC plots page, opened in real headless Chromium offline.

One real digits run (``fmpipe run``, the report its last step, no mocks; conftest.py: ``digits_run``);
the DVC plots page is built by real ``dvc plots show`` from the project's own dvc.yaml over
that run's outputs, in a temporary git + DVC repo.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from browser import open_page
from helpers import REPO, fmpipe
from pipeline import steps as registry

@pytest.fixture(scope="module")
def digits(digits_run, tmp_path_factory) -> Path:
    """A copy of the session's digits run (its last step wrote the report; one train row,
    ``DIGITS_RELABEL``, relabelled by an annotation)."""
    root = digits_run.copy(tmp_path_factory.mktemp("digits") / "project")
    assert (root / "data" / "digits" / "report" / "index.html").is_file()
    return root


def _rows(page, selector: str) -> int:
    return page.evaluate(f"document.querySelectorAll({json.dumps(selector)}).length")


def test_digits_report_renders_offline(digits, tmp_path):
    index = digits / "data" / "digits" / "report" / "index.html"
    summary = json.loads((digits / "data" / "digits" / "validate" / "summary.json").read_text())
    seen = {}

    def check(page):
        seen["images"] = page.evaluate(
            "Array.from(document.images).map(i => [i.className, i.naturalWidth, i.naturalHeight])")
        seen["sections"] = page.evaluate("Array.from(document.querySelectorAll('section')).map(s => s.id)")
        for cls in ("counts", "validation", "per-class", "files", "changes", "resources", "slices", "robustness"):
            seen[cls] = _rows(page, f"table.{cls} tbody tr")
        seen["change_thumbs"] = _rows(page, "table.changes img.thumb")
        seen["errors"] = _rows(page, ".error")
        seen["text"] = page.evaluate("document.body.innerText")
        seen["scroll_width"] = page.evaluate("document.documentElement.scrollWidth")
        # Each review group's table: its scores in rank order.
        seen["queue_scores"] = page.evaluate(
            "Array.from(document.querySelectorAll('table.queue')).map(t => Array.from(t.querySelectorAll('tbody tr'))"
            ".map(r => parseFloat(r.children[r.children.length - 3].innerText)))")
        seen["given_colours"] = page.evaluate(
            "Array.from(new Set(Array.from(document.querySelectorAll('.given')).map(e => getComputedStyle(e).color)))")

    page = open_page(index, tmp_path / "digits_report.png", check)
    assert page.external_requests == []
    assert page.screenshot.stat().st_size > 10_000
    assert seen["sections"] == ["data", "labels", "training", "evaluation", "slices", "package", "what-changed"]
    plots = [i for i in seen["images"] if i[0] == "plot"]
    # rows per class, training curves, per-class F1, confusion matrix, reliability, accuracy per
    # slice, accuracy under corruptions, and the attributions of the mistakes (when there is a
    # mistake) and of the worst slice's examples (when a slice is gated)
    details = digits / "data" / "digits" / "evaluate" / "details"
    explained = sum((details / name).exists() for name in ("explanations.png", "explanations_worst_slice.png"))
    assert (details / "explanations_worst_slice.png").exists()
    assert len(plots) == 7 + explained and all(w > 0 and h > 0 for _, w, h in plots)
    metrics = json.loads((digits / "data" / "digits" / "evaluate" / "metrics.json").read_text())
    assert seen["slices"] == metrics["slices"]["slices"]  # every slice of slices.csv, one row each
    assert seen["robustness"] == 6  # one row per image corruption
    assert seen["counts"] == 10 + 1  # ten classes and the total row
    assert seen["validation"] == summary["expectations"]
    assert seen["per-class"] == 10
    assert seen["files"] >= 4  # at least weights, model.json, ONNX, model card
    assert seen["changes"] == 1 and seen["change_thumbs"] == 1
    assert seen["resources"] == len(registry.ORDER) - 1  # the runner's record of every step but report
    assert seen["errors"] == 0  # every artefact of a real run was read
    # Readable: nothing wider than the window, no "nan" cells, passes summarised in one line
    # (the list folded away), review groups each in the queue's one ranking, one colour for "given".
    assert seen["scroll_width"] <= 1280
    assert "nan" not in seen["text"].split() and f"{summary['expectations']} passed" in seen["text"]
    assert seen["queue_scores"] and all(s == sorted(s, reverse=True) for s in seen["queue_scores"])
    assert len(seen["given_colours"]) == 1
    # The pictures are written beside the page too, for `dvc plots show`.
    # (reliability.png too, unless evaluate wrote its own reliability picture, which the page inlines)
    assert {"confusion.png", "per_class.png", "rows_per_class.png", "training_curves.png", "slices.png",
            "robustness.png"} <= {
        p.name for p in (index.parent / "plots").iterdir()}


def test_same_inputs_give_the_same_page(digits):
    """Same inputs, same page: the report itself adds no timestamps or random ids."""
    index = digits / "data" / "digits" / "report" / "index.html"
    first = index.read_bytes()
    assert fmpipe("report", "--stage", "digits", cwd=digits).returncode == 0
    assert index.read_bytes() == first


def _dvc_repo(digits: Path, dest: Path) -> Path:
    """A git + DVC repo with the project's dvc.yaml and the digits run's outputs in its workspace."""
    dest.mkdir()
    shutil.copy(REPO / "dvc.yaml", dest / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["enabled"] = ["digits"]
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(digits / "data", dest / "data")
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    return dest


def _render_plots(page_path: Path, shot: Path):
    seen = {}

    def check(page):
        # vega-embed renders asynchronously: wait until three charts have a size (at most 10 s),
        # not a fixed time.
        page.evaluate("""new Promise(done => { const t0 = Date.now(); (function poll() {
            const n = Array.from(document.querySelectorAll('canvas, svg.marks'))
                .filter(c => c.getBoundingClientRect().width > 0).length;
            if (n >= 3 || Date.now() - t0 > 10000) done(n); else setTimeout(poll, 50); })(); })""")
        seen["charts"] = page.evaluate(
            "Array.from(document.querySelectorAll('canvas, svg.marks')).map(c => c.getBoundingClientRect().width)")
        seen["images"] = page.evaluate("Array.from(document.images).map(i => i.naturalWidth)")

    return open_page(page_path, shot, check), seen


def test_dvc_plots_page_renders_offline(digits, tmp_path):
    repo = _dvc_repo(digits, tmp_path / "repo")
    done = fmpipe("plots", cwd=repo)
    assert done.returncode == 0, done.stderr
    page, seen = _render_plots(repo / "dvc_plots" / "index.html", tmp_path / "dvc_plots.png")
    assert page.external_requests == []
    # Vega charts: confusion, per-class F1 and the four DVCLive curves (train/val loss and acc).
    assert len(seen["charts"]) >= 3 and all(w > 0 for w in seen["charts"])
    # The report's PNGs (and any other image plot in dvc.yaml), embedded.
    assert len(seen["images"]) >= 4 and all(w > 0 for w in seen["images"])

    # DVC's own page, for contrast: it loads Vega from a CDN, which offline means blank charts
    # (read, not rendered: a browser start costs seconds, and the script tags say it).
    subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "-o", "plain"], cwd=repo, check=True,
                   capture_output=True)
    plain = (repo / "plain" / "index.html").read_text()
    assert re.search(r'<script[^>]+src="https://cdn\.jsdelivr\.net/', plain), plain[:2000]

    # --install makes plain `dvc plots show` offline in this checkout.
    assert fmpipe("plots", "--install", cwd=repo).returncode == 0
    subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "-o", "installed"], cwd=repo, check=True,
                   capture_output=True)
    installed, installed_seen = _render_plots(repo / "installed" / "index.html", tmp_path / "installed.png")
    assert installed.external_requests == [] and len(installed_seen["charts"]) >= 3


# --- without a pipeline run: what the page does with partial, unknown or broken inputs ---------

def _dataset(d: Path, ids: list[str], labels: list[int], split: list[str]) -> None:
    d.mkdir(parents=True)
    pd.DataFrame({"id": ids, "split": split, "label": labels,
                  "label_name": [str(x) for x in labels]}).to_parquet(d / "manifest.parquet")
    rng = np.random.default_rng(0)
    np.save(d / "images.npy", rng.integers(0, 255, (len(ids), 8, 8, 1), dtype=np.uint8))
    (d / "dataset.json").write_text(json.dumps({"kind": "image", "classes": ["0", "1"]}))


def test_partial_variant_shows_what_exists_and_says_what_is_missing(project):
    from pipeline.report import build_report

    v = Path("data/toy")
    ids = [f"toy/{i}" for i in range(6)]
    _dataset(v / "collect", ids, [0, 1, 0, 1, 0, 1], ["train", "train", "val", "val", "test", "test"])
    _dataset(v / "clean", ids[:5], [0, 1, 0, 1, 0], ["train", "train", "val", "val", "test"])
    (v / "clean" / "report.json").write_text(json.dumps({
        "step": "clean", "variant": "toy", "rows_in": 6, "rows_out": 5, "rows_removed": 1, "removed_by_reason": {"duplicate": 1},
        "removed": [{"id": "toy/5", "reason": "duplicate", "dup_of": "toy/4"}]}))
    # Columns a newer clean/review may write: the report takes what is there.
    pd.DataFrame({"rule": ["near_duplicate"], "id_a": ["toy/0"], "id_b": ["toy/2"], "score": [0.98]}).to_parquet(
        v / "clean" / "findings.parquet")
    (v / "review").mkdir()
    pd.DataFrame({"id": ["toy/1", "toy/3"], "priority": [0.9, 0.5], "suggested": ["0", "1"]}).to_parquet(
        v / "review" / "queue.parquet")
    (v / "evaluate").mkdir()
    (v / "evaluate" / "metrics.json").write_text("{not json")
    # A picture another step wrote (e.g. a contact sheet) and its page: inlined and linked.
    from PIL import Image

    Image.new("RGB", (40, 30), "red").save(v / "review" / "sheet.png")
    (v / "review" / "sheet.html").write_text("<p>sheet</p>")

    html = build_report("toy").read_text()
    assert html.count('class="thumb"') == 2 + 2 + 2  # removed row and its twin, finding pair, queue rows
    assert "Could not show this section: data/toy/evaluate/metrics.json: not valid JSON" in html
    for absent in ("validation", "training summary", "package"):
        assert f"Not available: {absent}" in html
    assert "http://" not in html and "https://" not in html
    assert 'alt="review/sheet.png"' in html and 'href="../review/sheet.html"' in html


def test_report_with_no_data_yet_says_what_is_missing(project):
    """A variant that has not run: the page is written, every section says what is missing."""
    done = fmpipe("report", "--stage", "digits", cwd=project)
    assert done.returncode == 0, done.stderr
    html = (project / "data" / "digits" / "report" / "index.html").read_text()
    for absent in ("row counts", "clean report", "validation", "annotation report", "training summary",
                   "metrics", "package"):
        assert f"Not available: {absent}" in html


def test_report_of_unknown_variant_is_one_line(project):
    done = fmpipe("report", "--stage", "nope", cwd=project)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fmpipe report --stage nope: error:") and "nope" in lines[0][30:]


def test_plots_outside_a_dvc_project_is_one_line(tmp_path):
    done = fmpipe("plots", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"fmpipe plots: error: {tmp_path.resolve()}: not a DVC project (no .dvc/ folder); run this from the project root"]
