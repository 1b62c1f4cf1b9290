"""Time `fmpipe train` on the cifar variant's recipe and score it on the CIFAR-10 test set.

Not a test: it prints figures (bench/README.md has the ones measured and the machine's load).

    python bench/train_recipe.py                          # the cifar default, 10 epochs (~20 min, 2 cores)
    python bench/train_recipe.py --preset 15min           # the 15-minute preset
    python bench/train_recipe.py --preset 40min           # the 40-minute preset
    python bench/train_recipe.py --epochs 1 --train-subset 4000 --test-subset 1000   # smoke run
    python bench/train_recipe.py --preset airbench94 --seeds 0 1 2 --epochs 8 10   # a sweep, one line each

What runs is ``pipeline.training.fit.fit``, the very function ``fmpipe train`` calls, with the
variant's ``model`` and ``train`` sections from params.yaml. ``--set`` overrides a key, YAML
values, dotted paths into ``train`` (``--set precision=bf16-mixed --set optimizer.lr=1.2``) or
``model`` (``--set model.options.widths=[128,384,384]``); ``--preset NAME`` applies a documented
preset (``PRESETS`` below) first. The data are the JPEG copy of CIFAR-10 beside the checkout,
decoded once and cached by bench/train_cifar.py; the val hold-out is drawn from the training
images with the project's own split function and the variant's ``split`` section (the ids differ
from a real collect, so the rows do too: same sizes). ``--splits FILE`` (a manifest parquet, e.g.
a real run's ``data/cifar/annotate/manifest.parquet``, or a CSV with ``id`` and ``split``)
takes the rows and splits of that run instead: clean's removals and the very same val rows.

Printed: training time (fit's own timer, validation excluded) and wall time of the call,
s/epoch, test accuracy without TTA and with the model.json ``tta`` views, and the 1-minute
load average before and after (a benchmark is only meaningful on a quiet machine: load
below ~0.5 before the run on 2 cores).
"""

from __future__ import annotations

import argparse
import copy
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

# Documented presets (bench/README.md), as --set overrides on the variant's section.
PRESETS: dict[str, dict[str, object]] = {
    # The cifar default until 2026-11-24: the airbench94 recipe (SGD for every tensor, lookahead).
    "airbench94": {
        "batch_size": 1024,
        "optimizer": {"name": "sgd", "lr": 1.5, "momentum": 0.85, "nesterov": True, "weight_decay": 0.00133},
        "schedule": {"name": "triangular", "start": 0.2, "peak_at": 0.23, "end": 0.07},
        "param_groups": [
            {"module": "BatchNorm*", "param": "weight", "frozen": True},
            {"module": "BatchNorm*", "param": "bias", "lr_scale": 64, "wd_scale": 0.015625},
            {"name": "body.0.conv.bias", "train_epochs": 3},
        ],
        "averaging": {"mode": "lookahead", "start_epoch": 3, "every_n_steps": 5, "decay": 0.7738,
                      "decay_power": 3},
    },
    # airbench94_muon as published, at its batch of 2000 (the default runs it at 1024): conv
    # filters take the orthogonalized step (lr 0.24 = 0.145 x 1.656, momentum 0.6); the head
    # plain SGD (lr 1.656 for a mean loss, decay 0.004 per step).
    "muon-b2000": {
        "batch_size": 2000,
        "optimizer": {"name": "sgd", "lr": 1.656, "momentum": 0.85, "nesterov": True, "weight_decay": 0.00242},
        "param_groups.3.momentum": 0.6,
    },
    # The 40-minute preset: a wider network (1.7x the compute per image), 12 epochs: 31-32 min
    # of training on 2 CPU cores, 91.45% mean of two seeds (the default: 91.32% in 16 min).
    "40min": {"max_epochs": 12, "model.options.widths": [96, 320, 320]},
    # The 15-minute preset: the default, 8 epochs.
    "15min": {"max_epochs": 8},
}


def apply_override(section: dict, dotted: str, value: object) -> None:
    """``section[a][b] = value`` for ``dotted`` "a.b" (missing dicts created; a number indexes
    a list: ``param_groups.3.momentum``)."""
    *parents, leaf = dotted.split(".")
    node = section
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    if isinstance(node, list):
        node[int(leaf)] = value
    else:
        node[leaf] = value


def dataset_from_splits(archive: Path, splits_file: Path) -> Dataset:
    """The archive's images restricted to ``splits_file``'s ids, with its splits and labels."""
    import pandas as pd

    from pipeline.sources import imagefolder

    table = (pd.read_parquet(splits_file, columns=["id", "split"]) if splits_file.suffix == ".parquet"
             else pd.read_csv(splits_file, usecols=["id", "split"]))
    split_of = dict(zip(table["id"], table["split"]))
    got = imagefolder.load(imagefolder.Spec(path=str(archive)))
    keep = np.array([i in split_of for i in got.ids])
    ids = [i for i in got.ids if i in split_of]
    labels = np.asarray(got.labels, dtype=np.int64)[keep]
    images = got.images[keep]
    manifest = build_manifest(ids, labels, list(got.classes), [split_of[i] for i in ids], image_rows(images))
    return Dataset(manifest=manifest, classes=list(got.classes), images=images)


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
    ap.add_argument("--epochs", type=int, nargs="+", default=None, help="train.max_epochs (several: a sweep)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="train.seed (several: a sweep)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a documented preset")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=YAML",
                    help="override a train key (dotted: optimizer.lr=1.2) or model.* key")
    ap.add_argument("--splits", type=Path, default=None,
                    help="rows and splits of a real run (manifest parquet, or CSV with id,split)")
    ap.add_argument("--train-subset", type=int, default=0, help="use N random training images (smoke runs)")
    ap.add_argument("--test-subset", type=int, default=0, help="score on N random test images")
    ap.add_argument("--archive", type=Path, default=ARCHIVE)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/fmpipe-cifar10-cache"))
    ap.add_argument("--json", type=Path, default=None, help="append the figures as one JSON line")
    ap.add_argument("--keep", type=Path, default=None,
                    help="copy each run's train folder (model.safetensors, model.json) under this folder")
    args = ap.parse_args()

    from train_cifar import load_cifar

    base = load_variant(args.variant, args.params)
    sections = {"train": base.train.model_dump(exclude_unset=True), "model": base.model.model_dump()}
    overrides = [(k, v) for k, v in (PRESETS.get(args.preset) or {}).items()]
    for item in args.set:
        key, _, value = item.partition("=")
        overrides.append((key, yaml.safe_load(value)))
    for key, value in copy.deepcopy(overrides):
        section, dotted = (("model", key[len("model."):]) if key.startswith("model.") else ("train", key))
        apply_override(sections[section], dotted, value)

    if args.splits is not None:
        ds = dataset_from_splits(args.archive, args.splits)
    else:
        ds = make_dataset(load_cifar(args.archive, args.cache), base.split, args.train_subset, args.test_subset)
    counts = {s: int((ds.manifest["split"] == s).sum()) for s in ("train", "val", "test")}
    for epochs in args.epochs or [None]:
        for seed in args.seeds or [None]:
            train = dict(sections["train"])
            if epochs is not None:
                train["max_epochs"] = epochs
            if seed is not None:
                train["seed"] = seed
            spec = base.model_copy(update={"train": TrainSpec.model_validate(train),
                                           "model": type(base.model).model_validate(sections["model"])})
            run_one(spec, ds, counts, args)


def predict_proba(net, x, tta=None, batch_size: int = 512):
    """Class probabilities of ``net`` on ``x`` (N x K numpy), with the model's TTA record or
    none: evaluate's own path (``pipeline.inference``: the views' logits, then the one rule
    that combines them; a binary model's single logit as [1 - p, p])."""
    from pipeline.inference.network import predict_logits
    from pipeline.inference.tta import probabilities

    return probabilities(predict_logits(net, x, tta, batch_size=batch_size), 1.0, tta)


def run_one(spec, ds: Dataset, counts: dict[str, int], args) -> None:
    import torch

    from pipeline.models import load_trained
    from pipeline.training.fit import fit

    load_before = os.getloadavg()
    print(f"{args.variant}: {spec.model.name} {spec.model.options}, {spec.train.max_epochs} epochs, "
          f"batch {spec.train.batch_size}, precision {spec.train.precision}, compile {spec.train.compile}, "
          f"seed {spec.train.seed}, preset {args.preset}, set {args.set}; "
          f"rows {counts}; torch threads {torch.get_num_threads()}; "
          f"load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = fit(ds, spec, Path(tmp) / "train", variant=args.variant)
        wall = time.perf_counter() - t0
        net, meta = load_trained(Path(tmp) / "train")
        if args.keep:
            import shutil

            name = f"{args.preset or 'default'}-e{spec.train.max_epochs}-s{spec.train.seed}"
            shutil.copytree(Path(tmp) / "train", args.keep / name, dirs_exist_ok=True)
    test = ds.split("test")
    x = torch.from_numpy(np.ascontiguousarray(np.asarray(test.images).transpose(0, 3, 1, 2))).float()
    y = test.manifest["label"].to_numpy()
    if torch.cuda.is_available():  # score where it trained: the CPU would take longer than the training
        net, x = net.cuda(), x.cuda()
    acc_plain = float((predict_proba(net, x).argmax(1) == y).mean())
    acc_tta = float((predict_proba(net, x, tta=meta.get("tta")).argmax(1) == y).mean())
    load_after = os.getloadavg()
    epochs = summary["epochs"]
    result = {
        "variant": args.variant, "epochs": epochs, "seed": spec.train.seed, "preset": args.preset,
        "overrides": args.set, "rows": counts, "device": summary.get("device"),
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
