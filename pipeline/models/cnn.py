"""Small convolutional networks for small images."""

from __future__ import annotations

from torch import nn

from pipeline.models import register


def _conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


@register("cnn_small")
def cnn_small(input_shape: tuple[int, ...], num_classes: int, width: int = 32,
              dropout: float = 0.1) -> nn.Module:
    """Two conv-BN-ReLU blocks with pooling, global average pool, linear head (digits' 8x8)."""
    c = input_shape[0]
    return nn.Sequential(
        *_conv_bn(c, width), *_conv_bn(width, width), nn.MaxPool2d(2),
        *_conv_bn(width, 2 * width), *_conv_bn(2 * width, 2 * width), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * width, num_classes),
    )
