"""The blessing: the TFX-style gate between evaluate and package (thresholds only; the slice
rules come from ``pipeline/evaluation/slices.py``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.artefacts import Blessing, Check, JudgedModel, Metrics

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.config import EvaluateSpec


def bless(metrics: Metrics, spec: "EvaluateSpec", model: JudgedModel, tta: str = "", tta_views: int = 1,
          tta_flip: bool = False, extra: tuple[Check, ...] | list[Check] = ()) -> Blessing:
    """The gate: every threshold of ``EvaluateSpec`` must hold (value >= threshold) for ``model``.

    A pure function of this evaluation: the change against the last blessed model is reported
    separately (``pipeline.evaluation.summary.comparison``, an uncached file), never enforced.
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
    checks += list(extra)  # the slice rules (pipeline/evaluation/slices.py: slice_checks)
    return Blessing(blessed=all(c.passed for c in checks), checks=checks, tta_flip=tta_flip,
                    tta_views=tta_views, tta=tta, model=model)
