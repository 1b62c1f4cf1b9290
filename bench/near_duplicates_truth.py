"""Near-duplicate search on the real CIFAR-10, scored against pairs judged by eye.

The truth is ``tests/fixtures/cifar_near_duplicates.csv`` (its README says how it was drawn and
the judging rule). L = the number of test images judged leaked (a ``same_photo`` or
``same_object`` train image). For each embedder named on the command line:

- every test image ranked by cosine distance to its closest train image: the share of the
  leaked list in the first L and 2L (the flag budgets of issue #30), and the precision of the
  first L (judged leaked / L: a lower bound, unjudged images count as not leaked);
- at ``--threshold`` (default: clean's ``near_threshold`` in params.yaml for that embedder):
  test images flagged, and recall / precision among them;
- within the test split: the share of judged pairs within the threshold, and that are
  each other's nearest neighbour.

Accuracy figures, not timings. The decoded archive is cached in ``--cache`` (one .npz,
~180 MB) so a second run does not decode 60,000 JPEGs again.

    python bench/near_duplicates_truth.py                 # thumbs and crops, full CIFAR-10
    python bench/near_duplicates_truth.py crops --threshold 0.025
    python bench/near_duplicates_truth.py thumbs --subsample 20000   # a quicker look
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pipeline.quality.embedders import make_embedder  # noqa: E402
from pipeline.quality.neighbors import normalize  # noqa: E402

TRUTH = REPO / "tests/fixtures/cifar_near_duplicates.csv"
ARCHIVE = next((p for p in (REPO.parent / "shared/datasets/cifar10-jpeg.tar.gz",
                            REPO.parent.parent / "shared/datasets/cifar10-jpeg.tar.gz") if p.exists()),
               REPO.parent / "shared/datasets/cifar10-jpeg.tar.gz")
LEAK = ("same_photo", "same_object")


def load_cifar(archive: Path, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """(ids, uint8 N x 32 x 32 x 3), ids as the imagefolder source names them."""
    if cache.exists():
        got = np.load(cache)
        return got["ids"], got["images"]
    ids, images = [], []
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".jpg"):
                parts = member.name.split("/")
                ids.append("/".join(parts[-3:]))
                images.append(np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")))
    order = np.argsort(ids)
    ids_arr, img_arr = np.array(ids)[order], np.stack(images)[order]
    np.savez(cache, ids=ids_arr, images=img_arr)
    return ids_arr, img_arr


def read_truth(path: Path = TRUTH) -> tuple[set[str], list[tuple[str, str]]]:
    """(leaked test ids, judged within-test duplicate pairs)."""
    leaked, within = set(), []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row["judgement"] not in LEAK:
                continue
            if row["kind"] == "test-trainval":
                leaked.add(row["a"])
            else:
                within.append((row["a"], row["b"]))
    return leaked, within


def nearest(q: np.ndarray, b: np.ndarray, views: list[np.ndarray] = (), exclude_self: bool = False
            ) -> tuple[np.ndarray, np.ndarray]:
    """Distance to and index of each query row's closest base row, the closest over the plain
    query and its ``views`` (each L2-normalised), chunked."""
    dist = np.full(len(q), np.inf, np.float32)
    arg = np.zeros(len(q), np.int64)
    for query in (q, *views):
        for s in range(0, len(q), 512):
            sims = query[s:s + 512] @ b.T
            if exclude_self:
                sims[np.arange(len(sims)), np.arange(s, s + len(sims))] = -np.inf
            a = sims.argmax(axis=1)
            d = 1 - sims[np.arange(len(sims)), a]
            better = d < dist[s:s + 512]
            dist[s:s + 512][better] = d[better]
            arg[s:s + 512][better] = a[better]
    return dist, arg


def score(ids: np.ndarray, vectors: np.ndarray, leaked: set[str], within: list[tuple[str, str]],
          threshold: float, test_views: list[np.ndarray] = ()) -> dict:
    """Figures for one embedding; ``test_views``: extra views of the test rows (crops)."""
    vectors = normalize(vectors)
    views = [normalize(v) for v in test_views]
    test = np.flatnonzero(np.char.startswith(ids.astype(str), "test/"))
    train = np.flatnonzero(np.char.startswith(ids.astype(str), "train/"))
    dist, _ = nearest(vectors[test], vectors[train], views)
    test_ids = ids[test]
    is_leak = np.isin(test_ids, list(leaked))
    L = int(is_leak.sum())
    order = np.argsort(dist, kind="stable")
    flagged = dist <= threshold
    pos = {k: i for i, k in enumerate(test_ids)}
    wdist, warg = nearest(vectors[test], vectors[test], views, exclude_self=True)
    pairs = [(pos[a], pos[b]) for a, b in within if a in pos and b in pos]
    pair_d = np.array([min(1 - float(v[a] @ vectors[test[b]]) for v in (vectors[test], *views))
                       for a, b in pairs] if pairs else [])
    pair_d = np.minimum(pair_d, [min(1 - float(v[b] @ vectors[test[a]]) for v in (vectors[test], *views))
                                 for a, b in pairs] if pairs else [])
    mutual = np.mean([warg[a] == b or warg[b] == a for a, b in pairs]) if pairs else float("nan")
    return {
        "L": L, "recall@L": is_leak[order[:L]].sum() / max(L, 1), "recall@2L": is_leak[order[:2 * L]].sum() / max(L, 1),
        "precision@L": is_leak[order[:L]].sum() / max(L, 1),
        "distance@L": float(dist[order[L - 1]]) if L else float("nan"),
        "distance@2L": float(dist[order[2 * L - 1]]) if L else float("nan"),
        "flagged": int(flagged.sum()), "recall@t": is_leak[flagged].sum() / max(L, 1),
        "precision@t": is_leak[flagged].sum() / max(int(flagged.sum()), 1),
        "within pairs": len(pairs), "within@t": float((pair_d <= threshold).mean()) if pairs else float("nan"),
        "within nn": float(mutual),
    }


RATIO_BINS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)


def judged_pairs(path: Path = TRUTH) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def copy_rate(ids: np.ndarray, images: np.ndarray, emb, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Every judged pair's distance over ``threshold`` (the first image's views included, as
    clean searches) and whether it was judged a copy (same photo or same object)."""
    pos = {k: i for i, k in enumerate(ids.astype(str))}
    pairs = [p for p in judged_pairs() if p["a"] in pos and p["b"] in pos]
    a = images[[pos[p["a"]] for p in pairs]]
    b = normalize(emb.embed(images[[pos[p["b"]] for p in pairs]]))
    views = [normalize(emb.embed(a))] + [normalize(v) for v in (emb.embed_views(a) if hasattr(emb, "embed_views") else [])]
    dist = np.min([1 - (v * b).sum(axis=1) for v in views], axis=0)
    return dist / threshold, np.array([p["judgement"] in LEAK for p in pairs])


def params_threshold() -> float:
    import yaml

    from pipeline.quality.rules import NearSpec

    clean = (yaml.safe_load((REPO / "params.yaml").read_text())["variants"]["cifar"].get("clean") or {})
    return float(clean.get("near_threshold", NearSpec().near_threshold))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("embedders", nargs="*", default=["thumbs", "crops"], help="make_embedder kinds")
    ap.add_argument("--threshold", type=float, default=None)
    ap.add_argument("--subsample", type=int, default=0, help="train images kept (all test images stay)")
    ap.add_argument("--archive", type=Path, default=ARCHIVE)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/fmpipe-cifar10-jpeg.npz"))
    args = ap.parse_args()
    ids, images = load_cifar(args.archive, args.cache)
    if args.subsample:
        train = np.flatnonzero(np.char.startswith(ids.astype(str), "train/"))
        keep = np.sort(np.concatenate([np.flatnonzero(~np.isin(np.arange(len(ids)), train)),
                                       np.random.default_rng(0).choice(train, args.subsample, replace=False)]))
        ids, images = ids[keep], images[keep]
    leaked, within = read_truth()
    threshold = args.threshold if args.threshold is not None else params_threshold()
    print(f"CIFAR-10 {len(ids)} images; truth: {len(leaked)} leaked test images, {len(within)} within-test pairs; "
          f"threshold {threshold}")
    cols = ("recall@L", "recall@2L", "precision@L", "distance@L", "distance@2L", "flagged", "recall@t",
            "precision@t", "within@t", "within nn")
    print(f"{'embedder':10s} " + " ".join(f"{c:>11s}" for c in cols))
    rates = []
    for kind in args.embedders:
        emb = make_embedder(kind)
        test = np.char.startswith(ids.astype(str), "test/")
        views = emb.embed_views(images[test]) if hasattr(emb, "embed_views") else []
        got = score(ids, emb.embed(images), leaked, within, threshold, views)
        print(f"{kind:10s} " + " ".join(f"{got[c]:11.4f}" if isinstance(got[c], float) else f"{got[c]:>11}"
                                         for c in cols))
        rates.append(copy_rate(ids, images, emb, threshold))
    # The share of judged pairs people called a copy, by distance / threshold (both embedders'
    # pairs pooled): review's near-duplicate score (pipeline/quality/finders.py COPY_RATE).
    ratio, copy = (np.concatenate(parts) for parts in zip(*rates))
    print("judged copies by distance / threshold (all embedders' pairs):")
    for lo, hi in zip(RATIO_BINS, RATIO_BINS[1:]):
        inside = (ratio >= lo) & (ratio < hi)
        print(f"  [{lo:.2f}, {hi:.2f}): {int(inside.sum()):4d} pairs, {copy[inside].mean() if inside.any() else float('nan'):.2f} copies")


if __name__ == "__main__":
    main()
