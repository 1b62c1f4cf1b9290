"""The evaluate step: score a trained network on the test split and decide its blessing.

``evaluate`` computes everything in memory (probabilities through ``pipeline.inference``, the
one path predict and serve share; calibration; scores; the membership audit; the blessing;
the comparison with the last blessed package), ``Evaluation.write`` writes the declared
outputs (see ``stages/evaluate.py``). The comparison and the last package's lineage depend on
what ran before, so they go to the run record only, never into a declared output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from pipeline.artefacts import BinaryMetrics, Blessing, JudgedModel, MembershipAudit, Metrics, PrivacySpent
from pipeline.errors import FmpipeError
from pipeline.evaluation.blessing import bless
from pipeline.evaluation.calibration import calibrate, reliability_png
from pipeline.evaluation.metrics import binary_scores, compare_figures, score
from pipeline.evaluation.summary import comparison, last_blessed_lineage, read_last_blessed
from pipeline.evaluation import slices
from pipeline.filenames import (BLESSING, CALIBRATION, CONFUSION, DETAILS, DISCOVERED, EXPLANATIONS_PNG,
                                EXPLANATIONS_WORST_PNG, FIGURES,
                                IMPORTANCE_CSV, METRICS, MISTAKES,
                                PER_CLASS, PREDICTIONS, RELIABILITY_PNG, ROBUSTNESS_CSV, ROBUSTNESS_PNG, SLICES_CSV,
                                SLICES_PNG)
from pipeline.inference.batch import forward
from pipeline.inference.network import ModelInputs, check_compatible, penultimate, predict_logits
from pipeline.inference.tta import effective_tta, tta_description
from pipeline.io import sha256_file, to_json
from pipeline.models import WEIGHTS
from pipeline.resources import release_freed_cpu_memory


@dataclass
class Evaluation:
    """What evaluate found: the declared outputs' content and the run record's extras."""

    variant: str
    metrics: Metrics
    blessing: Blessing
    calibration: dict[str, Any]
    predictions: pd.DataFrame  # one row per test row, every class probability
    per_class: pd.DataFrame
    figures: dict[str, Any]
    compared: Optional[dict[str, Any]]  # against the last blessed package (run record only)
    last_blessed: Any  # that package's lineage (run record only)
    gallery: Optional[str]  # mistakes.html (image variants)
    slices: dict[str, Any]  # pipeline.evaluation.slices.evaluate_slices
    robustness: Optional[dict[str, Any]] = None  # pipeline.evaluation.robustness.evaluate_robustness
    explained: Optional[dict[str, Any]] = None  # pipeline.evaluation.explain.explain

    def write(self, out: Path) -> None:
        """The declared outputs, into ``out``."""
        self.metrics.write(out / METRICS)
        (out / FIGURES).write_text(to_json(self.figures))
        self.blessing.write(out / BLESSING)
        self.predictions[["label_name", "predicted_name"]].set_axis(["actual", "predicted"], axis=1).to_csv(
            out / CONFUSION, index=False)
        self.per_class.to_csv(out / PER_CLASS, index=False, float_format="%.6f")
        self.predictions.to_parquet(out / PREDICTIONS, index=False)
        details = out / DETAILS
        details.mkdir()
        cal = self.calibration
        (details / CALIBRATION).write_text(to_json(cal))
        (details / RELIABILITY_PNG).write_bytes(reliability_png(
            cal["bins"], f"{self.variant}: reliability (test, ECE {cal['ece']:.4f}, T {cal['temperature']:.3g})"))
        if self.gallery is not None:
            (details / MISTAKES).write_text(self.gallery)
        table = self.slices["table"]
        table.to_csv(out / SLICES_CSV, index=False, float_format="%.6f")
        if len(table):
            (details / SLICES_PNG).write_bytes(slices.slices_png(
                table, f"{self.variant}: accuracy per slice (test, {self.metrics.n_test} rows)"))
        if self.slices["discovered"] is not None:
            (details / DISCOVERED).write_text(to_json(self.slices["discovered"]))
        if self.explained is not None and self.explained["png"] is not None:
            (details / EXPLANATIONS_PNG).write_bytes(self.explained["png"])
        if self.explained is not None and self.explained.get("worst_png") is not None:
            (details / EXPLANATIONS_WORST_PNG).write_bytes(self.explained["worst_png"])
        if self.explained is not None and self.explained["importance"] is not None:
            self.explained["importance"].to_csv(details / IMPORTANCE_CSV, index=False, float_format="%.6f")
        if self.robustness is not None:
            from pipeline.evaluation import robustness

            rob = self.robustness["table"]
            rob.to_csv(out / ROBUSTNESS_CSV, index=False, float_format="%.6f")
            if len(rob):
                (details / ROBUSTNESS_PNG).write_bytes(robustness.robustness_png(
                    rob, f"{self.variant}: accuracy under corruptions ({self.robustness['rows']} test rows)"))

    def result(self) -> dict[str, Any]:
        return {"metrics": self.metrics.model_dump(exclude_none=True),
                "blessing": self.blessing.model_dump(exclude_none=True),
                "comparison": self.compared, "calibration": self.calibration}

    def summary_line(self) -> str:
        return summary_line(self.metrics, self.blessing, self.compared)


def evaluate(*, variant: str, spec, net, meta: dict[str, Any], ds, model_dir: Path, data_dir: Path,
             last_package: Path, last_run_record: Path, flagged: Optional[set] = None,
             engine: str = "local") -> Evaluation:
    """Score ``net`` (loaded from ``model_dir``) on ``ds``'s test split under ``spec.evaluate``.

    ``last_package``: the previous package's ``lineage.json`` (the "last blessed model");
    ``last_run_record``: evaluate's run record, which keeps that lineage between runs;
    ``flagged``: the ids clean flagged (a slice; ``slices.flagged_ids``); ``engine``: where the
    test and val forward passes run (``pipeline.inference.batch``; the same logits either way).
    """
    from pipeline.evaluation.gallery import render_gallery

    test = ds.split("test")
    check_compatible(meta, test, model_dir, data_dir)
    ev = spec.evaluate

    tta = effective_tta(meta, spec.train)
    split_of = ds.manifest["split"].to_numpy()

    def split_logits(name: str):
        return forward(net, ds, model_dir, data_dir, np.flatnonzero(split_of == name), tta=tta, engine=engine)

    logits = split_logits("test")
    classes = list(test.classes)
    labels = test.manifest["label"].to_numpy()
    val_scores = None
    if ev.temperature_scaling:
        val = ds.split("val")
        if len(val) == 0:
            raise FmpipeError(f"{data_dir}: the val split is empty; temperature_scaling "
                              f"(params.yaml: variants.{variant}.evaluate) needs it")
        val_scores = (split_logits("val"), val.manifest["label"].to_numpy())
    probs_np, calibration = calibrate(logits, labels, val_scores, ev.temperature_scaling,
                                      ev.calibration_bins, tta)
    s = score(probs_np, labels, classes)

    metrics = Metrics(accuracy=s["accuracy"], macro_f1=s["macro_f1"], n_test=len(test),
                      ece=calibration["ece"], temperature=calibration["temperature"])
    if len(classes) == 2:
        metrics.binary = BinaryMetrics(**binary_scores(probs_np, labels, ev.binary_threshold))
    if meta.get("privacy"):
        metrics.privacy = PrivacySpent(epsilon=meta["privacy"]["epsilon"], delta=meta["privacy"]["delta"])
    if ev.membership_rows:
        metrics.membership = membership_audit(net, meta, ds, ev.membership_rows)
        # Each phase's kept activations are not the next one's (forward releases its own).
        release_freed_cpu_memory()
    sliced = slices.evaluate_slices(ev.slices, test.manifest, labels, s["predicted"], len(classes),
                                    features=test.features, flagged=flagged,
                                    embed=lambda: penultimate(net, ModelInputs(test)))
    metrics.slices = sliced["figures"]
    release_freed_cpu_memory()
    explained = None
    if ev.explain is not None:
        from pipeline.evaluation import explain

        worst = sliced["found"]["worst"]
        explained = explain.explain(ev.explain, net, test, labels, s["predicted"], s["confidence"], classes, variant,
                                    worst=None if worst is None else (worst["name"], sliced["worst_rows"]))
        release_freed_cpu_memory()
    rob = None
    if ev.robustness is not None:
        from pipeline.evaluation import robustness

        rob = robustness.evaluate_robustness(
            ev.robustness, test, ds.split("train") if test.features is not None else None,
            lambda part: predict_logits(net, ModelInputs(part)).argmax(axis=1))
        metrics.robustness = robustness.figures(rob)
        release_freed_cpu_memory()
    views = (tta or {}).get("views") or []
    weights_sha = sha256_file(model_dir / WEIGHTS)
    blessing = bless(metrics, ev, JudgedModel(dir=str(model_dir), sha256=weights_sha, name=meta["model"]["name"]),
                     tta=tta_description(tta), tta_views=max(1, len(views)), tta_flip=any(v["flip"] for v in views),
                     extra=[*slices.slice_checks(sliced["found"], ev), *_robustness_checks(rob, ev)])
    # The previous package is the "last blessed model". It is not a DVC dependency of this
    # step (package depends on evaluate; the reverse would be a cycle), so the comparison goes
    # to the runner's run record (data/runs/<v>/evaluate.json), never into a declared output:
    # even an uncached one's hash is in dvc.lock, and this one depends on what ran before.
    compared = comparison(metrics, read_last_blessed(last_package), weights_sha)
    # The change thresholds package will apply against that same package, said here first.
    compared["slices"] = slices.change_against(Path(last_package).parent, sliced["table"], metrics.accuracy,
                                               weights_sha, ev)
    # The whole lineage of that package, for the report's "What changed since the last blessed
    # package" (fmpipe compare's content): same rule, run record only.
    last_blessed = last_blessed_lineage(last_package, last_run_record, weights_sha)

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
    gallery = None
    if test.images is not None:
        gallery = render_gallery(variant=variant, images=test.images, ids=list(predictions["id"]), labels=labels,
                                 probs=probs_np, classes=classes, limit=ev.gallery_size, n_test=len(test))
    return Evaluation(variant=variant, metrics=metrics, blessing=blessing, calibration=calibration,
                      predictions=predictions, per_class=per_class,
                      figures=compare_figures(variant, metrics, meta.get("training")),
                      compared=compared, last_blessed=last_blessed, gallery=gallery, slices=sliced, robustness=rob,
                      explained=explained)


def _robustness_checks(found: Optional[dict[str, Any]], ev) -> list:
    from pipeline.evaluation import robustness

    return robustness.check(found, ev) if ev.min_corruption_accuracy is not None else []


def membership_audit(net, meta: dict, ds, limit: int) -> MembershipAudit:
    """The loss-threshold attack: train rows (members) against val + test rows, at most
    ``limit`` of each (seeded sample), scored on the plain network's logits."""
    from pipeline.evaluation import membership as M

    head = meta["model"].get("head", "softmax")
    losses = {}
    for side, splits in (("members", ("train",)), ("nonmembers", ("val", "test"))):
        # The sample's row numbers first, then one take: only the sampled rows' pixels are read.
        rows = np.flatnonzero(ds.manifest["split"].isin(splits).to_numpy())
        part = ds.take(rows[M.sample_rows(len(rows), limit)])
        logits = predict_logits(net, ModelInputs(part)) if len(part) else np.zeros((0, 1))
        losses[side] = M.per_row_loss(logits, part.manifest["label"].to_numpy(), head)
    result = M.audit(losses["members"], losses["nonmembers"])
    result.pop("attack")
    return MembershipAudit(**result)


def summary_line(metrics: Metrics, blessing: Blessing, compared: dict | None = None) -> str:
    """The runner's one line for evaluate: the scores and the verdict."""
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
    sliced = slices.summary(metrics.slices)
    if sliced:
        head += f"; {sliced}"
    rob = metrics.robustness
    if rob is not None and rob.mean_accuracy is not None:
        head += (f"; under corruptions {rob.mean_accuracy:.4f} mean (clean {rob.clean_accuracy:.4f}, "
                 f"worst {rob.worst_corruption} {rob.worst_corruption_accuracy:.4f})")
    refusals = [slices.describe_failure(f) for f in ((compared or {}).get("slices") or {}).get("failures", [])]
    if blessing.blessed and not refusals:
        verdict = "BLESSED"
    elif blessing.blessed:
        verdict = "BLESSED, but package will refuse it against the last blessed package: " + "; ".join(refusals)
    else:
        verdict = "NOT BLESSED: " + ", ".join(blessing.failed()) + "; package will refuse it"
    change = ((compared or {}).get("changes") or {}).get("accuracy")
    if change is not None:
        verdict += f" (accuracy {change:+.4f} vs last package)"
    return f"{head} -> {verdict}"
