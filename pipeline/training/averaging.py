"""Weight averaging (``train.averaging``): EMA or lookahead over the network's float state.

:class:`WeightAverager` is the plain logic (testable by hand on a tiny net);
:class:`WeightAveraging` is the Lightning callback that drives it from the training loop and
keeps its state in checkpoints, so a resumed run continues the same average.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch import nn

from pipeline.config import AveragingSpec


def _float_state(net: nn.Module) -> dict[str, torch.Tensor]:
    # Parameters and float buffers (BatchNorm running statistics); counters stay as they are.
    return {k: v for k, v in net.state_dict(keep_vars=True).items() if v.is_floating_point()}


class WeightAverager:
    """The average of ``net``'s float state, updated by :meth:`update`."""

    def __init__(self, spec: AveragingSpec) -> None:
        self.spec = spec
        self.avg: Optional[dict[str, torch.Tensor]] = None

    def decay(self, step: int, total_steps: int) -> float:
        s = self.spec
        if s.decay_power == 0:
            return s.decay
        return s.decay * (min(step, total_steps) / max(1, total_steps)) ** s.decay_power

    @torch.no_grad()
    def start(self, net: nn.Module) -> None:
        self.avg = {k: v.detach().clone() for k, v in _float_state(net).items()}

    @torch.no_grad()
    def update(self, net: nn.Module, decay: float) -> None:
        """``avg = decay * avg + (1 - decay) * net``; lookahead then sets ``net = avg``."""
        if self.avg is None:
            self.start(net)
        for k, v in _float_state(net).items():
            a = self.avg[k]
            a.lerp_(v.detach().to(a.dtype), 1.0 - decay)
            if self.spec.mode == "lookahead":
                v.data.copy_(a)

    @torch.no_grad()
    def copy_to(self, net: nn.Module) -> None:
        if self.avg is None:
            return
        for k, v in _float_state(net).items():
            v.data.copy_(self.avg[k])


class WeightAveraging(pl.Callback):
    """Drives :class:`WeightAverager` on ``pl_module.net``: after every ``every_n_steps``-th
    optimizer step from ``start_epoch`` on; at the end of training the network takes the average.

    ``on_optimizer_step_end`` is ``ClassifierModule``'s per-step call (one ``training_step`` may
    take several steps, ``train.steps_per_call``; ``on_train_batch_end`` would see only the last).
    """

    def __init__(self, spec: AveragingSpec) -> None:
        self.averager = WeightAverager(spec)
        self.spec = spec

    def on_optimizer_step_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch < self.spec.start_epoch:
            return
        step = trainer.global_step  # optimizer steps taken, this one included
        if self.averager.avg is None:
            self.averager.start(pl_module.net)
        if step % self.spec.every_n_steps == 0:
            self.averager.update(pl_module.net, self.averager.decay(step, self._total))

    def on_train_end(self, trainer, pl_module) -> None:
        self.averager.copy_to(pl_module.net)

    def state_dict(self) -> dict[str, Any]:
        avg = self.averager.avg
        return {"avg": None if avg is None else {k: v.detach().cpu() for k, v in avg.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("avg")

    def on_train_start(self, trainer, pl_module) -> None:
        # Optimizer steps of the run (ClassifierModule.configure_optimizers counted them).
        self._total = int(pl_module.total_steps)
        pending = getattr(self, "_pending", None)
        if pending is not None:
            device = pl_module.device
            self.averager.avg = {k: v.to(device) for k, v in pending.items()}
            self._pending = None
