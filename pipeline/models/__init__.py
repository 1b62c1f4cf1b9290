"""Plain ``nn.Module`` networks (no Lightning inside) and the trained-model file format.

Every network fmpipe trains is ``Network(normalize, body)``: the first layer standardises the
raw input with statistics measured on the training split (stored as buffers), so the saved
weights, the ONNX export and the served model all take raw inputs: images as float32
N x C x H x W pixel values 0..255, tables as float32 N x F feature values.

A trained model on disk (the train step's output directory):
- ``model.safetensors``: the network's state dict, normalisation buffers included;
- ``model.json``: what is needed to rebuild it: model name, options and ``head``
  (``softmax``: one logit per class; ``sigmoid``: one logit, probabilities ``[1 - p, p]``),
  input kind and shape, class names, and ``tta``: the test-time views evaluate averaged
  (``pipeline.training.recipe.tta_record``).
"""

from __future__ import annotations

import contextlib
import json
import os
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch import nn

from pipeline.errors import FmpipeError

WEIGHTS = "model.safetensors"
MODEL_META = "model.json"

# name -> builder(input_shape, num_classes, **options) -> nn.Module (the body)
REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        REGISTRY[name] = fn
        return fn
    return deco


class Normalize(nn.Module):
    """(x - mean) / std per channel (images) or per feature (tables), fixed after training starts."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.detach().clone().float())
        self.register_buffer("std", std.detach().clone().float().clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Network(nn.Module):
    def __init__(self, normalize: Normalize, body: nn.Module) -> None:
        super().__init__()
        self.normalize = normalize
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x))


def build(name: str, input_shape: tuple[int, ...], num_classes: int,
          options: dict[str, Any] | None = None, mean: torch.Tensor | None = None,
          std: torch.Tensor | None = None, head: str = "softmax") -> Network:
    """The network ``name`` for inputs of ``input_shape`` (C,H,W or F, no batch dim).

    ``head="sigmoid"`` (two classes only) gives one output, the positive class's logit.
    """
    _load_builtin_models()
    if name not in REGISTRY:
        raise FmpipeError(f"unknown model {name!r} (known: {', '.join(sorted(REGISTRY))})")
    outputs = num_classes
    if head == "sigmoid":
        if num_classes != 2:
            raise FmpipeError(f"model.head: sigmoid needs exactly 2 classes, the data has {num_classes}")
        outputs = 1
    try:
        body = REGISTRY[name](tuple(input_shape), outputs, **(options or {}))
    except (TypeError, ValueError) as exc:
        raise FmpipeError(f"model {name!r}: bad options {options}: {exc}") from None
    stat_shape = (input_shape[0], 1, 1) if len(input_shape) == 3 else (input_shape[0],)
    mean = torch.zeros(stat_shape) if mean is None else mean.reshape(stat_shape)
    std = torch.ones(stat_shape) if std is None else std.reshape(stat_shape)
    return Network(Normalize(mean, std), body)


def activation_bytes_per_row(net: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """What one input row costs in activations: ``(widest, total)`` bytes.

    ``widest``: the largest input + output of one layer, what an inference pass holds at once
    (it frees each map once the next layer has made its own); ``total``: every layer's output,
    about what a training step keeps for its backward pass. Measured by hooks on the leaf
    modules over one float32 row of zeros, in eval mode without gradients, so nothing about
    ``net`` (weights, statistics, random state) changes. Pure in the network's structure and
    ``input_shape``: the same figure on every machine, so a batch size derived from it leaves
    outputs and their hashes alone (and measured once per network and shape). Forward hooks
    already on ``net`` see the probe's row too: call it (or :func:`batch_rows`) before
    registering any.
    """
    shape = tuple(int(d) for d in input_shape)
    known = _PROBED.setdefault(net, {})
    if shape not in known:
        known[shape] = _probe(net, shape)
    return known[shape]


# What activation_bytes_per_row measured, per network and input shape (train asks twice: its
# memory warning and its validation batches; evaluate once per pass).
_PROBED: "weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, ...], tuple[int, int]]]" = weakref.WeakKeyDictionary()


def _probe(net: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, int]:
    sizes: list[tuple[int, int]] = []

    def nbytes(t: Any) -> int:
        return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0

    def hook(_module, args, output):
        sizes.append((sum(nbytes(a) for a in args), nbytes(output)))

    leaves = [m for m in net.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was_training = net.training
    device = next(iter(net.parameters()), torch.empty(0)).device
    try:
        net.eval()
        with torch.inference_mode():
            net(torch.zeros((1, *input_shape), device=device))
    finally:
        net.train(was_training)
        for h in handles:
            h.remove()
    widest = max((i + o for i, o in sizes), default=0)
    return max(1, widest), max(1, sum(o for _, o in sizes))


# At most this much memory per inference batch, counted per row as the widest layer's input and
# output (pipeline.models.activation_bytes_per_row) plus three float32 copies of the input row
# (the converted batch, its TTA view, its channels_last copy: all alive while the network runs;
# with a strided stem they are most of it). 512 MiB leaves the 512-row batch of every shipped
# model as it was (the cifar net: 0.38 MB a row, 1,431 rows would fit) and cuts cnn_small at
# 224 x 224 to 65 rows (8.2 MB a row; 178 with a stem of 4): its fixed 512-row batch held 13 GB
# at evaluate's peak, and with a stem 2.8 GB (the heap keeps freed blocks for the next batch:
# about 1.7x the count; bench/inference_memory.py). Smaller batches are no slower at that
# size: 128 rows ran 2.4x faster than 512 (issue #25). FMPIPE_INFERENCE_BATCH_BYTES overrides it
# (tests use a small value to cut small data into capped batches). Like any other batch size it
# may move logits by ~1e-6, so it belongs to a whole run: Ray tasks take their driver's.
INFERENCE_BATCH_BYTES = 512 << 20
INFERENCE_BATCH_BYTES_ENV = "FMPIPE_INFERENCE_BATCH_BYTES"

def batch_rows(net: nn.Module, input_shape: tuple[int, ...], most: int, *, backward: bool = False) -> int:
    """Rows per inference batch: ``most``, or fewer where that many rows' activations would
    pass the budget (:func:`inference_batch_bytes`). A pure function of the network's structure and the
    input shape (never of the machine's free memory): every engine and machine cuts the same
    batches, so the logits, and the hashes of what is made from them, stay the same.

    ``backward``: for a pass that takes gradients with respect to its inputs (Integrated
    Gradients): every layer's output is kept for the backward pass, so a row costs the
    ``total`` of :func:`activation_bytes_per_row` plus its input and the input's gradient
    (cnn_small at 224 px: 31.9 MB; the cifar net: 1.45 MB, its 256 points in one batch)."""
    widest, total = activation_bytes_per_row(net, input_shape)
    row = 4 * int(np.prod(input_shape))  # the input row as float32
    per_row = total + 2 * row if backward else widest + 3 * row
    return max(1, min(int(most), inference_batch_bytes() // per_row))


_BUDGET_IN_FORCE: Optional[int] = None  # set by inference_batch_budget


def inference_batch_bytes() -> int:
    """This process's inference budget: a Ray task's driver's (:func:`inference_batch_budget`),
    else ``FMPIPE_INFERENCE_BATCH_BYTES``, else :data:`INFERENCE_BATCH_BYTES`."""
    if _BUDGET_IN_FORCE is not None:
        return _BUDGET_IN_FORCE
    value = os.environ.get(INFERENCE_BATCH_BYTES_ENV)
    if not value:
        return INFERENCE_BATCH_BYTES
    if not value.strip().isdigit() or int(value) < 1:
        raise FmpipeError(f"{INFERENCE_BATCH_BYTES_ENV}={value!r}: expected a whole number of bytes above 0 "
                          f"(default {INFERENCE_BATCH_BYTES})")
    return int(value)


@contextlib.contextmanager
def inference_batch_budget(nbytes: int) -> Iterator[None]:
    """Run with the driver's budget whatever this worker's environment says, so a chunk cuts
    the batches the driver's local pass would (``pipeline.inference.batch.forward_chunk``)."""
    global _BUDGET_IN_FORCE
    before, _BUDGET_IN_FORCE = _BUDGET_IN_FORCE, int(nbytes)
    try:
        yield
    finally:
        _BUDGET_IN_FORCE = before


def save_trained(net: Network, meta: dict[str, Any], out_dir: str | Path) -> None:
    """Write weights + meta into ``out_dir`` (the caller makes the directory atomic).

    The weights as float32 on the CPU in the standard memory layout, whatever precision,
    device and memory format ``net`` trained in (the network fit trained is saved as it is).
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    state = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
             for k, v in net.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS), metadata={"model": meta["model"]["name"]})
    (out_dir / MODEL_META).write_text(json.dumps(meta, indent=2) + "\n")


def load_meta(model_dir: str | Path) -> dict[str, Any]:
    """``model.json`` of a trained model or package."""
    meta_path = Path(model_dir) / MODEL_META
    if not meta_path.exists():
        raise FmpipeError(f"{model_dir}: no trained model ({MODEL_META} missing); run the train step first")
    return json.loads(meta_path.read_text())


def load_trained(model_dir: str | Path, device: str = "cpu") -> tuple[Network, dict[str, Any]]:
    """Rebuild a trained network from ``model.json`` + ``model.safetensors`` (no pickle)."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    meta_path = model_dir / MODEL_META
    if not meta_path.exists():
        raise FmpipeError(f"{model_dir}: no trained model ({MODEL_META} missing); run the train step first")
    meta = json.loads(meta_path.read_text())
    net = build(meta["model"]["name"], tuple(meta["input"]["shape"]), len(meta["classes"]),
                meta["model"].get("options"), head=meta["model"].get("head", "softmax"))
    net.load_state_dict(load_file(str(model_dir / WEIGHTS), device=device))
    return net.to(device).eval(), meta


def _load_builtin_models() -> None:
    # Importing the modules registers their networks.
    from pipeline.models import airbench, cnn, lenet, mlp  # noqa: F401
