"""Test-time augmentation and the logits -> probabilities rule, one definition for every caller.

A model's TTA record (model.json's and preprocess.json's ``tta``) lists its views, each a
horizontal flip and/or a shift with a weight, and how their outputs combine. ``view`` makes one
view of a batch (a torch tensor in evaluate and review, a numpy array in predict and serve:
the same pixels either way), ``probabilities`` combines the views' logits with the
temperature. Evaluate, review, calibration, the INT8 gate, predict and serve all score
through these two functions.

numpy only at import: torch is imported inside ``view`` when it is handed a tensor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.config import TTASpec


def tta_views(spec: Optional["TTASpec"]) -> list[dict[str, Any]]:
    """The views of ``spec`` as ``{"flip", "shift": [dy, dx], "weight"}``, weights summing to 1.

    No TTA is the one identity view. This list (with ``combine``) is what model.json records
    under ``tta``, so a served package can apply the very same views.
    """
    if spec is None:
        return [{"flip": False, "shift": [0, 0], "weight": 1.0}]
    if spec.views is not None:
        raw = [(v.flip, list(v.shift), v.weight) for v in spec.views]
    else:
        flips = [False, True] if spec.flip else [False]
        raw = [(f, [0, 0], 1.0 / len(flips)) for f in flips]
        if spec.translate:
            t = spec.translate
            shifted = [(f, [d, d]) for d in (-t, t) for f in flips]
            raw = [(f, s, w * 0.5) for f, s, w in raw] + [(f, s, 0.5 / len(shifted)) for f, s in shifted]
    total = sum(w for _, _, w in raw)
    return [{"flip": f, "shift": s, "weight": w / total} for f, s, w in raw]


def tta_record(spec: Optional["TTASpec"]) -> dict[str, Any]:
    """model.json's ``tta`` entry: the views and how their outputs combine."""
    return {"combine": spec.combine if spec is not None else "logits", "padding": "reflect",
            "views": tta_views(spec)}


# The TTA record of an older package that only knew ``tta_flip``: image and mirror, softmax averaged.
LEGACY_FLIP_TTA = {"combine": "probs", "padding": "reflect",
                   "views": [{"flip": False, "shift": [0, 0], "weight": 0.5},
                             {"flip": True, "shift": [0, 0], "weight": 0.5}]}


def effective_tta(meta: dict[str, Any], train_spec) -> Optional[dict[str, Any]]:
    """The TTA record a model is evaluated and served with: model.json's ``tta`` (older models
    without one: what ``train`` params say), None for tables or no TTA."""
    if meta["input"]["kind"] != "image":
        return None
    if "tta" in meta:
        return meta["tta"]
    spec = train_spec.tta_spec()
    return tta_record(spec) if spec is not None else None


def tta_description(record: Optional[dict[str, Any]]) -> str:
    """A short human description of a TTA record ("" when there is none)."""
    views = (record or {}).get("views") or []
    if len(views) <= 1:
        return ""
    flips = any(v["flip"] for v in views)
    shifts = sorted({abs(int(d)) for v in views for d in v["shift"]} - {0})
    parts = (["flip"] if flips else []) + [f"{t}px translate" for t in shifts]
    return f"{' + '.join(parts)} TTA, {len(views)} views"


def view(x, flip: bool, shift: Sequence[int]):
    """One TTA view of an N x C x H x W batch (a torch tensor or a numpy array, returned as the
    same type): pixel (i, j) is input pixel (i+dy, j+dx), mirrored at the borders, then the
    horizontal flip."""
    dy, dx = int(shift[0]), int(shift[1])
    if isinstance(x, np.ndarray):
        if dy or dx:
            h, w = x.shape[-2:]
            py, px = abs(dy), abs(dx)
            padded = np.pad(x, ((0, 0), (0, 0), (py, py), (px, px)), mode="reflect")
            x = padded[..., py + dy:py + dy + h, px + dx:px + dx + w]
        if flip:
            x = x[..., ::-1]
        return np.ascontiguousarray(x)
    import torch.nn.functional as F

    if dy or dx:
        h, w = x.shape[-2:]
        py, px = abs(dy), abs(dx)
        padded = F.pad(x, (px, px, py, py), mode="reflect")
        x = padded[..., py + dy:py + dy + h, px + dx:px + dx + w]
    if flip:
        x = x.flip(-1)
    return x


def is_identity(v: dict[str, Any]) -> bool:
    """A view that leaves the batch as it is (no flip, no shift)."""
    return not v["flip"] and not any(v["shift"])


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def as_class_logits(logits: np.ndarray) -> np.ndarray:
    """N x K logits as they are; a binary model's N x 1 logit z as [0, z] (softmax = [1-p, p])."""
    logits = np.asarray(logits, dtype=np.float32)
    if logits.ndim == 2 and logits.shape[1] == 1:
        return np.concatenate([np.zeros_like(logits), logits], axis=1)
    return logits


def probabilities(view_logits, temperature: float = 1.0, tta: Optional[dict[str, Any]] = None) -> np.ndarray:
    """Class probabilities from the logits of each TTA view, with the temperature applied.

    ``view_logits``: one N x K (or N x 1 binary) array when there is no TTA, else a list
    aligned with ``tta["views"]``. ``combine: logits`` averages the weighted logits before the
    softmax; ``combine: probs`` averages the softmaxes. Evaluate, predict and serve all use it.
    """
    if tta is None or isinstance(view_logits, np.ndarray):
        return softmax(as_class_logits(view_logits).astype(np.float64) / temperature).astype(np.float32)
    views = tta["views"]
    if tta.get("combine", "logits") == "logits":
        z = sum(float(v["weight"]) * as_class_logits(l).astype(np.float64) for v, l in zip(views, view_logits))
        return softmax(z / temperature).astype(np.float32)
    p = sum(float(v["weight"]) * softmax(as_class_logits(l).astype(np.float64) / temperature)
            for v, l in zip(views, view_logits))
    return p.astype(np.float32)
