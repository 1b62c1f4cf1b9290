"""Step 5: package the blessed model (data/<variant>/package/).

Refuses unless ``data/<variant>/evaluate/blessing.json`` blesses the very weights now in
``data/<variant>/train/`` (same sha256). Writes, in one atomic directory, so a refused or
failed run leaves the previous package untouched:

- ``model.safetensors`` + ``model.json``: the trained model, byte-for-byte;
- ``model.onnx``: the network with a dynamic batch dimension, verified with onnxruntime
  against torch on up to 256 real test inputs (``package.onnx_atol``, identical argmax);
- ``MODEL_CARD.md``: architecture, intended use, data, evaluation, input format, how to run
  it, limitations, lineage summary;
- ``preprocess.json`` + ``checks/``: the machine-readable input/output contract (shape,
  channels, value range, resize rule, classes, fitted temperature, TTA views, output kind) and
  a few check inputs with PyTorch's logits, for ``fmpipe predict/serve/verify`` (no torch);
- ``lineage.json``: upstream ``dvc.lock`` entries, the variant's params, metrics, blessing,
  the ONNX check and the sha256 + size of every other packaged file. The git commit of this
  run goes to the uncached run record (see pipeline/packaging/lineage.py).

The ``dist`` step then archives it and lays out a Triton / KServe model repository.
"""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd

from pipeline import steps as registry
from pipeline.artefacts import Blessing, FileDigest, Metrics
from pipeline.errors import FmpipeError
from pipeline.io import sha256_file
from pipeline.manifest import SPLITS, read_report
from pipeline.models import MODEL_META, WEIGHTS, load_trained
from pipeline.packaging import CALIBRATION, LINEAGE, MODEL_CARD, ONNX_MODEL, PER_CLASS, deploy
from pipeline.packaging.evaluation import check_compatible, effective_tta, model_inputs, read_json
from pipeline.packaging.lineage import build_lineage, dvc_lock_entries, file_digests, git_info, lock_matches_file
from pipeline.packaging.model_card import render_model_card
from pipeline.packaging.onnx_export import export_onnx, verify_onnx
from pipeline.packaging.quantize import INT8_MODEL, INT8_REPORT

MAX_CHECK_INPUTS = 256


def run(ctx) -> None:
    spec, variant = ctx.spec, ctx.variant
    blessing_path, metrics_path = ctx.input("evaluate/blessing.json"), ctx.input("evaluate/metrics.json")
    model_dir, data_dir = ctx.input("train/model.json").parent, ctx.input("annotate")

    rerun = f"run `fmpipe evaluate --stage {variant}` first"
    blessing = Blessing.read(blessing_path, rerun)
    if not blessing.blessed:
        failed = ", ".join(blessing.failed()) or "no failed check recorded"
        raise FmpipeError(f"{blessing_path}: model is not blessed (failed: {failed}); "
                          f"refusing to package it, previous package left as it was")
    if not (model_dir / WEIGHTS).exists():
        raise FmpipeError(f"{model_dir / WEIGHTS}: not found; run `fmpipe train --stage {variant}` first")
    weights_sha = sha256_file(model_dir / WEIGHTS)
    if weights_sha != blessing.model.sha256:
        raise FmpipeError(f"{model_dir / WEIGHTS}: differs from the weights evaluate blessed "
                          f"({blessing_path}); run `fmpipe evaluate --stage {variant}` again")
    metrics = Metrics.read(metrics_path, rerun)
    calibration = read_json(ctx.input("evaluate/details") / CALIBRATION, rerun)
    per_class = pd.read_csv(metrics_path.parent / PER_CLASS, dtype={"class": str},
                            keep_default_na=False).to_dict("records")

    net, meta = load_trained(model_dir)
    ds = ctx.dataset("annotate")
    test = ds.split("test")
    check_compatible(meta, test, model_dir, data_dir)
    if len(test) == 0:
        raise FmpipeError(f"{data_dir}: the test split is empty; no inputs to check the ONNX export on")
    inputs = model_inputs(test.take(np.arange(min(len(test), MAX_CHECK_INPUTS))))

    lineage = build_lineage(
        variant=variant, meta=meta, n_params=sum(p.numel() for p in net.parameters()),
        weights_sha=weights_sha,
        dvc_lock=dvc_lock_entries(variant, registry.upstream_of("package")),
        params=spec.model_dump(mode="json", by_alias=True), data_dir=str(data_dir),
        rows_by_split={s: int((ds.manifest["split"] == s).sum()) for s in SPLITS},
        rows_by_class={c: int((ds.manifest["label"] == i).sum()) for i, c in enumerate(ds.classes)},
        classes=list(ds.classes), metrics=metrics, blessing=blessing,
    )

    if lineage.dvc_lock["available"]:
        # False after a plain `fmpipe` run that changed the model since the last `dvc repro`.
        lineage.dvc_lock["matches_model"] = lock_matches_file(
            lineage.dvc_lock, f"train@{variant}", model_dir / WEIGHTS)

    out = ctx.out
    shutil.copyfile(model_dir / WEIGHTS, out / WEIGHTS)
    shutil.copyfile(model_dir / MODEL_META, out / MODEL_META)
    onnx_model = export_onnx(net, inputs[:2], spec.package.onnx_opset, metadata={
        "fmpipe.variant": variant,
        "fmpipe.model": meta["model"],
        "fmpipe.input": meta["input"],
        "fmpipe.classes": meta["classes"],
        "fmpipe.weights_sha256": weights_sha,
    })
    (out / ONNX_MODEL).write_bytes(onnx_model)
    # Fails (and the runner discards the output) unless onnxruntime reproduces torch within
    # package.onnx_atol.
    lineage.onnx = {"opset": spec.package.onnx_opset, **verify_onnx(onnx_model, net, inputs, spec.package.onnx_atol)}
    import torch

    with torch.inference_mode():
        check_logits = net.eval()(inputs[:deploy.N_CHECKS]).float().numpy()
    pre = deploy.build_preprocess_spec(
        variant=variant, meta=meta, n_outputs=int(check_logits.shape[1]),
        temperature=float(calibration.get("temperature", 1.0)), tta=effective_tta(meta, spec.train),
        atol=spec.package.onnx_atol, high_bit_depth=getattr(spec.source, "high_bit_depth", "scale"),
        feature_names=list(ds.features.columns) if ds.features is not None else None)
    check_files = deploy.write_checks(out, inputs[:deploy.N_CHECKS].numpy(), check_logits)
    int8 = None
    if spec.package.int8 is not None:
        int8, int8_files = _int8(ctx, onnx_model, pre, ds, test, inputs[:deploy.N_CHECKS].numpy())
        check_files += int8_files
    (out / deploy.PREPROCESS).write_text(deploy.spec_json(pre))
    card = render_model_card(
        variant=variant, description=spec.description, meta=meta,
        n_params=lineage.model.n_params, source=lineage.params["source"],
        rows_by_split=lineage.data.rows_by_split,
        feature_names=list(ds.features.columns) if ds.features is not None else None,
        annotate_report=read_report(data_dir), metrics=metrics,
        per_class=per_class, blessing=blessing, onnx_check=lineage.onnx, opset=spec.package.onnx_opset,
        lineage=lineage,
    )
    (out / MODEL_CARD).write_text(card)
    digests = file_digests(out, [WEIGHTS, MODEL_META, ONNX_MODEL, MODEL_CARD, deploy.PREPROCESS, *check_files])
    lineage.files = {name: FileDigest(**d) for name, d in digests.items()}
    lineage.write(out / LINEAGE)
    ctx.result = lineage.model_dump(mode="json", exclude_none=True)

    # The commit HEAD names now is the previous one (the commit recording this package does not
    # exist yet) and varies: it goes to the uncached run record; lineage.json holds dvc.lock hashes.
    git = git_info()
    ctx.details["git"] = git
    ctx.summary = (f"packaged {meta['model']['name']} (accuracy {metrics.accuracy:.4f}); ONNX max |diff| "
                   f"{lineage.onnx['max_abs_diff']:.3g} on {lineage.onnx['n_checked']} test inputs; "
                   f"git {git.get('commit', 'n/a')[:12]}{' (dirty)' if git.get('dirty') else ''}; "
                   f"{_lock_note(lineage.dvc_lock, variant)}")
    if int8 is not None:
        speed = ctx.details.get("int8_speed") or {}
        ctx.summary += (f"; INT8 {'shipped' if int8.shipped else 'LEFT OUT'}: {int8.reason}, argmax agreement "
                        f"{int8.argmax_agreement:.4f}, {int8.size_int8 / 1e6:.2f} MB vs {int8.size_fp32 / 1e6:.2f} MB"
                        + (f", {speed['speedup']:.2f}x float32 throughput here at batch {speed['batch']}, "
                           f"1 thread (load {speed['loadavg_1m']:.1f})" if speed else "")
                        + ("" if int8.shipped else f" (see {ctx.final_dir / INT8_REPORT})"))


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


def _int8(ctx, onnx_model: bytes, pre: dict, ds, test, check_x: np.ndarray):
    """Quantize, score INT8 against float32 on the test split, gate; returns (report, files written).

    ``pre`` (the preprocess spec, not yet written) gains ``int8`` when the model ships.
    """
    from pipeline import inference
    from pipeline.packaging.quantize import (INT8_CHECK_ATOL, INT8_CHECK_LOGITS, gate, measure_speed,
                                             quantize_int8)

    spec, out = ctx.spec.package.int8, ctx.out
    val = ds.split("val")
    if len(val) == 0:
        raise FmpipeError(f"{ctx.input('annotate')}: the validation split is empty; INT8 calibration "
                          "needs it (or remove package.int8)")
    calib = model_inputs(val.take(np.arange(min(len(val), spec.calibration_rows)))).numpy()
    name = pre["input"]["name"]
    (out / INT8_MODEL).write_bytes(quantize_int8(onnx_model, calib, name, spec.calibration))
    pre["int8"] = {"model_file": INT8_MODEL, "min_speedup": spec.min_speedup,
                   "checks": {"logits": INT8_CHECK_LOGITS, "atol": INT8_CHECK_ATOL,
                              "note": "expected logits are the INT8 model's own on checks.input"}}
    pkg = inference.Package(root=out, spec=pre, source=str(ctx.final_dir))
    # One thread: the scores go into a hashed file and must not depend on the machine's cores.
    x = model_inputs(test).numpy()
    probs = {p: inference.Predictor(pkg, threads=1, check_digest=False, precision=p).predict_proba(x)
             for p in ("fp32", "int8")}
    report = gate(fp32_probs=probs["fp32"], int8_probs=probs["int8"], labels=test.manifest["label"].to_numpy(),
                  spec=spec, size_fp32=(out / ONNX_MODEL).stat().st_size, size_int8=(out / INT8_MODEL).stat().st_size,
                  calibration_rows=len(calib))
    # Timed here for the run record and the summary only (run-varying: never in a hashed file).
    ctx.details["int8_speed"] = measure_speed(out / ONNX_MODEL, out / INT8_MODEL, name, x)
    report.write(out / INT8_REPORT)
    if not report.shipped:
        (out / INT8_MODEL).unlink()
        pre["int8"] = None
        return report, [INT8_REPORT]
    int8_logits = inference.Predictor(pkg, threads=1, check_digest=False, precision="int8").logits(check_x)
    with open(out / INT8_CHECK_LOGITS, "wb") as fh:
        np.save(fh, np.ascontiguousarray(int8_logits, dtype=np.float32), allow_pickle=False)
    return report, [INT8_REPORT, INT8_MODEL, INT8_CHECK_LOGITS]
