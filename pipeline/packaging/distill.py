"""Distillation: a smaller student network trained from a trained teacher's softened outputs.

Declared in ``params.yaml`` under ``distill`` (``pipeline.config.StudentSpec``), one entry per
student, e.g. ``digits-small: {teacher: digits, model: {name: cnn_small, options: {width: 8}}}``;
dvc.yaml's ``distill`` stage runs once per entry with the teacher's trained model and data as
dependencies, so a retrained teacher re-distils its students.

What :func:`distill` does:

1. the teacher's logits for every train row, once, on the plain rows (no augmentation, no TTA):
   "offline" distillation. The student's batches are augmented (flip, shift) as the recipe
   says while their targets stay the teacher's logits of the original image: the same class
   evidence a few pixels off, for one teacher pass in all instead of one per step (on
   CIFAR-10 a teacher forward per step would add about a third of the teacher's training);
2. the student trained with ``weight * T^2 * KL + (1 - weight) * cross-entropy``
   (``pipeline.training.module.distillation_loss``), the teacher's recipe unless the student
   changes it;
3. the same student trained without the teacher (plain cross-entropy, same seed, same recipe):
   the baseline the distilled student must beat to have been worth a teacher;
4. all three scored on the teacher's test split exactly as evaluate scores a model (each with
   its own TTA views, no temperature scaling), and the student exported to ONNX and checked
   against torch with onnxruntime.

Throughput and latency of the three (and of the teacher's INT8 model) vary with the machine:
``bench/distill.py`` measures them; nothing here is timed.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import FmpipeError
from pipeline.filenames import ONNX_MODEL
from pipeline.io import atomic_write_json

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.config import StudentSpec, VariantSpec
    from pipeline.manifest import Dataset

COMPARISON = "comparison.json"
FIGURES = "figures.json"
BASELINE = "baseline"  # the student trained without the teacher: its model.safetensors + model.json
CHECK_ROWS = 256  # test rows the ONNX export is checked on


def teacher_logits(net, ds: "Dataset", split: str = "train") -> np.ndarray:
    """The teacher's raw logits for one split's rows, in the split's row order (float32)."""
    from pipeline.inference.network import ModelInputs, predict_logits
    from pipeline.training.data import split_rows

    rows = split_rows(ds, split)
    return predict_logits(net, ModelInputs(ds.take(rows))).astype(np.float32)


def score(net, meta: dict[str, Any], ds: "Dataset", train_spec) -> dict[str, Any]:
    """A model's test-split figures, as evaluate computes them (its TTA, temperature 1)."""
    from pipeline.evaluation.calibration import expected_calibration_error
    from pipeline.evaluation.metrics import score as metric_scores
    from pipeline.inference.network import ModelInputs, predict_logits
    from pipeline.inference.tta import effective_tta, probabilities
    from pipeline.training.data import split_rows

    test = ds.take(split_rows(ds, "test"))
    if len(test) == 0:
        raise FmpipeError("distill: the teacher's test split is empty: nothing to compare the models on")
    tta = effective_tta(meta, train_spec)
    probs = probabilities(predict_logits(net, ModelInputs(test), tta), 1.0, tta)
    labels = test.manifest["label"].to_numpy(dtype=np.int64)
    scores = metric_scores(probs, labels, list(ds.classes))
    parameters = sum(p.numel() for p in net.parameters())
    buffers = sum(b.numel() * b.element_size() for b in net.buffers())
    return {"accuracy": round(scores["accuracy"], 6), "macro_f1": round(scores["macro_f1"], 6),
            "ece": round(expected_calibration_error(probs, labels), 6), "test_rows": int(len(labels)),
            "parameters": int(parameters),
            "float32_mb": round((parameters * 4 + buffers) / 2**20, 4),
            "training_gflop": meta.get("training", {}).get("gflop")}


def distill(*, name: str, student: "StudentSpec", spec: "VariantSpec", teacher_spec: "VariantSpec",
            teacher_dir: Path, ds: "Dataset", out: Path, scratch: Path) -> dict[str, Any]:
    """Train ``name`` (and its teacher-less baseline) and write the student, the baseline and
    the comparison into ``out``. ``scratch`` holds the trainings' checkpoints (not an output)."""
    teacher_name = student.teacher
    from pipeline.inference.network import check_compatible, model_inputs
    from pipeline.models import load_trained, save_trained
    from pipeline.packaging.onnx_export import export_onnx, verify_onnx
    from pipeline.training.data import split_rows
    from pipeline.training.fit import fit

    teacher, teacher_meta = load_trained(teacher_dir)
    check_compatible(teacher_meta, ds, teacher_dir, "the teacher's data")
    if teacher_meta["model"].get("head", "softmax") != "softmax" or student.model.head != "softmax":
        raise FmpipeError(f"distill.{name}: distillation needs softmax heads (one logit per class) in "
                          f"teacher {teacher_name!r} and student")
    logits = teacher_logits(teacher, ds)
    runs = {}
    for run, distilled in (("student", (student.temperature, student.weight)), (BASELINE, None)):
        summary = fit(ds, spec, scratch / run, state_dir=scratch / f"{run}-state", variant=name,
                      teacher_logits=logits if distilled else None, distill=distilled)
        runs[run] = summary
    student_net, student_meta = load_trained(scratch / "student")
    student_meta["distilled_from"] = {"teacher": teacher_name, "temperature": student.temperature,
                                      "weight": student.weight}
    save_trained(student_net, student_meta, out)
    baseline_net, baseline_meta = load_trained(scratch / BASELINE)
    (out / BASELINE).mkdir()
    for f in ("model.safetensors", "model.json"):
        shutil.copy2(scratch / BASELINE / f, out / BASELINE / f)

    test = ds.take(split_rows(ds, "test")[:CHECK_ROWS])
    sample = model_inputs(test)
    onnx_model = export_onnx(student_net, sample[:2], spec.package.onnx_opset,
                             {"fmpipe_variant": name, "teacher": teacher_name})
    onnx_check = verify_onnx(onnx_model, student_net, sample, atol=spec.package.onnx_atol)
    (out / ONNX_MODEL).write_bytes(onnx_model)

    figures = {"teacher": score(teacher, teacher_meta, ds, teacher_spec.train),
               "student": score(student_net, student_meta, ds, spec.train),
               "baseline": score(baseline_net, baseline_meta, ds, spec.train)}
    comparison = {
        "student": name, "teacher": teacher_name,
        "temperature": student.temperature, "weight": student.weight,
        "models": figures,
        "student_vs_teacher": {"accuracy": round(figures["student"]["accuracy"] - figures["teacher"]["accuracy"], 6),
                               "parameters": round(figures["student"]["parameters"] / figures["teacher"]["parameters"], 4)},
        "student_vs_baseline": {"accuracy": round(figures["student"]["accuracy"] - figures["baseline"]["accuracy"], 6)},
        "onnx": {"opset": spec.package.onnx_opset, "max_abs_diff": onnx_check["max_abs_diff"],
                 "rows_checked": onnx_check["n_checked"]},
        "epochs": {run: s.get("epochs") for run, s in runs.items()},
    }
    atomic_write_json(out / COMPARISON, comparison)
    # The DVC metric, keyed by the student like evaluate's figures are by variant.
    atomic_write_json(out / FIGURES, {name: {
        "accuracy": figures["student"]["accuracy"], "teacher_accuracy": figures["teacher"]["accuracy"],
        "baseline_accuracy": figures["baseline"]["accuracy"], "parameters": figures["student"]["parameters"]}})
    return comparison


def summary_line(c: dict[str, Any]) -> str:
    m = c["models"]
    return (f"student {m['student']['accuracy']:.4f} ({m['student']['parameters']:,} parameters) vs teacher "
            f"{c['teacher']} {m['teacher']['accuracy']:.4f} ({m['teacher']['parameters']:,}) vs the student "
            f"without the teacher {m['baseline']['accuracy']:.4f}")
