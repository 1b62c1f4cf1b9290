"""Step 4: score the trained model on the test split and decide its blessing (data/<variant>/evaluate/).

Reads ``data/<variant>/train/`` (model.json + model.safetensors) and the test split of
``data/<variant>/annotate/``. Writes, in one atomic directory:

- ``metrics.json``: accuracy, macro_f1, n_test and per-class precision/recall (for
  ``dvc metrics show/diff``);
- ``confusion.csv``: ``actual,predicted`` class names, one row per test example (DVC's
  confusion plot template);
- ``per_class.csv``: class, precision, recall, f1, support;
- ``predictions.parquet``: id, label, predicted, confidence (+ the class names);
- ``blessing.json``: every threshold of ``variants.<v>.evaluate`` with its value and
  verdict, the sha256 of the weights it judged (package checks it packages those very
  bytes), and, when a previous package exists, the change against that last blessed model.

A model that fails the thresholds is not an error here: the step exits 0 so its metrics are
recorded and visible; ``package`` is the step that refuses it.
"""

from __future__ import annotations

import sys

import pandas as pd

from pipeline.config import DEFAULT_PARAMS, load_variant
from pipeline.io import atomic_dir, sha256_file, to_json
from pipeline.manifest import read_dataset
from pipeline.models import WEIGHTS, load_trained
from pipeline.packaging import BLESSING, CONFUSION, LINEAGE, METRICS, PER_CLASS, PREDICTIONS
from pipeline.packaging.evaluation import (
    bless,
    check_compatible,
    failed_checks,
    model_inputs,
    predict_proba,
    read_baseline,
    score,
)
from pipeline.paths import step_dir


def run(variant: str, params_path: str = DEFAULT_PARAMS) -> dict:
    spec = load_variant(variant, params_path)
    model_dir, data_dir = step_dir(variant, "train"), step_dir(variant, "annotate")
    net, meta = load_trained(model_dir)
    test = read_dataset(data_dir).split("test")
    check_compatible(meta, test, model_dir, data_dir)

    tta = bool(spec.train.tta_flip and meta["input"]["kind"] == "image")
    probs = predict_proba(net, model_inputs(test), tta_flip=tta)
    classes = list(test.classes)
    labels = test.manifest["label"].to_numpy()
    s = score(probs, labels, classes)

    metrics = {
        "accuracy": s["accuracy"],
        "macro_f1": s["macro_f1"],
        "n_test": int(len(test)),
        "tta_flip": tta,
        "per_class": {c: {"precision": float(s["precision"][i]), "recall": float(s["recall"][i])}
                      for i, c in enumerate(classes)},
    }
    # The previous package's lineage is the "last blessed model". It is deliberately not a DVC
    # dependency of this stage (package depends on evaluate; that would be a cycle): the
    # comparison is informational and never changes the verdict.
    baseline = read_baseline(step_dir(variant, "package") / LINEAGE)
    blessing = bless(metrics, spec.evaluate, baseline)
    blessing["model"] = {"dir": str(model_dir), "sha256": sha256_file(model_dir / WEIGHTS),
                         "name": meta["model"]["name"]}

    predicted = s["predicted"]
    predictions = pd.DataFrame({
        "id": test.manifest["id"].astype("string").to_numpy(),
        "label": labels.astype("int64"),
        "predicted": predicted.astype("int64"),
        "confidence": s["confidence"].astype("float32"),
        "label_name": [classes[i] for i in labels],
        "predicted_name": [classes[i] for i in predicted],
    })
    per_class = pd.DataFrame({
        "class": classes,
        "precision": s["precision"], "recall": s["recall"], "f1": s["f1"], "support": s["support"],
    })

    with atomic_dir(step_dir(variant, "evaluate")) as tmp:
        (tmp / METRICS).write_text(to_json(metrics))
        (tmp / BLESSING).write_text(to_json(blessing))
        predictions[["label_name", "predicted_name"]].set_axis(["actual", "predicted"], axis=1).to_csv(
            tmp / CONFUSION, index=False)
        per_class.to_csv(tmp / PER_CLASS, index=False, float_format="%.6f")
        predictions.to_parquet(tmp / PREDICTIONS, index=False)

    print(summary_line(variant, metrics, blessing), file=sys.stderr)
    return {"metrics": metrics, "blessing": blessing}


def summary_line(variant: str, metrics: dict, blessing: dict) -> str:
    head = (f"fmpipe evaluate --stage {variant}: accuracy {metrics['accuracy']:.4f}, "
            f"macro F1 {metrics['macro_f1']:.4f} on {metrics['n_test']} test rows"
            f"{' (flip TTA)' if metrics['tta_flip'] else ''}")
    if blessing["blessed"]:
        verdict = "BLESSED"
    else:
        verdict = "NOT BLESSED: " + ", ".join(failed_checks(blessing)) + "; package will refuse it"
    change = (blessing.get("baseline") or {}).get("accuracy_change")
    if change is not None:
        verdict += f" (accuracy {change:+.4f} vs last package)"
    return f"{head} -> {verdict}"
