"""The training recipe's pieces as plain functions: LR schedule shapes and parameter groups.

Everything here is a function of params and a plain ``nn.Module``/tensor, with no Lightning, so
the training module and the benchmarks share one definition and tests can check each
piece by hand.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from pipeline.errors import FmpipeError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from pipeline.config import OptimizerSpec, ParamGroupRule, ScheduleSpec


# ----------------------------------------------------------------------------- schedule

def lr_multiplier(schedule: "ScheduleSpec", total_steps: int) -> Callable[[int], float]:
    """The factor on the base LR for optimizer step ``t`` (0-based) of ``total_steps``.

    The rise runs from ``start`` at step 0 to ``peak`` at step ``round(peak_at * total)``;
    a rise from 0 begins one step in ((t + 1) / rise), so that the first step is not wasted
    at a zero learning rate. The fall runs from ``peak`` to ``end`` at the last step + 1.
    """
    total = max(1, int(total_steps))
    s = schedule
    rise = int(round(s.peak_at * total)) if s.name in ("onecycle", "triangular") else 0
    lead = 1 if s.start == 0 else 0

    def factor(t: int) -> float:
        if s.name == "constant":
            return s.peak
        if t < rise:
            return s.start + (s.peak - s.start) * min(1.0, (t + lead) / rise)
        progress = min(1.0, (t - rise) / max(1, total - rise))
        if s.name == "triangular":
            return max(0.0, s.peak + (s.end - s.peak) * progress)
        return s.end + (s.peak - s.end) * 0.5 * (1.0 + math.cos(math.pi * progress))  # onecycle, cosine

    return factor


# ----------------------------------------------------------------------------- param groups

@dataclass
class ParamGroup:
    """The parameters one rule selected (rule index None: the rest) and how they train."""

    rule: Optional[int]
    names: list[str] = field(default_factory=list)
    params: list[Any] = field(default_factory=list)
    lr_scale: float = 1.0
    wd_scale: float = 1.0
    frozen: bool = False
    train_epochs: Optional[int] = None
    momentum: Optional[float] = None
    orthogonalize: bool = False
    fixed_norm: bool = False


def _class_names(module: "nn.Module") -> list[str]:
    return [c.__name__ for c in type(module).__mro__]


def resolve_param_groups(net: "nn.Module", rules: Sequence["ParamGroupRule"],
                         where: str = "train.param_groups") -> list[ParamGroup]:
    """Sort ``net``'s parameters into one group per rule plus the rest (first match wins).

    Parameters that do not require gradients before any rule applies (a data-set whitening
    filter, say) are left out of every group: nothing trains them. A rule that selects
    nothing raises, naming ``where[i]``.
    """
    groups = [ParamGroup(rule=i, lr_scale=r.lr_scale, wd_scale=r.wd_scale, frozen=r.frozen,
                         train_epochs=r.train_epochs, momentum=r.momentum, orthogonalize=r.orthogonalize,
                         fixed_norm=r.fixed_norm) for i, r in enumerate(rules)]
    rest = ParamGroup(rule=None)
    for mod_name, module in net.named_modules():
        classes = _class_names(module)
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if not p.requires_grad:
                continue
            target = rest
            for g, r in zip(groups, rules):
                if r.name is not None and not fnmatch.fnmatchcase(full, r.name):
                    continue
                if r.module is not None and not any(fnmatch.fnmatchcase(c, r.module) for c in classes):
                    continue
                if r.param is not None and not fnmatch.fnmatchcase(p_name, r.param):
                    continue
                target = g
                break
            target.names.append(full)
            target.params.append(p)
    for g, r in zip(groups, rules):
        if not g.params:
            sel = ", ".join(f"{k}={v!r}" for k, v in (("name", r.name), ("module", r.module), ("param", r.param))
                            if v is not None)
            raise FmpipeError(f"{where}[{g.rule}]: ({sel}) selects no trainable parameter of the network")
        flat = [n for n, p in zip(g.names, g.params) if p.ndim < 2]
        if g.orthogonalize and flat:
            raise FmpipeError(f"{where}[{g.rule}].orthogonalize: needs matrices or conv filters (2-D or more); "
                              f"the rule also selects {', '.join(flat[:3])}{' ...' if len(flat) > 3 else ''}")
    return [g for g in groups + [rest] if g.params]


def apply_frozen(groups: Sequence[ParamGroup], epoch: int) -> None:
    """Set ``requires_grad`` per group for ``epoch``: frozen never, ``train_epochs`` only before it.

    A parameter without gradient is skipped by the optimizer's step (no momentum, no decay),
    so it keeps its value.
    """
    for g in groups:
        trainable = not g.frozen and (g.train_epochs is None or epoch < g.train_epochs)
        for p in g.params:
            p.requires_grad_(trainable)


def optimizer_groups(groups: Sequence[ParamGroup], spec: "OptimizerSpec") -> list[dict[str, Any]]:
    """torch optimizer param-group dicts: scaled lr and weight decay (and the group's own
    momentum, or its orthogonalized update, where the rule sets them); frozen groups left out."""
    out = []
    for g in groups:
        if g.frozen:
            continue
        d: dict[str, Any] = {"params": list(g.params), "lr": spec.lr * g.lr_scale,
                             "weight_decay": spec.weight_decay * g.wd_scale}
        if g.momentum is not None:
            d["momentum"] = g.momentum
        if g.orthogonalize:
            d.update(orthogonalize=True, fixed_norm=g.fixed_norm, weight_decay=0.0)
        out.append(d)
    return out


def make_optimizer(params, spec: "OptimizerSpec") -> "torch.optim.Optimizer":
    """The optimizer over ``params`` (tensors, or group dicts with their own lr/weight_decay).

    SGD is torch's own unless a group asks for the orthogonalized update
    (``pipeline.training.orthogonal.OrthogonalSGD``, the same SGD for the other groups).
    """
    import torch

    if spec.name == "sgd":
        params = list(params)
        if any(isinstance(g, dict) and g.get("orthogonalize") for g in params):
            from pipeline.training.orthogonal import OrthogonalSGD

            return OrthogonalSGD(params, lr=spec.lr, momentum=spec.momentum, nesterov=spec.nesterov,
                                 weight_decay=spec.weight_decay, ns_steps=spec.ns_steps)
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, nesterov=spec.nesterov,
                               weight_decay=spec.weight_decay)
    if spec.name == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.name == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    raise ValueError(f"unknown optimizer {spec.name!r}")  # the schema's Literal rules this out
