"""How far the model's confidences can be trusted: ECE, reliability diagram, temperature scaling.

- ``expected_calibration_error``: torchmetrics' binned L1 calibration error (the mean gap
  between confidence and accuracy, weighted by the share of examples in each bin);
- ``reliability_bins``: the same equal-width bins as data (count, mean confidence, accuracy
  per bin) for the report, and ``reliability_png`` draws them (PIL only, with its bundled
  font: a static image with deterministic bytes, so it can be a cached DVC output);
- ``fit_temperature``: one scalar T > 0 dividing the logits, chosen to minimise the negative
  log-likelihood on the validation split (Guo et al. 2017). It never changes the argmax, so
  accuracy and the blessing are unaffected; only the confidences move.

The fit is a golden-section search over log T in numpy: a 1-D convex-in-practice problem,
deterministic to the last bit, with no optimiser state to seed.
"""

from __future__ import annotations

import io
import math
from typing import Any, Optional

import numpy as np

from pipeline.inference.tta import probabilities

T_MIN, T_MAX = 0.05, 20.0


def nll(logits, labels: np.ndarray, temperature: float, tta: Optional[dict[str, Any]] = None) -> float:
    """Mean negative log-likelihood; ``logits`` as ``pipeline.inference.tta.probabilities`` takes them."""
    p = probabilities(logits, temperature, tta).astype(np.float64)
    picked = p[np.arange(len(labels)), np.asarray(labels, dtype=np.int64)]
    return float(-np.log(np.clip(picked, 1e-12, None)).mean())


def fit_temperature(logits, labels: np.ndarray, tta: Optional[dict[str, Any]] = None,
                    iterations: int = 60) -> float:
    """The T in [0.05, 20] minimising validation NLL (golden-section search over log T)."""
    if len(labels) == 0:
        return 1.0
    lo, hi = math.log(T_MIN), math.log(T_MAX)
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(logits, labels, math.exp(a), tta), nll(logits, labels, math.exp(b), tta)
    for _ in range(iterations):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(logits, labels, math.exp(a), tta)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(logits, labels, math.exp(b), tta)
    t = math.exp((lo + hi) / 2)
    # Keep T = 1 unless scaling actually helps (a flat NLL must not drift T for nothing).
    return round(t, 6) if nll(logits, labels, t, tta) < nll(logits, labels, 1.0, tta) else 1.0


def calibrate(logits, labels: np.ndarray, val: Optional[tuple[Any, np.ndarray]],
              temperature_scaling: bool, n_bins: int = 15,
              tta: Optional[dict[str, Any]] = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Test probabilities (temperature and TTA applied) and the ``calibration.json`` record.

    ``logits``: the test split's, one array or one per TTA view of ``tta``. ``val``: (logits,
    labels) of the val split in the same form, required when ``temperature_scaling`` is on;
    the temperature is fitted there, never on test.
    """
    record: dict[str, Any] = {"temperature_scaling": bool(temperature_scaling), "temperature": 1.0,
                              "n_bins": int(n_bins)}
    if temperature_scaling:
        v_logits, v_labels = val
        t = fit_temperature(v_logits, v_labels, tta)
        record.update({
            "temperature": t, "fitted_on": "val", "n_val": int(len(v_labels)),
            "val_nll_before": nll(v_logits, v_labels, 1.0, tta),
            "val_nll_after": nll(v_logits, v_labels, t, tta),
        })
    probs = probabilities(logits, record["temperature"], tta)
    record["ece"] = expected_calibration_error(probs, labels, n_bins)
    if temperature_scaling:
        record["ece_before_scaling"] = expected_calibration_error(probabilities(logits, 1.0, tta), labels, n_bins)
    record["bins"] = reliability_bins(probs, labels, n_bins)
    return probs, record


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """torchmetrics MulticlassCalibrationError (L1, equal-width bins) of the top-1 confidence."""
    import torch
    from torchmetrics.classification import MulticlassCalibrationError

    if len(labels) == 0:
        return 0.0
    metric = MulticlassCalibrationError(num_classes=probs.shape[1], n_bins=n_bins, norm="l1")
    return float(metric(torch.from_numpy(np.array(probs, dtype=np.float32)),
                        torch.from_numpy(np.array(labels, dtype=np.int64))))


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> list[dict[str, Any]]:
    """Per equal-width confidence bin: bounds, count, mean confidence, accuracy (None if empty)."""
    conf = probs.max(axis=1).astype(np.float64)
    correct = probs.argmax(axis=1) == np.asarray(labels)
    # Bin i holds (i/n, (i+1)/n]; confidence is >= 1/K > 0, so nothing falls below bin 0.
    idx = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    out = []
    for i in range(n_bins):
        m = idx == i
        n = int(m.sum())
        out.append({"lower": i / n_bins, "upper": (i + 1) / n_bins, "count": n,
                    "confidence": float(conf[m].mean()) if n else None,
                    "accuracy": float(correct[m].mean()) if n else None})
    return out


def reliability_png(bins: list[dict[str, Any]], title: str, size: int = 420) -> bytes:
    """A reliability diagram: accuracy per confidence bin (bars), each bin's mean confidence (a
    red tick: the gap between tick and bar top is the miscalibration), the diagonal of perfect
    calibration, both axes labelled, and a legend saying so."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=13)  # Pillow's bundled font: the same bytes everywhere
    small = ImageFont.load_default(size=11)
    pad_l, pad_b, pad_t, pad_r = 62, 50, 40, 16
    legend_h = 62
    w, h = size + pad_l + pad_r, size + pad_t + pad_b + legend_h
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    x0, y0 = pad_l, pad_t + size  # origin, bottom-left
    bar, bar_edge, tick, diag = (70, 120, 200), (40, 80, 150), (200, 40, 40), (120, 120, 120)

    def px(v: float) -> float:
        return x0 + v * size

    def py(v: float) -> float:
        return y0 - v * size

    for t in range(0, 11, 2):  # grid and tick labels every 0.2
        v = t / 10
        d.line([(px(v), py(0)), (px(v), py(1))], fill=(235, 235, 235))
        d.line([(px(0), py(v)), (px(1), py(v))], fill=(235, 235, 235))
        d.text((px(v), y0 + 6), f"{v:.1f}", fill="black", font=small, anchor="mt")
        d.text((x0 - 6, py(v)), f"{v:.1f}", fill="black", font=small, anchor="rm")
    for b in bins:
        if not b["count"]:
            continue
        left, right = px(b["lower"]) + 1, px(b["upper"]) - 1
        d.rectangle([left, py(b["accuracy"]), right, py(0)], fill=bar, outline=bar_edge)
        d.line([(left - 1, py(b["confidence"])), (right + 1, py(b["confidence"]))], fill=tick, width=3)
        top = max(b["accuracy"], b["confidence"])  # the bin's example count, above its marks
        d.text(((left + right) / 2, py(top) - 4 if top < 0.96 else py(top) + 14), f"n={b['count']}",
               fill="black" if top < 0.96 else "white", font=small, anchor="mb")
    d.line([(px(0), py(0)), (px(1), py(1))], fill=diag, width=1)
    d.rectangle([px(0), py(1), px(1), py(0)], outline="black")
    d.text((w // 2, 12), title, fill="black", font=font, anchor="mt")
    d.text((px(0.5), y0 + 24), "confidence (the top class's probability)", fill="black", font=font, anchor="mt")
    label = Image.new("RGB", (size, 18), "white")  # the y label, drawn sideways
    ImageDraw.Draw(label).text((size // 2, 9), "accuracy in the bin", fill="black", font=font, anchor="mm")
    im.paste(label.rotate(90, expand=True), (8, pad_t))
    ly = y0 + pad_b
    items = [("bar", "accuracy of the test examples in the bin (n: how many)"),
             ("tick", "their mean confidence (tick above the bar: over-confident)"),
             ("diag", "perfect calibration (accuracy = confidence)")]
    for k, (kind, text) in enumerate(items):
        y = ly + 4 + 19 * k
        if kind == "bar":
            d.rectangle([x0, y, x0 + 22, y + 12], fill=bar, outline=bar_edge)
        elif kind == "tick":
            d.line([(x0, y + 6), (x0 + 22, y + 6)], fill=tick, width=3)
        else:
            d.line([(x0, y + 12), (x0 + 22, y)], fill=diag, width=1)
        d.text((x0 + 30, y + 6), text, fill="black", font=small, anchor="lm")
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return buf.getvalue()
