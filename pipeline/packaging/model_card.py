"""``MODEL_CARD.md``: what the packaged model is, how good it is, how to run it, where it came from.

Everything in the card is computed from the package's own inputs (model meta, dataset
report, evaluation, ONNX check, lineage), so it cannot drift from the files beside it.
"""

from __future__ import annotations

import json
import math
from typing import Any

from pipeline.artefacts import Blessing, DatasetReport, Lineage, Metrics


def render_model_card(*, variant: str, description: str, meta: dict[str, Any], n_params: int,
                      source: dict[str, Any], rows_by_split: dict[str, int],
                      feature_names: list[str] | None, annotate_report: DatasetReport,
                      metrics: Metrics, per_class: list[dict[str, Any]],
                      blessing: Blessing, onnx_check: dict[str, Any], opset: int,
                      lineage: Lineage, slices_md: str = "") -> str:
    classes = list(meta["classes"])
    kind = meta["input"]["kind"]
    shape = list(meta["input"]["shape"])
    model = meta["model"]
    n_test = metrics.n_test
    acc = metrics.accuracy
    lo, hi = _wilson(acc, n_test)
    out: list[str] = []
    add = out.append

    add(f"# Model card: {variant} ({model['name']})\n")
    add(f"{description or 'A classifier trained by fmpipe.'}\n")
    add(f"Test accuracy **{acc:.4f}**, macro F1 **{metrics.macro_f1:.4f}** on {n_test} held-out "
        f"examples; {'blessed' if blessing.blessed else 'NOT blessed'} for packaging.\n")

    add("## Model\n")
    add(f"- Architecture: `{model['name']}` with options `{json.dumps(model.get('options') or {}, sort_keys=True)}` "
        f"(see `pipeline/models/`), preceded by a fixed normalisation layer holding the training "
        "split's mean/std.")
    add(f"- Parameters: {n_params:,} (the normalisation statistics are buffers and not counted).")
    if model.get("head") == "sigmoid":
        add(f"- Input: {kind}, shape {shape} per example; output: one logit, the log-odds of "
            f"`{classes[1]}` (probabilities [1 - sigmoid(logit), sigmoid(logit)]).")
    else:
        add(f"- Input: {kind}, shape {shape} per example; output: {len(classes)} logits, one per class.")
    add("- Files: `model.onnx` (opset {}, dynamic batch), `model.safetensors` + `model.json` "
        "(rebuild in PyTorch with `pipeline.models.load_trained(dir)`).\n".format(opset))

    training = meta.get("training")
    if training:
        add("## Cost of training\n")
        add(f"- {training['epochs']} epochs, {training['optimizer_steps']:,} optimizer steps, "
            f"{training['samples_seen']:,} samples seen.")
        add(f"- About {training['gflop']:,.1f} GFLOP of training compute (torch's FLOP counter on one "
            "step, times the samples; matmuls and convolutions).")
        add("- Time, CPU and memory of every step vary from run to run, so they are not in this card: "
            f"`fmpipe resources --stage {variant}` prints them.\n")

    privacy = meta.get("privacy")
    mia = metrics.membership
    if privacy or (mia is not None and mia.auc is not None):
        add("## Privacy\n")
        if privacy:
            add(f"- Trained with DP-SGD (Opacus): ({privacy['epsilon']:.3g}, {privacy['delta']:.2g})-differentially "
                f"private over the whole run ({privacy['accountant']} accountant; noise multiplier "
                f"{privacy['noise_multiplier']:.3g}, per-row gradients clipped to {privacy['max_grad_norm']:g}, "
                f"Poisson-sampled batches at rate {privacy['sample_rate']:.3g}, {privacy['steps']:,} steps). "
                "The noise comes from torch's seeded generator, not a cryptographic one.")
        else:
            add("- Trained without differential privacy.")
        if mia is not None and mia.auc is not None:
            add(f"- Membership inference (loss-threshold attack, {mia.members:,} training rows against "
                f"{mia.nonmembers:,} held-out rows): AUC {mia.auc:.3f} (0.5 = no better than a coin), "
                f"true-positive rate {mia.tpr_at_1pct_fpr:.3f} at 1% false positives.")
        add("")

    add("## Intended use\n")
    add(f"Classifying {kind} inputs drawn from the same distribution as the `{variant}` training data "
        f"into one of: {', '.join(f'`{c}`' for c in classes)}. It is a pipeline-produced baseline meant for "
        "experimentation, demos and as a reference for reproducibility; it is not validated for "
        "decisions about people or for safety-critical use.\n")

    add("## Training data\n")
    add(f"- Variant: `{variant}`; source: `{json.dumps(source, sort_keys=True)}`.")
    add("- Rows per split (after cleaning and annotation): "
        + ", ".join(f"{s} {int(n)}" for s, n in rows_by_split.items()) + ".")
    decisions = annotate_report.model_extra or {}  # annotate's own keys
    if decisions.get("decisions_applied") is not None:
        add(f"- Human review decisions applied: {decisions['decisions_applied']} "
            f"({decisions.get('relabelled', 0)} relabelled, {decisions.get('confirmed', 0)} confirmed, "
            f"{decisions.get('dropped', 0)} dropped; files under `{decisions.get('annotations_dir', 'annotations/')}`).")
    add(f"- Classes ({len(classes)}, index order = logit order): "
        + ", ".join(f"{i}=`{c}`" for i, c in enumerate(classes)) + ".\n")

    add("## Evaluation\n")
    add(f"Test split, {n_test} examples{f', test-time augmentation: {blessing.tta}' if blessing.tta else ''}.\n")
    add(f"- Accuracy: {acc:.4f} (95% Wilson interval {lo:.3f}..{hi:.3f})")
    add(f"- Macro F1: {metrics.macro_f1:.4f}\n")
    add("| class | precision | recall | F1 | support |")
    add("|---|---:|---:|---:|---:|")
    for row in per_class:
        add(f"| {row['class']} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} | {int(row['support'])} |")
    add("")
    add(f"Blessing (thresholds from `params.yaml: variants.{variant}.evaluate`): "
        f"**{'passed' if blessing.blessed else 'failed'}**.\n")
    add("| check | threshold | value | passed |")
    add("|---|---:|---:|---|")
    for c in blessing.checks:
        name = f"{c.name} ({c.slice})" if c.slice else c.name
        add(f"| {name} | {c.threshold:.4f} | {c.value:.4f} | {'yes' if c.passed else 'no'} |")
    add("")
    if slices_md:
        add(slices_md)

    add("## Input format and preprocessing\n")
    if kind == "image":
        c, h, w = shape
        add(f"A float32 tensor N x {c} x {h} x {w} (NCHW) of **raw pixel values 0..255** (uint8 pixels cast to "
            "float, no scaling). Mean/std normalisation is inside the model; do not normalise again. "
            "The ONNX graph does no resizing: `fmpipe predict`/`fmpipe serve` convert and resize any image by "
            "the rule in `preprocess.json` (colour mode, then bicubic resize).\n")
    else:
        names = feature_names or [f"feature {i}" for i in range(shape[0])]
        add(f"A float32 tensor N x {shape[0]} of **raw feature values** in this order: "
            + ", ".join(f"`{n}`" for n in names)
            + ". Standardisation is inside the model; missing values are not supported.\n")

    add("## Running it\n")
    add("Without fmpipe's training code or torch (numpy, Pillow and onnxruntime only), from this directory "
        "or its `.tar.gz` archive: `fmpipe predict <package> <images, folders or CSV files>`, "
        "`fmpipe serve <package>` (KServe V2 REST) and `fmpipe verify <package>` (file hashes and recorded "
        "outputs). `preprocess.json` holds the input contract (shape, colour mode, resize rule, feature "
        "order), the class names and the temperature those commands apply.\n")
    add("### With onnxruntime directly\n")
    add("```python")
    add("import numpy as np")
    add("import onnxruntime as ort\n")
    add('session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])')
    if kind == "image":
        add("# images: uint8 array N x H x W x C")
        add("x = images.astype(np.float32).transpose(0, 3, 1, 2)")
    else:
        add("# rows: N x F numbers, columns in the order listed above")
        add("x = np.asarray(rows, dtype=np.float32)")
    add('logits = session.run(["logits"], {"input": x})[0]')
    add(f"classes = {json.dumps(classes)}")
    if model.get("head") == "sigmoid":
        add("predicted = [classes[int(v > 0)] for v in logits[:, 0]]")
    else:
        add("predicted = [classes[i] for i in logits.argmax(axis=1)]")
    add("```\n")
    views = (meta.get("tta") or {}).get("views") or []
    if len(views) > 1:
        add(f"The reported metrics average {len(views)} test-time views of each image (`model.json` key "
            f"`tta`: flips and reflect-padded shifts with weights, combined as "
            f"{(meta.get('tta') or {}).get('combine', 'logits')}); the ONNX graph scores one view, so "
            "run it on each view and combine them to reproduce the metrics.\n")
    elif blessing.tta_flip:
        add("The reported metrics average the softmax of each image and its horizontal mirror; the ONNX "
            "graph scores one image, so run it on both and average to reproduce them.\n")
    add(f"The ONNX model was checked against PyTorch on {onnx_check['n_checked']} test inputs: max |logit "
        f"difference| {onnx_check['max_abs_diff']:.3g} (allowed {onnx_check['atol']:g}), identical argmax.\n")

    add("## Limitations\n")
    add(f"- Measured on {n_test} test examples from the same source as training; the interval above is "
        "the sampling uncertainty alone. Accuracy on data from other devices, scanners, populations or "
        "time periods (distribution shift) is unknown.")
    add(f"- Confidences: expected calibration error {metrics.ece:.4f} on the test split"
        f" (temperature {metrics.temperature:.3g}, applied by predict/serve).")
    add(f"- Only the {len(classes)} classes above exist for the model: an input of any other kind still "
        "gets one of them.")
    weakest = min(per_class, key=lambda r: r["f1"]) if per_class else None
    if weakest is not None:
        add(f"- Weakest class on the test split: `{weakest['class']}` (F1 {weakest['f1']:.3f}).")
    add("")

    add("## Lineage\n")
    # No git commit here: the commit that records this model does not exist yet when package
    # runs. The dvc.lock hashes below name code, params and data; `fmpipe audit model` finds it.
    add("- Code, params and data: the upstream `dvc.lock` hashes in `lineage.json`; "
        "`fmpipe audit model <this package>` names the commit that recorded them.")
    dvc = lineage.dvc_lock
    if dvc.get("available"):
        add(f"- Data and steps: {len(dvc.get('stages', {}))} upstream `dvc.lock` entries recorded "
            f"({', '.join(dvc.get('stages', {}))}){'; missing: ' + ', '.join(dvc['missing']) if dvc.get('missing') else ''}.")
    else:
        add(f"- Data and steps: {dvc.get('note', 'no dvc.lock')}.")
    add(f"- Weights: sha256 `{lineage.model.sha256}`.")
    add("- Full record (params, hashes, metrics, file digests): `lineage.json`.")
    return "\n".join(out) + "\n"


def _wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound near 0 and 1, unlike p +- 2se)."""
    if n <= 0:
        return 0.0, 1.0
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
