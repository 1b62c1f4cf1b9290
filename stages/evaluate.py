"""Step 4 glue: score the trained model on the test split and decide its blessing.

Writes ``metrics.json`` (numbers people compare: accuracy, macro F1, test rows; a DVC
metric), ``per_class.csv`` (precision/recall/F1/support per class; a DVC plot),
``confusion.csv`` (actual/predicted per test row; DVC's confusion template),
``predictions.parquet`` and ``blessing.json`` (every threshold with its value and verdict, and
the sha256 of the weights judged: package packages those very bytes). Scoring and the gate
live in ``pipeline/packaging/evaluation.py``.

A model that fails the thresholds is not an error here: the step exits 0 so its metrics are
recorded and visible; ``package`` is the step that refuses it.
"""

from __future__ import annotations

import pandas as pd

from pipeline import steps as registry
from pipeline.io import sha256_file, to_json
from pipeline.models import WEIGHTS, load_trained
from pipeline.packaging import BLESSING, CONFUSION, LINEAGE, METRICS, PER_CLASS, PREDICTIONS
from pipeline.packaging.evaluation import (
    binary_scores,
    bless,
    check_compatible,
    failed_checks,
    model_inputs,
    predict_proba,
    read_baseline,
    score,
    tta_description,
)
from pipeline.runner import step_path
from pipeline.training.recipe import tta_record


def run(ctx) -> None:
    model_dir, data_dir = ctx.input("train/model.json").parent, ctx.input("annotate")
    net, meta = load_trained(model_dir)
    test = ctx.dataset("annotate").split("test")
    check_compatible(meta, test, model_dir, data_dir)

    # The TTA views the model is to be served with, as recorded in model.json (older models
    # without the record: the train.tta_flip switch).
    tta = meta.get("tta") if meta["input"]["kind"] == "image" else None
    if tta is None and "tta" not in meta and meta["input"]["kind"] == "image":
        tta_spec = ctx.spec.train.tta_spec()
        tta = tta_record(tta_spec) if tta_spec is not None else None
    head = meta["model"].get("head", "softmax")
    probs = predict_proba(net, model_inputs(test), tta=tta, head=head)
    classes = list(test.classes)
    labels = test.manifest["label"].to_numpy()
    s = score(probs, labels, classes)

    metrics = {"accuracy": s["accuracy"], "macro_f1": s["macro_f1"], "n_test": int(len(test))}
    if len(classes) == 2:
        metrics["binary"] = binary_scores(probs, labels, ctx.spec.evaluate.binary_threshold)
    views = (tta or {}).get("views") or []
    # The previous package's lineage is the "last blessed model". It is deliberately not a DVC
    # dependency of this stage (package depends on evaluate; that would be a cycle): the
    # comparison is informational and never changes the verdict.
    baseline = read_baseline(step_path(registry.get("package").dir, ctx.variant) / LINEAGE)
    # Not a declared input either, so the comparison stays out of blessing.json (hashed, and
    # embedded in the package): it goes to the uncached run record.
    blessing = bless(metrics, ctx.spec.evaluate)
    ctx.details["baseline"] = bless(metrics, ctx.spec.evaluate, baseline).get("baseline")
    blessing["tta_flip"] = any(v["flip"] for v in views)
    blessing["tta_views"] = max(1, len(views))
    blessing["tta"] = tta_description(tta)
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

    out = ctx.out
    (out / METRICS).write_text(to_json(metrics))
    (out / BLESSING).write_text(to_json(blessing))
    predictions[["label_name", "predicted_name"]].set_axis(["actual", "predicted"], axis=1).to_csv(
        out / CONFUSION, index=False)
    per_class.to_csv(out / PER_CLASS, index=False, float_format="%.6f")
    predictions.to_parquet(out / PREDICTIONS, index=False)
    ctx.summary = summary_line(metrics, blessing, ctx.details["baseline"])
    ctx.result = {"metrics": metrics, "blessing": blessing, "baseline": ctx.details["baseline"]}


def summary_line(metrics: dict, blessing: dict, baseline: dict | None = None) -> str:
    tta = f" ({blessing['tta']})" if blessing.get("tta") else ""
    head = (f"accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f} on "
            f"{metrics['n_test']} test rows{tta}")
    b = metrics.get("binary")
    if b and b.get("roc_auc") is not None:
        head += f", ROC-AUC {b['roc_auc']:.4f}, PR-AUC {b['pr_auc']:.4f}, F1 {b['f1']:.4f} at p >= {b['threshold']:g}"
    if blessing["blessed"]:
        verdict = "BLESSED"
    else:
        verdict = "NOT BLESSED: " + ", ".join(failed_checks(blessing)) + "; package will refuse it"
    change = (baseline or {}).get("accuracy_change")
    if change is not None:
        verdict += f" (accuracy {change:+.4f} vs last package)"
    return f"{head} -> {verdict}"
