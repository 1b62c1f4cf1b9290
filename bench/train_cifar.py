"""Train the ``cifar`` default (airbench recipe) on the full real CIFAR-10 and report time and accuracy.

Not a test: it prints figures (see bench/README.md for the ones measured and how to read them).

    python bench/train_cifar.py --time-steps 5                # s/step for fp32 / channels_last / bf16
    python bench/train_cifar.py --profile 5                   # torch.profiler top ops of a train step
    python bench/train_cifar.py --epochs 1 --log /tmp/c.jsonl # a real run, test accuracy with flip TTA

Data: /work/shared/datasets/cifar10-jpeg.tar.gz (or --archive), decoded once with the project's
own imagefolder source and cached as .npy under /tmp (``--cache``), so later runs start in ~1 s.
The recipe is the built-in airbench one below (the same as the ``cifar`` variant's in
params.yaml), or params.yaml's with ``--from-params``.

The training loop here is a hand-written PyTorch loop on purpose: it is the fastest honest
baseline, and bench/lightning_overhead.py shows that the project's Lightning core runs at the same
speed per step, so the figures carry over to ``fmpipe train --stage cifar``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.models import build  # noqa: E402

ARCHIVE = REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"


# ---------------------------------------------------------------- data

def load_cifar(archive: Path, cache: Path) -> dict[str, np.ndarray]:
    """train/test images (N x 32 x 32 x 3 uint8) and labels, decoded once and cached."""
    files = {k: cache / f"{k}.npy" for k in ("x_train", "y_train", "x_test", "y_test")}
    if all(f.exists() for f in files.values()):
        return {k: np.load(f) for k, f in files.items()}
    from pipeline.sources import imagefolder

    t0 = time.perf_counter()
    got = imagefolder.load(imagefolder.Spec(path=str(archive)))
    split = np.asarray(got.given_split)
    labels = np.asarray(got.labels, dtype=np.int64)
    out = {"x_train": got.images[split == "train"], "y_train": labels[split == "train"],
           "x_test": got.images[split == "test"], "y_test": labels[split == "test"]}
    cache.mkdir(parents=True, exist_ok=True)
    for k, arr in out.items():
        tmp = cache / f".{k}.tmp.npy"
        np.save(tmp, arr)
        os.replace(tmp, files[k])  # atomic: a killed decode never leaves a half cache
    print(f"decoded {archive.name} in {time.perf_counter() - t0:.1f}s -> {cache} "
          f"(train {len(out['y_train'])}, test {len(out['y_test'])}, classes {got.classes})", flush=True)
    return out


def to_nchw(x: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x C -> uint8 N x C x H x W tensor (kept uint8: 4x less memory than float)."""
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------- batch augmentation (on device)

def augment(x: torch.Tensor, flip: bool, translate: int, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and random shift by up to ``translate`` pixels (reflect padding),
    per example, for a whole float batch at once: no per-sample Python."""
    n, _, h, w = x.shape
    if flip:
        mask = torch.rand(n, generator=gen, device=x.device) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    if translate:
        t = translate
        padded = F.pad(x, (t, t, t, t), mode="reflect")
        dy = torch.randint(0, 2 * t + 1, (n,), generator=gen, device=x.device)
        dx = torch.randint(0, 2 * t + 1, (n,), generator=gen, device=x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        idx_n = torch.arange(n, device=x.device)[:, None, None, None]
        idx_c = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[idx_n, idx_c, rows, cols]
    return x


# ---------------------------------------------------------------- recipe

def recipe_from_params(variant: str) -> dict:
    from pipeline.config import load_variant

    v = load_variant(variant, REPO / "params.yaml")
    t = v.train
    return {
        "model": v.model.name, "options": dict(v.model.options), "batch_size": t.batch_size,
        "optimizer": t.optimizer.model_dump(), "schedule": t.schedule.model_dump(),
        "flip": t.augment.flip, "translate": t.augment.translate,
        "label_smoothing": t.label_smoothing, "tta_flip": t.tta_spec() is not None,
        "channels_last": t.channels_last, "precision": t.precision, "max_epochs": t.max_epochs,
    }


# The airbench recipe as params.yaml's cifar variant had it before issue #13. This hand loop
# does not implement param_groups, averaging, alternating flip or 6-view TTA; for the full
# recipe as `fmpipe train` runs it, use bench/train_recipe.py.
DEFAULT_RECIPE = {
    "model": "airbench", "options": {"widths": [64, 256, 256]}, "batch_size": 1024,
    "optimizer": {"name": "sgd", "lr": 1.5, "momentum": 0.85, "nesterov": True, "weight_decay": 0.0013},
    "schedule": {"name": "triangular", "warmup_fraction": 0.2},
    "flip": True, "translate": 2, "label_smoothing": 0.2, "tta_flip": True,
    "channels_last": True, "precision": "32-true", "max_epochs": 10,
}


def lr_factor(step: int, total: int, schedule: dict) -> float:
    """The training core's schedule (pipeline.training.module), so the curve is fmpipe train's."""
    from pipeline.config import ScheduleSpec
    from pipeline.training.module import lr_multiplier

    return lr_multiplier(ScheduleSpec(**schedule), total)(step)


class Trainer:
    def __init__(self, data: dict[str, np.ndarray], recipe: dict, seed: int = 0,
                 channels_last: bool | None = None, bf16: bool | None = None) -> None:
        torch.manual_seed(seed)
        self.recipe = recipe
        self.gen = torch.Generator().manual_seed(seed)
        self.x_train = to_nchw(data["x_train"])
        self.y_train = torch.from_numpy(data["y_train"])
        self.x_test = to_nchw(data["x_test"])
        self.y_test = torch.from_numpy(data["y_test"])
        xf = self.x_train.float()
        mean, std = xf.mean(dim=(0, 2, 3)), xf.std(dim=(0, 2, 3))
        del xf
        self.net = build(recipe["model"], (3, 32, 32), 10, recipe["options"], mean=mean, std=std)
        self.channels_last = recipe["channels_last"] if channels_last is None else channels_last
        self.bf16 = recipe["precision"].startswith("bf16") if bf16 is None else bf16
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        from pipeline.config import OptimizerSpec
        from pipeline.training.module import make_optimizer

        o = recipe["optimizer"]
        self.opt = make_optimizer(self.net.parameters(), OptimizerSpec(**o))
        self.base_lr = o["lr"]
        self.bs = recipe["batch_size"]
        self.steps_per_epoch = math.ceil(len(self.y_train) / self.bs)

    def _prep(self, xb: torch.Tensor) -> torch.Tensor:
        xb = xb.float()
        return xb.contiguous(memory_format=torch.channels_last) if self.channels_last else xb

    def train_step(self, xb: torch.Tensor, yb: torch.Tensor, lr: float) -> torch.Tensor:
        for g in self.opt.param_groups:
            g["lr"] = lr
        x = self._prep(augment(xb.float(), self.recipe["flip"], self.recipe["translate"], self.gen))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.net(x)
        loss = F.cross_entropy(logits.float(), yb, label_smoothing=self.recipe["label_smoothing"])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def epoch_batches(self):
        perm = torch.randperm(len(self.y_train), generator=self.gen)
        for i in range(self.steps_per_epoch):
            idx = perm[i * self.bs:(i + 1) * self.bs]
            yield self.x_train[idx], self.y_train[idx]

    @torch.no_grad()
    def evaluate(self, tta: bool) -> tuple[float, float | None]:
        """Test accuracy without and (``tta``) with flip test-time augmentation, in one pass."""
        self.net.eval()
        correct, correct_tta = 0, 0
        for i in range(0, len(self.y_test), 2000):
            x, y = self._prep(self.x_test[i:i + 2000]), self.y_test[i:i + 2000]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                logits = self.net(x).float()
                correct += (logits.argmax(1) == y).sum().item()
                if tta:  # average the logits of the image and its mirror
                    logits = logits + self.net(x.flip(3)).float()
                    correct_tta += (logits.argmax(1) == y).sum().item()
        self.net.train()
        n = len(self.y_test)
        return correct / n, (correct_tta / n if tta else None)


# ---------------------------------------------------------------- modes

CONFIGS = {"fp32": (False, False), "fp32_cl": (True, False), "bf16": (False, True), "bf16_cl": (True, True)}


def time_steps(data, recipe, steps: int, which: list[str]) -> None:
    """ms/step and images/s for fp32 vs channels_last vs bf16 autocast, same data, same steps."""
    results = {}
    for name in which:
        cl, bf = CONFIGS[name]
        tr = Trainer(data, recipe, channels_last=cl, bf16=bf)
        batches = tr.epoch_batches()
        for _ in range(2):  # warm-up: whitening fit, oneDNN kernel selection, allocator
            tr.train_step(*next(batches), 0.01)
        t0 = time.perf_counter()
        for _ in range(steps):
            tr.train_step(*next(batches), 0.01)
        dt = (time.perf_counter() - t0) / steps
        results[name] = dt
        print(f"{name:20s} {dt * 1e3:8.0f} ms/step  {tr.bs / dt:7.0f} img/s  "
              f"epoch ~{dt * tr.steps_per_epoch / 60:.1f} min", flush=True)
    print(f"fastest: {min(results, key=results.get)}", flush=True)


def profile(data, recipe, steps: int) -> None:
    from torch.profiler import ProfilerActivity, profile as prof

    tr = Trainer(data, recipe)
    batches = tr.epoch_batches()
    for _ in range(2):
        tr.train_step(*next(batches), 0.01)
    with prof(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(steps):
            tr.train_step(*next(batches), 0.01)
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), flush=True)


def train(data, recipe, epochs: float, log: Path | None, seed: int) -> None:
    tr = Trainer(data, recipe, seed=seed)
    total = math.ceil(epochs * tr.steps_per_epoch)
    print(f"training {recipe['model']} {recipe['options']} for {epochs} epochs = {total} steps of "
          f"{tr.bs}; channels_last={tr.channels_last} bf16={tr.bf16} threads={torch.get_num_threads()}",
          flush=True)
    out = open(log, "a") if log else None
    step, t_start = 0, time.perf_counter()
    epoch = 0
    while step < total:
        t_epoch, losses = time.perf_counter(), []
        for xb, yb in tr.epoch_batches():
            if step >= total:
                break
            losses.append(tr.train_step(xb, yb, tr.base_lr * lr_factor(step, total, recipe["schedule"])))
            step += 1
            if step % 10 == 0:
                el = time.perf_counter() - t_start
                print(f"  step {step}/{total} loss {torch.stack(losses[-10:]).mean():.3f} "
                      f"{el / step:.2f}s/step eta {(total - step) * el / step / 60:.1f} min", flush=True)
        epoch += 1
        train_s = time.perf_counter() - t_epoch
        acc, acc_tta = tr.evaluate(tta=recipe["tta_flip"])
        rec = {"epoch": epoch, "step": step, "epoch_train_s": round(train_s, 1),
               "elapsed_s": round(time.perf_counter() - t_start, 1),
               "loss": round(torch.stack(losses).mean().item(), 4), "test_acc": acc, "test_acc_tta": acc_tta}
        print(json.dumps(rec), flush=True)
        if out:
            out.write(json.dumps(rec) + "\n")
            out.flush()
    print(f"done: {epoch} epochs ({epochs} requested) in {(time.perf_counter() - t_start) / 60:.1f} min; "
          f"test accuracy {acc:.4f}, with flip TTA {acc_tta}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archive", type=Path, default=ARCHIVE)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/fmpipe-cifar10-cache"))
    ap.add_argument("--from-params", action="store_true",
                    help="take the recipe from params.yaml's --variant instead of the built-in airbench one")
    ap.add_argument("--variant", default="cifar")
    ap.add_argument("--time-steps", type=int, default=0, help="time N steps per precision/layout config")
    ap.add_argument("--configs", default="fp32,fp32_cl,bf16,bf16_cl",
                    help="which of fp32, fp32_cl (channels_last), bf16 (autocast), bf16_cl to time")
    ap.add_argument("--profile", type=int, default=0, help="profile N train steps, print top ops")
    ap.add_argument("--epochs", type=float, default=None, help="train this many epochs (fractions ok)")
    ap.add_argument("--train-subset", type=int, default=0, help="use only the first N training images")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--log", type=Path, default=None, help="append one JSON line per epoch")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    if args.from_params:
        recipe = recipe_from_params(args.variant)
    else:
        recipe = dict(DEFAULT_RECIPE)
    if args.lr:
        recipe["optimizer"] = {**recipe["optimizer"], "lr": args.lr}
    t0 = time.perf_counter()
    data = load_cifar(args.archive, args.cache)
    if args.train_subset:
        data["x_train"], data["y_train"] = data["x_train"][:args.train_subset], data["y_train"][:args.train_subset]
    print(f"data ready in {time.perf_counter() - t0:.1f}s; recipe {json.dumps(recipe)}", flush=True)
    if args.time_steps:
        time_steps(data, recipe, args.time_steps, args.configs.split(","))
    if args.profile:
        profile(data, recipe, args.profile)
    if args.epochs:
        train(data, recipe, args.epochs, args.log, args.seed)


if __name__ == "__main__":
    main()
