"""The review step's parts in memory: cross-validated scoring, cleanlab, finders, the queue and
the files people look at; then the whole step on a tiny digits model, twice (same bytes)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest

from helpers import annotated, make_model, run_data_steps
from pipeline.review.export import contact_sheet, label_config, label_studio_tasks, queue_table
from pipeline.quality.finders import (
    DROP_INDEX,
    ReviewInputs,
    build_queue,
    find_label_issues,
    find_near_duplicates,
    find_outliers,
)
from pipeline.review.scoring import cross_validated_head_probs, label_issues


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def blobs(n_per_class: int = 100, k: int = 3, flip: float = 0.05, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, 8)) * 4
    y = np.repeat(np.arange(k), n_per_class)
    x = centres[y] + rng.normal(size=(len(y), 8))
    noisy = y.copy()
    flipped = rng.choice(len(y), size=int(flip * len(y)), replace=False)
    noisy[flipped] = (y[flipped] + 1) % k
    return x, y, noisy, flipped


def manifest_for(labels: np.ndarray, split=None) -> pd.DataFrame:
    n = len(labels)
    return pd.DataFrame({"id": pd.array([f"r{i:03d}" for i in range(n)], dtype="string"),
                         "split": pd.array(split if split is not None else ["train"] * n, dtype="string"),
                         "label": labels.astype(np.int64)})


def test_cross_validated_head_finds_flipped_labels():
    x, truth, noisy, flipped = blobs()
    probs = cross_validated_head_probs(x, noisy, 3, folds=5, seed=0, c=1.0)
    assert np.allclose(probs.sum(axis=1), 1.0)
    # Out-of-fold: a flipped row's own (wrong) label did not train the head that scored it.
    assert (probs[flipped].argmax(axis=1) == truth[flipped]).mean() >= 0.9
    frame, _ = label_issues(noisy, probs, rank_by="self_confidence")
    flagged = set(np.flatnonzero(frame["is_issue"].to_numpy()))
    assert len(flagged & set(flipped)) >= 0.8 * len(flipped)
    assert len(flagged - set(flipped)) <= 5
    # The same seed gives the same folds and the same probabilities.
    assert np.array_equal(probs, cross_validated_head_probs(x, noisy, 3, folds=5, seed=0, c=1.0))


def test_label_list_is_chosen_within_scoring_groups_and_ranked_by_the_chance_the_label_is_wrong():
    labels = np.zeros(6, dtype=np.int64)
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.99, 0.01], [0.55, 0.45], [0.7, 0.3]])
    issues = pd.DataFrame({"is_issue": [False, True, False, False, False, False], "quality": probs[:, 0],
                           "suggested": probs.argmax(1), "given_prob": probs[:, 0], "suggested_prob": probs.max(1)})
    groups = np.array(["a", "a", "a", "b", "b", "b"], dtype=object)
    found = find_label_issues(ReviewInputs(manifest_for(labels), probs, issues, groups=groups), {})
    # One score across groups: 1 - p(given) (review calibrates each group's probabilities first).
    assert found["row"].tolist() == [1, 4, 2, 5, 0, 3]
    assert found["score"].round(4).tolist() == [0.8, 0.45, 0.4, 0.3, 0.1, 0.01]
    assert found["reason"].tolist()[:2] == ["label_issue", "low_label_quality"]
    assert (found["suggested"] == 1).all()  # the best class other than the given one
    # Membership is decided within each group: the lowest third of each by quality, plus
    # cleanlab's flags. Row 5 (0.3 doubt) is in: the 2nd lowest of group b is not in the third,
    # but the lowest of b (row 4) is; row 2 (0.4) is not the lowest of a (row 1 is).
    found = find_label_issues(ReviewInputs(manifest_for(labels), probs, issues, groups=groups),
                              {"low_quality_fraction": 1 / 3})
    assert found["row"].tolist() == [1, 4]


def test_near_duplicates_queue_the_less_protected_copy_and_suggest_drop():
    rng = np.random.default_rng(1)
    vecs = rng.normal(size=(6, 16)).astype(np.float32)
    vecs[4] = vecs[0] + 1e-4  # test row 0 ~ train row 4: a leak
    vecs[5] = vecs[2] + 1e-4  # two train rows: a near duplicate (the later id queued)
    m = manifest_for(np.array([0, 1, 0, 1, 1, 0]), split=["test", "train", "train", "train", "train", "train"])
    issues = pd.DataFrame({"given_prob": np.full(6, 0.9)})
    found = find_near_duplicates(ReviewInputs(m, np.zeros((6, 2)), issues, duplicate_vectors=vecs),
                                 {"duplicate_threshold": 0.01})
    got = {(r, rel, reason) for r, rel, reason in zip(found["row"], found["related_row"], found["reason"])}
    assert got == {(4, 0, "cross_split_duplicate_conflicting_labels"), (5, 2, "near_duplicate")}
    assert (found["suggested"] == DROP_INDEX).all()


def test_every_registered_finder_runs_with_its_params_and_is_a_queue_group():
    """Registration is the one list of finders: each runs with the params it declares (read
    from the review section, which is composed of them) and its rows form a queue group with
    the score meaning it registered."""
    from pipeline.config import ReviewSpec
    from pipeline.quality.finders import FINDERS, REGISTRY, SCORE_MEANING, finder_options

    spec = ReviewSpec(outlier_fraction=0.05, low_quality_fraction=0.05, duplicate_threshold=0.01)
    assert spec.finders == list(REGISTRY)  # the default: every registered finder, in order
    x, _, y, flipped = blobs(flip=0.05)
    x[7] = x[3] + 1e-4  # a near copy
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=len(y))
    frame, _ = label_issues(y, probs, rank_by="self_confidence")
    inputs = ReviewInputs(manifest_for(y), probs, frame, penultimate=x, duplicate_vectors=x)
    findings = {}
    for name, finder in REGISTRY.items():
        options = finder_options(spec, name)
        assert set(options) == set(finder.Params.model_fields) and set(options) <= set(ReviewSpec.model_fields)
        findings[name] = FINDERS[name](inputs, options)
        assert len(findings[name]), f"finder {name} found nothing"
        assert SCORE_MEANING[name] == finder.score and finder.score
    queue = build_queue(findings, size=len(y))
    assert set(queue["group"]) == set(REGISTRY)


def test_outliers_flag_the_row_far_from_every_class():
    x, _, y, _ = blobs(flip=0.0)
    x = np.vstack([x, np.full((1, 8), 50.0) * np.array([1, -1] * 4)])
    y = np.append(y, 0)
    m = manifest_for(y)
    issues = pd.DataFrame({"suggested": np.zeros(len(y), np.int64), "suggested_prob": np.ones(len(y)),
                           "given_prob": np.ones(len(y))})
    probs = np.full((len(y), 3), 0.1)
    probs[np.arange(len(y)), y] = 0.8  # the model agrees with every given label
    found = find_outliers(ReviewInputs(m, probs, issues, penultimate=x), {"outlier_fraction": 0.01})
    assert found["row"].iloc[0] == len(y) - 1 and len(found) == 4
    # The suggestion is the most probable *other* class (docs/review.md), never the label the row has.
    assert (found["suggested"].to_numpy() != y[found["row"].to_numpy()]).all()
    assert np.allclose(found["suggested_prob"], 0.1)


def _finding(rows, reason, scores):
    n = len(rows)
    return pd.DataFrame({"row": rows, "reason": [reason] * n, "score": scores,
                         "suggested": [0] * n, "suggested_prob": [0.5] * n, "given_prob": [0.1] * n,
                         "related_row": [-1] * n, "distance": [np.nan] * n})


def test_queue_is_one_ranking_that_merges_reasons_and_skips_decided_rows():
    q = build_queue({"label_issues": _finding([1, 2, 3, 4, 5], "label_issue", [0.9, 0.8, 0.7, 0.3, 0.2]),
                     "near_duplicates": _finding([2, 7], "near_duplicate", [0.95, 0.5]),
                     "outliers": _finding([9], "outlier", [0.6])}, size=5, skip_rows=np.array([3]))
    # Best score first whatever the finder; row 2 found twice takes its best finding.
    assert q["row"].tolist() == [2, 1, 9, 7, 4]
    assert q["group"].tolist() == ["near_duplicates", "label_issues", "outliers", "near_duplicates", "label_issues"]
    assert q["reasons"].tolist()[0] == "label_issue+near_duplicate"
    assert (np.diff(q["score"].to_numpy()) <= 0).all()
    # Equal scores: the finder listed first, then in that finder's own order.
    q = build_queue({"a": _finding([5, 4], "x", [0.5, 0.5]), "b": _finding([1], "y", [0.5])}, size=3)
    assert q["row"].tolist() == [5, 4, 1]


def test_queue_shares_cap_each_finder_and_what_they_hold_back_fills_the_rest():
    """review.<finder>_share: the most rows a finder may queue (ceil(share x size)); rows the caps
    held back come in last, best first, when the lists are otherwise spent."""
    from pipeline.config import ReviewSpec
    from pipeline.quality.finders import caps

    spec = ReviewSpec()
    defaults = {n: getattr(spec, f"{n}_share") for n in ("label_issues", "near_duplicates", "outliers")}
    assert caps(defaults, 300) == {"label_issues": 300, "near_duplicates": 45, "outliers": 45}
    assert caps({"a": 0.34}, 10) == {"a": 4} and caps({"a": 0.0}, 5) == {"a": 0}
    findings = {"label_issues": _finding(list(range(100, 120)), "label_issue", np.linspace(0.5, 0.1, 20)),
                "near_duplicates": _finding(list(range(200, 220)), "near_duplicate", np.linspace(0.99, 0.9, 20)),
                "outliers": _finding([300, 301, 100], "outlier", [0.7, 0.6, 0.55])}
    q = build_queue(findings, size=10, shares={"label_issues": 1.0, "near_duplicates": 0.2, "outliers": 0.2})
    assert q.groupby("group").size().to_dict() == {"label_issues": 6, "near_duplicates": 2, "outliers": 2}
    # Each finder's best rows, in one ranking.
    assert q["row"].tolist()[:4] == [200, 201, 300, 301] and set(q["row"][4:]) == set(range(100, 106))
    # Nothing else left: the best of the held-back near duplicates come in, in the one ranking.
    q = build_queue(findings, size=30, shares={"label_issues": 1.0, "near_duplicates": 0.1, "outliers": 0.1})
    assert len(q) == 30 and q["row"].is_unique and (np.diff(q["score"].to_numpy()) <= 0).all()
    assert set(q.loc[q["group"] == "near_duplicates", "row"]) == set(range(200, 208))
    # A share of 0: that finder's rows only come in if the others run out.
    q = build_queue(findings, size=5, shares={"label_issues": 1.0, "near_duplicates": 0.0, "outliers": 0.0})
    assert set(q["group"]) == {"label_issues"}


def test_label_studio_files_and_contact_sheet():
    m = pd.DataFrame({"id": pd.array(["a/1", "a/2"], dtype="string"), "split": pd.array(["train", "test"], dtype="string"),
                      "label": np.array([0, 1])})
    classes = ["cat", "dog & co"]
    queue = pd.DataFrame({"row": [0, 1], "reasons": ["label_issue", "cross_split_duplicate"], "score": [0.9, 0.99],
                          "group": ["label_issues", "near_duplicates"],
                          "suggested": [1, DROP_INDEX], "suggested_prob": [0.8, np.nan], "given_prob": [0.1, 0.7],
                          "related_row": [-1, 0], "distance": [np.nan, 0.004]})
    table = queue_table(queue, m, classes, np.array(["cv", "model"], dtype=object))
    assert table["suggested_label"].tolist() == ["dog & co", "drop"] and table["related_id"].tolist()[1] == "a/1"
    images = np.random.default_rng(0).integers(0, 255, size=(2, 8, 8, 3), dtype=np.uint8)
    tasks = label_studio_tasks(table, queue, kind="image", images=images, features=None, model_version="v1")
    assert tasks[0]["data"]["fmpipe_id"] == "a/1" and tasks[0]["predictions"][0]["score"] == 0.8
    assert tasks[0]["predictions"][0]["result"][0]["value"] == {"choices": ["dog & co"]}
    assert tasks[1]["predictions"][0]["result"][0]["value"] == {"choices": ["drop"]}
    config = ET.fromstring(label_config(classes, "image"))
    assert [c.get("value") for c in config.iter("Choice")] == ["cat", "dog & co", "drop"]
    html = contact_sheet(table, queue, title="t", kind="image", images=images, features=None, limit=1)
    assert html.count('class="card"') == 1 and "data:image/png;base64," in html and "http" not in html
    # No "nan" anywhere a person reads: the drop suggestion has no probability, so none is shown.
    full = contact_sheet(table, queue, title="t", kind="image", images=images, features=None)
    assert "nan" not in full.lower() and "nan" not in json.dumps([t["data"]["info"] for t in tasks]).lower()
    assert "suggested drop;" in tasks[1]["data"]["info"]


# ---------------------------------------------------------------- the step on a tiny model

@pytest.fixture
def digits_model(project):
    annotated("digits")
    make_model("digits", epochs=2)
    return project


def test_review_step_writes_every_output_deterministically(digits_model):
    from pipeline.io import sha256_file
    from pipeline.runner import run_step

    report = run_step("review", "digits")
    out = digits_model / "data/digits/review"
    names = {"queue.parquet", "queue.csv", "label_studio_tasks.json", "label_config.xml", "contact_sheet.html",
             "report.json"}
    assert names <= {p.name for p in out.iterdir()}
    assert 0 < report["queue"]["size"] <= 300 and report["changes_data"] is False
    assert report["scoring"]["by_split"]["test"]["scored_by"].startswith("trained network's softmax")
    first = {n: sha256_file(out / n) for n in names}
    run_step("review", "digits")
    assert {n: sha256_file(out / n) for n in names} == first
    queue = pd.read_csv(out / "queue.csv")
    assert len(json.loads((out / "label_studio_tasks.json").read_text())) == len(queue) == report["queue"]["size"]
    # Ranks follow one score, the chance a person changes the row, whatever finder queued it
    # (each finder's meaning of it in the report and on the page); the probabilities were
    # calibrated per scoring group (the temperatures are reported).
    assert queue["rank"].tolist() == list(range(1, len(queue) + 1))
    assert (np.diff(queue["score"].to_numpy()) <= 1e-9).all()
    groups = list(dict.fromkeys(queue["group"]))
    assert set(groups) == {g for g in report["queue"]["groups"] if report["queue"]["groups"][g]["rows"]}
    assert set(report["scoring"]["temperature"]) == {"val+test (model)", "train (cross-validated)"}
    assert all(0.05 <= t <= 20 for t in report["scoring"]["temperature"].values())
    sheet = (out / "contact_sheet.html").read_text()
    for g in groups:
        assert report["queue"]["groups"][g]["score"] in sheet.replace("&quot;", '"')
    assert " nan" not in sheet and "=nan" not in sheet
    # A suggestion is never the label the row already has (docs/review.md: the most probable other class).
    assert (queue["suggested_label"].astype(str) != queue["given_label"].astype(str)).all()
    # The 8 best-ranked rows carry where the network looked (Integrated Gradients), and only they.
    assert report["explained_rows"] == 8 and sheet.count('class="attr"') == 8
    top = queue.sort_values("rank").head(8)["id"].astype(str)
    assert all(f'alt="integrated gradients of {i}"' in sheet for i in top)


def test_full_model_scoring_retrains_per_fold(project):
    """``scoring: full_model`` (meant for a GPU): tiny here, iris, 2 folds of 3 epochs."""
    from pipeline.config import load_variant
    from pipeline.manifest import read_dataset
    from pipeline.review.review import full_model_probs

    run_data_steps("iris", "collect", "clean")
    ds = read_dataset("data/iris/clean", mmap=False)
    spec = load_variant("iris")
    train_rows = np.flatnonzero(ds.manifest["split"].to_numpy() == "train")
    probs = full_model_probs(ds, spec, train_rows, folds=2, seed=0, epochs=3, workdir=project)
    assert probs.shape == (len(train_rows), 3) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert (probs.argmax(1) == ds.manifest["label"].to_numpy()[train_rows]).mean() > 0.5
    assert not list(project.glob("fmpipe-review-folds-*"))  # the fold models are temporary


def test_contact_sheet_renders_offline_in_chromium(tmp_path):
    """The page people open: every image decodes from its data: URI, nothing is fetched."""
    from browser import open_page

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(12, 32, 32, 3), dtype=np.uint8)
    m = pd.DataFrame({"id": pd.array([f"test/{i}.png" for i in range(12)], dtype="string"),
                      "split": pd.array(["test"] * 12, dtype="string"), "label": np.arange(12) % 3})
    queue = pd.DataFrame({"row": np.arange(12), "reasons": ["label_issue"] * 11 + ["cross_split_duplicate"],
                          "group": ["label_issues"] * 11 + ["near_duplicates"],
                          "score": np.linspace(1, 0.5, 12), "suggested": [1] * 11 + [DROP_INDEX],
                          "suggested_prob": [0.9] * 11 + [np.nan], "given_prob": [0.05] * 12,
                          "related_row": [-1] * 11 + [0], "distance": [np.nan] * 11 + [0.003]})
    table = queue_table(queue, m, ["cat", "dog", "fox"], np.array(["model (out-of-sample)"] * 12, dtype=object))
    page_file = tmp_path / "contact_sheet.html"
    page_file.write_text(contact_sheet(table, queue, title="review", kind="image", images=images, features=None))
    seen = {}

    def check(page):
        seen["cards"] = page.evaluate("document.querySelectorAll('.card').length")
        seen["decoded"] = page.evaluate("Array.from(document.images).filter(i => i.complete && i.naturalWidth == 32).length")
        seen["text"] = page.evaluate("document.body.innerText")

    page = open_page(page_file, tmp_path / "shot.png", check)
    assert not page.external_requests and not page.console_errors
    assert seen["cards"] == 12 and seen["decoded"] == 13  # the leak card shows its near copy too
    assert "given cat" in seen["text"] and "suggested dog" in seen["text"] and "near copy: test/0.png" in seen["text"]


def test_review_scores_held_out_rows_with_the_models_tta_views(digits_model):
    """One inference path: val/test probabilities are the ones evaluate computes, TTA views included."""
    from pipeline.config import TTASpec, load_variant
    from pipeline.inference.tta import probabilities
    from pipeline.manifest import read_dataset
    from pipeline.models import load_trained
    from pipeline.inference.network import model_inputs, predict_logits
    from pipeline.inference.tta import softmax
    from pipeline.review.review import review
    from pipeline.inference.tta import tta_record

    meta_path = digits_model / "data/digits/train/model.json"
    meta = json.loads(meta_path.read_text())
    meta["tta"] = tta_record(TTASpec(flip=True, translate=1))
    meta_path.write_text(json.dumps(meta))
    ds = read_dataset(digits_model / "data/digits/annotate", mmap=False)
    result = review(ds, meta_path.parent, load_variant("digits"), variant="digits")
    assert result.report["scoring"]["tta"] == "flip + 1px translate TTA, 6 views"
    assert "6 views" in result.report["scoring"]["by_split"]["test"]["scored_by"]

    net, meta = load_trained(meta_path.parent)
    rows = np.flatnonzero(ds.manifest["split"].to_numpy() != "train")
    x = model_inputs(ds.take(rows))
    views = predict_logits(net, x, meta["tta"])
    # At the temperature fitted on the val rows' given labels (evaluate's fit), which the report names.
    from pipeline.evaluation.calibration import fit_temperature

    val = ds.manifest["split"].to_numpy()[rows] == "val"
    temperature = fit_temperature([v[val] for v in views], ds.manifest["label"].to_numpy()[rows][val], meta["tta"])
    assert result.report["scoring"]["temperature"]["val+test (model)"] == temperature != 1.0
    expected = probabilities(views, temperature, meta["tta"])
    np.testing.assert_allclose(result.probs[rows], expected, atol=1e-5)
    one_view = softmax(predict_logits(net, x))
    assert np.abs(result.probs[rows] - one_view).max() > 1e-3  # the views were used, not the plain pass


def test_near_duplicate_threshold_is_cleans_unless_review_sets_its_own():
    """One calibrated notion of a near-duplicate: review's finder takes clean's
    near_threshold by default (the number params calibrate once), its own only when set."""
    from types import SimpleNamespace

    from pipeline.config import ReviewSpec
    from pipeline.review.review import duplicate_threshold, near_copy_meaning

    spec = SimpleNamespace(clean=SimpleNamespace(near_threshold=0.02, embedder=SimpleNamespace(kind="crops")))
    assert ReviewSpec().duplicate_threshold is None
    assert duplicate_threshold(ReviewSpec(), spec) == 0.02
    assert "clean's threshold" in near_copy_meaning(ReviewSpec(), spec)
    assert duplicate_threshold(ReviewSpec(duplicate_threshold=0.05), spec) == 0.05
    assert "0.05" in near_copy_meaning(ReviewSpec(duplicate_threshold=0.05), spec)
    # Called without review (no variant at hand), the finder falls back to clean's default.
    rng = np.random.default_rng(1)
    vecs = rng.normal(size=(4, 16)).astype(np.float32)
    vecs[3] = vecs[0] + 1e-3
    m = manifest_for(np.array([0, 1, 0, 0]), split=["test", "train", "train", "train"])
    found = find_near_duplicates(ReviewInputs(m, np.zeros((4, 2)), pd.DataFrame({"given_prob": np.full(4, 0.9)}),
                                              duplicate_vectors=vecs), {"duplicate_threshold": None})
    assert list(found["row"]) == [3]
