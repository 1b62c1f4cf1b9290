"""How much does Lightning cost per step? The project's real training path vs a hand-written loop.

Not a test: it prints figures (bench/README.md has the ones we measured).

    python bench/lightning_overhead.py              # ~1-2 min on 2 CPU cores
    python bench/lightning_overhead.py --reps 7 --epochs 3 --profile

Both sides train the same network (LeNet, 62k parameters, on 32x32 RGB: small enough that
per-step overhead is visible next to the compute) on the same data, with the same batch size,
optimizer, LR schedule, loss, augmentation and number of steps, in the same process:

- Lightning: ``pipeline.training.fit`` itself, i.e. exactly what ``fmpipe train`` runs:
  ClassifierModule + TensorDataModule + the Trainer as fit configures it (progress bar,
  torchmetrics, DVCLive, ModelCheckpoint every epoch, validation every epoch, final save).
- hand: a plain PyTorch loop over the same on-device ``BatchStream`` batches (so the batching
  and augmentation code is identical and only the loop around it differs), the same optimizer
  and LambdaLR schedule from ``pipeline.training.module``, one validation pass per epoch, and
  the final ``save_trained``. No checkpoints, no metric objects, no logger.

The runs alternate (L H H L L H ...) so that drift in the shared machine's load hits both
sides alike; we report medians over ``--reps`` repetitions of:

- train time: the training epochs only, validation excluded, as CPU seconds of this process
  (robust to other users' load; one torch thread by default) and as wall seconds (fit's own
  ``ThroughputTimer``; the hand loop times the same span);
- end-to-end time of the whole call (setup, sanity check, validation, checkpoints, save).

The target is Lightning/hand >= 0.97 on train throughput (CPU time). ``--profile`` adds a cProfile of one
Lightning run, top functions by own time, to see where the rest goes.

Data: the first ``--train`` CIFAR-10 training images and ``--val`` test images from the JPEG
archive beside the checkout (decoded once and cached by bench/train_cifar.py); without the
archive, random images of the same shape (the timing does not depend on pixel values).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from pipeline.config import ModelSpec, TrainSpec, VariantSpec, load_variant  # noqa: E402
from pipeline.manifest import Dataset, build_manifest, image_rows  # noqa: E402


def make_dataset(n_train: int, n_val: int, archive: Path, cache: Path) -> tuple[Dataset, str]:
    if archive.exists() or (cache / "x_train.npy").exists():
        from train_cifar import load_cifar

        d = load_cifar(archive, cache)
        # A seeded random subset: the archive (and so the cache) is ordered by class.
        rng = np.random.default_rng(0)
        tr = rng.permutation(len(d["y_train"]))[:n_train]
        te = rng.permutation(len(d["y_test"]))[:n_val]
        x = np.concatenate([d["x_train"][tr], d["x_test"][te]])
        y = np.concatenate([d["y_train"][tr], d["y_test"][te]])
        what = f"CIFAR-10 (real): {n_train} train / {n_val} val images 32x32x3"
    else:
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (n_train + n_val, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, n_train + n_val)
        what = f"random 32x32x3 images (no CIFAR archive found): {n_train} train / {n_val} val"
    classes = [f"c{i}" for i in range(10)]
    splits = ["train"] * n_train + ["val"] * n_val
    manifest = build_manifest([f"img{i}" for i in range(len(y))], y, classes, splits, image_rows(x))
    return Dataset(manifest=manifest, classes=classes, images=x), what


def make_spec(args) -> VariantSpec:
    # Any valid variant gives the sections fit does not read (source, split, ...); we replace
    # the two it does.
    base = load_variant("digits", REPO / "params.yaml")
    return base.model_copy(update={
        "model": ModelSpec(name=args.model),
        "train": TrainSpec.model_validate({
            "accelerator": "cpu", "devices": 1, "precision": "32-true", "max_epochs": args.epochs,
            "batch_size": args.batch_size,
            "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
            "schedule": {"name": "onecycle", "warmup_fraction": 0.2},
            "augment": {"flip": True, "translate": 2}, "label_smoothing": 0.1, "seed": 0,
        }),
    })


def _cpu_timer():
    """A callback adding up this process's CPU seconds in training epochs, validation excluded.

    CPU time, not wall time: on a shared machine the wall clock of the same work swings 2x
    with other users' load, while the CPU seconds a single-threaded run burns barely move.
    """
    import lightning.pytorch as pl

    class CpuTimer(pl.Callback):
        def __init__(self) -> None:
            self.seconds, self._t0, self._v0 = 0.0, None, 0.0

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self._t0 = time.process_time()

        def on_validation_start(self, trainer, pl_module) -> None:
            self._v0 = time.process_time()

        def on_validation_end(self, trainer, pl_module) -> None:
            if self._t0 is not None:  # not the sanity check
                self._t0 += time.process_time() - self._v0

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.seconds += time.process_time() - self._t0
            self._t0 = None

    return CpuTimer()


def run_lightning(ds: Dataset, spec: VariantSpec) -> dict:
    # From the submodule: once it is imported, ``pipeline.training.fit`` names the module.
    from pipeline.training.fit import fit

    timer = _cpu_timer()
    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), time.process_time()
        summary = fit(ds, spec, Path(tmp) / "train", callbacks=[timer])
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"wall_s": wall, "train_s": summary["train_time_s"], "train_cpu_s": timer.seconds, "cpu_s": cpu,
            "steps": summary["global_step"], "samples": summary["global_step"] * spec.train.batch_size,
            "val_acc": summary["val_acc"]}


def run_hand(ds: Dataset, spec: VariantSpec) -> dict:
    from pipeline.models import build, save_trained
    from pipeline.training.data import EVAL_BATCH, BatchStream, input_shape, normalization_stats, split_arrays
    from pipeline.training.module import lr_multiplier, make_optimizer

    t = spec.train
    t0, c_start = time.perf_counter(), time.process_time()
    torch.manual_seed(t.seed)
    torch.use_deterministic_algorithms(t.deterministic)  # what the Trainer sets on the other side
    (xtr, ytr), (xva, yva) = split_arrays(ds, "train"), split_arrays(ds, "val")
    mean, std = normalization_stats(xtr)
    net = build(spec.model.name, input_shape(ds), len(ds.classes), spec.model.options, mean=mean, std=std)
    xtr, ytr, xva, yva = map(torch.from_numpy, (xtr, ytr, xva, yva))
    epoch = 0
    train_stream = BatchStream(xtr, ytr, t.batch_size, train=True, seed=t.seed, augment=t.augment,
                               epoch=lambda: epoch)
    val_stream = BatchStream(xva, yva, max(t.batch_size, EVAL_BATCH), train=False)
    opt = make_optimizer(net.parameters(), t.optimizer)
    total = len(train_stream) * t.max_epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(t.schedule, total))
    train_s, train_cpu, steps, acc = 0.0, 0.0, 0, None
    for epoch in range(t.max_epochs):
        net.train()
        e0, c0 = time.perf_counter(), time.process_time()
        for x, y in train_stream:
            loss = F.cross_entropy(net(x).float(), y, label_smoothing=t.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            steps += 1
        train_s += time.perf_counter() - e0
        train_cpu += time.process_time() - c0
        net.eval()
        correct = 0
        with torch.no_grad():
            for x, y in val_stream:
                correct += int((net(x).argmax(1) == y).sum())
        acc = correct / len(yva)
    with tempfile.TemporaryDirectory() as tmp:
        save_trained(net, {"model": spec.model.model_dump()}, tmp)
    return {"wall_s": time.perf_counter() - t0, "train_s": train_s, "train_cpu_s": train_cpu,
            "cpu_s": time.process_time() - c_start, "steps": steps,
            "samples": steps * t.batch_size, "val_acc": acc}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lenet")
    ap.add_argument("--train", type=int, default=8192, help="training images")
    ap.add_argument("--val", type=int, default=1024, help="validation images")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads for both sides (1: a 62k-parameter net gains nothing from "
                         "more, and one thread is far less sensitive to other load on a shared box)")
    ap.add_argument("--profile", action="store_true", help="cProfile one Lightning run, top 25 by own time")
    ap.add_argument("--archive", type=Path, default=REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/fmpipe-cifar10-cache"))
    ap.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    ds, what = make_dataset(args.train, args.val, args.archive, args.cache)
    spec = make_spec(args)
    steps = (args.train // args.batch_size) * args.epochs
    print(f"data: {what}\nnet: {args.model}, batch {args.batch_size}, {args.epochs} epochs = {steps} steps; "
          f"torch threads {torch.get_num_threads()}", flush=True)

    runners = {"lightning": run_lightning, "hand": run_hand}
    for name, fn in runners.items():  # warm-up: imports, oneDNN kernel choice, allocator
        fn(ds, spec)
    results: dict[str, list[dict]] = {"lightning": [], "hand": []}
    for rep in range(args.reps):
        order = ["lightning", "hand"] if rep % 2 == 0 else ["hand", "lightning"]
        for name in order:
            r = runners[name](ds, spec)
            assert r["steps"] == steps, (name, r["steps"], steps)
            results[name].append(r)
            print(f"  rep {rep} {name:9s} train {r['train_s']:6.2f}s wall / {r['train_cpu_s']:6.2f}s CPU  "
                  f"end-to-end {r['wall_s']:6.2f}s wall  val_acc {r['val_acc']:.3f}", file=sys.stderr, flush=True)

    keys = ("train_s", "train_cpu_s", "wall_s", "cpu_s")
    med = {name: {k: statistics.median(r[k] for r in rs) for k in keys} for name, rs in results.items()}
    print(f"\nmedians over {args.reps} reps ({steps} steps each):")
    for name in ("hand", "lightning"):
        m = med[name]
        print(f"  {name:9s} train wall {m['train_s']:6.2f}s ({m['train_s'] / steps * 1e3:6.2f} ms/step), "
              f"train CPU {m['train_cpu_s']:6.2f}s ({m['train_cpu_s'] / steps * 1e3:6.2f} ms/step); "
              f"end-to-end wall {m['wall_s']:6.2f}s, CPU {m['cpu_s']:6.2f}s")
    ratios = {k: med["hand"][k] / med["lightning"][k] for k in keys}
    for k, label in [("train_cpu_s", "train steps, CPU time (the robust figure on a shared box)"),
                     ("train_s", "train steps, wall time"), ("cpu_s", "end-to-end, CPU time"),
                     ("wall_s", "end-to-end, wall time (incl. setup, validation, checkpoints)")]:
        print(f"throughput ratio Lightning/hand, {label}: {ratios[k]:.3f}"
              + (f"  ({'meets' if ratios[k] >= 0.97 else 'MISSES'} the 0.97 target)" if k == "train_cpu_s" else ""))
    per_step_ms = (med["lightning"]["train_cpu_s"] - med["hand"]["train_cpu_s"]) / steps * 1e3
    print(f"Lightning's extra CPU per training step: {per_step_ms:+.2f} ms")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "medians": med, "ratios": ratios}, indent=2))

    if args.profile:
        import cProfile
        import pstats

        pr = cProfile.Profile()
        pr.enable()
        run_lightning(ds, spec)
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
