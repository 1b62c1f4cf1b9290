"""Robustness: accuracy of the model on test rows it has never seen in this form: corrupted, at
three severities, seeded, generated here (offline) from the test split.

Images (after ImageNet-C's families, scaled to the image's own size so an 8 px digit and a
32 px photo are hit alike): ``gaussian_noise``, ``blur`` (Gaussian), ``jpeg`` (re-encoding),
``brightness``, ``contrast``, ``pixelate``. Tables: ``feature_noise`` (Gaussian, in units of each
feature's spread on train) and ``missing_values`` (cells replaced by the train mean: what a
caller that imputes would send; the model itself takes no missing values).

Written with numpy and Pillow, not ``imagecorruptions`` (ImageNet-C's package): its last release
is from 2020, it pulls OpenCV and scikit-image, and its parameters assume 224 px images.

Scored on at most ``rows`` test rows (a seeded sample, the same for every corruption) with the
network's plain view (no TTA), beside the clean accuracy of those same rows, so the drop is the
corruption's alone. The result is a pure function of the model, the test rows and params.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from pipeline.config import EvaluateSpec, RobustnessSpec
    from pipeline.manifest import Dataset


IMAGE_CORRUPTIONS = ("gaussian_noise", "blur", "jpeg", "brightness", "contrast", "pixelate")
TABLE_CORRUPTIONS = ("feature_noise", "missing_values")

# Per severity 1..3. Noise: standard deviation in pixel values / 255; blur: radius per 32 px;
# jpeg: quality; brightness: added / 255; contrast: factor around the image mean; pixelate: the
# share of the side kept; feature_noise: in train standard deviations; missing_values: the share
# of cells lost.
LEVELS: dict[str, tuple[float, float, float]] = {
    "gaussian_noise": (0.04, 0.08, 0.14),
    "blur": (0.6, 1.0, 1.6),
    "jpeg": (50, 25, 10),
    "brightness": (0.1, 0.2, 0.35),
    "contrast": (0.6, 0.4, 0.25),
    "pixelate": (0.7, 0.5, 0.35),
    "feature_noise": (0.1, 0.3, 0.6),
    "missing_values": (0.1, 0.25, 0.5),
}


def _per_image(images: np.ndarray, fn: Callable) -> np.ndarray:
    from PIL import Image

    out = np.empty_like(images)
    gray = images.shape[3] == 1
    for i, img in enumerate(images):
        pil = Image.fromarray(img[..., 0] if gray else img)
        res = np.asarray(fn(pil))
        out[i] = res[..., None] if gray else res
    return out


def corrupt_images(images: np.ndarray, name: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """``images`` (N x H x W x C uint8) under one corruption at ``severity`` 1..3.

    In blocks of rows of at most ``CHUNK_BYTES`` of pixels: the float work takes 12-16x their
    bytes (1,000 rows at 224 px: 3 GB at once, issue #25). The noise is drawn block after
    block from the one generator, the same numbers as one draw for all rows, so the result does
    not depend on the block size (tests/test_slices.py)."""
    from pipeline.payload import CHUNK_BYTES, rows_per

    step = rows_per(int(np.prod(images.shape[1:])), CHUNK_BYTES)
    if len(images) <= step:
        return _corrupt_block(images, name, severity, rng)
    out = np.empty_like(images)
    for start in range(0, len(images), step):
        out[start:start + step] = _corrupt_block(images[start:start + step], name, severity, rng)
    return out


def _corrupt_block(images: np.ndarray, name: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import ImageFilter

    level = LEVELS[name][severity - 1]
    x = images.astype(np.float32)
    side = images.shape[1]
    if name == "gaussian_noise":
        x = x + rng.normal(0.0, level * 255.0, size=x.shape).astype(np.float32)
    elif name == "brightness":
        x = x + level * 255.0
    elif name == "contrast":
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        x = (x - mean) * level + mean
    elif name == "blur":
        radius = level * side / 32.0
        return _per_image(images, lambda im: im.filter(ImageFilter.GaussianBlur(radius)))
    elif name == "jpeg":
        import io

        from PIL import Image

        def reencode(im):
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=int(level))
            return Image.open(io.BytesIO(buf.getvalue())).convert(im.mode)
        return _per_image(images, reencode)
    elif name == "pixelate":
        from PIL import Image

        small = max(1, int(round(side * level)))
        return _per_image(images, lambda im: im.resize((small, small), Image.Resampling.BOX)
                          .resize(im.size, Image.Resampling.NEAREST))
    else:
        raise ValueError(f"unknown image corruption {name!r}")
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def corrupt_table(features: np.ndarray, name: str, severity: int, rng: np.random.Generator,
                  train_mean: np.ndarray, train_std: np.ndarray) -> np.ndarray:
    level = LEVELS[name][severity - 1]
    x = np.array(features, dtype=np.float32, copy=True)
    if name == "feature_noise":
        return x + rng.normal(0.0, 1.0, size=x.shape).astype(np.float32) * (level * train_std).astype(np.float32)
    if name == "missing_values":
        lost = rng.random(x.shape) < level
        return np.where(lost, train_mean.astype(np.float32)[None, :], x)
    raise ValueError(f"unknown table corruption {name!r}")


def sample_rows(n: int, limit: int, seed: int) -> np.ndarray:
    """At most ``limit`` row numbers of ``n``, a seeded sample in row order."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def evaluate_robustness(spec: "RobustnessSpec", test: "Dataset", train: "Optional[Dataset]",
                        predict: Callable[["Dataset"], np.ndarray]) -> dict[str, Any]:
    """Accuracy under every corruption of ``spec`` that fits the data (image or table) at
    severities 1..3. ``train`` gives a table's feature statistics; ``predict(ds)`` the predicted
    classes of a dataset's rows (the plain network, through ``ModelInputs``). Returns
    ``table`` (corruption, severity, accuracy, drop), ``per_corruption`` (mean over
    severities), ``mean`` (over corruptions), ``clean`` and ``rows``."""
    import pandas as pd

    sample = test.take(sample_rows(len(test), spec.rows, spec.seed))
    labels = sample.manifest["label"].to_numpy()
    images = sample.images is not None
    if images:
        clean_x = np.ascontiguousarray(sample.images)
        names = [c for c in spec.corruptions if c in IMAGE_CORRUPTIONS]
    else:
        clean_x = sample.features.to_numpy(dtype=np.float32)
        names = [c for c in spec.corruptions if c in TABLE_CORRUPTIONS]
        tr = train.features.to_numpy(dtype=np.float64) if train is not None and len(train) else clean_x.astype(np.float64)
        mean, std = np.nanmean(tr, axis=0), np.nanstd(tr, axis=0)

    def accuracy(x: np.ndarray) -> float:
        if not len(labels):
            return 0.0
        ds = (replace(sample, images=x) if images
              else replace(sample, features=pd.DataFrame(x, columns=sample.features.columns)))
        return float((np.asarray(predict(ds)) == labels).mean())

    clean = accuracy(clean_x)
    records = []
    for name in names:
        for severity in (1, 2, 3):
            # One generator per corruption and severity: adding one leaves the others as they were.
            rng = np.random.default_rng([spec.seed, severity, *name.encode()])
            x = (corrupt_images(clean_x, name, severity, rng) if images
                 else corrupt_table(clean_x, name, severity, rng, mean, std))
            acc = accuracy(x)
            records.append({"corruption": name, "severity": severity, "accuracy": acc, "drop": clean - acc})
    table = pd.DataFrame(records, columns=["corruption", "severity", "accuracy", "drop"])
    per = table.groupby("corruption", sort=False)["accuracy"].mean() if len(table) else pd.Series(dtype=float)
    return {"table": table, "per_corruption": {str(k): float(v) for k, v in per.items()},
            "mean": float(per.mean()) if len(per) else None, "clean": clean, "rows": int(len(labels))}


def figures(found: dict[str, Any]):
    """The few robustness figures metrics.json carries (the table is robustness.csv)."""
    from pipeline.artefacts import RobustnessFigures

    per = found["per_corruption"]
    worst = min(per, key=lambda k: (per[k], k)) if per else None
    return RobustnessFigures(rows=found["rows"], clean_accuracy=found["clean"], mean_accuracy=found["mean"],
                             worst_corruption=worst, worst_corruption_accuracy=None if worst is None else per[worst])


def check(found: dict[str, Any], spec: "EvaluateSpec"):
    """The blessing's robustness rule: the mean accuracy over corruptions (None: not checked)."""
    from pipeline.artefacts import Check

    if spec.min_corruption_accuracy is None:
        return []
    value = found["mean"] if found and found["mean"] is not None else 0.0
    return [Check(name="min_corruption_accuracy", metric="mean accuracy over corruptions",
                  threshold=float(spec.min_corruption_accuracy), value=float(value),
                  passed=value >= spec.min_corruption_accuracy)]


def robustness_png(table: "pd.DataFrame", title: str) -> bytes:
    """Accuracy per corruption, one line per corruption over severities 0 (clean) .. 3."""
    from pipeline.plotting import new_figure, png_bytes

    fig = new_figure(6, 3.5)
    ax = fig.add_subplot()
    for name, part in table.groupby("corruption", sort=False):
        clean = float(part["accuracy"].iloc[0] + part["drop"].iloc[0])
        ax.plot([0, *part["severity"]], [clean, *part["accuracy"]], marker="o", label=str(name))
    ax.set_xticks([0, 1, 2, 3], ["clean", "1", "2", "3"])
    ax.set_xlabel("severity")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return png_bytes(fig)


def card_section(figures, spec: "EvaluateSpec") -> str:
    """The model card's lines on robustness: what was corrupted, the figures, the rule."""
    if figures is None or figures.mean_accuracy is None:
        return ""
    rule = (f" The blessing required a mean of at least {spec.min_corruption_accuracy:g}."
            if spec.min_corruption_accuracy is not None else "")
    return ("### Robustness\n\n"
            f"On {figures.rows} test rows corrupted offline at three severities (seeded; `robustness.csv` in "
            f"evaluate's outputs), accuracy averages {figures.mean_accuracy:.4f} against {figures.clean_accuracy:.4f} "
            f"uncorrupted (one view, no TTA); the worst corruption is `{figures.worst_corruption}` "
            f"({figures.worst_corruption_accuracy:.4f}).{rule} Inputs degraded like these are outside what the "
            "headline accuracy promises.\n")
