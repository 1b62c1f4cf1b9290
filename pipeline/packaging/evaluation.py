"""Scoring a trained network on a dataset split, and the blessing that gates packaging.

The network takes raw inputs (normalisation is its first layer, see ``pipeline.models``):
images as float32 N x C x H x W pixel values 0..255, tables as float32 N x F features in the
dataset's column order. ``model_inputs`` is the one place that turns a dataset into that.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from pipeline.artefacts import Blessing, Check, JudgedModel, Metrics
from pipeline.errors import FmpipeError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from pipeline.config import EvaluateSpec
    from pipeline.manifest import Dataset


def model_inputs(ds: "Dataset") -> "torch.Tensor":
    """The dataset's payload as the network's raw input tensor (float32, CPU)."""
    import torch

    if ds.images is not None:
        # uint8 N x H x W x C -> float32 N x C x H x W, values kept in 0..255.
        return torch.from_numpy(np.ascontiguousarray(ds.images)).permute(0, 3, 1, 2).float().contiguous()
    return torch.from_numpy(ds.features.to_numpy(dtype=np.float32, copy=True))


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


def tta_description(record: Optional[dict[str, Any]]) -> str:
    """A short human description of a TTA record ("" when there is none)."""
    views = (record or {}).get("views") or []
    if len(views) <= 1:
        return ""
    flips = any(v["flip"] for v in views)
    shifts = sorted({abs(int(d)) for v in views for d in v["shift"]} - {0})
    parts = (["flip"] if flips else []) + [f"{t}px translate" for t in shifts]
    return f"{' + '.join(parts)} TTA, {len(views)} views"


def binary_scores(probs: "torch.Tensor", labels: np.ndarray, threshold: float = 0.5) -> dict[str, Any]:
    """Metrics of a two-class model, the second class positive: ROC-AUC, PR-AUC (average
    precision), and precision/recall/F1 of predicting positive when p >= ``threshold``."""
    import torch
    from torchmetrics.functional.classification import (
        binary_auroc,
        binary_average_precision,
        binary_f1_score,
        binary_precision,
        binary_recall,
    )

    p = probs[:, 1].float()
    target = torch.tensor(np.array(labels, dtype=np.int64))
    both = bool(target.min() != target.max()) if len(target) else False
    return {
        "threshold": float(threshold),
        # AUCs are undefined with one class only in the test split.
        "roc_auc": float(binary_auroc(p, target)) if both else None,
        "pr_auc": float(binary_average_precision(p, target)) if both else None,
        "f1": float(binary_f1_score(p, target, threshold=threshold)),
        "precision": float(binary_precision(p, target, threshold=threshold)),
        "recall": float(binary_recall(p, target, threshold=threshold)),
    }
def effective_tta(meta: dict[str, Any], train_spec) -> Optional[dict[str, Any]]:
    """The TTA record a model is evaluated and served with: model.json's ``tta`` (older models
    without one: what ``train`` params say), None for tables or no TTA."""
    if meta["input"]["kind"] != "image":
        return None
    if "tta" in meta:
        return meta["tta"]
    from pipeline.training.recipe import tta_record

    spec = train_spec.tta_spec()
    return tta_record(spec) if spec is not None else None


def predict_logits(net: "torch.nn.Module", x: "torch.Tensor", tta: Optional[dict[str, Any]] = None,
                   batch_size: int = 512):
    """Raw network outputs as float32 numpy: one N x K (or N x 1) array, or with ``tta`` one
    per view, in the form ``pipeline.inference.probabilities`` (evaluate, predict, serve) takes.

    Images go through the network in channels_last (NHWC in memory, the same values): oneDNN's
    convolutions are faster on it, and on a CPU the freed activations stay in the heap
    (``pipeline.resources.keep_freed_cpu_memory``). Together 1.8x faster for the cifar net's
    6 TTA views (bench/README.md); the logits move by ~1e-6, the same on every run. ``net`` is
    left in the memory format it came in.
    """
    import torch

    from pipeline.console import progress
    from pipeline.resources import keep_freed_cpu_memory
    from pipeline.training.recipe import view

    views = (tta or {}).get("views")
    net.eval()
    images = x.ndim == 4
    device = next(iter(net.parameters()), torch.empty(0)).device
    if device.type == "cpu":
        keep_freed_cpu_memory()
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


def _to_channels_last(net: "torch.nn.Module") -> bool:
    """Put ``net``'s 4-D weights in channels_last; True when it changed any (to undo after)."""
    import torch

    filters = [p for p in net.parameters() if p.ndim == 4]
    if not filters or all(p.is_contiguous(memory_format=torch.channels_last) for p in filters):
        return False
    net.to(memory_format=torch.channels_last)
    return True


def score(probs: "torch.Tensor", labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """torchmetrics scores of the argmax predictions against ``labels``.

    Returns plain Python/numpy values: ``accuracy`` (micro), ``macro_f1``, per-class
    ``precision``/``recall``/``f1``/``support`` arrays and the ``confusion`` matrix
    (rows: actual, columns: predicted).
    """
    import torch
    from torchmetrics.classification import (
        MulticlassAccuracy,
        MulticlassConfusionMatrix,
        MulticlassF1Score,
        MulticlassPrecision,
        MulticlassRecall,
    )

    if len(labels) == 0:
        raise FmpipeError("the test split is empty: nothing to evaluate")
    k = len(classes)
    preds = probs.argmax(dim=1)
    target = torch.tensor(np.array(labels, dtype=np.int64))

    def run(metric) -> np.ndarray:
        return metric(preds, target).detach().cpu().numpy()

    return {
        "accuracy": float(run(MulticlassAccuracy(num_classes=k, average="micro"))),
        "macro_f1": float(run(MulticlassF1Score(num_classes=k, average="macro"))),
        "precision": run(MulticlassPrecision(num_classes=k, average=None)),
        "recall": run(MulticlassRecall(num_classes=k, average=None)),
        "f1": run(MulticlassF1Score(num_classes=k, average=None)),
        "support": np.bincount(target.numpy(), minlength=k),
        "confusion": run(MulticlassConfusionMatrix(num_classes=k)),
        "predicted": preds.numpy(),
        "confidence": probs.max(dim=1).values.numpy(),
    }


def bless(metrics: Metrics, spec: "EvaluateSpec", model: JudgedModel, tta: str = "", tta_views: int = 1,
          tta_flip: bool = False) -> Blessing:
    """The gate: every threshold of ``EvaluateSpec`` must hold (value >= threshold) for ``model``.

    A pure function of this evaluation: the change against the last blessed model is reported
    separately (``pipeline.packaging.summary.comparison``, an uncached file), never enforced.
    """
    checks = []
    for name, key in (("min_accuracy", "accuracy"), ("min_macro_f1", "macro_f1")):
        threshold = float(getattr(spec, name))
        value = float(getattr(metrics, key))
        checks.append(Check(name=name, metric=key, threshold=threshold, value=value, passed=value >= threshold))
    cap = getattr(spec, "max_membership_auc", None)
    if cap is not None:
        auc = metrics.membership.auc if metrics.membership is not None else None
        # No audit (membership_rows: 0, or no held-out rows) cannot pass a cap.
        checks.append(Check(name="max_membership_auc", metric="membership.auc", threshold=float(cap),
                            value=1.0 if auc is None else float(auc),
                            passed=auc is not None and auc <= cap, at_most=True))
    return Blessing(blessed=all(c.passed for c in checks), checks=checks, tta_flip=tta_flip,
                    tta_views=tta_views, tta=tta, model=model)


def read_json(path: Path, hint: str) -> dict[str, Any]:
    """A JSON file another step wrote, or one clear error naming it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FmpipeError(f"{path}: not found; {hint}") from None
    except json.JSONDecodeError as exc:
        raise FmpipeError(f"{path}: not valid JSON: {exc}") from None


def compare_figures(variant: str, metrics: Metrics, training: dict[str, Any] | None) -> dict[str, Any]:
    """``evaluate/figures.json``: the variant's DVC metric, the figures compared across runs.

    Quality (accuracy, macro F1, ECE; ROC-AUC for two classes) and the cost of training that
    does not vary run to run (epochs, GFLOP; ``train/model.json``). Wall times are per-run
    records (``data/resources``), not here. Keyed by the variant so that ``dvc exp show``
    headers are ``digits.accuracy`` rather than the path-qualified
    ``data/digits/evaluate/metrics.json:accuracy``: every variant's figures then fit on the
    first screen of a 200-column terminal.
    """
    figures: dict[str, Any] = {"accuracy": metrics.accuracy, "macro_f1": metrics.macro_f1, "ece": metrics.ece}
    if metrics.binary is not None and metrics.binary.roc_auc is not None:
        figures["roc_auc"] = metrics.binary.roc_auc
    for key in ("epochs", "gflop"):
        if (training or {}).get(key) is not None:
            figures[key] = training[key]
    return {variant: figures}
