"""SGD whose parameter groups may take an orthogonalized update (the "Muon" idea).

For a weight matrix (or a conv filter bank read as ``out x (in * k * k)``) the plain SGD step
moves along the momentum, whose few largest singular directions dominate. The orthogonalized
step replaces the momentum ``M = U S V^T`` by ``U V^T``: every direction it holds moves by
the same amount. ``U V^T`` is approximated by a few Newton-Schulz iterations of an odd
quintic polynomial, which only needs matrix products (no SVD): cheap next to a training step
of a conv net (two 256 x 2304 products per iteration for the widest airbench layer).

A group marked ``orthogonalize`` trains its tensors this way (no weight decay is applied to
them: their update has a fixed size whatever the loss scale); ``fixed_norm`` additionally
rescales each tensor to Frobenius norm ``sqrt(rows)`` before its step, so the step size is
relative to a weight of constant size. Every other group is plain SGD with (Nesterov)
momentum and weight decay, step for step what ``torch.optim.SGD`` does. Per-group
``momentum`` is honoured in both kinds. ``pipeline.config.ParamGroupRule`` documents the
params keys; ``recipe.make_optimizer`` picks this class when a group asks for it.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

# The quintic's coefficients: chosen (by the Muon authors' tuning) so that the iteration
# pushes singular values in (0, 1] quickly towards ~1 rather than exactly 1; that is enough
# for an update direction and converges in ~5 steps from a matrix scaled to norm 1.
_NS_COEFFS = (3.4445, -4.7750, 2.0315)


@torch.no_grad()
def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """An approximation of ``U V^T`` for ``g = U S V^T`` (2-D or more: read as rows x rest).

    Computed in float32 (the matrices are small; bf16 would lose the small singular values on a
    CPU without a bf16 matmul advantage). Returns a tensor of ``g``'s shape and dtype.
    """
    shape, dtype = g.shape, g.dtype
    x = g.reshape(shape[0], -1).float()
    tall = x.shape[0] > x.shape[1]
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    x = x / (x.norm() + eps)
    a, b, c = _NS_COEFFS
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    if tall:
        x = x.T
    return x.reshape(shape).to(dtype)


class OrthogonalSGD(torch.optim.Optimizer):
    """SGD with (Nesterov) momentum; groups with ``orthogonalize=True`` take orthogonalized steps.

    Group keys: ``lr``, ``momentum``, ``nesterov``, ``weight_decay`` (plain groups only),
    ``orthogonalize``, ``fixed_norm``, and ``ns_steps`` (Newton-Schulz iterations).
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.9, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5) -> None:
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        orthogonalize=False, fixed_norm=False, ns_steps=ns_steps)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["orthogonalize"]:
                flat = [tuple(p.shape) for p in group["params"] if p.ndim < 2]
                if flat:
                    raise ValueError(f"orthogonalize needs matrices or filter banks (2-D or more), "
                                     f"got shapes {flat}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mom, nesterov = group["lr"], group["momentum"], group["nesterov"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if not group["orthogonalize"] and group["weight_decay"]:
                    g = g.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if mom:
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = g.detach().clone()
                    else:
                        buf.mul_(mom).add_(g)
                    g = g.add(buf, alpha=mom) if nesterov else buf
                if group["orthogonalize"]:
                    if group["fixed_norm"]:
                        p.mul_(p.shape[0] ** 0.5 / p.norm().clamp_min(1e-12))
                    g = orthogonalize(g, group["ns_steps"])
                p.add_(g, alpha=-lr)
        return loss
