"""LeNet: the small CIFAR-10 baseline of the PyTorch "training a classifier" tutorial.

conv 6@5x5 - ReLU - maxpool 2 - conv 16@5x5 - ReLU - maxpool 2 - fc 120 - fc 84 - fc classes.
On 3x32x32 inputs with 10 classes it has 62,006 parameters and reaches about 55% test accuracy
after two epochs of plain SGD; it is the baseline the ``cifar`` variant can fall back to
(``model: {name: lenet}``) and a cheap net for smoke runs.
"""

from __future__ import annotations

from torch import nn

from pipeline.models import register
from pipeline.errors import FmpipeError


def _after_features(size: int, padding: int) -> int:
    """Spatial size after conv5(padding) -> pool2 -> conv5(padding) -> pool2."""
    for _ in range(2):
        size = (size + 2 * padding - 4) // 2
    return size


@register("lenet")
def lenet(input_shape: tuple[int, ...], num_classes: int, padding: int | None = None) -> nn.Module:
    """LeNet for any C x H x W input.

    ``padding`` of the two 5x5 convolutions: the classic net uses none (32 -> 28 -> 14 -> 10 -> 5).
    By default (None) we keep that whenever the image is large enough and switch to padding 2
    ("same") for small images such as the 8x8 digits, where unpadded convs would shrink the map
    below one pixel. The flatten size is computed from the input, not hard-coded to 16*5*5.
    """
    if len(input_shape) != 3:
        raise FmpipeError(f"lenet needs image inputs C x H x W, got shape {tuple(input_shape)}")
    c, h, w = input_shape
    if padding is None:
        padding = 0 if min(_after_features(h, 0), _after_features(w, 0)) >= 1 else 2
    fh, fw = _after_features(h, padding), _after_features(w, padding)
    if fh < 1 or fw < 1:
        raise FmpipeError(f"lenet: input {h}x{w} is too small for padding={padding}")
    return nn.Sequential(
        nn.Conv2d(c, 6, 5, padding=padding), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5, padding=padding), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * fh * fw, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, num_classes),
    )
