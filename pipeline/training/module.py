"""``ClassifierModule``: the LightningModule that trains any plain ``nn.Module`` classifier.

The network stays a plain module (``pipeline.models``): this class only adds the loss
(cross-entropy with label smoothing), per-split torchmetrics accuracy, the optimizer and the
learning-rate schedule, all read from a :class:`pipeline.config.TrainSpec`.

Logged once per epoch (so DVCLive writes one point per epoch per curve):
``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``.

The schedule is a multiplier of ``optimizer.lr`` stepped after every optimizer step
(``interval="step"``), over ``trainer.estimated_stepping_batches`` steps in total:

- ``constant``: 1 throughout;
- ``onecycle``: linear rise over the first ``warmup_fraction`` of the steps, cosine decay to 0;
- ``triangular``: linear rise, then linear decay to 0 (the airbench shape);
- ``cosine``: cosine decay from 1 to 0, no warm-up.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from pipeline.config import OptimizerSpec, ScheduleSpec, TrainSpec


def lr_multiplier(schedule: ScheduleSpec, total_steps: int) -> Callable[[int], float]:
    """The factor on the base LR for step ``t`` (0-based) of ``total_steps``."""
    total = max(1, int(total_steps))
    warm = int(round(schedule.warmup_fraction * total)) if schedule.name in ("onecycle", "triangular") else 0

    def factor(t: int) -> float:
        if schedule.name == "constant":
            return 1.0
        if t < warm:
            return (t + 1) / warm
        progress = min(1.0, (t - warm) / max(1, total - warm))
        if schedule.name == "triangular":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))  # onecycle's decay and cosine

    return factor


def make_optimizer(params, spec: OptimizerSpec) -> torch.optim.Optimizer:
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, nesterov=spec.nesterov,
                               weight_decay=spec.weight_decay)
    if spec.name == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.name == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    raise ValueError(f"unknown optimizer {spec.name!r}")  # the schema's Literal rules this out


class ClassifierModule(pl.LightningModule):
    """Wrap ``net`` (raw inputs -> logits) for training with ``train``'s loss/optimizer/schedule.

    ``net`` is kept as ``self.net``, unchanged in type, so its ``state_dict`` keys (prefixed
    ``net.`` in Lightning checkpoints) match ``pipeline.models.build`` and the trained weights
    can be saved from ``module.net`` directly. ``train.compile`` compiles it in place
    (``nn.Module.compile``), which keeps those keys.
    """

    def __init__(self, net: nn.Module, num_classes: int, train: TrainSpec) -> None:
        super().__init__()
        self.net = net
        self.spec = train
        # Updated every training step, so skip the per-call input validation (the inputs are
        # our own logits and labels) and the NaN scan: a NaN loss should show in the logged
        # mean rather than be dropped with a warning.
        self.train_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.train_loss = MeanMetric(nan_strategy="disable")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        if train.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if train.compile:
            self.net.compile()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), y, label_smoothing=self.spec.label_smoothing)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self._loss(logits, y)
        # Only accumulate here; logged once in on_train_epoch_end. Two self.log calls and the
        # metric's forward (which also computes a per-batch value) cost ~4 ms per step on a CPU,
        # 17% of a small net's step (bench/lightning_overhead.py).
        self.train_acc.update(logits.detach(), y)
        self.train_loss.update(loss.detach(), weight=len(y))
        return loss

    def on_train_epoch_end(self) -> None:
        # compute() all-reduces across DDP ranks itself, so no sync_dist here.
        self.log("train/loss", self.train_loss.compute(), prog_bar=True)
        self.log("train/acc", self.train_acc.compute(), prog_bar=True)
        self.train_loss.reset()
        self.train_acc.reset()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        n = len(y)
        self.val_acc(logits, y)
        self.log("val/loss", self._loss(logits, y), on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=n, sync_dist=True)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True, batch_size=n)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = make_optimizer(self.parameters(), self.spec.optimizer)
        factor = lr_multiplier(self.spec.schedule, self.trainer.estimated_stepping_batches)
        # A plain closure, not a callable object: LambdaLR then keeps only its step count in the
        # checkpoint, and a resumed run recomputes the curve for its own max_epochs.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: factor(t))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
