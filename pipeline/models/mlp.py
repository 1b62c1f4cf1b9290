"""Multi-layer perceptrons: the tabular default (iris 4-64-3) and the MNIST MLP 784-128-10."""

from __future__ import annotations

import math

from torch import nn

from pipeline.models import register


@register("mlp")
def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: list[int] = (64,),
        dropout: float = 0.0) -> nn.Module:
    """Flatten, then Linear-ReLU(-Dropout) per hidden width, then the classifier layer."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
