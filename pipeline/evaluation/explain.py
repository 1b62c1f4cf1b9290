"""Explanations: where the network looked when it was most confidently wrong (images), and which
features it leans on (tables).

- Images: Captum's Integrated Gradients (black image as the baseline, ``steps`` points on the
  path) for the most confident mistakes on the test split, towards the class the model chose;
  drawn beside each image as a heat map (``details/explanations.png``); the same for examples
  of the worst slice, its mistakes first (``details/explanations_worst_slice.png``). The review
  step draws them for the top of its queue (``pipeline/review/review.py``).
- Tables: scikit-learn's permutation importance on the test split (accuracy lost when one
  feature's column is shuffled, ``repeats`` times, seeded): ``details/importance.csv``.

Both are deterministic on a CPU (no sampling in IG; seeded shuffles), so they sit among the
hashed outputs. Captum and scikit-learn, not hand-written attribution code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import torch

    from pipeline.config import ExplainSpec


def confident_mistakes(labels: np.ndarray, predicted: np.ndarray, confidence: np.ndarray, limit: int) -> np.ndarray:
    """Row numbers of the ``limit`` most confident mistakes, most confident first (ties by row)."""
    wrong = np.flatnonzero(np.asarray(labels) != np.asarray(predicted))
    order = np.lexsort((wrong, -np.asarray(confidence)[wrong]))
    return wrong[order][:limit]


def integrated_gradients(net: "torch.nn.Module", x: "torch.Tensor", targets: np.ndarray, steps: int) -> np.ndarray:
    """|attribution| summed over channels, N x H x W, for inputs ``x`` (N x C x H x W raw pixels)."""
    import torch
    from captum.attr import IntegratedGradients

    from pipeline.models import batch_rows

    if len(x) == 0:
        return np.zeros((0, *x.shape[2:]), np.float32)
    net.eval()
    # The path's points in batches whose kept activations fit the budget (8 mistakes x 32 steps
    # of cnn_small at 224 px would keep 16 GB at once); Captum takes no fewer than one point
    # per input at a time. The shipped models at their sizes keep the one batch of all points.
    internal = max(len(x), batch_rows(net, tuple(x.shape[1:]), max(len(x), steps), backward=True))
    ig = IntegratedGradients(net)
    attr = ig.attribute(x.float(), baselines=torch.zeros_like(x, dtype=torch.float32),
                        target=torch.as_tensor(np.asarray(targets, dtype=np.int64)), n_steps=steps,
                        internal_batch_size=internal)
    return attr.detach().abs().sum(dim=1).float().numpy()


def explanations_png(images: np.ndarray, maps: np.ndarray, captions: list[str], title: str) -> bytes:
    """Each image beside its attribution heat map, two columns of pairs."""
    from pipeline.plotting import new_figure, png_bytes

    n = len(images)
    cols = 2
    rows = max(1, (n + cols - 1) // cols)
    fig = new_figure(7, 1.9 * rows + 0.4)
    axes = fig.subplots(rows, 2 * cols, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(n):
        r, c = divmod(i, cols)
        img = images[i]
        axes[r][2 * c].imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                              vmin=0, vmax=255)
        axes[r][2 * c].set_title(captions[i], fontsize=7)
        peak = float(maps[i].max()) or 1.0
        axes[r][2 * c + 1].imshow(maps[i] / peak, cmap="inferno", vmin=0, vmax=1)
        axes[r][2 * c + 1].set_title("integrated gradients", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return png_bytes(fig)


def permutation_importance(features: "pd.DataFrame", labels: np.ndarray, predict: Callable[[np.ndarray], np.ndarray],
                           spec: "ExplainSpec") -> "pd.DataFrame":
    """Accuracy lost per shuffled feature (scikit-learn's ``permutation_importance``), largest first."""
    import pandas as pd
    from sklearn.inspection import permutation_importance as sk_importance

    class _Model:  # scikit-learn asks only for an object its scorer can call
        def fit(self, *_):  # pragma: no cover - never called
            return self

    def accuracy(_model, x, y) -> float:
        return float((np.asarray(predict(np.asarray(x, dtype=np.float32))) == np.asarray(y)).mean())

    x = features.to_numpy(dtype=np.float32)
    found = sk_importance(_Model(), x, np.asarray(labels), scoring=accuracy, n_repeats=spec.repeats,
                          random_state=spec.seed)
    table = pd.DataFrame({"feature": [str(c) for c in features.columns],
                          "importance": found.importances_mean, "std": found.importances_std})
    return table.sort_values(["importance", "feature"], ascending=[False, True], kind="stable").reset_index(drop=True)


def worst_slice_examples(labels: np.ndarray, predicted: np.ndarray, confidence: np.ndarray, rows: np.ndarray,
                         limit: int) -> np.ndarray:
    """Up to ``limit`` of the worst slice's ``rows``: its mistakes, most confident first, then
    its least confident right answers (what the slice's failures look like, and its near misses)."""
    rows = np.asarray(rows, dtype=np.int64)
    wrong = rows[np.asarray(labels)[rows] != np.asarray(predicted)[rows]]
    right = rows[np.asarray(labels)[rows] == np.asarray(predicted)[rows]]
    conf = np.asarray(confidence)
    wrong = wrong[np.lexsort((wrong, -conf[wrong]))]
    right = right[np.lexsort((right, conf[right]))]
    return np.concatenate([wrong, right])[:limit]


def _explained_png(net, test, rows: np.ndarray, labels, predicted, confidence, classes, steps: int,
                   title: str) -> tuple[Optional[bytes], list[str]]:
    from pipeline.inference.network import model_inputs

    if not len(rows):
        return None, []
    part = test.take(rows)
    maps = integrated_gradients(net, model_inputs(part), predicted[rows], steps)
    ids = part.manifest["id"].astype(str).tolist()
    captions = [f"{i}: {classes[labels[r]]} -> {classes[predicted[r]]} ({confidence[r]:.2f})" for i, r in zip(ids, rows)]
    return explanations_png(np.asarray(part.images), maps, captions, title), ids


def explain(spec: "ExplainSpec", net, test, labels: np.ndarray, predicted: np.ndarray, confidence: np.ndarray,
            classes: list[str], variant: str, worst: Optional[tuple[str, np.ndarray]] = None) -> dict[str, Any]:
    """What evaluate writes: ``png`` (images: the most confident mistakes), ``worst_png`` (images:
    examples of the worst slice, ``worst`` = its name and test rows) or ``importance`` (tables),
    and the rows explained."""
    import torch

    if test.images is not None:
        rows = confident_mistakes(labels, predicted, confidence, spec.mistakes)
        png, ids = _explained_png(net, test, rows, labels, predicted, confidence, classes, spec.steps,
                                  f"{variant}: the most confident mistakes and where the model looked")
        worst_png, worst_ids = None, []
        if worst is not None and len(worst[1]):
            chosen = worst_slice_examples(labels, predicted, confidence, worst[1], spec.mistakes)
            worst_png, worst_ids = _explained_png(
                net, test, chosen, labels, predicted, confidence, classes, spec.steps,
                f"{variant}: the worst slice, {worst[0]} (mistakes first) and where the model looked")
        return {"png": png, "importance": None, "rows": ids, "worst_png": worst_png, "worst_rows": worst_ids}

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            # A copy: scikit-learn hands read-only arrays, torch wants writable memory.
            out = net.eval()(torch.from_numpy(np.array(x, dtype=np.float32))).float().numpy()
        return (out[:, 0] > 0).astype(int) if out.shape[1] == 1 else out.argmax(axis=1)

    return {"png": None, "importance": permutation_importance(test.features, labels, predict, spec), "rows": [],
            "worst_png": None, "worst_rows": []}


def card_section(details_dir) -> str:
    """The model card's lines on explanations: a table's feature importance, or where the image
    attributions are."""
    from pathlib import Path

    import pandas as pd

    from pipeline.filenames import EXPLANATIONS_PNG, EXPLANATIONS_WORST_PNG, IMPORTANCE_CSV

    details = Path(details_dir)
    if (details / IMPORTANCE_CSV).is_file():
        t = pd.read_csv(details / IMPORTANCE_CSV)
        rows = "\n".join(f"| `{r.feature}` | {r.importance:.4f} | {r.std:.4f} |" for r in t.itertuples())
        return ("### What the model leans on\n\nPermutation importance on the test split (accuracy lost when one "
                "feature is shuffled; scikit-learn, seeded):\n\n| feature | importance | std |\n|---|---:|---:|\n"
                f"{rows}\n")
    shown = [f"of the most confident test mistakes (`details/{EXPLANATIONS_PNG}`)"] \
        if (details / EXPLANATIONS_PNG).is_file() else []
    if (details / EXPLANATIONS_WORST_PNG).is_file():
        shown.append(f"of examples of the worst slice, its mistakes first (`details/{EXPLANATIONS_WORST_PNG}`)")
    if shown:
        return ("### What the model looked at\n\nIntegrated Gradients (Captum) " + " and ".join(shown)
                + " are in evaluate's outputs and the report.\n")
    return ""
