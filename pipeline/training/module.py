"""``ClassifierModule``: the LightningModule that trains any plain ``nn.Module`` classifier.

The network stays a plain module (``pipeline.models``): this class only adds the loss
(cross-entropy with label smoothing; binary cross-entropy for a one-logit ``sigmoid`` head),
train/val accuracy, the optimizer with its parameter groups and the learning-rate schedule,
all read from a :class:`pipeline.config.TrainSpec` (see ``pipeline.training.recipe``).

Logged once per epoch (so DVCLive writes one point per epoch per curve):
``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``.

The schedule (``recipe.lr_multiplier``) multiplies every group's lr after every optimizer
step, over ``total_steps`` optimizer steps in total (:meth:`ClassifierModule.total_optimizer_steps`).

The step itself is written out in ``training_step`` (Lightning's manual optimization): zero
the gradients, ``manual_backward`` (the precision and strategy plugins' backward: loss
scaling, DDP's gradient sync, the ``on_before/after_backward`` hooks), the optimizer's step
through Lightning's optimizer wrapper (``on_before_optimizer_step``, the scaler's unscale and
skip), then the schedule. The same arithmetic in the same order as Lightning's automatic
loop, so the same weights, but without its closure machinery: about 0.1 ms less per step,
half a percent of a small net's 23 ms step (bench/lightning_overhead.py).

One call of ``training_step`` takes ``train.steps_per_call`` such steps, one per batch of the
group it is handed (``pipeline.training.data.StepGroups``): Lightning's per-call work is then
paid once per group. The trainer's own counters follow the optimizer: ``global_step`` counts
steps, the curves' x axis is the optimizer step (the ``step`` logged with them), and the
backward/optimizer hooks run once per step; ``on_train_batch_end`` runs once per call, so a
callback that must see every step defines ``on_optimizer_step_end(trainer, module)``, which
``training_step`` calls after each one (``WeightAveraging`` does).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import TrainSpec
from pipeline.training.recipe import (  # noqa: F401  (lr_multiplier, make_optimizer: re-exported)
    apply_frozen,
    lr_multiplier,
    make_optimizer,
    optimizer_groups,
    resolve_param_groups,
)


# Attributes Lightning sets on the module during the loop that are never tensors or modules.
_PLAIN_ATTRIBUTES = frozenset({"_current_fx_name"})


class ClassifierModule(pl.LightningModule):
    """Wrap ``net`` (raw inputs -> logits) for training with ``train``'s loss/optimizer/schedule.

    ``net`` is kept as ``self.net``, unchanged in type, so its ``state_dict`` keys (prefixed
    ``net.`` in Lightning checkpoints) match ``pipeline.models.build`` and the trained weights
    can be saved from ``module.net`` directly. ``train.compile`` compiles it in place
    (``nn.Module.compile``), which keeps those keys. ``head="sigmoid"``: ``net`` gives one
    logit per row (the positive class's) and labels are 0/1.
    """

    def __init__(self, net: nn.Module, num_classes: int, train: TrainSpec, head: str = "softmax",
                 distill: tuple[float, float] | None = None) -> None:
        super().__init__()
        self.net = net
        self.spec = train
        self.head = head
        # (temperature, weight): training batches then carry the teacher's logits
        # (pipeline/packaging/distill.py), and the loss mixes in the softened-target term.
        self.distill = distill
        if distill is not None and head != "softmax":
            raise ValueError("distillation needs a softmax head (one logit per class)")
        # Resolved before channels_last/compile, on the plain module tree; raises on a rule
        # that selects nothing.
        self.groups = resolve_param_groups(net, train.param_groups)
        apply_frozen(self.groups, 0)
        # Per step only the batch's loss * n and its correct count are kept (on the device, no
        # sync): torchmetrics' update and self.log per step cost milliseconds, a visible share
        # of a small net's step (bench/lightning_overhead.py). Logged once per epoch, summed
        # across DDP ranks. Plain attributes, not buffers: bf16-true must not cast them.
        self._sums: dict[str, Any] = {"train": None, "val": None}
        self.automatic_optimization = False
        self.total_steps = 0  # optimizer steps of the whole run, set by configure_optimizers
        self._step_end_callbacks: list[Any] = []
        if train.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if train.compile:
            self.net.compile()
        # DP-SGD (train.privacy, pipeline/training/privacy.py): per-sample gradient hooks on
        # net's layers. The wrapper is kept outside the module tree (object.__setattr__), so
        # state_dict keys and checkpoints stay those of the plain network.
        self.privacy: dict[str, Any] | None = None
        if train.privacy is not None:
            from pipeline.training.privacy import per_sample_gradients

            object.__setattr__(self, "_grad_sampler", per_sample_gradients(net))

    def __setattr__(self, name: str, value: Any) -> None:
        # The trainer sets _current_fx_name around every hook call (~50 times per step), and
        # nn.Module.__setattr__ first checks the parameter, buffer and submodule tables:
        # plain attributes named here skip that (bench/lightning_overhead.py).
        if name in _PLAIN_ATTRIBUTES:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # Our batches are made on the training device already (TensorDataModule): skip
        # Lightning's walk over the batch structure on every step.
        if _on_device(batch, device):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _loss(self, logits: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor | None = None) -> torch.Tensor:
        ls = self.spec.label_smoothing
        if self.head == "sigmoid":
            target = y.to(torch.float32) * (1 - ls) + 0.5 * ls
            return F.binary_cross_entropy_with_logits(logits.float().reshape(-1), target)
        hard = F.cross_entropy(logits.float(), y, label_smoothing=ls)
        if teacher is None or self.distill is None:
            return hard
        return distillation_loss(logits, teacher, hard, *self.distill)

    def _correct(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.head == "sigmoid":
            return ((logits.reshape(-1) > 0).long() == y).sum()
        return (logits.argmax(dim=1) == y).sum()

    def _accumulate(self, split: str, logits: torch.Tensor, y: torch.Tensor, loss: torch.Tensor) -> None:
        # Appending two small tensors (no in-place sums, no host sync) is the cheapest record.
        if self._sums[split] is None:
            self._sums[split] = ([], [], [0])
        losses, correct, count = self._sums[split]
        losses.append(loss.detach() * len(y))
        correct.append(self._correct(logits.detach(), y))
        count[0] += len(y)

    def _log_sums(self, split: str) -> None:
        record = self._sums[split]
        self._sums[split] = None
        if record is None:
            return
        losses, correct, count = record
        sums = torch.stack([torch.stack(losses).float().sum(), torch.stack(correct).float().sum(),
                            torch.tensor(float(count[0]), device=losses[0].device)])
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        n = sums[2].clamp_min(1)
        self.log(f"{split}/loss", sums[0] / n, prog_bar=True)
        self.log(f"{split}/acc", sums[1] / n, prog_bar=True)
        # The curves' x axis: the index of the epoch's last optimizer step, which is what
        # Lightning writes for one step per call; its own count is of training_step calls.
        self.log("step", float(self.global_step - 1))

    def on_train_epoch_start(self) -> None:
        # Groups with train_epochs stop training once their epochs are over (also after a resume).
        apply_frozen(self.groups, self.current_epoch)

    def on_fit_start(self) -> None:
        self._step_end_callbacks = [cb for cb in self.trainer.callbacks if hasattr(cb, "on_optimizer_step_end")]

    def training_step(self, batches: tuple[tuple[torch.Tensor, torch.Tensor], ...], batch_idx: int) -> None:
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        for x, y, *teacher in batches:  # distillation: (inputs, labels, teacher logits)
            if len(y) == 0:  # an empty Poisson batch (DP-SGD): no step; the accountant counts it
                continue
            logits = self(x)
            loss = self._loss(logits, y, teacher[0] if teacher else None)
            self._accumulate("train", logits, y, loss)
            optimizer.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            optimizer.step()
            scheduler.step()
            for callback in self._step_end_callbacks:
                callback.on_optimizer_step_end(self.trainer, self)

    def on_train_epoch_end(self) -> None:
        self._log_sums("train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self._accumulate("val", logits, y, self._loss(logits, y))

    def on_validation_epoch_end(self) -> None:
        self._log_sums("val")

    def total_optimizer_steps(self) -> int:
        """Optimizer steps of the whole run. Lightning's estimate counts training_step calls;
        the train loader is a ``StepGroups`` (training_step takes groups of batches), whose
        epoch is ``len()`` calls and ``steps_per_epoch`` steps."""
        calls = int(self.trainer.estimated_stepping_batches)  # also sets up the train loader
        loader = self.trainer.train_dataloader
        return calls // max(1, len(loader)) * loader.steps_per_epoch

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = make_optimizer(optimizer_groups(self.groups, self.spec.optimizer), self.spec.optimizer)
        self.total_steps = self.total_optimizer_steps()
        if self.spec.privacy is not None:
            optimizer = self._private(optimizer)
        factor = lr_multiplier(self.spec.schedule, self.total_steps)
        # A plain closure, not a callable object: LambdaLR then keeps only its step count in the
        # checkpoint, and a resumed run recomputes the curve for its own max_epochs. Returned so
        # that checkpoints carry its state; training_step steps it.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: factor(t))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


    def _private(self, optimizer):
        """Wrap ``optimizer`` for DP-SGD; the noise for ``target_epsilon`` is set for this run's
        length. ``self.privacy`` keeps what the accountant needs at the end."""
        from pipeline.training.privacy import noise_multiplier, private_optimizer, resolve_delta

        spec = self.spec.privacy
        n_train = self.trainer.datamodule.num_train
        rate = self.trainer.datamodule.poisson_rate  # the rate the batches are drawn at (data.py)
        delta = resolve_delta(spec, n_train)
        sigma = noise_multiplier(spec, rate, self.total_steps, delta)
        self.privacy = {"noise_multiplier": sigma, "sample_rate": rate, "delta": delta}
        return private_optimizer(optimizer, spec, sigma, self.spec.batch_size)


def distillation_loss(logits: torch.Tensor, teacher: torch.Tensor, hard: torch.Tensor, temperature: float,
                      weight: float) -> torch.Tensor:
    """``weight * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - weight) * hard``.

    T^2 keeps the soft term's gradients on the scale of the hard one's whatever T is (Hinton
    et al., 2015); KL is averaged over the batch (``batchmean``: the true KL per row)."""
    t = float(temperature)
    soft = F.kl_div(F.log_softmax(logits.float() / t, dim=1), F.log_softmax(teacher.float() / t, dim=1),
                    reduction="batchmean", log_target=True)
    return weight * t * t * soft + (1.0 - weight) * hard


def _on_device(batch: Any, device: torch.device) -> bool:
    """Whether every tensor of a (nested) tuple/list batch is already on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.device == device
    return isinstance(batch, (tuple, list)) and all(_on_device(item, device) for item in batch)
