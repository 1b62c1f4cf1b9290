"""The package step: from the blessed model to ``data/<variant>/package/`` (see ``stages/package.py``).

``check_blessed`` refuses unless evaluate's blessing covers the very weights now trained;
``build_package`` writes every package file into the step's output directory and returns
what the run record and the summary line need. The runner moves that directory into place
only on success, so a refused or failed run leaves the previous package as it was.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import pandas as pd

from pipeline.artefacts import Blessing, FileDigest, Int8Report, Lineage, Metrics
from pipeline.errors import FmpipeError
from pipeline.evaluation import explain, robustness, slices
from pipeline.filenames import (CALIBRATION, DETAILS, LINEAGE, MODEL_CARD, ONNX_MODEL, PER_CLASS, PREPROCESS,
                                SLICES_CSV)
from pipeline.inference.network import check_compatible, model_inputs
from pipeline.inference.tta import effective_tta
from pipeline.io import sha256_file
from pipeline.manifest import SPLITS, read_report
from pipeline.models import MODEL_META, WEIGHTS
from pipeline.packaging import deploy
from pipeline.packaging.lineage import build_lineage, file_digests, lock_matches_file
from pipeline.packaging.model_card import render_model_card
from pipeline.packaging.onnx_export import export_onnx, verify_onnx
from pipeline.packaging.quantize import INT8_MODEL, INT8_REPORT
from pipeline.reading import loads_json, read_text
from pipeline.steps import rerun_hint

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.config import EvaluateSpec

MAX_CHECK_INPUTS = 256


@dataclass
class Evaluated:
    """What evaluate wrote about the model, read back and checked against the weights."""

    blessing: Blessing
    metrics: Metrics
    calibration: dict[str, Any]
    per_class: list[dict[str, Any]]
    weights_sha: str
    slices: pd.DataFrame  # evaluate's slices.csv (pipeline/evaluation/slices.py)
    slices_path: Path


def check_blessed(evaluate_dir: Path, model_dir: Path, variant: str) -> Evaluated:
    """evaluate's verdict on the weights in ``model_dir``, or one clear refusal."""
    blessing_path, metrics_path = evaluate_dir / "blessing.json", evaluate_dir / "metrics.json"
    rerun = rerun_hint("evaluate", variant)
    blessing = Blessing.read(blessing_path, rerun)
    if not blessing.blessed:
        failed = ", ".join(blessing.failed()) or "no failed check recorded"
        raise FmpipeError(f"{blessing_path}: model is not blessed (failed: {failed}); "
                          f"refusing to package it, previous package left as it was")
    if not (model_dir / WEIGHTS).exists():
        raise FmpipeError(f"{model_dir / WEIGHTS}: not found; {rerun_hint('train', variant)}")
    weights_sha = sha256_file(model_dir / WEIGHTS)
    if weights_sha != blessing.model.sha256:
        raise FmpipeError(f"{model_dir / WEIGHTS}: differs from the weights evaluate blessed "
                          f"({blessing_path}); {rerun_hint('evaluate', variant, then='again')}")
    metrics = Metrics.read(metrics_path, rerun)
    calibration_path = evaluate_dir / DETAILS / CALIBRATION
    if not calibration_path.is_file():
        raise FmpipeError(f"{calibration_path}: not found; {rerun}")
    calibration = loads_json(read_text(calibration_path, "evaluate's calibration record"), str(calibration_path))
    per_class = pd.read_csv(evaluate_dir / PER_CLASS, dtype={"class": str},
                            keep_default_na=False).to_dict("records")
    slices_path = evaluate_dir / SLICES_CSV
    table = slices.read_table(slices_path)
    if table is None:
        raise FmpipeError(f"{slices_path}: not found or not a slice table; {rerun}")
    return Evaluated(blessing=blessing, metrics=metrics, calibration=calibration, per_class=per_class,
                     weights_sha=weights_sha, slices=table, slices_path=slices_path)


def check_change_thresholds(evaluated: Evaluated, package_dir: Path, spec: "EvaluateSpec") -> None:
    """Refuse a model that breaks a change threshold (``evaluate.change``) against the last
    blessed model: the package in ``package_dir`` this run would replace. Only the verdict
    depends on it, never a byte of the new package."""
    changed = slices.change_against(package_dir, evaluated.slices, evaluated.metrics.accuracy,
                                    evaluated.weights_sha, spec)
    if changed and changed["failures"]:
        worst = changed["failures"]
        more = f" (and {len(worst) - 1} more)" if len(worst) > 1 else ""
        raise FmpipeError(f"{evaluated.slices_path}: the model regressed against the last blessed package "
                          f"({package_dir}): {slices.describe_failure(worst[0])}{more}; refusing to "
                          f"package it, previous package left as it was")


@dataclass
class Packaged:
    """What ``build_package`` made, for the run record and the summary line."""

    lineage: Lineage
    int8: Optional[Int8Report] = None
    details: dict[str, Any] = field(default_factory=dict)  # run-varying: the run record only


def build_package(*, variant: str, spec, net, meta: dict[str, Any], ds, evaluated: Evaluated, model_dir: Path,
                  data_dir: Path, dvc_lock: dict[str, Any], out: Path, final_dir: Path) -> Packaged:
    """Write the package files into ``out`` (``final_dir``: where the runner will move it).

    ``dvc_lock``: the upstream stages' ``dvc.lock`` entries (``lineage.dvc_lock_entries``).
    """
    check_change_thresholds(evaluated, final_dir, spec.evaluate)
    test = ds.split("test")
    check_compatible(meta, test, model_dir, data_dir)
    if len(test) == 0:
        raise FmpipeError(f"{data_dir}: the test split is empty; no inputs to check the ONNX export on")
    inputs = model_inputs(test.take(np.arange(min(len(test), MAX_CHECK_INPUTS))))
    weights_sha = evaluated.weights_sha
    feature_names = list(ds.features.columns) if ds.features is not None else None

    lineage = build_lineage(
        variant=variant, meta=meta, n_params=sum(p.numel() for p in net.parameters()),
        weights_sha=weights_sha, dvc_lock=dvc_lock,
        params=spec.model_dump(mode="json", by_alias=True), data_dir=str(data_dir),
        rows_by_split={s: int((ds.manifest["split"] == s).sum()) for s in SPLITS},
        rows_by_class={c: int((ds.manifest["label"] == i).sum()) for i, c in enumerate(ds.classes)},
        classes=list(ds.classes), metrics=evaluated.metrics, blessing=evaluated.blessing,
    )
    if lineage.dvc_lock["available"]:
        # False after a plain `fmpipe` run that changed the model since the last `dvc repro`.
        lineage.dvc_lock["matches_model"] = lock_matches_file(
            lineage.dvc_lock, f"train@{variant}", model_dir / WEIGHTS)

    shutil.copyfile(model_dir / WEIGHTS, out / WEIGHTS)
    shutil.copyfile(model_dir / MODEL_META, out / MODEL_META)
    # The slice figures travel with the model: the next package's change thresholds compare with them.
    shutil.copyfile(evaluated.slices_path, out / SLICES_CSV)
    opset, atol = spec.package.onnx_opset, spec.package.onnx_atol
    onnx_model = export_onnx(net, inputs[:2], opset, metadata={
        "fmpipe.variant": variant,
        "fmpipe.model": meta["model"],
        "fmpipe.input": meta["input"],
        "fmpipe.classes": meta["classes"],
        "fmpipe.weights_sha256": weights_sha,
    })
    (out / ONNX_MODEL).write_bytes(onnx_model)
    # Fails (and the runner discards the output) unless onnxruntime reproduces torch within atol.
    lineage.onnx = {"opset": opset, **verify_onnx(onnx_model, net, inputs, atol)}
    import torch

    check_x = inputs[:deploy.N_CHECKS]
    with torch.inference_mode():
        check_logits = net.eval()(check_x).float().numpy()
    pre = deploy.build_preprocess_spec(
        variant=variant, meta=meta, n_outputs=int(check_logits.shape[1]),
        temperature=float(evaluated.calibration.get("temperature", 1.0)), tta=effective_tta(meta, spec.train),
        atol=atol, high_bit_depth=getattr(spec.source, "high_bit_depth", "scale"), feature_names=feature_names)
    check_files = deploy.write_checks(out, check_x.numpy(), check_logits)
    packaged = Packaged(lineage=lineage)
    if spec.package.int8 is not None:
        packaged.int8, int8_files = _int8(spec.package.int8, onnx_model, pre, ds, test, check_x.numpy(),
                                          out, final_dir, data_dir, packaged.details)
        check_files += int8_files
    (out / PREPROCESS).write_text(deploy.spec_json(pre))
    card = render_model_card(
        variant=variant, description=spec.description, meta=meta,
        n_params=lineage.model.n_params, source=lineage.params["source"],
        rows_by_split=lineage.data.rows_by_split, feature_names=feature_names,
        annotate_report=read_report(data_dir), metrics=evaluated.metrics,
        per_class=evaluated.per_class, blessing=evaluated.blessing, onnx_check=lineage.onnx, opset=opset,
        lineage=lineage,
        slices_md=slices.card_section(evaluated.slices, evaluated.metrics.slices, spec.evaluate)
        + robustness.card_section(evaluated.metrics.robustness, spec.evaluate)
        + explain.card_section(evaluated.slices_path.parent / DETAILS),
    )
    (out / MODEL_CARD).write_text(card)
    digests = file_digests(out, [WEIGHTS, MODEL_META, ONNX_MODEL, MODEL_CARD, PREPROCESS, SLICES_CSV,
                                 *check_files])
    lineage.files = {name: FileDigest(**d) for name, d in digests.items()}
    lineage.write(out / LINEAGE)
    return packaged


def _test_proba(predictor, test) -> np.ndarray:
    """``predictor.predict_proba`` of the whole test split, read in blocks of whole
    ``max_batch`` batches (the same batches, so the same bytes, as one call over all rows):
    never the split as float32 (4x its pixels) at once."""
    from pipeline import payload as P

    if test.images is None:
        return predictor.predict_proba(model_inputs(test).numpy())
    step = predictor.max_batch * max(1, P.chunk_rows(test.images, P.CHUNK_BYTES // 4) // predictor.max_batch)
    parts = [predictor.predict_proba(model_inputs(test.take(np.arange(a, min(a + step, len(test))))).numpy())
             for a in range(0, len(test), step)]
    return np.concatenate(parts) if parts else predictor.predict_proba(model_inputs(test).numpy())


def _int8(spec, onnx_model: bytes, pre: dict, ds, test, check_x: np.ndarray, out: Path, final_dir: Path,
          data_dir: Path, details: dict[str, Any]):
    """Quantize, score INT8 against float32 on the test split, gate; returns (report, files written).

    ``pre`` (the preprocess spec, not yet written) gains ``int8`` when the model ships. Both
    models are scored by the package's own path (``runtime.Predictor``: its TTA views and
    temperature) in onnxruntime, so the accuracy drop is quantization's alone.
    """
    from pipeline.inference import runtime
    from pipeline.packaging.quantize import INT8_CHECK_ATOL, INT8_CHECK_LOGITS, gate, measure_speed, quantize_int8

    val = ds.split("val")
    if len(val) == 0:
        raise FmpipeError(f"{data_dir}: the validation split is empty; INT8 calibration "
                          "needs it (or remove package.int8)")
    calib = model_inputs(val.take(np.arange(min(len(val), spec.calibration_rows)))).numpy()
    name = pre["input"]["name"]
    (out / INT8_MODEL).write_bytes(quantize_int8(onnx_model, calib, name, spec.calibration))
    pre["int8"] = {"model_file": INT8_MODEL, "min_speedup": spec.min_speedup,
                   "checks": {"logits": INT8_CHECK_LOGITS, "atol": INT8_CHECK_ATOL,
                              "note": "expected logits are the INT8 model's own on checks.input"}}
    pkg = runtime.Package(root=out, spec=pre, source=str(final_dir))
    # One thread: the scores go into a hashed file and must not depend on the machine's cores.
    predictors = {p: runtime.Predictor(pkg, threads=1, check_digest=False, precision=p) for p in ("fp32", "int8")}
    probs = {p: _test_proba(predictor, test) for p, predictor in predictors.items()}
    report = gate(fp32_probs=probs["fp32"], int8_probs=probs["int8"], labels=test.manifest["label"].to_numpy(),
                  spec=spec, size_fp32=(out / ONNX_MODEL).stat().st_size, size_int8=(out / INT8_MODEL).stat().st_size,
                  calibration_rows=len(calib))
    # Timed here for the run record and the summary only (run-varying: never in a hashed file).
    details["int8_speed"] = measure_speed(out / ONNX_MODEL, out / INT8_MODEL, name,
                                          model_inputs(test.take(np.arange(min(len(test), 64)))).numpy())
    report.write(out / INT8_REPORT)
    if not report.shipped:
        (out / INT8_MODEL).unlink()
        pre["int8"] = None
        return report, [INT8_REPORT]
    int8_logits = predictors["int8"].logits(check_x)
    with open(out / INT8_CHECK_LOGITS, "wb") as fh:
        np.save(fh, np.ascontiguousarray(int8_logits, dtype=np.float32), allow_pickle=False)
    return report, [INT8_REPORT, INT8_MODEL, INT8_CHECK_LOGITS]


def summary_line(packaged: Packaged, meta: dict[str, Any], metrics: Metrics, git: dict[str, Any], variant: str,
                 final_dir: Path) -> str:
    """The runner's one line for package."""
    lineage, int8 = packaged.lineage, packaged.int8
    line = (f"packaged {meta['model']['name']} (accuracy {metrics.accuracy:.4f}); ONNX max |diff| "
            f"{lineage.onnx['max_abs_diff']:.3g} on {lineage.onnx['n_checked']} test inputs; "
            f"git {git.get('commit', 'n/a')[:12]}{' (dirty)' if git.get('dirty') else ''}; "
            f"{_lock_note(lineage.dvc_lock, variant)}")
    if int8 is not None:
        speed = packaged.details.get("int8_speed") or {}
        line += (f"; INT8 {'shipped' if int8.shipped else 'LEFT OUT'}: {int8.reason}, argmax agreement "
                 f"{int8.argmax_agreement:.4f}, {int8.size_int8 / 1e6:.2f} MB vs {int8.size_fp32 / 1e6:.2f} MB"
                 + (f", {speed['speedup']:.2f}x float32 throughput here at batch {speed['batch']}, "
                    f"1 thread (load {speed['loadavg_1m']:.1f})" if speed else "")
                 + ("" if int8.shipped else f" (see {final_dir / INT8_REPORT})"))
    return line


def _lock_note(lock: dict, variant: str) -> str:
    """What lineage.json could take from dvc.lock: only entries DVC wrote say anything."""
    entries = lock.get("stages") or {}
    if not lock.get("available"):
        return "no dvc.lock: lineage has no upstream hashes (run under `dvc repro`)"
    if not entries:
        return (f"dvc.lock has no entries for {variant}: lineage has no upstream hashes "
                f"(run under `dvc repro`, or `dvc commit -f` after running by hand)")
    missing = lock.get("missing") or []
    return (f"dvc.lock entries of {len(entries)} of {len(entries) + len(missing)} upstream stages recorded"
            + (f" (none yet for {', '.join(missing)})" if missing else ""))
