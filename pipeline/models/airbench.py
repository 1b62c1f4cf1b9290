"""A fast small-image classifier in the style of the "airbench" CIFAR-10 speedruns.

Shape (defaults, 3x32x32 input, 10 classes: 1,972,792 parameters, 312 of them in the stem):

    stem   2x2 conv, no padding (32 -> 31), 24 channels, GELU
    block  conv3x3(64)  - maxpool2 - BN - GELU - conv3x3(64)  - BN - GELU     31 -> 15
    block  conv3x3(256) - maxpool2 - BN - GELU - conv3x3(256) - BN - GELU     15 -> 7
    block  conv3x3(256) - maxpool2 - BN - GELU - conv3x3(256) - BN - GELU      7 -> 3
    head   global max pool - linear (no bias) - multiply by ``scale`` (1/9)

Why it trains fast, and what each choice is for:
- Pooling right after the first conv of a block (before BN and GELU) makes the normalisation and
  activation run on a quarter of the pixels. Max-pool commutes with BN whenever BN's scale is
  positive and with GELU wherever GELU is increasing (inputs above about -0.75), so the order
  changes the function only slightly while saving most of the BN/GELU time.
- ``stem="whiten"``: the 2x2 stem is not learned but set from the data: its filters are the
  eigenvectors of the covariance of 2x2 image patches, scaled by 1/sqrt(eigenvalue), so its
  output is decorrelated with unit variance per direction ("whitened"). Each filter is present
  with both signs (hence 2 * C * 2 * 2 = 24 channels for RGB) so that the GELU after it keeps
  both halves of every direction. The filters are computed from the first training batch the
  network sees (lazily, inside ``forward`` in training mode), so no change to the training loop
  is needed; afterwards they are frozen (``requires_grad=False``), the stem bias stays trainable.
  ``stem="plain"`` is an ordinary learned 2x2 conv of the same width.
- The first ``C_in`` filters of every 3x3 conv start as the identity (Dirac) kernel, so each
  block initially passes its input through; this speeds up the first few hundred steps.
- BN running statistics move fast (``bn_momentum`` 0.4, PyTorch's convention: the weight of the
  newest batch) because runs are short and the recipe uses batches of ~1024.
- The head's output is scaled down (``scale``, 1/9) so that the very high learning rates of the
  recipe do not saturate the softmax early.

The recipe around it is params, not code (see the ``cifar`` variant in params.yaml): the conv
filters take the orthogonalized ("Muon") step (pipeline/training/orthogonal.py), the head and
the BatchNorm biases Nesterov SGD, label smoothing 0.2, a linear decay, batch 1024, alternating
flips + translate by 2 pixels, 6-view test-time augmentation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.errors import FmpipeError
from pipeline.models import register


class WhiteningStem(nn.Module):
    """2x2 conv whose filters whiten image patches; set from the first training batch."""

    def __init__(self, channels: int, kernel: int = 2, eps: float = 5e-4) -> None:
        super().__init__()
        self.kernel = kernel
        self.eps = eps
        dim = channels * kernel * kernel
        self.conv = nn.Conv2d(channels, 2 * dim, kernel, padding=0, bias=True)
        self.conv.weight.requires_grad_(False)  # data-determined, never trained
        nn.init.zeros_(self.conv.bias)
        # A buffer (not a Python attribute) so that it is saved with the weights: a loaded or
        # resumed network must never recompute its stem from a new batch.
        self.register_buffer("whitened", torch.tensor(False))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> None:
        """Set the filters from the 2x2 patches of ``x`` (N x C x H x W, already normalised)."""
        k = self.kernel
        c = x.shape[1]
        patches = x.float().unfold(2, k, 1).unfold(3, k, 1)  # N, C, H', W', k, k
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k).double()
        # float64: the smallest eigenvalues of natural-image patch covariances are tiny.
        cov = patches.T @ patches
        count = torch.tensor(float(patches.shape[0]), dtype=torch.float64, device=x.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Under DDP every rank sees a different first batch; frozen weights are never
            # synchronised by gradient all-reduce, so agree on the statistics here instead.
            torch.distributed.all_reduce(cov)
            torch.distributed.all_reduce(count)
        cov = cov / count
        eigvals, eigvecs = torch.linalg.eigh(cov)
        filters = (eigvecs.T / torch.sqrt(eigvals.clamp_min(0) + self.eps)[:, None])
        filters = filters.reshape(-1, c, k, k)
        self.conv.weight.copy_(torch.cat([filters, -filters]).to(self.conv.weight.dtype))
        self.whitened.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Only in training mode: eval/ONNX export never reach the data-dependent branch.
        if self.training and not bool(self.whitened):
            self.fit(x)
        return self.conv(x)


class GlobalMaxPool(nn.Module):
    """N x C x H x W -> N x C, the max over each map.

    ``amax`` rather than ``nn.AdaptiveMaxPool2d(1)``: the latter's CUDA backward has no
    deterministic implementation, so it fails under ``torch.use_deterministic_algorithms``
    (train.deterministic) on a GPU; ``amax``'s backward is a plain mask and is deterministic.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.amax(x, dim=(2, 3))


class Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


def _conv(c_in: int, c_out: int) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)  # BN follows: a bias would be redundant
    with torch.no_grad():
        n = min(c_in, c_out)
        nn.init.dirac_(conv.weight[:n])
    return conv


def _block(c_in: int, c_out: int, bn_momentum: float, bn_eps: float) -> nn.Sequential:
    return nn.Sequential(
        _conv(c_in, c_out), nn.MaxPool2d(2), nn.BatchNorm2d(c_out, eps=bn_eps, momentum=bn_momentum), nn.GELU(),
        _conv(c_out, c_out), nn.BatchNorm2d(c_out, eps=bn_eps, momentum=bn_momentum), nn.GELU(),
    )


@register("airbench")
def airbench(input_shape: tuple[int, ...], num_classes: int, widths: list[int] = (64, 256, 256),
             stem: str = "whiten", stem_width: int | None = None, bn_momentum: float = 0.4,
             scale: float = 1 / 9, bn_eps: float = 1e-5) -> nn.Module:
    """The airbench-style net for C x H x W images (H, W >= 9 for three pools after the stem).

    ``widths``: output channels of the three blocks. ``stem``: "whiten" (data-set 2x2 filters,
    width fixed at 2*C*4) or "plain" (learned 2x2 conv, width ``stem_width``, default 24).
    """
    if len(input_shape) != 3:
        raise FmpipeError(f"airbench needs image inputs C x H x W, got shape {tuple(input_shape)}")
    c, h, w = input_shape
    if min(h, w) - 1 < 8:
        raise FmpipeError(f"airbench: input {h}x{w} is too small (needs at least 9x9)")
    if not math.isfinite(scale) or scale <= 0:
        raise FmpipeError(f"airbench: scale must be a positive number, got {scale}")
    if len(widths) != 3:
        raise FmpipeError(f"airbench: widths must list 3 block widths, got {list(widths)}")
    if stem == "whiten":
        if stem_width is not None:
            raise FmpipeError("airbench: stem_width applies to stem='plain' only")
        first = WhiteningStem(c)
        width = first.conv.out_channels
    elif stem == "plain":
        width = stem_width or 24
        first = nn.Conv2d(c, width, 2, padding=0, bias=True)
    else:
        raise FmpipeError(f"airbench: stem must be 'whiten' or 'plain', got {stem!r}")
    layers: list[nn.Module] = [first, nn.GELU()]
    for c_out in widths:
        layers.append(_block(width, c_out, bn_momentum, float(bn_eps)))
        width = c_out
    layers += [GlobalMaxPool(), nn.Linear(width, num_classes, bias=False),
               Scale(scale)]
    return nn.Sequential(*layers)
