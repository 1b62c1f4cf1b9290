"""Training FLOPs, measured: torch's FlopCounterMode on one forward+backward, times the samples.

Counting one small step costs milliseconds, so the estimate is recorded on every train run.
The count covers matmuls and convolutions (what FlopCounterMode counts); elementwise work is
left out, as in the usual "6 x params x tokens"-style estimates.
"""

from __future__ import annotations

_PROBE_BATCH = 2


def step_flops_per_sample(net, input_shape: tuple[int, ...]) -> float:
    """FLOPs of forward + backward for one sample (measured on a batch of two).

    ``net`` is left as it was: its weights and buffers (batch-norm statistics move in a
    training-mode forward), its gradients and torch's random state (the probe batch and any
    dropout draw from it), so counting before training changes nothing about the training.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    was_training = net.training
    net.train()
    counter = FlopCounterMode(display=False)
    try:
        x = torch.rand(_PROBE_BATCH, *input_shape) * 255
        with counter:
            net(x).float().sum().backward()
    finally:
        net.zero_grad(set_to_none=True)
        net.train(was_training)
        with torch.no_grad():
            for k, v in net.state_dict().items():
                v.copy_(state[k])
        torch.set_rng_state(rng)
    return counter.get_total_flops() / _PROBE_BATCH
