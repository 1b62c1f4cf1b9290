"""Static pictures (PNG) of the plots people look at, drawn with matplotlib's Agg backend.

They open anywhere: in the report, in ``dvc plots show`` (as image plots, no JavaScript), in a
file browser. Each function takes plain data and returns PNG bytes; the files carry no
timestamp or software tag, so the same data and matplotlib version give the same bytes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from pipeline.plotting import new_figure, png_bytes


def confusion_png(matrix: np.ndarray, classes: Sequence[str], title: str = "Confusion matrix (test)") -> bytes:
    """Counts per (actual row, predicted column), with the count written in every non-empty cell."""
    matrix = np.asarray(matrix)
    n = len(classes)
    side = min(9.0, max(3.5, 0.55 * n + 2))
    fig = new_figure(side + 1, side)
    ax = fig.add_subplot()
    im = ax.imshow(matrix, cmap="Blues", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n), labels=list(classes), rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_yticks(range(n), labels=list(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    if n <= 30:
        top = matrix.max() if matrix.size else 0
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=8,
                            color="white" if matrix[i, j] > top / 2 else "black")
    return png_bytes(fig, tight=True)


def per_class_png(classes: Sequence[str], values: dict[str, Sequence[float]], title: str = "Per-class F1 (test)") -> bytes:
    """Horizontal bars per class for each metric in ``values`` (e.g. f1, precision, recall)."""
    classes = list(classes)
    names = list(values)
    fig = new_figure(6.5, max(2.2, 0.28 * len(classes) * max(1, len(names)) + 1.0))
    ax = fig.add_subplot()
    height = 0.8 / max(1, len(names))
    y = np.arange(len(classes))
    for k, name in enumerate(names):
        ax.barh(y + k * height - 0.4 + height / 2, values[name], height=height, label=name)
    ax.set_yticks(y, labels=classes)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.0)
    ax.set_xlabel("score")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    if len(names) > 1:
        ax.legend(loc="lower right", fontsize=8)
    return png_bytes(fig, tight=True)


def curves_png(series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str = "Training curves") -> bytes:
    """One panel per quantity (loss, accuracy, ...), train and val drawn together.

    ``series`` maps a metric name such as ``train/loss`` or ``val/acc`` to (steps, values);
    names are grouped by their last path part, so ``train/loss`` and ``val/loss`` share a panel.
    """
    groups: dict[str, list[str]] = {}
    for name in series:
        groups.setdefault(name.rsplit("/", 1)[-1], []).append(name)
    panels = sorted(groups)
    cols = min(2, max(1, len(panels)))
    rows = (len(panels) + cols - 1) // cols
    fig = new_figure(4.2 * cols, 3.0 * rows + 0.4)
    # Constrained layout keeps the figure title clear of the panels' own titles.
    fig.set_layout_engine("constrained")
    for k, panel in enumerate(panels):
        ax = fig.add_subplot(rows, cols, k + 1)
        for name in sorted(groups[panel]):
            x, y = series[name]
            ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, label=name)
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontweight="bold")
    return png_bytes(fig, tight=True)


def reliability_png(confidence: np.ndarray, correct: np.ndarray, bins: int = 10,
                    title: str = "Reliability (test)") -> bytes:
    """Accuracy against mean confidence per confidence bin, with the diagonal of perfect calibration."""
    confidence = np.asarray(confidence, dtype=float)
    correct = np.asarray(correct, dtype=float)
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    fig = new_figure(4.5, 4.2)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect")
    xs, ys, ns = [], [], []
    for b in range(bins):
        m = idx == b
        if m.any():
            xs.append(confidence[m].mean()); ys.append(correct[m].mean()); ns.append(int(m.sum()))
    ax.plot(xs, ys, marker="o", label="model")
    ax.set_xlim(0, 1); ax.set_ylim(0, 1)
    ax.set_xlabel("confidence"); ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return png_bytes(fig, tight=True)


def counts_png(table: dict[str, dict[str, int]], title: str = "Rows per split and class") -> bytes:
    """Grouped bars: one group per class, one bar per split."""
    splits = list(table)
    classes: list[str] = []
    for s in splits:
        for c in table[s]:
            if c not in classes:
                classes.append(c)
    fig = new_figure(min(12, max(5, 0.5 * len(classes) + 3)), 3.2)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(splits))
    x = np.arange(len(classes))
    for k, s in enumerate(splits):
        ax.bar(x + k * width - 0.4 + width / 2, [table[s].get(c, 0) for c in classes], width=width, label=s)
    ax.set_xticks(x, labels=classes, rotation=45 if len(classes) > 6 else 0,
                  ha="right" if len(classes) > 6 else "center")
    ax.set_ylabel("rows")
    ax.set_title(title)
    # Outside the axes: with balanced classes any corner inside would cover a bar.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return png_bytes(fig, tight=True)
