"""clean's rules on constructed datasets: leakage, near-duplicates, health, tables, policies,
the findings table, the report's accounting and the contact sheet in real headless Chromium."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.config import CleanSpec
from pipeline.errors import FmpipeError
from pipeline.manifest import Dataset, build_manifest, feature_rows, image_rows, make_report, check_report
from pipeline.quality.clean import clean_dataset, sheet_writer, summary_line
from helpers import fmpipe
from helpers import photos as _photos

CLASSES = ["a", "b"]


def _image_dataset(images: np.ndarray, splits: list[str], labels=None) -> Dataset:
    labels = np.zeros(len(images), int) if labels is None else np.asarray(labels)
    ids = [f"img/{k:03d}" for k in range(len(images))]
    return Dataset(manifest=build_manifest(ids, labels, CLASSES, splits, image_rows(images)),
                   classes=CLASSES, images=images)


def _jpeg(img, q=60):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=q)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _copies(img):
    h, w, _ = img.shape
    return {
        "shift": np.pad(img, ((0, 0), (1, 0), (0, 0)), mode="edge")[:h, :w],
        "crop+resize": np.asarray(Image.fromarray(img[1:h - 1, 1:w - 1]).resize((w, h), Image.BILINEAR)),
        "recolour": np.clip(img.astype(np.float32) * [1.1, 1.0, 0.9] + 5, 0, 255).astype(np.uint8),
        "mirror": img[:, ::-1].copy(),
        "jpeg": _jpeg(img),
    }


@pytest.fixture(scope="module")
def leaky():
    """40 distinct train photos (one class), 10 test photos of which 5 are edited copies of
    train photos (one per edit), one blank image, one exact train/test duplicate, and a
    within-test near-duplicate."""
    photos = _photos(60, seed=3)
    train = list(photos[:40])
    test = []
    edits = []
    for k, (name, img) in enumerate(_copies(photos[0]).items()):
        src = photos[k * 3]
        test.append(_copies(src)[name])
        edits.append((name, k * 3))
    test += list(photos[40:45])
    test.append(_jpeg(photos[40], 70))  # within-test near duplicate of test photo 40
    test.append(photos[10].copy())  # exact duplicate of train photo 10
    train.append(np.full_like(photos[0], 128))  # blank
    images = np.stack(train + test)
    splits = ["train"] * len(train) + ["test"] * len(test)
    return _image_dataset(images, splits), edits


def test_leaked_copies_found_and_training_side_dropped(leaky):
    ds, edits = leaky
    out = clean_dataset(ds, CleanSpec())
    f = out.findings
    leak = f[f["rule"] == "leakage"]
    # Every edited copy pairs with its source; the train copy is the one acted on.
    assert set(zip(leak["id"], leak["other_id"])) == {(f"img/{src:03d}", f"img/{41 + k:03d}") for k, (_, src) in enumerate(edits)}
    assert (leak["split"] == "train").all() and (leak["other_split"] == "test").all() and (leak["action"] == "drop").all()
    kept = set(out.dataset.manifest["id"])
    assert all(f"img/{41 + k:03d}" in kept for k in range(len(edits)))  # test set untouched
    assert not any(f"img/{src:03d}" in kept for _, src in edits)
    # The exact duplicate: train copy dropped by exact_duplicate, not counted as leakage again.
    exact = f[f["rule"] == "exact_duplicate"]
    assert list(exact["id"]) == ["img/010"] and list(exact["other_split"]) == ["test"]
    # Within-test near duplicate: flagged, both stay.
    within = f[(f["rule"] == "near_duplicates")]
    assert len(within) == 1 and within.iloc[0]["action"] == "flag" and within.iloc[0]["split"] == "test"
    assert {"img/046", "img/051"} <= kept
    # Blank image dropped; distinct photos of the same class are not flagged.
    assert list(f[f["rule"] == "blank_images"]["id"]) == ["img/040"]
    flagged = set(f["id"]) | set(f["other_id"].dropna())
    assert len(flagged) == 2 * len(edits) + 2 + 2 + 1
    # Accounting: counts add up, every removal names its rule; nothing leaked is left.
    report = make_report("clean", "t", len(ds), out.dataset, removed=out.removed, **out.facts)
    check_report(report)
    assert report["removed_by_reason"] == {"leakage": 5, "exact_duplicate": 1, "blank_images": 1}
    assert out.facts["leaked_rows_remaining"] == 0 and not out.dataset.manifest["leaked"].any()
    assert out.facts["near_duplicate_index"][0]["method"] == "exact"
    line = summary_line("t", len(ds), out)
    assert "rows in" in line and "leakage 5 dropped" in line and "near_duplicates 1 flagged" in line


def test_policies_flag_and_off(leaky):
    ds, edits = leaky
    flag = clean_dataset(ds, CleanSpec(leakage="flag", exact_duplicate="flag", blank_images="off"))
    assert len(flag.dataset) == len(ds) and flag.removed == []
    assert (flag.findings.loc[flag.findings["rule"] == "leakage", "action"] == "flag").all()
    assert "blank_images" not in set(flag.findings["rule"])
    # Flagged leaks stay in the data, and clean says so (validate checks the column).
    assert flag.facts["leaked_rows_remaining"] == 2 * (len(edits) + 1)
    off = clean_dataset(ds, CleanSpec(leakage="off", near_duplicates="off", exact_duplicate="off",
                                      blank_images="off", exposure="off", image_shape="off"))
    assert off.findings.empty and len(off.dataset) == len(ds) and off.facts["embedder"] is None
    drop_within = clean_dataset(ds, CleanSpec(near_duplicates="drop"))
    assert "img/051" not in set(drop_within.dataset.manifest["id"])  # the larger id goes
    assert "img/046" in set(drop_within.dataset.manifest["id"])


def test_exposure_and_shape_rules():
    photos = _photos(6, seed=5)
    photos[1] = np.random.default_rng(1).integers(0, 13, photos[1].shape).astype(np.uint8)  # dark, textured
    photos[2] = np.clip(photos[2].astype(int) + 230, 0, 255).astype(np.uint8)
    ds = _image_dataset(photos, ["train"] * 3 + ["test"] * 3)
    ds.manifest.loc[4, "height"] = 31  # a row whose recorded shape disagrees
    out = clean_dataset(ds, CleanSpec(leakage="off", near_duplicates="off"))
    f = out.findings.set_index("id")
    assert f.loc["img/001", "rule"] == "exposure" and "under" in f.loc["img/001", "detail"]
    assert f.loc["img/002", "rule"] == "exposure" and "over" in f.loc["img/002", "detail"]
    assert f.loc["img/004", "rule"] == "image_shape" and "img/004" not in set(out.dataset.manifest["id"])
    assert {"img/001", "img/002"} <= set(out.dataset.manifest["id"])  # exposure defaults to flag


def _table(values: dict[str, list[float]], labels, splits) -> Dataset:
    features = pd.DataFrame(values, dtype="float64")
    ids = [f"row/{k}" for k in range(len(features))]
    return Dataset(manifest=build_manifest(ids, np.asarray(labels), CLASSES, splits, feature_rows(features)),
                   classes=CLASSES, features=features)


def test_table_rules():
    rng = np.random.default_rng(0)
    a = np.linspace(-3, 3, 20).round(3)
    b = rng.permutation(np.linspace(-5, 5, 20)).round(3)
    a[3], b[3] = a[2] + 1e-4, b[2]  # near-duplicate row of row 2
    a[16], b[16] = a[10], b[10] + 1e-4  # a test row nearly identical to train row 10: a leak
    a[5] = np.nan
    b[6] = 99.0  # out of the bounds below
    ds = _table({"a": a, "b": b, "c": [1.0] * 20}, [k % 2 for k in range(20)],
                ["train"] * 15 + ["test"] * 5)
    ds.manifest.loc[7, "label"] = 5
    spec = CleanSpec(bounds={"b": (-10, 10)}, constant_columns="drop")
    out = clean_dataset(ds, spec)
    f = out.findings.set_index("rule")
    assert f.loc["non_finite", "id"] == "row/5" and f.loc["out_of_range", "id"] == "row/6"
    assert f.loc["label_range", "id"] == "row/7"
    near = out.findings[out.findings["rule"] == "near_duplicate_rows"]
    # Within train: flagged (this rule's policy); across splits: the train copy dropped (leakage's).
    assert sorted(zip(near["id"], near["other_id"], near["action"])) == [
        ("row/10", "row/16", "drop"), ("row/3", "row/2", "flag")]
    assert out.facts["leaked_rows_remaining"] == 0
    assert f.loc["constant_columns", "id"] == "c" and list(out.dataset.features.columns) == ["a", "b"]
    assert {r["id"] for r in out.removed} == {"row/5", "row/6", "row/7", "row/10"}
    kept_leak = clean_dataset(ds, CleanSpec(leakage="flag"))
    assert kept_leak.facts["leaked_rows_remaining"] == 2  # rows 10 and 16: validate will stop
    with pytest.raises(FmpipeError, match="clean.bounds names column 'zz'"):
        clean_dataset(ds, CleanSpec(bounds={"zz": (0, 1)}))


def test_package_embedder_may_not_be_the_variants_own_output(tmp_path, monkeypatch):
    from pipeline.quality.clean import embedder_for

    monkeypatch.chdir(tmp_path)
    spec = CleanSpec(embedder={"kind": "package", "path": "data/cifar/package"})
    with pytest.raises(FmpipeError, match="inside data/cifar/"):
        embedder_for(spec, "cifar")
    with pytest.raises(FmpipeError, match="no model.json"):
        embedder_for(CleanSpec(embedder={"kind": "package", "path": "models/old"}), "cifar")


def test_contact_sheet_renders_offline_in_chromium(leaky, tmp_path):
    from browser import open_page

    ds, edits = leaky
    out = clean_dataset(ds, CleanSpec())
    page = tmp_path / "contact_sheet.html"
    sheet_writer("t", ds, out, max_pairs=300)(page)
    pairs = out.findings["other_id"].notna().sum()
    assert pairs == len(edits) + 2  # leaks, the exact duplicate, the within-test pair
    seen = {}

    def check(p):
        seen["pairs"] = p.evaluate("document.querySelectorAll('.pair').length")
        seen["items"] = p.evaluate("document.querySelectorAll('.item').length")
        seen["sizes"] = p.evaluate(
            "[...document.images].map(i => [i.complete, i.naturalWidth, i.getBoundingClientRect().width])")
        seen["count"] = p.evaluate("document.getElementById('pair-count').textContent")

    result = open_page(page, tmp_path / "sheet.png", check)
    assert seen["pairs"] == pairs and seen["count"] == str(pairs) and seen["items"] == 1
    assert len(seen["sizes"]) == 2 * pairs + 1
    assert all(done and natural > 0 and shown > 0 for done, natural, shown in seen["sizes"])
    assert result.external_requests == [] and result.console_errors == []
    png = Image.open(result.screenshot)
    assert png.size[0] == 1280 and png.size[1] > 400
    assert np.asarray(png.convert("L")).std() > 5  # something was drawn


def test_clean_with_a_package_embedder(leaky, tmp_path, monkeypatch):
    """A saved fmpipe network outside data/ works as clean's embedder (penultimate layer)."""
    import torch

    from pipeline.models import build, save_trained

    ds, _ = leaky
    torch.manual_seed(0)
    net = build("cnn_small", (3, 32, 32), 2, {"width": 8})
    (tmp_path / "models" / "v1").mkdir(parents=True)
    save_trained(net, {"model": {"name": "cnn_small", "options": {"width": 8}},
                       "input": {"kind": "image", "shape": [3, 32, 32]}, "classes": CLASSES},
                 tmp_path / "models" / "v1")
    monkeypatch.chdir(tmp_path)
    spec = CleanSpec(embedder={"kind": "package", "path": "models/v1"}, near_threshold=0.001)
    out = clean_dataset(ds, spec, variant="t")
    assert out.facts["embedder"]["name"] == "package" and out.facts["embedder"]["layer"] == "body.17"
    # Exact copies are found by hash whatever the embedder.
    assert "img/010" in set(out.findings.loc[out.findings["rule"] == "exact_duplicate", "id"])
    assert out.facts["near_duplicate_index"][0]["dim"] == 16


def _every_problem_image_dataset() -> Dataset:
    """Small image set with one case of each image rule's problem."""
    photos = list(_photos(12, seed=7))
    photos[1] = np.full_like(photos[0], 128)  # blank
    photos[2] = np.random.default_rng(2).integers(0, 13, photos[0].shape).astype(np.uint8)  # dark
    photos[7] = photos[0].copy()  # exact copy (test) of train 0
    photos[8] = _jpeg(photos[3], 70)  # near copy (test) of train 3: a leak
    photos[5] = _jpeg(photos[4], 70)  # near copy within train
    ds = _image_dataset(np.stack(photos), ["train"] * 6 + ["test"] * 6)
    ds.manifest.loc[11, "label"] = 5  # out of range
    ds.manifest.loc[9, "height"] = 31  # recorded shape disagrees
    return ds


def test_every_registered_rule_runs_and_is_reported():
    """Registration is the one list of rules: each registered rule runs on the kinds it
    applies to, finds its planted problem, and is in the report (and the findings)."""
    from pipeline.quality.rules import REGISTRY

    a = np.linspace(-3, 3, 20).round(3)
    b = np.linspace(-5, 5, 20)[::-1].round(3)
    a[3], b[3] = a[2] + 1e-4, b[2]  # near-duplicate rows
    a[5] = np.nan
    b[6] = 99.0
    table = _table({"a": a, "b": b, "c": [1.0] * 20}, [k % 2 for k in range(20)], ["train"] * 15 + ["test"] * 5)
    table.manifest.loc[7, "label"] = 5
    seen: dict[str, int] = {}
    for ds in (_every_problem_image_dataset(), table):
        out = clean_dataset(ds, CleanSpec(bounds={"b": (-10, 10)} if ds.kind == "tabular" else {}))
        applicable = [name for name, rule in REGISTRY.items() if ds.kind in rule.kinds]
        assert list(out.facts["rules"]) == applicable  # every one, in registration order
        report = make_report("clean", "t", len(ds), out.dataset, removed=out.removed, **out.facts)
        check_report(report)
        for name in applicable:
            assert report["rules"][name]["policy"] in ("drop", "flag")
            seen[name] = seen.get(name, 0) + out.facts["findings_by_rule"].get(name, 0)
    assert set(seen) == set(REGISTRY), "a registered rule applies to no dataset kind"
    assert all(seen.values()), f"rules that found nothing on their planted problem: {seen}"
    for name, rule in REGISTRY.items():
        assert rule.description(), f"rule {name} has no description (its docstring)"
        assert name in CleanSpec.model_fields  # its policy key is in params' clean section


def test_rule_registration_refuses_a_rule_without_its_policy_or_with_a_taken_key():
    from pipeline.quality import rules as R
    from pipeline.schema import Strict

    class NoPolicy(R.Rule):
        name = "no_policy"

        class Params(Strict):
            threshold: float = 1.0

    with pytest.raises(TypeError, match="policy field named 'no_policy'"):
        R.register(NoPolicy)

    class Clash(R.Rule):
        name = "clash"

        class Params(Strict):
            clash: R.Policy = "flag"
            blank_max_std: float = 3.0  # blank_images's

    with pytest.raises(TypeError, match="'blank_max_std' is also rule 'blank_images'"):
        R.register(Clash)
    assert "no_policy" not in R.REGISTRY and "clash" not in R.REGISTRY


def test_clean_section_validated_per_rule(tmp_path):
    """The clean section is the rules' params: an unknown key and a rule's own check are one
    line each, naming the key path."""

    import yaml

    from pipeline.config import load_params

    base = yaml.safe_load(open("params.yaml"))
    for clean, expected in (({"near_treshold": 0.01}, "variants.digits.clean.near_treshold: unknown key (expected one of: label_range,"),
                            ({"dark_max_mean": 200, "bright_min_mean": 100},
                             "variants.digits.clean: Value error, rule exposure: dark_max_mean (200.0) must be below bright_min_mean (100.0)")):
        base["variants"]["digits"]["clean"] = clean
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(base))
        with pytest.raises(FmpipeError) as err:
            load_params(path)
        assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)
    r = fmpipe("clean", "--stage", "digits", "--params", str(path))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "rule exposure" in r.stderr, r.stderr


def test_crops_embedder_catches_a_recropped_leak_thumbs_lets_through():
    """clean with ``embedder: crops``: a train photo that is a 70% crop of a test photo (the
    test image shows more background) is a leak; with plain thumbs at the same threshold it
    is not. The threshold is the one clean, review and validation share."""
    photos = _photos(30, seed=5)
    crop = np.asarray(Image.fromarray(photos[0][5:27, 5:27]).resize((32, 32), Image.BILINEAR))
    images = np.concatenate([[crop], photos[1:25], photos[25:], [photos[0]]])
    splits = ["train"] * 25 + ["test"] * 6
    ds = _image_dataset(images, splits)
    crops = clean_dataset(ds, CleanSpec(embedder={"kind": "crops"}, near_threshold=0.02))
    leak = crops.findings[crops.findings["rule"] == "leakage"]
    assert list(leak["id"]) == [ds.manifest["id"].iat[0]] and list(leak["other_id"]) == [ds.manifest["id"].iat[30]]
    assert crops.facts["embedder"]["name"] == "crops"
    # Views for the test queries (across splits and within test), none within train (cost).
    index = crops.facts["near_duplicate_index"]
    assert sorted((r["within"], r["n_query"], r.get("views")) for r in index) == \
        [(False, 6, 8), (True, 6, 8), (True, 24, None)]  # the train copy was dropped
    thumbs = clean_dataset(ds, CleanSpec(near_threshold=0.02))
    assert (thumbs.findings["rule"] != "leakage").all()
