"""The near-pair index and the embedders: exact vs approximate backends, constructed copies."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from helpers import photos as _photos
from pipeline.errors import FmpipeError
from pipeline.quality.embedders import PackageEmbedder, ThumbsEmbedder, make_embedder, symmetrise, _mirror_perm
from pipeline.quality.neighbors import describe, near_pairs, normalize


def _brute(q, b, threshold, within):
    d = 1 - normalize(q) @ normalize(b).T
    pairs = {(i, j) for i, j in zip(*np.nonzero(d <= threshold)) if not within or i < j}
    return pairs


def _planted(n=400, dim=32, copies=30, noise=0.02, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    src = rng.choice(n, copies, replace=False)
    near = x[src] + noise * rng.normal(size=(copies, dim)).astype(np.float32)
    return x, near, src


def test_exact_within_matches_brute_force_each_pair_once():
    x, near, src = _planted()
    data = np.concatenate([x, near])
    pairs = near_pairs(data, threshold=0.01, method="exact", chunk_bytes=4096)  # many chunks
    got = set(zip(pairs["i"], pairs["j"]))
    assert got == _brute(data, data, 0.01, within=True)
    assert got == {(int(s), 400 + c) for c, s in enumerate(src)}
    assert (pairs["i"] < pairs["j"]).all() and not pairs.duplicated(["i", "j"]).any()
    assert list(pairs.columns) == ["i", "j", "distance"] and pairs["distance"].dtype == np.float32
    record = describe(pairs)
    assert record["method"] == "exact" and record["threshold"] == 0.01 and record["pairs"] == 30


def test_query_against_base_and_k_limit():
    x, near, src = _planted()
    pairs = near_pairs(near, x, threshold=0.01, method="exact")
    assert (x.shape[0] > pairs["j"]).all()
    assert set(zip(pairs["i"], pairs["j"])) == {(c, int(s)) for c, s in enumerate(src)}
    # Twelve identical vectors: each query row keeps at most k neighbours.
    same = np.ones((12, 4), np.float32)
    capped = near_pairs(same[:1], same, threshold=0.0, k=5, method="exact")
    assert len(capped) == 5 and (capped["distance"] == 0).all()
    within = near_pairs(same, threshold=0.0, k=3, method="exact")
    assert within.groupby("i").size().max() <= 3 and (within["i"] < within["j"]).all()


def test_overwrite_normalises_the_callers_copy_and_finds_the_same_pairs():
    """clean hands near_pairs copies it owns (``overwrite``): normalised in place, no second
    copy, and the same pairs and distances to the bit as a search on untouched inputs."""
    from pipeline.quality.neighbors import near_pairs_views

    method = "exact"

    x, near, _ = _planted(n=600, dim=24, copies=30)
    for base in (None, x):
        query = np.concatenate([x, near]) if base is None else near
        kept = near_pairs(query.copy(), None if base is None else base.copy(), threshold=0.05, method=method)
        q, b = query.copy(), None if base is None else base.copy()
        got = near_pairs(q, b, threshold=0.05, method=method, overwrite=True)
        pd.testing.assert_frame_equal(got, kept)
        assert np.array_equal(q, normalize(query)) and (b is None or np.array_equal(b, normalize(base)))
        views = [query[:, ::-1].copy(), query * 2]
        plain_views = near_pairs_views(query.copy(), [v.copy() for v in views], base, threshold=0.05, method=method)
        owned = near_pairs_views(query.copy(), [v.copy() for v in views], None if base is None else base.copy(),
                                 threshold=0.05, method=method, overwrite=True)
        pd.testing.assert_frame_equal(owned, plain_views)


def test_clean_context_embeds_each_row_once_and_finds_rows_by_id():
    """Rules share one matrix of embeddings; a dataset that lost rows (an earlier rule dropped
    them) gets the same vectors by id, and asking for more never embeds a row twice."""
    from pipeline.manifest import Dataset, build_manifest, image_rows
    from pipeline.quality.rules import Context

    images = _photos(40)
    manifest = build_manifest([f"p/{i:03d}" for i in range(40)], np.arange(40) % 2, ["a", "b"],
                              ["train"] * 30 + ["test"] * 10, image_rows(images))
    ds = Dataset(manifest=manifest, classes=["a", "b"], images=images)
    calls = []

    class Counting(ThumbsEmbedder):
        def embed(self, batch):
            calls.append(len(batch))
            return super().embed(batch)

    ctx = Context(spec=None, embedder=Counting())
    whole = ctx.vectors(ds)
    assert np.array_equal(whole, ThumbsEmbedder().embed(images)) and sum(calls) == 40
    keep = np.ones(40, bool)
    keep[[3, 17, 31]] = False
    smaller = ds.take(keep)
    rows = np.array([5, 0, 20])
    assert np.array_equal(ctx.vectors(smaller, rows), whole[np.flatnonzero(keep)[rows]])
    assert sum(calls) == 40  # nothing embedded again
    owned = ctx.vectors(smaller, rows)
    owned[:] = 0  # the caller's copy: the cache is untouched
    assert np.array_equal(ctx.vectors(smaller, rows), whole[np.flatnonzero(keep)[rows]])


@pytest.mark.parametrize("method", ["faiss-ivf", "faiss-hnsw", "usearch"])
def test_approximate_backends_find_the_planted_pairs(method):
    x, near, src = _planted(n=2000, dim=48, copies=40)
    data = np.concatenate([x, near])
    exact = near_pairs(data, threshold=0.01, method="exact")
    approx = near_pairs(data, threshold=0.01, method=method)
    assert set(zip(approx["i"], approx["j"])) == set(zip(exact["i"], exact["j"]))
    # Distances are recomputed exactly, so they agree with the exact backend.
    merged = exact.merge(approx, on=["i", "j"])
    np.testing.assert_allclose(merged["distance_x"], merged["distance_y"], atol=1e-6)
    assert describe(approx)["method"] == method and describe(approx)["params"]
    cross = near_pairs(near, x, threshold=0.01, method=method)
    assert set(zip(cross["i"], cross["j"])) == {(c, int(s)) for c, s in enumerate(src)}
    # Same vectors, same pairs: a graph built by racing threads would differ between runs.
    for _ in range(3):
        assert near_pairs(near, x, threshold=0.01, method=method).equals(cross)


def test_auto_switches_to_ann_above_the_size_limit():
    x, near, _ = _planted()
    assert describe(near_pairs(x, threshold=0.1))["method"] == "exact"
    big = near_pairs(x, threshold=0.1, exact_max_pairs=1000)
    assert describe(big)["method"] == "faiss-ivf" and describe(big)["requested"] == "auto"


def test_bad_arguments_are_clear_errors():
    x = np.zeros((3, 4), np.float32)
    with pytest.raises(FmpipeError, match="unknown method"):
        near_pairs(x, threshold=0.1, method="annoy")
    with pytest.raises(FmpipeError, match="threshold"):
        near_pairs(x, threshold=3.0)
    with pytest.raises(FmpipeError, match="dimension"):
        near_pairs(x, np.zeros((2, 5)), threshold=0.1)
    assert near_pairs(x[:1], threshold=0.1).empty


# ---------------------------------------------------------------- embedders

def _jpeg(img: np.ndarray, quality: int = 60) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _edits(img: np.ndarray) -> dict[str, np.ndarray]:
    """Light edits, the kind published CIFAR-10 audits found: found at the default threshold."""
    h, w, _ = img.shape

    def shift(dy, dx):  # the uncovered border filled from the edge
        return np.pad(img, ((dy, 0), (dx, 0), (0, 0)), mode="edge")[:h, :w]

    return {"shift 1,0": shift(1, 0), "shift 0,1": shift(0, 1),
            "crop+resize": np.asarray(Image.fromarray(img[1:h - 1, 1:w - 1]).resize((w, h), Image.BILINEAR)),
            "recolour": np.clip(img.astype(np.float32) * [1.1, 1.0, 0.9] + 5, 0, 255).astype(np.uint8),
            "mirror": img[:, ::-1].copy(), "jpeg": _jpeg(img, 60)}


def _strong_edits(img: np.ndarray) -> dict[str, np.ndarray]:
    """Heavier edits: a 2-pixel shift or crop of a 32 px image moves the thumbnails further."""
    h, w, _ = img.shape

    def shift(dy, dx):
        return np.pad(img, ((dy, 0), (dx, 0), (0, 0)), mode="edge")[:h, :w]

    return {"shift 1,1": shift(1, 1), "shift 0,2": shift(0, 2), "shift 2,0": shift(2, 0),
            "crop 2 + resize": np.asarray(Image.fromarray(img[2:h - 2, 2:w - 2]).resize((w, h), Image.BILINEAR)),
            "recolour 15%": np.clip(img.astype(np.float32) * [1.15, 0.95, 0.85] + 10, 0, 255).astype(np.uint8)}


THRESHOLD = 0.015  # the clean default (pipeline.config.CleanSpec.near_threshold)
LOOSE = 0.04  # what the heavier edits need (and what costs false pairs on real photos)


def test_thumbs_finds_edited_copies_and_not_distinct_images():
    photos = _photos(120)
    emb = ThumbsEmbedder()
    base = emb.embed(photos)
    assert base.shape == (120, emb.dim) and base.dtype == np.float32
    # Distinct images are not near-duplicates of each other at the default threshold.
    assert near_pairs(base, threshold=THRESHOLD).empty
    sources = np.arange(0, 120, 4)
    for name in _edits(photos[0]):
        copies = np.stack([_edits(photos[s])[name] for s in sources])
        found = near_pairs(emb.embed(copies), base, threshold=THRESHOLD, k=1)
        assert list(found["i"]) == list(range(len(sources))), name
        assert list(found["j"]) == list(sources), name
    # Heavier edits: still each copy's nearest neighbour, within the looser threshold.
    assert near_pairs(base, threshold=LOOSE).empty
    for name in _strong_edits(photos[0]):
        copies = np.stack([_strong_edits(photos[s])[name] for s in sources])
        found = near_pairs(emb.embed(copies), base, threshold=LOOSE, k=1)
        assert list(found["j"]) == list(sources), name


def test_mirror_symmetrisation_is_exactly_invariant():
    photos = _photos(5, seed=1)
    emb = ThumbsEmbedder()
    np.testing.assert_allclose(emb.embed(photos), emb.embed(photos[:, :, ::-1].copy()), atol=1e-5)
    perm = _mirror_perm((3, 4, 6), bin_axis_reflect=True)
    assert sorted(perm) == list(range(72)) and (perm[perm] == np.arange(72)).all()
    f = np.random.default_rng(0).normal(size=(2, 72))
    assert symmetrise(f, perm).shape == (2, 72)
    np.testing.assert_allclose(symmetrise(f, perm), symmetrise(f[:, perm], perm))


def test_thumbs_handles_gray_and_other_sizes():
    gray = _photos(6)[..., :1]
    out = ThumbsEmbedder().embed(gray)
    assert out.shape == (6, ThumbsEmbedder().dim) and np.isfinite(out).all()
    big = np.repeat(np.repeat(_photos(3), 2, axis=1), 2, axis=2)  # 64 x 64
    assert np.isfinite(ThumbsEmbedder().embed(big)).all()
    blank = np.zeros((2, 8, 8, 3), np.uint8)
    assert np.isfinite(ThumbsEmbedder().embed(blank)).all()
    with pytest.raises(FmpipeError, match="parts"):
        ThumbsEmbedder(parts=("sift",))
    with pytest.raises(FmpipeError, match="uint8"):
        ThumbsEmbedder().embed(np.zeros((2, 8, 8), np.float32))


def test_package_embedder_hooks_a_named_layer(tmp_path):
    import torch

    from pipeline.models import build, save_trained

    torch.manual_seed(0)
    net = build("cnn_small", (3, 32, 32), 4, {"width": 8})
    meta = {"model": {"name": "cnn_small", "options": {"width": 8}},
            "input": {"kind": "image", "shape": [3, 32, 32]}, "classes": list("abcd")}
    save_trained(net, meta, tmp_path)
    photos = _photos(10)
    penultimate = make_embedder("package", path=str(tmp_path))
    feats = penultimate.embed(photos)
    assert feats.shape == (10, 16)  # the input of the last Linear: 2 * width
    assert penultimate.describe()["layer"] == "body.17" and penultimate.describe()["taken"] == "input"
    conv = PackageEmbedder(str(tmp_path), layer="body.2", batch_size=3)
    assert "body.2" in conv.layers()
    assert conv.embed(photos).shape == (10, 8)  # spatially pooled conv map: one value per channel
    with pytest.raises(FmpipeError, match="no layer 'nope'"):
        PackageEmbedder(str(tmp_path), layer="nope").embed(photos)
    with pytest.raises(FmpipeError, match="model takes images"):
        penultimate.embed(photos[:, :16, :16])
    with pytest.raises(FmpipeError, match="no model.json"):
        PackageEmbedder(str(tmp_path / "missing")).embed(photos)



def _border_or_crop(img: np.ndarray) -> dict[str, np.ndarray]:
    """The re-crops real CIFAR-10 copies show (tests/fixtures/README.md): a quarter of the
    picture cut away, another aspect ratio, a corner, the picture shrunk into a 2-px frame."""
    h, w = img.shape[:2]
    resize = lambda x, size=(w, h): np.asarray(Image.fromarray(x).resize(size, Image.BILINEAR))  # noqa: E731
    framed = np.full_like(img, 255)
    framed[2:h - 2, 2:w - 2] = resize(img, (w - 4, h - 4))
    return {"crop 70%": resize(img[5:27, 5:27]), "aspect": resize(img[:, 4:w - 4]), "frame": framed,
            "corner crop": resize(img[:26, 6:])}


def test_crops_views_find_recrops_that_plain_thumbs_misses():
    """A copy that is a re-crop of the original (or the original in a frame) is far in plain
    thumbs (every cell moved) but close to the matching crop view of the wider image:
    near_pairs_views finds it whichever row is the wider one, at the threshold clean uses,
    and distinct photos stay apart."""
    from pipeline.quality.neighbors import near_pairs_views

    photos = _photos(40, seed=3)
    emb = make_embedder("crops")
    base = emb.embed(photos)
    assert np.allclose(base, ThumbsEmbedder().embed(photos))  # a row's vector is thumbs'
    views = emb.embed_views(photos)
    assert len(views) == len(emb.views) and all(v.shape == base.shape for v in views)
    threshold = 0.02  # the cifar variant's near_threshold for crops (params.yaml)
    assert near_pairs_views(base, views, threshold=threshold).empty
    n = 10
    for name in _border_or_crop(photos[0]):
        copies = np.stack([_border_or_crop(p)[name] for p in photos[:n]])
        mixed = np.concatenate([copies, photos[:n]])  # row k and row k + n: one photo
        vecs = emb.embed(mixed)
        plain = set(zip(*near_pairs(vecs, threshold=threshold)[["i", "j"]].to_numpy().T))
        found = near_pairs_views(vecs, emb.embed_views(mixed), threshold=threshold)
        pairs = set(zip(found["i"], found["j"]))
        truth = {(k, k + n) for k in range(n)}
        assert pairs <= truth and len(pairs) >= n - 1 and len(plain & truth) < n - 1, (name, pairs, plain)
    assert describe(found)["views"] == len(emb.views)
    # Query rows against a base: the views are the query's.
    across = near_pairs_views(base[:n], [v[:n] for v in views], emb.embed(np.stack(
        [_border_or_crop(p)["crop 70%"] for p in photos[:n]])), threshold=threshold, k=1)
    assert list(across["i"]) == list(across["j"]) and len(across) >= n - 1
    with pytest.raises(FmpipeError, match="unknown views"):
        make_embedder("crops", views=["zoom99"])
