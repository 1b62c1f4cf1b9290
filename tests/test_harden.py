"""Issue #7, in memory: atomic outputs keep DVC's files and the umask, a full disk leaves
nothing behind, duplicate params keys are refused, high-bit-depth images are scaled (not
clipped), skip reasons are deterministic, numeric class names resolve as names."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.config import load_params
from pipeline.errors import FmpipeError
from pipeline.io import atomic_dir, atomic_write_text
from pipeline.manifest import read_dataset
from pipeline.review.decisions import parse_decisions_csv, resolve
from pipeline.runner import run_step


# ---------------------------------------------------------------- atomic outputs

def test_atomic_dir_keeps_dvc_gitignore_and_uses_the_umask(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / ".gitignore").write_text("/model.safetensors\n")
    (target / "old.txt").write_text("old")
    old_umask = os.umask(0o027)
    try:
        with atomic_dir(target) as tmp:
            (tmp / "model.safetensors").write_bytes(b"new")
        atomic_write_text(tmp_path / "note.txt", "x")
    finally:
        os.umask(old_umask)
    assert sorted(p.name for p in target.iterdir()) == [".gitignore", "model.safetensors"]
    assert (target / ".gitignore").read_text() == "/model.safetensors\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o750  # not mkdtemp's 0700
    assert stat.S_IMODE((tmp_path / "note.txt").stat().st_mode) == 0o640  # not mkstemp's 0600


def test_a_step_that_writes_its_own_gitignore_wins(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / ".gitignore").write_text("old\n")
    with atomic_dir(target) as tmp:
        (tmp / ".gitignore").write_text("new\n")
    assert (target / ".gitignore").read_text() == "new\n"


def test_disk_full_in_atomic_dir_is_one_error_and_leaves_nothing(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "good.json").write_text("{}")
    with pytest.raises(FmpipeError) as err:
        with atomic_dir(target) as tmp:
            (tmp / "part").write_bytes(b"x" * 10)
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "big"))
    assert "out: cannot write the output: disk full" in str(err.value)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp directory left
    assert (target / "good.json").read_text() == "{}"


def test_other_errors_keep_their_type(tmp_path):
    with pytest.raises(ValueError):
        with atomic_dir(tmp_path / "out"):
            raise ValueError("a bug")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- params

def test_duplicate_params_key_names_both_lines(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("enabled: [a]\nvariants:\n  a:\n    train:\n      max_epochs: 3\n      max_epochs: 30\n")
    with pytest.raises(FmpipeError, match=r"params\.yaml:6: not valid YAML: duplicate key 'max_epochs' on lines 5 and 6"):
        load_params(path)


# ---------------------------------------------------------------- dataset contract

def test_payload_swapped_behind_the_manifest_is_refused(project):

    run_step("collect", "digits")
    path = Path("data/digits/collect/images.npy")
    images = np.load(path)
    np.save(path, images[::-1].copy(), allow_pickle=False)
    with pytest.raises(FmpipeError, match=r"data/digits/collect/images\.npy: does not match dataset\.json"):
        read_dataset("data/digits/collect")


def test_dataset_json_records_rows_and_digests(project):

    run_step("collect", "iris")
    meta = json.loads(Path("data/iris/collect/dataset.json").read_text())
    assert meta["rows"] == 150
    assert set(meta["files"]) == {"manifest.parquet", "features.parquet"}


# ---------------------------------------------------------------- image sources

def _spec(path, **kw):
    from pipeline.sources.imagefolder import Spec

    return Spec(path=str(path), **kw)


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    from pipeline.sources.imagefolder import load

    values = {"dark": 1000, "mid": 30000, "bright": 65535}
    for cls, v in values.items():
        (tmp_path / cls).mkdir()
        Image.fromarray(np.full((4, 4), v, dtype=np.uint16)).save(tmp_path / cls / "0.png")
    assert Image.open(tmp_path / "mid/0.png").mode == "I;16"
    col = load(_spec(tmp_path, channels=1))
    got = {col.classes[label]: int(img[0, 0, 0]) for label, img in zip(col.labels, col.images)}
    assert got == {"dark": 4, "mid": 117, "bright": 255}  # v / 257, rounded; clipping gave 255 for all


def test_float_images_scale_from_unit_range_and_out_of_range_is_skipped(tmp_path):
    from pipeline.sources.imagefolder import load

    for cls, v in {"a": 0.5, "b": 1.0, "c": 3.0}.items():
        (tmp_path / cls).mkdir()
        Image.fromarray(np.full((4, 4), v, dtype=np.float32)).save(tmp_path / cls / "0.tiff")
        Image.fromarray(np.full((4, 4), 0.25, dtype=np.float32)).save(tmp_path / cls / "1.tiff")
    col = load(_spec(tmp_path, channels=3))
    assert [s["id"] for s in col.skipped] == ["c/0.tiff"]
    assert "outside the expected 0..1" in col.skipped[0]["reason"]
    first = dict(zip(col.ids, col.images[:, 0, 0, 0].tolist()))
    assert first["a/0.tiff"] == 128 and first["b/0.tiff"] == 255 and first["a/1.tiff"] == 64


def test_unreadable_image_reason_is_deterministic(project, tmp_path):
    import yaml


    pics = tmp_path / "pics"
    for cls in ("a", "b"):
        (pics / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((4, 4), 60 * (i + 1), dtype=np.uint8)).save(pics / cls / f"{i}.png")
    (pics / "a" / "broken.png").write_bytes(b"not an image")
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["variants"]["pics"] = {**params["variants"]["digits"],
                                  "source": {"kind": "imagefolder", "path": str(pics), "channels": 1}}
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_step("collect", "pics")
    first = Path("data/pics/collect/report.json").read_bytes()
    run_step("collect", "pics")
    assert Path("data/pics/collect/report.json").read_bytes() == first
    reasons = [r["reason"] for r in json.loads(first)["removed"]]
    assert reasons == ["unreadable image (not a format Pillow recognises)"]
    assert "0x" not in first.decode()


def test_empty_folder_error_names_the_folder_and_what_it_holds(tmp_path):
    from pipeline.sources.imagefolder import load

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "labels.txt").write_text("x")
    with pytest.raises(FmpipeError, match=r"no readable images; found 1 file\(s\) in class folders.*a/labels\.txt"):
        load(_spec(tmp_path))


def test_zero_size_is_rejected_by_the_schema():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        _spec("x", size=[0, 8])


# ---------------------------------------------------------------- annotations

def test_numeric_class_names_resolve_as_names_before_indices():
    votes = parse_decisions_csv("id,label,note\nx,1,\ny,3,\nz,0,\n", "a.csv", ["1", "2", "3"])
    # "1" is the class named "1" (index 0), "3" the class named "3" (index 2); "0" names no
    # class, so it is read as an index.
    assert {k: r.label for k, r in resolve(votes).items()} == {"x": 0, "y": 2, "z": 0}


def test_empty_annotations_file_is_a_clear_error():
    with pytest.raises(FmpipeError, match=r"a.csv: empty file \(expected a header line: id,label,note\)"):
        parse_decisions_csv("", "a.csv", ["x", "y"])
    assert parse_decisions_csv("id,label,note\n", "a.csv", ["x", "y"]) == []


def test_annotate_refuses_a_validation_of_other_data(project):
    """validate failing early (single class, damaged input) keeps its last summary; annotate
    must not take that summary for a pass of the data now in clean/."""
    import pandas as pd

    from pipeline.manifest import reseal

    run_step("collect", "iris")
    run_step("clean", "iris")
    run_step("validate", "iris")
    path = Path("data/iris/clean/manifest.parquet")
    manifest = pd.read_parquet(path)
    manifest.loc[0, "label"], manifest.loc[0, "label_name"] = 1, "versicolor"
    manifest.to_parquet(path, index=False)
    reseal(path.parent)
    with pytest.raises(FmpipeError, match=r"validate/summary\.json: validates other data than the current data/iris/clean"):
        run_step("annotate", "iris")


# ---------------------------------------------------------------- issue #22: YAML aliases

def test_anchors_within_the_budget_still_load_and_a_recursive_alias_is_refused(tmp_path):
    from pipeline.reading import load_yaml

    repo_params = (Path(__file__).resolve().parents[1] / "params.yaml").read_text()
    text = repo_params.replace("  iris:\n", "  iris: &iris\n", 1) + "  iris2: *iris\n"
    path = tmp_path / "params.yaml"
    path.write_text(text)
    params = load_params(path)  # people share a variant's section through an anchor
    assert params.variants["iris2"] == params.variants["iris"]
    with pytest.raises(FmpipeError, match=r"^x\.yaml:1: refused: a recursive alias"):
        load_yaml("a: &a [1, *a]\n", "x.yaml")


def test_the_libyaml_loader_for_dvc_lock_reads_the_same_values_within_the_same_budget():
    """dvc.lock is read with libyaml (MachineYamlLoader): the values PyYAML's own parser gives,
    and the same refusals of an alias bomb and a recursive alias."""
    from pipeline.reading import AliasRefused, BoundedYamlLoader, MachineYamlLoader

    lock = (Path(__file__).resolve().parents[1] / "dvc.lock").read_text()
    assert yaml.load(lock, Loader=MachineYamlLoader) == yaml.load(lock, Loader=BoundedYamlLoader)
    assert "CParser" in [c.__name__ for c in MachineYamlLoader.__mro__]  # libyaml is there: PyYAML's wheels have it
    levels = ["a: &a [x, x, x, x, x, x, x, x, x, x]"] + [
        f"{b}: &{b} [{', '.join([f'*{a}'] * 10)}]" for a, b in zip("abcd", "bcde")]
    for text, refusal in (("\n".join(levels) + "\n", "aliases expand this value to more than 100,000"),
                          ("a: &a [1, *a]\n", "a recursive alias")):
        with pytest.raises(AliasRefused, match=refusal):
            yaml.load(text, Loader=MachineYamlLoader)


def test_a_big_value_under_an_unknown_key_is_one_short_line(tmp_path):
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["variants"]["iris"]["train"]["warmup"] = list(range(40_000))
    params["variants"]["iris"]["description"] = [list(range(500))] * 80  # aliases, under the budget
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(FmpipeError) as err:
        load_params(path)
    lines = str(err.value).splitlines()
    assert any("variants.iris.train.warmup: unknown key" in line for line in lines)
    assert any("variants.iris.description:" in line for line in lines)
    # Short: the value is not repeated (a 40,000-item list), only the keys train accepts are.
    assert all(len(line) < 500 for line in lines), lines
