"""Step 4 glue: score the trained model on the test split and decide its blessing.

Writes ``metrics.json`` (every score: accuracy, macro F1, test rows, ECE and the
temperature; for two-class models ROC-AUC, PR-AUC and F1), ``figures.json`` (the DVC metric:
the few figures compared across runs, keyed by variant; ``compare_figures``), ``per_class.csv``
(precision/recall/F1/support per class; a DVC plot), ``confusion.csv`` (actual/predicted per
test row; DVC's confusion template), ``predictions.parquet`` (with every class probability) and
``blessing.json`` (every threshold with its value and verdict, the TTA used, and the sha256 of
the weights judged: package packages those very bytes; a pure function of the declared
inputs). Also ``details/``: ``calibration.json`` (temperature fitted on val when
``temperature_scaling`` is on, ECE, reliability bins), ``reliability.png`` and, for image
variants, ``mistakes.html``. The change against the last blessed model (the previous
package, not a declared input) goes to the runner's run record ``data/runs/<v>/evaluate.json``
(``baseline``), printed in the table, never into a declared output. Scoring and the gate live in ``pipeline/packaging/evaluation.py``, calibration
in ``calibration.py``; probabilities come from ``pipeline.inference.probabilities``, the same
function predict and serve use.

A model that fails the thresholds is not an error here: the step exits 0 so its metrics are
recorded and visible; ``package`` is the step that refuses it.
"""

from __future__ import annotations

import pandas as pd
import torch

from pipeline import steps as registry
from pipeline.artefacts import BinaryMetrics, Blessing, JudgedModel, MembershipAudit, Metrics, PrivacySpent
from pipeline.errors import FmpipeError
from pipeline.io import sha256_file, to_json
from pipeline.models import WEIGHTS, load_trained
from pipeline.packaging import (BLESSING, CALIBRATION, CONFUSION, DETAILS, FIGURES, LINEAGE, METRICS,
                                MISTAKES, PER_CLASS, PREDICTIONS, RELIABILITY_PNG)
from pipeline.packaging.calibration import calibrate, reliability_png
from pipeline.packaging.evaluation import (
    binary_scores,
    bless,
    check_compatible,
    compare_figures,
    effective_tta,
    model_inputs,
    predict_logits,
    score,
    tta_description,
)
from pipeline.packaging.gallery import render_gallery
from pipeline.packaging.summary import comparison, last_blessed_lineage, read_last_blessed, render_table
from pipeline.runner import step_path


def run(ctx) -> None:
    model_dir, data_dir = ctx.input("train/model.json").parent, ctx.input("annotate")
    net, meta = load_trained(model_dir)
    ds = ctx.dataset("annotate")
    test = ds.split("test")
    check_compatible(meta, test, model_dir, data_dir)
    ev = ctx.spec.evaluate

    tta = effective_tta(meta, ctx.spec.train)
    logits = predict_logits(net, model_inputs(test), tta)
    classes = list(test.classes)
    labels = test.manifest["label"].to_numpy()
    val_scores = None
    if ev.temperature_scaling:
        val = ds.split("val")
        if len(val) == 0:
            raise FmpipeError(f"{data_dir}: the val split is empty; temperature_scaling "
                              f"(params.yaml: variants.{ctx.variant}.evaluate) needs it")
        val_scores = (predict_logits(net, model_inputs(val), tta), val.manifest["label"].to_numpy())
    probs_np, calibration = calibrate(logits, labels, val_scores, ev.temperature_scaling,
                                      ev.calibration_bins, tta)
    probs = torch.from_numpy(probs_np)
    s = score(probs, labels, classes)

    metrics = Metrics(accuracy=s["accuracy"], macro_f1=s["macro_f1"], n_test=len(test),
                      ece=calibration["ece"], temperature=calibration["temperature"])
    if len(classes) == 2:
        metrics.binary = BinaryMetrics(**binary_scores(probs, labels, ev.binary_threshold))
    if meta.get("privacy"):
        metrics.privacy = PrivacySpent(epsilon=meta["privacy"]["epsilon"], delta=meta["privacy"]["delta"])
    if ev.membership_rows:
        metrics.membership = membership_audit(net, meta, ds, ev.membership_rows)
    views = (tta or {}).get("views") or []
    weights_sha = sha256_file(model_dir / WEIGHTS)
    blessing = bless(metrics, ev, JudgedModel(dir=str(model_dir), sha256=weights_sha, name=meta["model"]["name"]),
                     tta=tta_description(tta), tta_views=max(1, len(views)), tta_flip=any(v["flip"] for v in views))
    # The previous package is the "last blessed model". It is not a DVC dependency of this
    # step (package depends on evaluate; the reverse would be a cycle), so the comparison goes
    # to the runner's run record (data/runs/<v>/evaluate.json), never into a declared output:
    # even an uncached one's hash is in dvc.lock, and this one depends on what ran before.
    package_lineage = step_path(registry.get("package").dir, ctx.variant) / LINEAGE
    compared = comparison(metrics, read_last_blessed(package_lineage), weights_sha)
    # The whole lineage of that package, for the report's "What changed since the last blessed
    # package" (fmpipe compare's content): same rule, run record only.
    ctx.details["last_blessed"] = last_blessed_lineage(
        package_lineage, step_path(registry.get("evaluate").run_record, ctx.variant), weights_sha)

    predicted = s["predicted"]
    predictions = pd.DataFrame({
        "id": test.manifest["id"].astype("string").to_numpy(),
        "label": labels.astype("int64"),
        "predicted": predicted.astype("int64"),
        "confidence": s["confidence"].astype("float32"),
        "probabilities": list(probs_np.astype("float32")),
        "label_name": [classes[i] for i in labels],
        "predicted_name": [classes[i] for i in predicted],
    })
    per_class = pd.DataFrame({
        "class": classes,
        "precision": s["precision"], "recall": s["recall"], "f1": s["f1"], "support": s["support"],
    })

    out = ctx.out
    metrics.write(out / METRICS)
    (out / FIGURES).write_text(to_json(compare_figures(ctx.variant, metrics, meta.get("training"))))
    blessing.write(out / BLESSING)
    predictions[["label_name", "predicted_name"]].set_axis(["actual", "predicted"], axis=1).to_csv(
        out / CONFUSION, index=False)
    per_class.to_csv(out / PER_CLASS, index=False, float_format="%.6f")
    predictions.to_parquet(out / PREDICTIONS, index=False)
    ctx.details["baseline"] = compared
    details = out / DETAILS
    details.mkdir()
    (details / CALIBRATION).write_text(to_json(calibration))
    (details / RELIABILITY_PNG).write_bytes(reliability_png(
        calibration["bins"], f"{ctx.variant}: reliability (test, ECE {calibration['ece']:.4f}, "
                             f"T {calibration['temperature']:.3g})"))
    if test.images is not None:
        (details / MISTAKES).write_text(render_gallery(
            variant=ctx.variant, images=test.images, ids=list(predictions["id"]), labels=labels,
            probs=probs_np, classes=classes, limit=ev.gallery_size, n_test=len(test)))
    render_table(ctx.variant, metrics, per_class.to_dict("records"), blessing, compared)
    ctx.summary = summary_line(metrics, blessing, compared)
    ctx.result = {"metrics": metrics.model_dump(exclude_none=True), "blessing": blessing.model_dump(exclude_none=True),
                  "comparison": compared, "calibration": calibration}


def membership_audit(net, meta: dict, ds, limit: int) -> MembershipAudit:
    """The loss-threshold attack: train rows (members) against val + test rows, at most
    ``limit`` of each (seeded sample), scored on the plain network's logits."""
    import numpy as np

    from pipeline.packaging import membership as M

    head = meta["model"].get("head", "softmax")
    losses = {}
    for side, splits in (("members", ("train",)), ("nonmembers", ("val", "test"))):
        part = ds.take(ds.manifest["split"].isin(splits).to_numpy())
        part = part.take(M.sample_rows(len(part), limit))
        logits = predict_logits(net, model_inputs(part)) if len(part) else np.zeros((0, 1))
        losses[side] = M.per_row_loss(logits, part.manifest["label"].to_numpy(), head)
    result = M.audit(losses["members"], losses["nonmembers"])
    result.pop("attack")
    return MembershipAudit(**result)


def summary_line(metrics: Metrics, blessing: Blessing, compared: dict | None = None) -> str:
    tta = f" ({blessing.tta})" if blessing.tta else ""
    head = f"accuracy {metrics.accuracy:.4f}, macro F1 {metrics.macro_f1:.4f} on {metrics.n_test} test rows{tta}"
    b = metrics.binary
    if b and b.roc_auc is not None:
        head += f", ROC-AUC {b.roc_auc:.4f}, PR-AUC {b.pr_auc:.4f}, F1 {b.f1:.4f} at p >= {b.threshold:g}"
    if metrics.privacy is not None:
        head += f"; DP epsilon {metrics.privacy.epsilon:.3g} at delta {metrics.privacy.delta:.2g}"
    mia = metrics.membership
    if mia is not None and mia.auc is not None:
        head += f"; membership attack AUC {mia.auc:.3f}, TPR {mia.tpr_at_1pct_fpr:.3f} at 1% FPR"
    if blessing.blessed:
        verdict = "BLESSED"
    else:
        verdict = "NOT BLESSED: " + ", ".join(blessing.failed()) + "; package will refuse it"
    change = ((compared or {}).get("changes") or {}).get("accuracy")
    if change is not None:
        verdict += f" (accuracy {change:+.4f} vs last package)"
    return f"{head} -> {verdict}"
