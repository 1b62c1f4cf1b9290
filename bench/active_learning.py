"""Active-learning gain of the pool queue: labels chosen by ``fmpipe review pool``'s ranking vs at random.

    python bench/active_learning.py --variant digits --labels 100
    python bench/active_learning.py --variant cifar --root <project where cifar ran> --labels 1000
    python bench/active_learning.py --variant cifar --root <project> --labels 1000 --epochs 4   # CPU: ~25 min

The pool is simulated from the training split (issue #28): ``--base-fraction`` of the train rows
(drawn at random) is what the model trains on first; the rest is an unlabelled pool. Round 0
trains on the base (the variant's own recipe, ``pipeline.training.fit``); its network scores the
pool; ``--labels`` pool rows are then chosen two ways, by the queue
(``pipeline.monitoring.queue``: margin, entropy, drift against the val rows, k-means
diversity) and uniformly at random, and the model is trained again on base + chosen rows
(their true labels: a perfect annotator). ``--strategies queue,random,margin`` adds plain
uncertainty sampling (smallest top-2 margin), which tells the queue's mix (margin, entropy,
drift, diversity) apart from uncertainty alone. Printed: test accuracy of each model, rows,
and the load average. Three trainings: on a CPU, cifar takes as long as three ``fmpipe train`` runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", default="digits")
    ap.add_argument("--root", default=".", help="project directory holding data/<variant>/annotate and params.yaml")
    ap.add_argument("--labels", type=int, default=1000, help="pool rows labelled per strategy")
    ap.add_argument("--base-fraction", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strategies", default="queue,random",
                    help="comma-separated, trained in this order: queue (the pool queue's ranking), random, "
                         "margin (smallest top-2 probability margin only: plain uncertainty sampling)")
    ap.add_argument("--epochs", type=int, default=None,
                    help="train.max_epochs of the three trainings (default: the variant's); the schedule follows it")
    args = ap.parse_args()
    os.chdir(args.root)

    import torch

    from pipeline.config import load_variant
    from pipeline.inference.network import model_inputs, predict_logits
    from pipeline.inference.tta import probabilities
    from pipeline.manifest import read_dataset
    from pipeline.models import load_trained
    from pipeline.monitoring import queue
    from pipeline.training.fit import fit

    print(f"bench/active_learning.py: {args.variant}; load average before {os.getloadavg()}; "
          f"cpu_count {os.cpu_count()}", flush=True)
    spec = load_variant(args.variant)
    if args.epochs is not None:
        spec = spec.model_copy(update={"train": spec.train.model_copy(update={"max_epochs": args.epochs})})
    ds = read_dataset(f"data/{args.variant}/annotate", mmap=False)
    split = ds.manifest["split"].to_numpy()
    train = np.flatnonzero(split == "train")
    rng = np.random.default_rng(args.seed)
    base = np.sort(rng.choice(train, int(len(train) * args.base_fraction), replace=False))
    pool = np.setdiff1d(train, base)
    keep = np.flatnonzero(split != "train")
    labels = min(args.labels, len(pool))
    test = ds.take(split == "test")
    tmp = Path(tempfile.mkdtemp(prefix="fmpipe-bench-al-"))

    def train_on(rows: np.ndarray, name: str):
        t = time.perf_counter()
        fit(ds.take(np.sort(np.concatenate([keep, rows]))), spec, tmp / name, variant=args.variant)
        net, _ = load_trained(tmp / name)
        z = predict_logits(net, model_inputs(test))
        acc = float((probabilities(z).argmax(1) == test.manifest["label"].to_numpy()).mean())
        print(f"{name:>8}: {len(rows)} train rows, test accuracy {acc:.4f} ({time.perf_counter() - t:.0f} s)", flush=True)
        return net, acc

    torch.manual_seed(args.seed)
    net, _ = train_on(base, "base")
    pool_logits = predict_logits(net, model_inputs(ds.take(pool)))
    ref_logits = predict_logits(net, model_inputs(ds.take(split == "val")))
    s = queue.scores(probabilities(pool_logits), pool_logits, ref_logits, seed=args.seed)
    # Only `random` draws from rng (training uses torch's generator), so each strategy chooses
    # the same rows whichever others run, and only the asked ones are computed.
    choose = {"queue": lambda: pool[queue.diversity_order(s["priority"].to_numpy(), s["cluster"].to_numpy())[:labels]],
              "random": lambda: rng.choice(pool, labels, replace=False),
              "margin": lambda: pool[np.argsort(-s["margin"].to_numpy(), kind="stable")[:labels]]}
    accuracy = {name: train_on(np.concatenate([base, choose[name]()]), name)[1]
                for name in args.strategies.split(",")}
    print(f"\n{labels} labels from a pool of {len(pool)}, base {len(base)} rows: "
          + ", ".join(f"{name} {acc:.4f}" for name, acc in accuracy.items())
          + (f" (queue - random {accuracy['queue'] - accuracy['random']:+.4f})" if {"queue", "random"} <= set(accuracy) else "")
          + f"; load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
