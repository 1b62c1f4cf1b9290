"""Small convolutional networks for small images."""

from __future__ import annotations

from torch import nn

from pipeline.models import register


def _norm(kind: str, c: int) -> list[nn.Module]:
    # "group": GroupNorm normalises each row on its own, so per-sample gradients (DP-SGD,
    # train.privacy) exist; BatchNorm mixes the rows of a batch and has none.
    if kind == "batch":
        return [nn.BatchNorm2d(c)]
    if kind == "group":
        return [nn.GroupNorm(8 if c % 8 == 0 else 1, c)]
    if kind == "none":
        return []
    raise ValueError(f"norm must be batch, group or none, got {kind!r}")


def _conv_bn(c_in: int, c_out: int, norm: str = "batch") -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=norm == "none"), *_norm(norm, c_out), nn.ReLU()]


@register("cnn_small")
def cnn_small(input_shape: tuple[int, ...], num_classes: int, width: int = 32,
              dropout: float = 0.1, norm: str = "batch", stem: int = 1) -> nn.Module:
    """Two conv-BN-ReLU blocks with pooling, global average pool, linear head (digits' 8x8).
    ``norm``: ``batch`` (default), ``group`` (trainable with DP-SGD) or ``none``.

    ``stem``: for large images, a first ``stem x stem`` convolution with stride ``stem`` (each
    patch to one pixel of ``width`` channels), so the blocks run at 1/stem the resolution and
    their activations, which a training step keeps for its backward pass, are stem² smaller:
    at 224 x 224 with width 16, 30.7 MB a row without a stem (7.9 GB for a 256-row batch),
    3.1 MB with ``stem: 4`` (issue #25). 1 (the default): no stem, the blocks see the pixels.
    """
    if not isinstance(stem, int) or stem < 1:
        raise ValueError(f"stem must be a whole number >= 1, got {stem!r}")
    c = input_shape[0]
    head: list[nn.Module] = []
    if stem > 1:
        head = [nn.Conv2d(c, width, stem, stride=stem, bias=norm == "none"), *_norm(norm, width), nn.ReLU()]
        c = width
    return nn.Sequential(
        *head, *_conv_bn(c, width, norm), *_conv_bn(width, width, norm), nn.MaxPool2d(2),
        *_conv_bn(width, 2 * width, norm), *_conv_bn(2 * width, 2 * width, norm), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * width, num_classes),
    )
