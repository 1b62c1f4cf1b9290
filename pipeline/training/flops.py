"""Training FLOPs, measured: torch's FlopCounterMode on one forward+backward, times the samples.

Counting one small step costs milliseconds, so the estimate is recorded on every train run.
The count covers matmuls and convolutions (what FlopCounterMode counts); elementwise work is
left out, as in the usual "6 x params x tokens"-style estimates.
"""

from __future__ import annotations

_PROBE_BATCH = 2


def step_flops_per_sample(net, input_shape: tuple[int, ...]) -> float:
    """FLOPs of forward + backward for one sample (measured on a batch of two)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(_PROBE_BATCH, *input_shape) * 255
    was_training = net.training
    net.train()
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            net(x).float().sum().backward()
    finally:
        net.zero_grad(set_to_none=True)
        net.train(was_training)
    return counter.get_total_flops() / _PROBE_BATCH


def train_flops(spec, dataset, samples_seen: int) -> float:
    """Estimated FLOPs of a whole training run of ``spec.model`` on ``dataset``'s inputs."""
    from pipeline.models import build

    if dataset.images is not None:
        h, w, c = dataset.images.shape[1:]
        shape: tuple[int, ...] = (c, h, w)
    else:
        shape = (dataset.features.shape[1],)
    net = build(spec.model.name, shape, len(dataset.classes), spec.model.options)
    return step_flops_per_sample(net, shape) * samples_seen
