"""Time `fmpipe train` on the cifar variant's recipe and score it on the CIFAR-10 test set.

Not a test: it prints figures (bench/README.md has the ones measured and the machine's load).

    python bench/train_recipe.py                          # the cifar default, 10 epochs (~20 min, 2 cores)
    python bench/train_recipe.py --epochs 7               # the 15-minute preset
    python bench/train_recipe.py --epochs 20              # the 40-minute preset
    python bench/train_recipe.py --epochs 1 --train-subset 4000 --test-subset 1000   # smoke run

What runs is ``pipeline.training.fit.fit``, the very function ``fmpipe train`` calls, with the
variant's ``model`` and ``train`` sections from params.yaml (``--set`` overrides a train key,
YAML values: ``--set precision=bf16-mixed --set compile=true``). The data are the JPEG copy
of CIFAR-10 beside the checkout, decoded once and cached by bench/train_cifar.py; the val
hold-out is drawn from the training images with the project's own split function and the
variant's ``split`` section (the ids differ from a real collect, so the rows do too: same sizes).

Printed: training time (fit's own timer, validation excluded) and wall time of the call,
s/epoch, test accuracy without TTA and with the model.json ``tta`` views, and the 1-minute
load average before and after (a benchmark is only meaningful on a quiet machine: load
below ~0.5 before the run on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from pipeline.config import TrainSpec, load_variant  # noqa: E402
from pipeline.manifest import Dataset, build_manifest, image_rows  # noqa: E402
from pipeline.splitting import assign_splits  # noqa: E402

# Beside the checkout (../shared), or beside a worktree's parent folder.
ARCHIVE = next((p for p in (REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz",
                            REPO.parent.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz") if p.exists()),
               REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz")
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_dataset(d: dict[str, np.ndarray], split_spec, train_subset: int, test_subset: int) -> Dataset:
    xtr, ytr, xte, yte = d["x_train"], d["y_train"], d["x_test"], d["y_test"]
    rng = np.random.default_rng(0)  # the cache is ordered by class: subsets are drawn at random
    if train_subset:
        keep = np.sort(rng.permutation(len(ytr))[:train_subset])
        xtr, ytr = xtr[keep], ytr[keep]
    if test_subset:
        keep = np.sort(rng.permutation(len(yte))[:test_subset])
        xte, yte = xte[keep], yte[keep]
    x = np.concatenate([xtr, xte])
    y = np.concatenate([ytr, yte]).astype(np.int64)
    ids = [f"train/{i:05d}" for i in range(len(ytr))] + [f"test/{i:05d}" for i in range(len(yte))]
    given = ["train"] * len(ytr) + ["test"] * len(yte)
    splits = assign_splits(ids, y, seed=split_spec.seed, val_fraction=split_spec.val_fraction,
                           test_fraction=0.0, given=given)
    manifest = build_manifest(ids, y, CLASSES, list(splits), image_rows(x))
    return Dataset(manifest=manifest, classes=CLASSES, images=x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="cifar")
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--epochs", type=int, default=None, help="override train.max_epochs")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=YAML",
                    help="override a top-level train key, e.g. precision=bf16-mixed")
    ap.add_argument("--train-subset", type=int, default=0, help="use N random training images (smoke runs)")
    ap.add_argument("--test-subset", type=int, default=0, help="score on N random test images")
    ap.add_argument("--archive", type=Path, default=ARCHIVE)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/fmpipe-cifar10-cache"))
    ap.add_argument("--json", type=Path, default=None, help="append the figures as one JSON line")
    args = ap.parse_args()

    import torch

    from pipeline.models import load_trained
    from pipeline.packaging.evaluation import predict_proba
    from pipeline.training.fit import fit
    from train_cifar import load_cifar

    spec = load_variant(args.variant, args.params)
    train = spec.train.model_dump()
    if args.epochs is not None:
        train["max_epochs"] = args.epochs
    for item in args.set:
        key, _, value = item.partition("=")
        train[key] = yaml.safe_load(value)
    spec = spec.model_copy(update={"train": TrainSpec.model_validate(train)})

    ds = make_dataset(load_cifar(args.archive, args.cache), spec.split, args.train_subset, args.test_subset)
    counts = {s: int((ds.manifest["split"] == s).sum()) for s in ("train", "val", "test")}
    load_before = os.getloadavg()
    print(f"{args.variant}: {spec.model.name} {spec.model.options}, {spec.train.max_epochs} epochs, "
          f"batch {spec.train.batch_size}, precision {spec.train.precision}, compile {spec.train.compile}; "
          f"rows {counts}; torch threads {torch.get_num_threads()}; "
          f"load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = fit(ds, spec, Path(tmp) / "train", variant=args.variant)
        wall = time.perf_counter() - t0
        net, meta = load_trained(Path(tmp) / "train")
    test = ds.split("test")
    x = torch.from_numpy(np.ascontiguousarray(np.asarray(test.images).transpose(0, 3, 1, 2))).float()
    y = test.manifest["label"].to_numpy()
    head = meta["model"].get("head", "softmax")
    acc_plain = float((predict_proba(net, x, head=head).argmax(1).numpy() == y).mean())
    acc_tta = float((predict_proba(net, x, tta=meta.get("tta"), head=head).argmax(1).numpy() == y).mean())
    load_after = os.getloadavg()
    epochs = summary["epochs"]
    result = {
        "variant": args.variant, "epochs": epochs, "overrides": args.set, "rows": counts,
        "train_time_s": summary["train_time_s"], "fit_wall_s": round(wall, 1),
        "s_per_epoch": round(summary["train_time_s"] / max(1, epochs), 1),
        "throughput_img_s": summary["throughput_samples_per_s"],
        "val_acc": summary["val_acc"], "test_acc": acc_plain, "test_acc_tta": acc_tta,
        "tta_views": len((meta.get("tta") or {}).get("views") or []),
        "load_before": [round(v, 2) for v in load_before], "load_after": [round(v, 2) for v in load_after],
    }
    print(f"train {result['train_time_s']:.0f} s ({result['s_per_epoch']:.1f} s/epoch, "
          f"{result['throughput_img_s']} img/s), fit() wall {wall:.0f} s = {wall / 60:.1f} min; "
          f"test accuracy {acc_plain:.4f} plain, {acc_tta:.4f} with TTA ({result['tta_views']} views); "
          f"load average after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    if args.json:
        with args.json.open("a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
