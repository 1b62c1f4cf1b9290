"""What the queue's budgets do to label-noise recall: the real finders and queue on injected noise.

Takes a dataset's images, files ``--noise`` of the rows under a wrong class, scores every row
out-of-fold (a logistic-regression head on cross-validated folds, the review's ``linear_head``
scoring, here on fixed features: ``thumbs`` for images, or the digits' pixels), runs the
registered finders (cleanlab's label issues, near-duplicates on thumbs, outliers) and builds
the queue twice: one ranking with no caps, and with the params' ``<finder>_share`` caps.
Prints the share of flipped rows inside the queue for each.

A proxy, no trained network: the head on hand-made features is a much weaker classifier than
the cifar model (so CIFAR figures sit far below what review on a trained model gives); it
compares the two queue rules on the same evidence. Accuracy figures, not timings.

    python bench/review_budgets.py --data digits --queue 80
    python bench/review_budgets.py --data cifar --n 10000 --queue 300    # CIFAR-10 train subsample
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def load(data: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features for the head, images for thumbs, labels)."""
    if data == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = np.rint(bunch.images * (255 / 16)).clip(0, 255).astype(np.uint8)[..., None]
        return bunch.data.astype(np.float32), images, bunch.target.astype(np.int64)
    from near_duplicates_truth import ARCHIVE, load_cifar

    ids, images = load_cifar(ARCHIVE, Path("/tmp/fmpipe-cifar10-jpeg.npz"))
    train = np.flatnonzero(np.char.startswith(ids.astype(str), "train/"))
    rows = np.sort(np.random.default_rng(seed).choice(train, min(n, len(train)), replace=False))
    classes = sorted({i.split("/")[1] for i in ids})
    labels = np.array([classes.index(i.split("/")[1]) for i in ids[rows]])
    from pipeline.quality.embedders import ThumbsEmbedder

    return ThumbsEmbedder(mirror_invariant=False).embed(images[rows]), images[rows], labels


def main() -> None:
    from pipeline.config import ReviewSpec
    from pipeline.quality.embedders import ThumbsEmbedder
    from pipeline.quality.finders import FINDERS, ReviewInputs, build_queue, finder_options
    from pipeline.review.scoring import cross_validated_head_probs, label_issues

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", choices=("digits", "cifar"), default="digits")
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--noise", type=float, default=0.02)
    ap.add_argument("--queue", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    features, images, truth = load(args.data, args.n, args.seed)
    rng = np.random.default_rng(args.seed)
    k = int(truth.max()) + 1
    flipped = rng.choice(len(truth), int(round(args.noise * len(truth))), replace=False)
    labels = truth.copy()
    labels[flipped] = (truth[flipped] + rng.integers(1, k, len(flipped))) % k
    spec = ReviewSpec()
    probs = cross_validated_head_probs(features, labels, k, folds=spec.folds, seed=args.seed, c=1.0)
    frame, _ = label_issues(labels, probs, filter_by=spec.filter_by, rank_by=spec.rank_by)
    manifest = pd.DataFrame({"id": pd.array([f"r{i:05d}" for i in range(len(labels))], dtype="string"),
                             "split": pd.array(["train"] * len(labels), dtype="string"), "label": labels})
    thumbs = ThumbsEmbedder().embed(images)
    inputs = ReviewInputs(manifest=manifest, probs=probs, issues=frame, penultimate=features,
                          duplicate_vectors=thumbs, groups=np.array(["train"] * len(labels), dtype=object))
    options = {name: finder_options(spec, name) for name in spec.finders}
    findings = {name: FINDERS[name](inputs, options[name]) for name in spec.finders}
    shares = {name: getattr(spec, f"{name}_share") for name in spec.finders}
    accuracy = float((probs.argmax(axis=1) == labels).mean())
    print(f"{args.data}: {len(labels)} rows, {len(flipped)} flipped ({args.noise:.0%}); out-of-fold head accuracy "
          f"{accuracy:.3f}; queue {args.queue}; found per finder: "
          + ", ".join(f"{n} {len(f)}" for n, f in findings.items()))
    for name, rule in (("one ranking, no caps", None), (f"caps {shares}", shares)):
        queue = build_queue(findings, args.queue, shares=rule)
        caught = np.isin(flipped, queue["row"].to_numpy())
        by_group = queue.groupby("group").size().to_dict()
        print(f"  {name}: {caught.sum()}/{len(flipped)} flipped rows in the queue (recall {caught.mean():.3f}); "
              f"rows per finder {by_group}")


if __name__ == "__main__":
    main()
