"""Scores of a model's test-split probabilities: torchmetrics' multiclass and binary scores,
and the figures ``dvc metrics`` compares across runs.

torch and torchmetrics are imported inside the functions that need them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.artefacts import Metrics
from pipeline.errors import FmpipeError

if TYPE_CHECKING:  # pragma: no cover
    import torch


def score(probs: "np.ndarray | torch.Tensor", labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
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
    probs = torch.as_tensor(probs)
    k = len(classes)
    preds = probs.argmax(dim=1)
    target = torch.tensor(np.array(labels, dtype=np.int64))

    def run(metric) -> np.ndarray:
        return metric(preds, target).detach().cpu().numpy()

    def share(metric) -> float:
        # torchmetrics averages in float32: a perfect macro F1 can come out as 1.0000001,
        # which the Metrics artefact (a share, <= 1) rightly refuses.
        return min(1.0, max(0.0, float(run(metric))))

    return {
        "accuracy": share(MulticlassAccuracy(num_classes=k, average="micro")),
        "macro_f1": share(MulticlassF1Score(num_classes=k, average="macro")),
        "precision": run(MulticlassPrecision(num_classes=k, average=None)),
        "recall": run(MulticlassRecall(num_classes=k, average=None)),
        "f1": run(MulticlassF1Score(num_classes=k, average=None)),
        "support": np.bincount(target.numpy(), minlength=k),
        "confusion": run(MulticlassConfusionMatrix(num_classes=k)),
        "predicted": preds.numpy(),
        "confidence": probs.max(dim=1).values.numpy(),
    }


def binary_scores(probs: "np.ndarray | torch.Tensor", labels: np.ndarray, threshold: float = 0.5) -> dict[str, Any]:
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

    p = torch.as_tensor(probs)[:, 1].float()
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
