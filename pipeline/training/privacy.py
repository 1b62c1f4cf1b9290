"""Differentially private training (``train.privacy``): DP-SGD from Opacus' own parts.

Opacus' ``PrivacyEngine.make_private`` wants a ``torch.utils.data.DataLoader`` to swap for its
Poisson-sampling loader; fmpipe's batches come from :class:`pipeline.training.data.BatchStream`
(tensors on the device, no DataLoader). So the same three parts are put together here:

- ``GradSampleModule`` hooks the network's layers to compute per-sample gradients (the
  network object and its ``state_dict`` keys stay as they are: the hooks live on its layers);
- ``DPOptimizer`` wraps the recipe's optimizer: clip each row's gradient to ``max_grad_norm``,
  sum, add N(0, (noise_multiplier * max_grad_norm)^2) noise, divide by the expected batch size,
  then the wrapped optimizer's step (its parameter groups and the schedule unchanged);
- an Opacus accountant turns (noise multiplier, sample rate, steps) into epsilon at ``delta``.

Which accountant assumption holds: the RDP/PRV/GDP bounds are for the *Poisson-subsampled*
Gaussian mechanism: every row joins every step independently with probability q. fmpipe's
ordinary stream shuffles once per epoch and cuts fixed-size batches (sampling without
replacement), for which those bounds are not proven (shuffled batches can leak more, see
Chua et al. 2024, "How Private are DP-SGD Implementations?"). With privacy on, BatchStream
therefore draws Poisson batches (``poisson_rate`` = batch_size / training rows), ``len()``
unchanged: the reported epsilon is then the accountant's bound for what ran.

Two honest limits: the noise comes from torch's seeded generator (runs are reproducible,
but the generator is not cryptographically secure: Opacus' ``secure_mode`` is not used), and
a step whose Poisson batch is empty (probability (1 - q)^N per step, e.g. e^-64 at batch 64)
is skipped while the accountant still counts it (conservative).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pipeline.errors import FmpipeError


def check_network(net: nn.Module, model_name: str, variant: str = "") -> None:
    """Refuse a network DP-SGD cannot train (one line naming the params key)."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(net, strict=False)
    if errors:
        # The layer kinds at fault: each leaf layer checked on its own.
        kinds = sorted({type(m).__name__ for m in net.modules()
                        if not list(m.children()) and ModuleValidator.validate(m, strict=False)})
        key = f"variants.{variant}.model" if variant else "model"
        hint = " (cnn_small: options.norm: group)" if model_name == "cnn_small" else ""
        raise FmpipeError(
            f"params.yaml: {key}: {model_name} has layers DP-SGD (train.privacy) cannot train: "
            f"{', '.join(kinds) or ' '.join(str(errors[0]).split())} (they mix the rows of a batch); "
            f"use a network without them{hint} or drop train.privacy")


def resolve_delta(spec, n_train: int) -> float:
    return float(spec.delta) if spec.delta is not None else 1.0 / (10.0 * max(1, n_train))


def noise_multiplier(spec, sample_rate: float, steps: int, delta: float) -> float:
    """``spec.noise_multiplier``, or the one that spends ``target_epsilon`` in ``steps`` steps."""
    if spec.noise_multiplier is not None:
        return float(spec.noise_multiplier)
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=spec.target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=max(1, steps),
                                      accountant=spec.accountant))


def per_sample_gradients(net: nn.Module) -> nn.Module:
    """Hook ``net``'s layers for per-sample gradients; returns the wrapper (keep a reference)."""
    from opacus import GradSampleModule

    return GradSampleModule(net, batch_first=True, loss_reduction="mean")


def private_optimizer(optimizer, spec, sigma: float, expected_batch_size: int):
    from opacus.optimizers import DPOptimizer

    return DPOptimizer(optimizer, noise_multiplier=sigma, max_grad_norm=spec.max_grad_norm,
                       expected_batch_size=expected_batch_size, loss_reduction="mean")


def spent(spec, sigma: float, sample_rate: float, steps: int, delta: float) -> dict[str, Any]:
    """The privacy spent by ``steps`` DP-SGD steps: the record model.json carries."""
    from opacus.accountants import create_accountant

    accountant = create_accountant(spec.accountant)
    # The accountants' own record of a run: (noise multiplier, sample rate, steps) per phase;
    # one phase here (noise and rate never change), so a resumed run gives the same figure.
    accountant.history = [(sigma, sample_rate, int(steps))] if steps else []
    epsilon = float(accountant.get_epsilon(delta)) if steps and sigma > 0 else (0.0 if not steps else float("inf"))
    return {"epsilon": round(epsilon, 6), "delta": delta, "accountant": spec.accountant,
            "noise_multiplier": round(sigma, 6), "max_grad_norm": spec.max_grad_norm,
            "sample_rate": round(sample_rate, 8), "steps": int(steps), "sampling": "poisson",
            "target_epsilon": spec.target_epsilon}
