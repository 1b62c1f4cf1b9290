"""A trained torch network run over a dataset: the batch side of inference (evaluate, review,
the membership audit, package's ONNX check inputs).

The network takes raw inputs (normalisation is its first layer, see ``pipeline.models``):
images as float32 N x C x H x W pixel values 0..255, tables as float32 N x F features in the
dataset's column order. :class:`ModelInputs` is the one place that turns a dataset's rows into
that, a batch at a time: a whole split as float32 would be 4x its uint8 pixels (the
permute-then-copy made it 8x), 2 GB for 10,000 images of 128 x 128 (issue #25), so batch
inference (evaluate, review, the membership audit) holds one batch of floats whatever N is.
``model_inputs`` is the whole tensor at once, for a few rows (package's check inputs, tests).
``predict_logits`` gives the logits of every TTA view (``pipeline.inference.tta``), which
``tta.probabilities`` turns into class probabilities exactly as predict and serve do;
``penultimate`` the features before the last linear layer (evaluate's discovered slices).
Both run batches of at most ``batch_size`` rows, fewer for large inputs
(``pipeline.models.batch_rows``: one batch within 512 MiB).

torch is imported inside the functions that need it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from pipeline.errors import FmpipeError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from pipeline.manifest import Dataset


class ModelInputs:
    """A dataset's rows as the network's raw input, converted one slice at a time.

    ``len``, ``shape``, ``ndim`` as the float32 tensor would have them; ``x[a:b]`` is that
    tensor's rows a..b (a fresh float32 CPU tensor, C-contiguous N x C x H x W or N x F), the
    same values and layout as slicing the whole converted tensor, so scores do not depend on
    whether the split was converted at once or in batches. The pixels are read with the
    payload's own slicing (``Dataset.images``: a memory map or a sharded view).
    """

    def __init__(self, ds: "Dataset") -> None:
        if ds.images is not None:
            self._rows = ds.images
            n, h, w, c = ds.images.shape
            self.shape: tuple[int, ...] = (n, c, h, w)
        else:
            # A table is in memory already (a DataFrame); as float32 it is N x F * 4 bytes.
            self._rows = ds.features.to_numpy(dtype=np.float32, copy=True)
            self.shape = tuple(self._rows.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> "torch.Tensor":
        import torch

        if not isinstance(rows, slice):
            raise TypeError(f"ModelInputs takes a slice of rows, got {type(rows).__name__}")
        if self.ndim == 2:
            return torch.from_numpy(self._rows[rows])
        # uint8 n x H x W x C -> float32 n x C x H x W, values kept in 0..255. np.array: a
        # memory-mapped payload is read-only, torch wants writable memory.
        part = np.array(self._rows[rows], dtype=np.uint8)
        return torch.from_numpy(part).permute(0, 3, 1, 2).float().contiguous()


def model_inputs(ds: "Dataset") -> "torch.Tensor":
    """The dataset's whole payload as the network's raw input tensor (float32, CPU): for a few
    rows only (4x the pixels' bytes); batch inference takes :class:`ModelInputs`."""
    return ModelInputs(ds)[:]


def check_compatible(meta: dict[str, Any], ds: "Dataset", model_dir: str | Path, data_dir: str | Path) -> None:
    """Refuse to score a model on data it was not built for (kind, shape, classes, features)."""
    where = f"{model_dir}/model.json vs {data_dir}"
    kind = meta["input"]["kind"]
    if kind != ds.kind:
        raise FmpipeError(f"{where}: model takes {kind} input, dataset is {ds.kind}")
    shape = list(meta["input"]["shape"])
    if ds.images is not None:
        h, w, c = ds.images.shape[1:]
        expected = [c, h, w]
    else:
        expected = [ds.features.shape[1]]
    if shape != expected:
        raise FmpipeError(f"{where}: model input shape {shape}, dataset gives {expected}")
    if list(meta["classes"]) != list(ds.classes):
        raise FmpipeError(f"{where}: model classes {meta['classes']} differ from dataset classes {ds.classes}")
    names = meta["input"].get("feature_names")
    if names is not None and ds.features is not None and list(names) != list(ds.features.columns):
        raise FmpipeError(f"{where}: model features {names} differ from dataset columns {list(ds.features.columns)}")


def predict_logits(net: "torch.nn.Module", x: "torch.Tensor", tta: Optional[dict[str, Any]] = None,
                   batch_size: int = 512):
    """Raw network outputs as float32 numpy: one N x K (or N x 1) array, or with ``tta`` one
    per view, in the form ``pipeline.inference.tta.probabilities`` (evaluate, predict, serve) takes.
    ``batch_size`` rows at a time, fewer for large inputs (``pipeline.models.batch_rows``).

    Images go through the network in channels_last (NHWC in memory, the same values): oneDNN's
    convolutions are faster on it, and on a CPU the freed activations stay in the heap
    (``pipeline.resources.keep_freed_cpu_memory``). Together 1.8x faster for the cifar net's
    6 TTA views (bench/README.md); the logits move by ~1e-6, the same on every run. ``net`` is
    left in the memory format it came in.
    """
    import torch

    from pipeline.console import progress
    from pipeline.inference.tta import view
    from pipeline.resources import keep_freed_cpu_memory

    views = (tta or {}).get("views")
    net.eval()
    images = x.ndim == 4
    device = next(iter(net.parameters()), torch.empty(0)).device
    if device.type == "cpu":
        keep_freed_cpu_memory()
    from pipeline.models import batch_rows

    batch_size = batch_rows(net, tuple(x.shape[1:]), batch_size)
    restore = images and _to_channels_last(net)
    outs: list[list[np.ndarray]] = [[] for _ in (views or [None])]
    starts = range(0, len(x), batch_size)
    try:
        with torch.inference_mode():
            for start in progress(starts, len(starts), "predict"):
                batch = x[start:start + batch_size]
                for i, v in enumerate(views or [None]):
                    b = batch if v is None else view(batch, bool(v["flip"]), v["shift"])
                    if images:
                        b = b.contiguous(memory_format=torch.channels_last)
                    outs[i].append(net(b).float().cpu().numpy())
    finally:
        if restore:
            net.to(memory_format=torch.contiguous_format)
    arrays = [np.concatenate(o) if o else np.zeros((0, 0), dtype=np.float32) for o in outs]
    return arrays if views else arrays[0]


def penultimate(net, x, batch_size: int = 512) -> np.ndarray:
    """The input of the network's last ``nn.Linear`` for every row (spatial maps averaged), one
    plain forward pass: what the model "sees" just before it decides."""
    import torch
    from torch import nn

    from pipeline.models import batch_rows

    linear = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not linear:
        return np.zeros((len(x), 0), np.float32)
    parts: list[np.ndarray] = []

    def hook(_module, args, _output):
        t = args[0]
        t = t.mean(dim=tuple(range(2, t.ndim))) if t.ndim > 2 else t.reshape(len(t), -1)
        parts.append(t.float().cpu().numpy())

    batch_size = batch_rows(net, tuple(x.shape[1:]), batch_size)  # its probe before the hook exists
    handle = linear[-1].register_forward_hook(hook)
    device = next(iter(net.parameters())).device
    try:
        net.eval()
        with torch.inference_mode():
            for start in range(0, len(x), batch_size):
                net(x[start:start + batch_size].to(device))
    finally:
        handle.remove()
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def _to_channels_last(net: "torch.nn.Module") -> bool:
    """Put ``net``'s 4-D weights in channels_last; True when it changed any (to undo after)."""
    import torch

    filters = [p for p in net.parameters() if p.ndim == 4]
    if not filters or all(p.is_contiguous(memory_format=torch.channels_last) for p in filters):
        return False
    net.to(memory_format=torch.channels_last)
    return True
