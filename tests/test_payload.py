"""The image payload (pipeline/payload.py, issue #25): one ``images.npy`` or shards, one way to
read either, rows taken without reading pixels, and the byte-identical single-file layout.

Shards come from tiny data by setting ``FMPIPE_SHARD_BYTES`` (bytes of pixels per shard) small.
Every test runs in well under a few seconds.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import edit_params
from pipeline import payload as P
from pipeline.errors import FmpipeError
from pipeline.manifest import Dataset, build_manifest, image_rows, make_report, read_dataset, write_dataset


def tiny(n: int = 23, shape=(4, 5, 3), seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    labels = np.arange(n) % 3
    splits = ["train", "val", "test"] * (n // 3) + ["train"] * (n % 3)
    manifest = build_manifest([f"r{i:03d}" for i in range(n)], labels, ["a", "b", "c"], splits, image_rows(images))
    return Dataset(manifest=manifest, classes=["a", "b", "c"], images=images)


def write(ds: Dataset, where: Path) -> Path:
    write_dataset(ds, where, make_report("test", "v", len(ds), ds))
    return where


def sharded(monkeypatch, rows_per_shard: int, row_bytes: int) -> None:
    monkeypatch.setenv(P.SHARD_BYTES_ENV, str(rows_per_shard * row_bytes))


def test_single_file_is_what_np_save_writes(tmp_path):
    ds = tiny()
    write(ds, tmp_path / "d")
    ref = tmp_path / "ref.npy"
    np.save(ref, ds.images, allow_pickle=False)
    assert (tmp_path / "d/images.npy").read_bytes() == ref.read_bytes()
    assert "shards" not in json.loads((tmp_path / "d/dataset.json").read_text())
    assert isinstance(read_dataset(tmp_path / "d").images, np.memmap)


def test_sharded_dataset_round_trips_like_the_single_file(tmp_path, monkeypatch):
    ds = tiny()
    single = write(ds, tmp_path / "single")
    sharded(monkeypatch, 5, ds.images[0].nbytes)
    shards = write(ds, tmp_path / "shards")
    meta = json.loads((shards / "dataset.json").read_text())
    assert [s["rows"] for s in meta["shards"]] == [5, 5, 5, 5, 3]
    assert sorted(p.name for p in (shards / "images").iterdir()) == [f"shard-{i:05d}.npy" for i in range(5)]
    assert not (shards / "images.npy").exists()
    for s in meta["shards"]:  # per-shard digests
        assert meta["files"][s["file"]] == hashlib.sha256((shards / s["file"]).read_bytes()).hexdigest()
    assert (shards / "manifest.parquet").read_bytes() == (single / "manifest.parquet").read_bytes()
    one, many = read_dataset(single), read_dataset(shards)
    pd.testing.assert_frame_equal(one.manifest, many.manifest)
    assert isinstance(many.images, P.Images) and many.images.shape == ds.images.shape
    np.testing.assert_array_equal(np.asarray(many.images), ds.images)
    assert one.meta() == {k: v for k, v in many.meta().items()}
    # Read back and written again with the default threshold: the single file, byte for byte.
    monkeypatch.delenv(P.SHARD_BYTES_ENV)
    again = write(many, tmp_path / "again")
    assert (again / "images.npy").read_bytes() == (single / "images.npy").read_bytes()
    assert (again / "dataset.json").read_text() == (single / "dataset.json").read_text()


@pytest.mark.parametrize("layout", ["single", "shards"])
def test_images_contract_reads_what_numpy_would(tmp_path, monkeypatch, layout):
    ds = tiny(n=31)
    ref = ds.images
    if layout == "shards":
        sharded(monkeypatch, 4, ref[0].nbytes)
    images = read_dataset(write(ds, tmp_path / "d")).images
    view = images if isinstance(images, P.Images) else P.Images(P._ArrayStore(images))
    assert (len(view), view.shape, view.dtype, view.ndim) == (31, ref.shape, np.uint8, 4)
    np.testing.assert_array_equal(view[3:17], ref[3:17])
    np.testing.assert_array_equal(view[::-3], ref[::-3])
    np.testing.assert_array_equal(view[7], ref[7])
    np.testing.assert_array_equal(view[-1], ref[-1])
    idx = np.array([0, 2, 3, 4, 5, 11, 12, 30])
    np.testing.assert_array_equal(view[idx], ref[idx])
    np.testing.assert_array_equal(view[idx[::-1]], ref[idx[::-1]])  # any order, repeats too
    np.testing.assert_array_equal(view[[5, 5, 1]], ref[[5, 5, 1]])
    mask = np.arange(31) % 4 == 1
    np.testing.assert_array_equal(view[mask], ref[mask])
    np.testing.assert_array_equal(view[2:9, 1:3, :, 0], ref[2:9, 1:3, :, 0])
    sub = view.take(mask).take(np.array([0, 2, 4]))  # views compose; nothing read yet
    np.testing.assert_array_equal(np.asarray(sub), ref[mask][[0, 2, 4]])
    blocks = list(P.chunks(view, max_bytes=7 * ref[0].nbytes))
    assert [len(b) for b in blocks] == [7, 7, 7, 7, 3]
    np.testing.assert_array_equal(np.concatenate(blocks), ref)
    with pytest.raises(IndexError):
        view[31]


def test_take_of_a_dataset_on_disk_reads_no_pixels_and_writes_what_was_taken(tmp_path, monkeypatch):
    ds = tiny(n=40)
    sharded(monkeypatch, 6, ds.images[0].nbytes)
    back = read_dataset(write(ds, tmp_path / "d"))
    keep = np.arange(40) % 3 != 0
    out = back.take(keep)
    assert isinstance(out.images, P.Images) and len(out.images) == keep.sum()
    written = read_dataset(write(out, tmp_path / "kept"))
    np.testing.assert_array_equal(np.asarray(written.images), ds.images[keep])
    assert list(written.manifest["id"]) == list(ds.manifest["id"][keep])
    # A single memory-mapped file gives the same lazy view.
    monkeypatch.delenv(P.SHARD_BYTES_ENV)
    mm = read_dataset(write(ds, tmp_path / "single"))
    assert isinstance(mm.take(keep).images, P.Images)
    np.testing.assert_array_equal(np.asarray(mm.split("test").images), ds.images[ds.manifest["split"] == "test"])


@pytest.mark.parametrize("layout", ["single", "shards"])
def test_rows_appended_to_a_payload_on_disk_read_and_write_as_one_array(tmp_path, monkeypatch, layout):
    """annotate appends labelled production rows (review/pool.py) to clean's payload: a lazy
    concatenation reads like np.concatenate, and is written block by block."""
    ds = tiny()
    if layout == "shards":
        sharded(monkeypatch, 4, ds.images[0].nbytes)
    base = read_dataset(write(ds, tmp_path / "d")).images
    extra = tiny(5, seed=1).images
    both = P.concat(base, extra)
    expected = np.concatenate([ds.images, extra])
    assert both.shape == expected.shape and len(both) == 28 and both.files() is None
    assert np.array_equal(np.asarray(both), expected)
    for key in (slice(20, 26), slice(None, None, 3), np.array([27, 0, 23, 23, 5]), np.arange(28) % 2 == 0, 24, -1):
        assert np.array_equal(both[key], expected[key]), key
    taken = both.take(np.array([26, 2, 22]))
    assert np.array_equal(np.asarray(taken), expected[[26, 2, 22]])
    assert np.array_equal(np.concatenate(list(P.chunks(both, max_bytes=3 * ds.images[0].nbytes))), expected)
    out = tmp_path / "out"
    out.mkdir()
    shards = P.write_images(both, out)
    files = [out / s["file"] for s in shards] or [out / P.IMAGES]
    assert len(files) == (7 if layout == "shards" else 1)
    assert np.array_equal(np.concatenate([np.load(f) for f in files]), expected)
    assert np.array_equal(np.asarray(read_dataset(tmp_path / "d").images), ds.images)  # input unchanged
    with pytest.raises(ValueError, match="cannot append rows"):
        P.concat(base, np.zeros((2, 4, 4, 3), np.uint8))


def test_a_dataset_read_again_is_not_hashed_again_unless_it_changed(tmp_path, monkeypatch):
    """read_dataset checks every payload file's sha256; the digest of an unchanged file is
    remembered (device, inode, size, mtime) in .dvc/tmp, as DVC does, not recomputed per read."""
    import os
    import time

    from pipeline import io

    monkeypatch.chdir(tmp_path)
    (tmp_path / ".dvc/tmp").mkdir(parents=True)
    d = write(tiny(), tmp_path / "d")
    hashed = []
    real = io.file_digest
    monkeypatch.setattr(io, "file_digest", lambda path, *a, **k: hashed.append(Path(path).name) or real(path, *a, **k))

    read_dataset(d)
    read_dataset(d)
    assert sorted(hashed) == ["images.npy", "images.npy", "manifest.parquet", "manifest.parquet"]  # too fresh to trust
    past = time.time() - 60
    for f in (d / "images.npy", d / "manifest.parquet"):
        os.utime(f, (past, past))
    hashed.clear()
    read_dataset(d)
    read_dataset(d)
    assert sorted(hashed) == ["images.npy", "manifest.parquet"]  # once, then remembered
    assert io.DIGEST_STATE.is_file()

    payload = d / "images.npy"
    data = bytearray(payload.read_bytes())
    data[-1] ^= 1
    payload.write_bytes(bytes(data))  # same size, new mtime
    with pytest.raises(FmpipeError, match=r"images\.npy: does not match dataset\.json"):
        read_dataset(d)
    monkeypatch.setenv(io.DIGEST_CACHE_ENV, "0")
    hashed.clear()
    with pytest.raises(FmpipeError):
        read_dataset(d)
    assert "images.npy" in hashed

    # A damaged state file costs only the hashing: the read still checks every file.
    monkeypatch.delenv(io.DIGEST_CACHE_ENV)
    io.DIGEST_STATE.write_bytes(b"not a database" * 100)
    good = write(tiny(), tmp_path / "e")
    hashed.clear()
    assert len(read_dataset(good)) == len(tiny())
    assert sorted(hashed) == ["images.npy", "manifest.parquet"]


def test_whole_payload_is_copied_by_the_kernel_not_linked(tmp_path, monkeypatch):
    ds = tiny(n=20)
    sharded(monkeypatch, 8, ds.images[0].nbytes)
    src = read_dataset(write(ds, tmp_path / "a"))
    dst = write(src.take(np.ones(20, bool)), tmp_path / "b")
    for name in ("images/shard-00000.npy", "images/shard-00002.npy"):
        assert (dst / name).read_bytes() == (tmp_path / "a" / name).read_bytes()
        assert (dst / name).stat().st_ino != (tmp_path / "a" / name).stat().st_ino  # an edit of one never changes the other


@pytest.mark.parametrize("damage", ["flip", "remove", "truncate"])
def test_a_damaged_or_missing_shard_stops_reading_with_one_line_naming_it(tmp_path, monkeypatch, damage):
    ds = tiny(n=20)
    sharded(monkeypatch, 8, ds.images[0].nbytes)
    d = write(ds, tmp_path / "d")
    shard = d / "images/shard-00001.npy"
    if damage == "flip":
        data = bytearray(shard.read_bytes())
        data[-1] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "remove":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:200])
    with pytest.raises(FmpipeError) as err:
        read_dataset(d, run="fmpipe collect --stage v")
    message = str(err.value)
    assert "\n" not in message and str(shard) in message
    assert ("missing" if damage == "remove" else "does not match dataset.json") in message


# ---------------------------------------------------------------- collect

def folder(root: Path, n_per_class: int = 7, size: int = 12) -> Path:
    from PIL import Image

    rng = np.random.default_rng(3)
    for cls in ("cat", "dog", "eel"):
        (root / cls).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / cls / f"{i:02d}.png")
    (root / "dog" / "broken.png").write_bytes(b"not an image")  # a skip in the middle of the rows
    return root


def _collect_pics(tmp_path: Path, name: str) -> Path:
    from pipeline.runner import run_step

    run_step("collect", "pics")
    return Path(shutil.copytree("data/pics/collect", tmp_path / name))


def test_collect_gives_the_same_manifest_and_pixels_sharded_or_not(project, tmp_path, monkeypatch):
    folder(project / "pics")

    def add(params):
        params["variants"]["pics"] = {**params["variants"]["digits"],
                                      "source": {"kind": "imagefolder", "path": "pics", "size": [8, 8]}}
    edit_params(add)
    single = _collect_pics(tmp_path, "single")
    sharded(monkeypatch, 6, 8 * 8 * 3)
    many = _collect_pics(tmp_path, "many")
    assert (single / "images.npy").exists() and len(list((many / "images").iterdir())) == 4  # 21 rows / 6
    assert (single / "manifest.parquet").read_bytes() == (many / "manifest.parquet").read_bytes()
    assert (single / "report.json").read_text() == (many / "report.json").read_text()
    a, b = read_dataset(single), read_dataset(many)
    np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))
    assert len(a) == 21 and "dog/broken.png" not in set(a.manifest["id"])
    # The pixels are those of the in-memory load, row for row, and the hashes are of them.
    from pipeline.config import load_variant
    from pipeline.sources.imagefolder import load

    col = load(load_variant("pics").source)
    np.testing.assert_array_equal(col.images, np.asarray(a.images))
    assert list(a.manifest["sha256"]) == list(image_rows(col.images)["sha256"])


def test_collect_from_an_archive_out_of_id_order_writes_rows_in_id_order(tmp_path):
    import tarfile

    from pipeline.sources.imagefolder import Spec, load

    src = folder(tmp_path / "src")
    archive = tmp_path / "pics.tar"
    with tarfile.open(archive, "w") as tf:  # members in reverse id order
        for f in sorted((p for p in src.rglob("*.png")), reverse=True):
            tf.add(f, arcname=f.relative_to(src).as_posix())
    out = tmp_path / "out"
    out.mkdir()
    spec = Spec(path=str(archive), size=(8, 8))
    on_disk, in_memory = load(spec, out=out), load(Spec(path=str(src), size=(8, 8)))
    assert on_disk.ids == in_memory.ids
    np.testing.assert_array_equal(np.asarray(on_disk.images), in_memory.images)
    assert list(on_disk.stats["sha256"]) == list(image_rows(in_memory.images)["sha256"])
    assert sorted(p.name for p in out.iterdir()) == ["images.npy"]  # the scratch file is gone


# Digests of digits' collected and cleaned payloads and manifests on main before shards
# (e81efd2): the small-data layout must not change a byte (DVC would see new versions).
DIGITS_SHA256 = {  # step: (images.npy, manifest.parquet)
    "collect": ("12fce391191d81182046255ad6a516afb95e3c862d2b9fa977af169ef4f36cbe",
                "ebb288f2b3e82a34b2b9d6f9f6586d531213b4b738d10ae269a88c43d72ea3e8"),
    "clean": ("0f7233165a13100b03581e3c5c836f94d7c28ab7ab5cd2e98dc351c612eb8c31",
              "b400ce6eefde6971cf581495aabd993603fe2f104a830886e51cd2d7d5daf8b8"),
}


def test_digits_collected_and_cleaned_outputs_are_unchanged(project):
    from pipeline.runner import run_step

    run_step("collect", "digits")
    run_step("clean", "digits")
    for step, (images, manifest) in DIGITS_SHA256.items():
        files = json.loads(Path(f"data/digits/{step}/dataset.json").read_text())["files"]
        assert files == {"manifest.parquet": manifest, "images.npy": images}, step


def test_dvc_hardlink_cache_is_safe_with_atomic_outputs(tmp_path):
    """`dvc config cache.type hardlink` (docs/pipeline.md): the outputs become links to the cache
    objects, and a step re-run by hand replaces them with new files, never writing into a link,
    so every cache object still holds the bytes its name (md5) says."""
    import hashlib as H

    from helpers import fmpipe, make_repo, sh

    repo = make_repo(tmp_path / "repo", ["digits"])
    sh(repo, "dvc", "config", "--local", "cache.type", "hardlink")
    sh(repo, "dvc", "repro", "-q", "collect@digits")
    payload = repo / "data/digits/collect/images.npy"
    objects = [p for p in (repo / ".dvc/cache").rglob("*") if p.is_file() and not p.name.endswith(".dir")]
    assert payload.stat().st_nlink == 2
    assert payload.stat().st_ino in {p.stat().st_ino for p in objects}
    fmpipe("collect", "--stage", "digits", cwd=repo, check=True)  # replaces the directory by rename
    assert payload.stat().st_nlink == 1
    for obj in objects:
        assert H.md5(obj.read_bytes()).hexdigest() == obj.parent.name + obj.name, obj
    assert "changed outs" not in sh(repo, "dvc", "status", "collect@digits").stdout  # same bytes again
    sh(repo, "dvc", "checkout", "-q", "--relink", "collect@digits")
    assert payload.stat().st_nlink == 2
