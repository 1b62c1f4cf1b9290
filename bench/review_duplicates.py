"""Which features find near-duplicates best for review: each layer of the trained network
(spatially average-pooled), its penultimate features, the hand-designed ``thumbs`` features of
clean, and ``thumbs`` combined with each layer, on constructed near-duplicates.

Takes N rows of a variant's annotated dataset and the variant's trained model, makes one
edited copy of each row per edit (the edits of ``bench/embedder_ablation.py``: 2-px shift,
crop + resize, recolour, mirror, brightness, JPEG 50), and reports per feature set:

- ``t@fp1%``: the cosine distance at which 1% of the N distinct originals would have some
  other original that close (a false pair): the threshold that keeps false pairs at 1%;
- per edit, ``top1`` (the copy's nearest original is its source) and ``rec`` (the copy is
  within ``t@fp1%`` of its source): recall at an equal false-pair rate, so feature sets
  compare fairly whatever their distance scale.

A classifier's last layers group images by class, so its penultimate features put two
different cats close together: expect it to lose to the intermediate layers and to thumbs.
Accuracy figures, not timings: machine load does not change them.

    # after `dvc repro` of the variant (a trained model in data/<v>/train):
    python bench/review_duplicates.py --variant cifar --n 2000
    python bench/review_duplicates.py --variant digits --n 300      # tiny check
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

_REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_REPO))
sys.path.insert(0, str(_REPO / "bench"))
from embedder_ablation import edits  # noqa: E402  (the same constructed edits as clean's bench)

from pipeline.manifest import read_dataset  # noqa: E402
from pipeline.quality.embedders import PackageEmbedder, ThumbsEmbedder  # noqa: E402
from pipeline.quality.neighbors import normalize  # noqa: E402


def feature_sets(model_dir: str, images: np.ndarray, copies: dict[str, np.ndarray]) -> dict[str, tuple]:
    """name -> (originals N x D, {edit: copies N x D}), every vector L2-normalised."""
    emb = PackageEmbedder(str(model_dir), batch_size=512)
    net = emb.load()
    body = dict(net.named_modules())["body"]
    layers = [f"body.{name}" for name, _ in body.named_children()]
    wanted = [None, *layers]

    def run(x):
        got = emb.embed_layers(x, wanted)
        return {k: normalize(v) for k, v in got.items()}

    base = run(images)
    edited = {e: run(c) for e, c in copies.items()}
    thumbs = ThumbsEmbedder()
    t_base = normalize(thumbs.embed(images))
    t_edit = {e: normalize(thumbs.embed(c)) for e, c in copies.items()}

    out: dict[str, tuple] = {"thumbs": (t_base, t_edit)}
    for layer in wanted:
        name = "penultimate" if layer is None else layer
        out[name] = (base[layer], {e: edited[e][layer] for e in copies})
        out[f"thumbs+{name}"] = (_cat(t_base, base[layer]), {e: _cat(t_edit[e], edited[e][layer]) for e in copies})
    return out


def _cat(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # The review's rule (pipeline.review.review.duplicate_vectors): parts equally weighted.
    return np.concatenate([a, b], axis=1) / np.sqrt(2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="digits")
    ap.add_argument("--data", default=None, help="dataset dir (default data/<variant>/annotate)")
    ap.add_argument("--model", default=None, help="trained model dir (default data/<variant>/train)")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    ds = read_dataset(args.data or f"data/{args.variant}/annotate")
    rng = np.random.default_rng(args.seed)
    rows = np.sort(rng.choice(len(ds), size=min(args.n, len(ds)), replace=False))
    images = np.asarray(ds.images[rows])
    _, first = np.unique(images.reshape(len(images), -1), axis=0, return_index=True)
    images = images[np.sort(first)]
    copies = edits(images, rng)
    sets = feature_sets(args.model or f"data/{args.variant}/train", images, copies)

    print(f"{len(images)} originals of {args.variant}; recall at the threshold that flags 1% of distinct originals")
    print(f"{'features':28s} {'t@fp1%':>7s} {'mean rec':>8s} " + " ".join(f"{e:>16s}" for e in copies))
    print(" " * 46 + " ".join(f"{'top1 / rec':>16s}" for _ in copies))
    results = []
    for name, (base, edited) in sets.items():
        sims = base @ base.T
        np.fill_diagonal(sims, -1)
        t_fp = float(np.quantile(1 - sims.max(axis=1), 0.01))
        cells, recs = [], []
        for e, q in edited.items():
            s = q @ base.T
            idx = np.arange(len(q))
            top1 = float((s.argmax(axis=1) == idx).mean())
            rec = float(((1 - s[idx, idx]) <= t_fp).mean())
            recs.append(rec)
            cells.append(f"{top1:5.3f} / {rec:5.3f}")
        results.append((float(np.mean(recs)), name, t_fp))
        print(f"{name:28s} {t_fp:7.4f} {np.mean(recs):8.3f} " + " ".join(f"{c:>16s}" for c in cells))
    best = max(results)
    print(f"\nbest: {best[1]} (mean recall {best[0]:.3f} at threshold {best[2]:.4f}); "
          f"set review.duplicate_features / duplicate_threshold accordingly")


if __name__ == "__main__":
    main()
